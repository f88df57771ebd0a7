"""The osteo trainer and the shared k-fold framework: folds, metrics, cards, resume and DDP on CPU."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import osteo
from tasks.cards import read_card, sha256_file, verify_folds
from tasks.weights import load_state_dict
from train.osteo import trainer as train_osteo
from train import synthetic
from train.core.loop import _selection_key
from train.core.folds import fold_splits, load_or_write_splits, read_groups
from train.core.metrics import classification_metrics, json_safe, roc_auc

REPO = Path(__file__).resolve().parents[1]
TINY = ["--width-coefficient", "0.1", "--depth-coefficient", "0.1", "--input-size", "64", "128",
        "--folds", "2", "--epochs", "1", "--batch-size", "4", "--precise-bn", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    data = tmp_path_factory.mktemp("phantoms")
    synthetic.generate("osteo", data, n=8, size=(112, 238), seed=5)
    return data


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "osteo"
    assert train_osteo.main([str(phantoms), "--out", str(out), "--demo", "--half", *TINY]) == 0
    return out


def test_a_two_fold_run_writes_a_card_the_daemon_can_load(trained):
    card = read_card(trained)
    verify_folds(trained, card)
    assert card["task"] == "osteo" and card["demo"] is True and card["labels"] == ["C1", "C3"]
    assert card["input"] == osteo.default_input_spec((64, 128))
    assert [fold["file"] for fold in card["folds"]] == ["fold0.safetensors", "fold1.safetensors"]
    for fold in card["folds"]:
        assert fold["n_train"] + fold["n_val"] == 8 and fold["best_epoch"] == 1
        assert fold["sha256"] == sha256_file(trained / fold["file"])
        network = osteo.build_network(card["architecture"])
        network.load_state_dict(load_state_dict(trained / fold["file"]), strict=True)
    pooled = card["metrics"]["pooled"]
    assert pooled["n"] == 8 and {"accuracy", "roc_auc", "sensitivity", "specificity", "confusion_matrix"} <= set(pooled)
    assert card["data"]["class_counts"] == {"C1": 4, "C3": 4} and "phantoms" in card["data"]["source"]
    assert card["quality"]["n"] == 8 and set(card["quality"]["ranges"]) == {"aspect", "mean", "contrast", "symmetry"}
    training = card["training"]
    assert training["world_size"] == 1 and training["half"] is True and training["seed"] == 0
    assert training["torch"] == torch.__version__ and training["command"].startswith("python -m train.osteo")


def test_a_run_leaves_splits_logs_plots_and_out_of_fold_predictions(trained):
    splits = json.loads((trained / "splits.json").read_text())
    assert len(splits) == 2 and sorted(sum((fold["val"] for fold in splits), [])) == sorted(
        sum((fold["train"] for fold in splits), []))
    for k in range(2):
        rows = list(csv.DictReader(open(trained / "logs" / f"fold{k}.csv")))
        assert [row["epoch"] for row in rows] == ["1"] and {"lr", "train_loss", "val_loss", "roc_auc"} <= set(rows[0])
        assert (trained / "logs" / f"fold{k}.png").stat().st_size > 0
    oof = list(csv.DictReader(open(trained / "oof_predictions.csv")))
    assert len(oof) == 8 and {"item", "fold", "target", "p_C1", "p_C3"} <= set(oof[0])
    assert (trained / "confusion_matrix.png").is_file() and (trained / "roc.png").is_file()


def test_resume_reuses_the_splits_and_retrains_only_unfinished_folds(phantoms, trained):
    splits_before = (trained / "splits.json").read_text()
    fold0_before = sha256_file(trained / "fold0.safetensors")
    (trained / "logs" / "fold1.done.json").unlink()  # as if the run died during fold 1
    # A different seed would split differently: resume must keep the saved folds anyway.
    args = [str(phantoms), "--out", str(trained), "--demo", "--half", "--resume", *TINY[:-1], "7"]
    assert train_osteo.main(args) == 0
    assert (trained / "splits.json").read_text() == splits_before
    assert sha256_file(trained / "fold0.safetensors") == fold0_before
    card = read_card(trained)
    verify_folds(trained, card)
    assert (trained / "logs" / "fold1.done.json").is_file() and card["metrics"]["pooled"]["n"] == 8


def test_grouped_folds_never_split_a_patient(phantoms):
    items, labels, _ = train_osteo.find_images(phantoms)
    groups = read_groups(phantoms / "groups.csv", items)
    assert len(set(groups)) == 4
    patients = [f"p{i // 3}" for i in range(30)]
    strata = [(i // 3) % 2 for i in range(30)]
    for train_idx, val_idx in fold_splits(strata, 5, seed=1, groups=patients):
        assert not {patients[i] for i in train_idx} & {patients[i] for i in val_idx}
        assert set(train_idx) | set(val_idx) == set(range(30))


def test_splits_are_stratified_seeded_and_checked_on_reuse(tmp_path):
    items, strata = [f"C1/{i}.png" for i in range(6)] + [f"C3/{i}.png" for i in range(6)], [0] * 6 + [1] * 6
    first = load_or_write_splits(tmp_path, items, strata, 3, seed=0)
    assert first == fold_splits(strata, 3, seed=0)
    for _, val in first:
        assert sorted(strata[i] for i in val) == [0, 0, 1, 1]
    assert load_or_write_splits(tmp_path, items, strata, 3, seed=99, reuse=True) == first
    with pytest.raises(ValueError, match="other data or another fold count"):
        load_or_write_splits(tmp_path, items, strata, 4, seed=0, reuse=True)
    with pytest.raises(ValueError, match="lower --folds"):
        fold_splits([0, 1], 3, seed=0)


def test_auc_comes_from_probabilities_not_hard_labels():
    targets = [0, 0, 1, 1]
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    metrics = classification_metrics(targets, probabilities, ["C1", "C3"])
    assert metrics["roc_auc"] == pytest.approx(0.75)  # hard labels would give 0.75 too; check a rank swap:
    assert roc_auc(targets, [0.1, 0.2, 0.3, 0.4]) == 1.0 and roc_auc(targets, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics["confusion_matrix"] == [[2, 0], [1, 1]]
    assert metrics["sensitivity"] == 0.5 and metrics["specificity"] == 1.0 and metrics["accuracy"] == 0.75


def test_undefined_metrics_are_nan_in_memory_and_null_in_cards():
    metrics = classification_metrics([1, 1], np.array([[0.3, 0.7], [0.6, 0.4]]), ["C1", "C3"])
    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["specificity"]) and metrics["sensitivity"] == 0.5
    assert json_safe(metrics)["roc_auc"] is None
    # Best-epoch choice: a NaN score loses to any number; equal scores go to the lower validation loss.
    assert _selection_key(float("nan"), 0.1) < _selection_key(0.5, 9.0)
    assert _selection_key(0.8, 0.3) > _selection_key(0.8, 0.4)


def test_a_c2c3_folder_selects_the_seeds_c1_vs_c2c3_labels(tmp_path):
    for label in ("C1", "C2C3"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "x.png").write_bytes(b"")
    assert train_osteo.find_images(tmp_path)[2] == ["C1", "C2C3"]
    (tmp_path / "C3").mkdir()
    with pytest.raises(SystemExit, match="C1/ and C3/"):
        train_osteo.find_images(tmp_path)


def test_class_folders_take_extensionless_dicoms_and_skip_what_is_not_an_image(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dicom_factory import phantom, write_dicom

    for label in ("C1", "C3"):
        (tmp_path / label).mkdir()
        write_dicom(tmp_path / label / "IM0001", phantom(bits=12))
        (tmp_path / label / "export.log").write_text("sent by the PACS\n")
    items, targets, labels = train_osteo.find_images(tmp_path)
    assert items == ["C1/IM0001", "C3/IM0001"] and targets == [0, 1] and labels == ["C1", "C3"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_osteo.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--arch", "--width-coefficient", "--depth-coefficient", "--folds", "--epochs",
                 "--batch-size", "--lr", "--groups", "--amp", "--resume", "--seed", "--workers", "--half",
                 "--demo", "--input-size", "--cache", "--precise-bn"):
        assert flag in text


def test_torchrun_with_two_cpu_processes_trains_with_gloo_and_exits_cleanly(phantoms, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on GPU hosts
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train.osteo", str(phantoms), "--out", str(out), "--amp", *TINY]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--amp needs CUDA" in result.stderr
    card = read_card(out)
    verify_folds(out, card)
    assert card["training"]["world_size"] == 2 and card["training"]["amp"] is False
    # Validation is sharded without padding and gathered: every image predicted exactly once.
    oof = list(csv.DictReader(open(out / "oof_predictions.csv")))
    assert sorted(int(row["index"]) for row in oof) == list(range(8))
    assert card["metrics"]["pooled"]["n"] == 8
