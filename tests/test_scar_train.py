"""The scar trainer: a 2-fold x 1-epoch run of each model into one card the daemon serves, scalers kept
identical between training and serving, the seed's data layouts, and the phantoms they train on."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from daemon.handlers.base import Settings
from daemon.registry import load_registry
from tasks import scar
from tasks.cards import read_card, verify_folds
from train import synthetic
from train.core.folds import fold_splits
from train.phantoms.scar import FEATURES, clinical_rows, clinical_score
from train.scar.trainer import build_task, main, parse_args
from train.scar.data import load_data

TINY = ["--folds", "2", "--epochs", "1", "--batch-size", "8", "--seed", "0", "--demo"]
IMAGE = ["--width", "4", "--layers", "1", "1", "1", "1", "--input-size", "64", "64"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("phantoms")
    synthetic.generate("scar", data, n=16, size=(64, 80), seed=3)
    return data


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "scar"
    assert main(["image", str(phantoms), "--out", str(out), *IMAGE, *TINY, "--half", "--augment"]) == 0
    assert main(["clinical", str(phantoms), "--out", str(out), *TINY]) == 0  # float32: compared exactly below
    assert main(["combined", str(phantoms), "--out", str(out), "--init-from-branches", *TINY, "--half"]) == 0
    return out


def test_the_three_runs_share_one_card_with_every_models_folds_and_metrics(trained):
    card = read_card(trained)
    verify_folds(trained, card)
    assert card["demo"] is True and card["labels"] == ["0", "1", "2", "3"]
    assert [(e["model"], e["fold"]) for e in card["folds"]] == [(m, k) for m in scar.MODES for k in (0, 1)]
    assert [e["file"] for e in card["folds"]][:2] == ["image_fold0.safetensors", "image_fold1.safetensors"]
    assert card["clinical_features"]["names"] == FEATURES == card["input"]["clinical_features"]
    assert card["input"]["photo"]["size"] == [64, 64] and card["input"]["photo"]["mean"] == list(scar.SEED_MEAN)
    assert card["architecture"]["combined"]["image"] == card["architecture"]["image"]
    for model in scar.MODES:
        pooled = card["metrics"][model]
        assert pooled["n"] == 16 and {"accuracy", "top2_accuracy", "roc_auc", "sensitivity", "confusion_matrix"} <= set(pooled)
        assert set(pooled["sensitivity"]) == {"0", "1", "2", "3"} and pooled["top2_accuracy"] >= pooled["accuracy"]
        run = trained / model
        assert (run / "splits.json").is_file() and (run / "roc.png").is_file() and (run / "confusion_matrix.png").is_file()
        assert len(list(csv.DictReader(open(run / "oof_predictions.csv")))) == 16
        training = card["models"][model]["training"]
        assert training["model"] == model and training["command"].startswith("python -m train.scar")
    assert card["models"]["combined"]["training"]["initialisation"].startswith("image/clinical branches")
    ranges = card["quality"]["ranges"]  # the photo runs' colour ranges and the clinical runs' feature ranges
    assert {"saturation", "colourfulness"} <= set(ranges) and "clinical.BMI" in ranges
    splits = [json.loads((trained / m / "splits.json").read_text()) for m in scar.MODES]
    assert splits[0] == splits[1] == splits[2]  # the patient column groups, the seed fixes the folds


def test_the_daemon_serves_the_trained_card_in_all_three_modes(trained, phantoms, tmp_path):
    registry = load_registry(trained.parent, Settings(device=torch.device("cpu")))
    handler = registry.handlers["scar"]
    row = pd.read_excel(phantoms / "clinical.xlsx").iloc[0]
    photo = str(phantoms / "images" / row["img_name"])
    clinical = {name: float(row[name]) for name in FEATURES}
    for request, mode in (({"img_path": photo, "destination_path": str(tmp_path)}, "image"),
                          ({"clinical": clinical}, "clinical"),
                          ({"img_path": photo, "clinical": clinical, "destination_path": str(tmp_path)}, "combined")):
        job = handler.validate({"task": "scar", **request})
        prepared = handler.preprocess(job)
        reply = handler.reply(job, handler.postprocess(job, prepared, handler.infer([prepared])[0]))
        assert reply["result"] == "ok" and reply["mode"] == mode and sum(reply["probabilities"]) == pytest.approx(1)
        assert reply["quality"]["ok"] is True and reply["uncertainty"]["folds"] == 2, reply
        if mode != "clinical":
            with Image.open(reply["overlay_img_path"]) as overlay:
                assert overlay.size == (80, 64)


def test_the_scaler_is_fitted_on_the_training_fold_stored_and_applied_identically_when_serving(trained, phantoms):
    card = read_card(trained)
    frame = pd.read_excel(phantoms / "clinical.xlsx")
    splits = json.loads((trained / "clinical" / "splits.json").read_text())
    oof = {row["item"]: row for row in csv.DictReader(open(trained / "clinical" / "oof_predictions.csv"))}
    args = parse_args(["clinical", str(phantoms), "--out", str(trained), *TINY])
    data = load_data(phantoms, "clinical")
    task = build_task(args, data)
    for fold, split in enumerate(splits):
        entry = next(e for e in card["folds"] if e["model"] == "clinical" and e["fold"] == fold)
        train_rows = frame.set_index("img_name").loc[split["train"], FEATURES].to_numpy(float)
        assert entry["scaler"]["mean"] == pytest.approx(train_rows.mean(0).tolist(), rel=1e-12)
        spread = train_rows.std(0)  # a feature constant in the fold keeps scale 1, as StandardScaler does
        assert entry["scaler"]["scale"] == pytest.approx(np.where(spread > 0, spread, 1.0).tolist(), rel=1e-12)
        index = {item: i for i, item in enumerate(data.items)}
        train_idx = sorted(index[n] for n in split["train"])
        val_idx = sorted(index[n] for n in split["val"])
        val_set = task.fold_dataset(val_idx, False, train_idx)
        trained_rows = torch.stack([val_set[i][0] for i in range(len(val_idx))]).numpy()
        served_rows = scar.standardise(data.features[val_idx], entry["scaler"])
        assert np.array_equal(trained_rows, served_rows)
        # The daemon, serving only this fold, reproduces the trainer's out-of-fold probabilities.
        handler = load_registry(trained.parent, Settings(device=torch.device("cpu"), fold=fold)).handlers["scar"]
        for name in split["val"][:3]:
            values = frame.set_index("img_name").loc[name, FEATURES].to_dict()
            prepared = handler.preprocess(handler.validate({"task": "scar", "clinical": values}))
            served = handler.infer([prepared])[0].probabilities
            assert served == pytest.approx([float(oof[name][f"p_{c}"]) for c in scar.LABELS], abs=1e-5)


def test_precise_bn_calibrates_on_training_rows_scaled_by_the_training_rows_scaler(phantoms, tmp_path, monkeypatch):
    # The calibration set once fitted its scaler on the validation rows (it is built unaugmented,
    # and "unaugmented" used to mean "validation"): validation data leaked into BatchNorm's statistics.
    import train.core.loop

    calibrated = []
    recalibrate = train.core.loop.recalibrate_batch_norm
    monkeypatch.setattr(train.core.loop, "recalibrate_batch_norm",
                        lambda model, dataset, *a, **k: (calibrated.append(dataset), recalibrate(model, dataset, *a, **k)))
    assert main(["clinical", str(phantoms), "--out", str(tmp_path / "scar"), *TINY, "--precise-bn", "2"]) == 0
    features = load_data(phantoms, "clinical").features
    assert len(calibrated) == 2  # one validation per fold
    for dataset in calibrated:
        training_rows_scaler = scar.fit_scaler(features[dataset.indices])
        assert np.array_equal(dataset.clinical, scar.standardise(features, training_rows_scaler))
        assert not dataset.train   # never augmented


def test_a_csv_table_with_photos_elsewhere_and_the_seeds_class_folders_are_read(phantoms, tmp_path):
    frame = pd.read_excel(phantoms / "clinical.xlsx").drop(columns=["patient"])
    frame.to_csv(tmp_path / "table.csv", index=False)
    data = load_data(tmp_path / "table.csv", "combined", images=phantoms / "images")
    assert data.feature_names == FEATURES and data.groups is None and len(data.items) == 16
    for split in ("train", "val", "test"):
        for severity in "0123":
            (tmp_path / "image" / split / severity).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / "image" / split / severity / f"{split}{severity}.jpg")
    folders = load_data(tmp_path / "image", "image")
    assert len(folders.items) == 8 and folders.targets == [0, 1, 2, 3] * 2  # train + val pooled, test held out
    with pytest.raises(SystemExit, match="needs a table"):
        load_data(tmp_path / "image", "clinical")


@pytest.mark.parametrize("change, message", [
    (lambda f: f.assign(BMI=["high"] * len(f)), "not numeric: BMI"),
    (lambda f: f.assign(age=[np.nan] + list(f["age"][1:])), "missing or infinite values"),
    (lambda f: f.assign(Cls=[5] + list(f["Cls"][1:])), "severities 0, 1, 2 or 3"),
    (lambda f: f.assign(img_name=["nope.jpg"] + list(f["img_name"][1:])), "not in"),
])
def test_a_table_the_model_cannot_use_is_refused_with_what_to_fix(phantoms, tmp_path, change, message):
    change(pd.read_excel(phantoms / "clinical.xlsx")).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit, match=message):
        load_data(tmp_path / "t.csv", "combined", images=phantoms / "images")


def test_a_patient_column_keeps_each_patients_photos_in_one_fold(phantoms, tmp_path):
    frame = pd.read_excel(phantoms / "clinical.xlsx")
    frame["patient"] = [f"p{i // 2}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "t.csv", index=False)
    data = load_data(tmp_path / "t.csv", "clinical")
    assert "patient" not in data.feature_names
    for train, val in fold_splits(data.targets, 2, seed=0, groups=data.groups):
        assert not {data.groups[i] for i in train} & {data.groups[i] for i in val}


def test_phantoms_carry_severity_in_the_photo_and_independently_in_the_table(phantoms):
    frame = pd.read_excel(phantoms / "clinical.xlsx")
    assert list(frame.columns) == ["img_name", "Cls", "patient", *FEATURES]
    note = json.loads((phantoms / "synthetic.json").read_text())
    assert "not clinical" in note["description"]
    with Image.open(phantoms / "images" / frame["img_name"][0]) as photo:
        assert photo.size == (80, 64) and photo.mode == "RGB"
    rows = clinical_rows(4000, np.random.default_rng(0))
    score = clinical_score(rows)
    assert np.corrcoef(score, rows["keloid_history"])[0, 1] > 0.2 and np.corrcoef(score, rows["age"])[0, 1] < -0.2
    assert abs(np.corrcoef(score, rows["drain"])[0, 1]) < 0.05  # a feature without effect
