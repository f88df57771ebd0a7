"""The hand-bone trainer: a 2-fold x 1-epoch run gives a card the daemon loads; ``infer`` ensembles cards into the seed's CSV."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.handlers.base import Settings
from daemon.registry import load_registry
from tasks import handbone
from tasks.cards import read_card, sha256_file, verify_folds, write_card
from train.handbone import trainer as train_handbone
from train import synthetic

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "unet", "--encoder", "tu-mobilenetv3_small_050", "--encoder-depth", "3",
        "--decoder-channels", "16", "16", "8", "--size", "64", "--folds", "2", "--epochs", "1",
        "--batch-size", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    data = tmp_path_factory.mktemp("hands")
    synthetic.generate("handbone", data, n=6, size=(96, 112), seed=5)
    return data


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "handbone"
    assert train_handbone.main([str(phantoms), "--out", str(out), "--demo", "--half", *TINY]) == 0
    return out


def test_a_two_fold_run_writes_a_card_with_dice_per_class(trained):
    card = read_card(trained)
    verify_folds(trained, card)
    assert card["task"] == "handbone" and card["demo"] is True and card["labels"] == handbone.CLASSES
    assert card["input"] == handbone.default_input_spec(64, "letterbox")
    assert card["architecture"]["arch"] == "Unet" and card["architecture"]["encoder"] == "tu-mobilenetv3_small_050"
    assert [fold["file"] for fold in card["folds"]] == ["fold0.safetensors", "fold1.safetensors"]
    for fold in card["folds"]:
        assert fold["n_train"] + fold["n_val"] == 6 and fold["sha256"] == sha256_file(trained / fold["file"])
        assert set(fold["metrics"]["dice_per_class"]) == set(handbone.CLASSES)
    pooled = card["metrics"]["pooled"]
    assert pooled["n"] == 6 and 0 <= pooled["dice"] <= 1
    assert pooled["dice"] == pytest.approx(np.mean(list(pooled["dice_per_class"].values())))
    assert card["training"]["command"].startswith("python -m train.handbone")
    ranges = card["quality"]["ranges"]  # recorded from the training masks, in the model frame
    assert card["quality"]["n"] == 6 and ranges["bones_found"]["max"] >= 29 and ranges["pieces.Radius"]["min"] <= 1
    assert card["quality"]["parameters"]["min_piece_fraction"] > 0
    assert (trained / "dice_per_class.png").is_file() and (trained / "logs" / "fold0.png").is_file()
    oof = list(csv.DictReader(open(trained / "oof_predictions.csv")))
    assert len(oof) == 6 and {"item", "fold", "dice", "dice_Pisiform"} <= set(oof[0])


def test_the_folds_keep_each_patients_two_hands_together(trained):
    splits = json.loads((trained / "splits.json").read_text())
    for fold in splits:
        val_patients = {item.split("/")[1] for item in fold["val"]}
        assert not val_patients & {item.split("/")[1] for item in fold["train"]}


def test_the_daemon_registry_loads_the_trained_card(trained):
    registry = load_registry(trained.parent, Settings(device=torch.device("cpu")), tasks=["handbone"])
    assert registry.unavailable == {}
    handler = registry.handlers["handbone"]
    assert len(handler.networks) == 2 and handler.card["name"].startswith("handbone-unet-")


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_writes_a_card_the_daemon_loads(phantoms, tmp_path):
    out = tmp_path / "weights" / "handbone"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on GPU hosts
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train.handbone", str(phantoms), "--out", str(out), *TINY]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card = read_card(out)
    verify_folds(out, card)
    assert card["training"]["world_size"] == 2 and len(card["folds"]) == 2
    # Validation is sharded over the ranks and gathered: every image scored exactly once.
    assert card["metrics"]["pooled"]["n"] == 6
    assert sorted(int(row["index"]) for row in csv.DictReader(open(out / "oof_predictions.csv"))) == list(range(6))
    registry = load_registry(out.parent, Settings(device=torch.device("cpu")), tasks=["handbone"])
    assert registry.unavailable == {} and len(registry.handlers["handbone"].networks) == 2


def test_infer_ensembles_two_cards_into_the_seed_csv(trained, phantoms, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    card = read_card(other)
    card["input"] = handbone.default_input_spec(96, "resize")  # a card fed differently joins at image size
    write_card(other, {k: v for k, v in card.items() if k != "schema"})
    test_dir = tmp_path / "test"
    shutil.copytree(phantoms / "DCM" / "ID000", test_dir / "DCM" / "ID000")  # one patient, two hands
    single, both = tmp_path / "single.csv", tmp_path / "both.csv"
    assert train_handbone.main(["infer", str(test_dir), "--weights", str(trained), "--out", str(single),
                                "--device", "cpu"]) == 0
    assert train_handbone.main(["infer", str(test_dir), "--weights", str(trained), str(trained), str(other),
                                "--out", str(both), "--tta", "--device", "cpu"]) == 0
    for path in (single, both):
        rows = list(csv.reader(open(path)))
        assert rows[0] == ["image_name", "class", "rle"] and len(rows) == 1 + 2 * 29
        assert [row[1] for row in rows[1:30]] == handbone.CLASSES
        for _, _, rle in rows[1:]:
            handbone.rle_decode(rle, 96, 112)  # valid runs inside the image


def test_infer_thresholds_at_the_cards_threshold_as_the_daemon_serves(trained, phantoms, tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(trained, strict)
    card = read_card(strict)
    card["output"] = {**(card.get("output") or {}), "threshold": 1.0}   # nothing is ever above 1.0
    write_card(strict, {k: v for k, v in card.items() if k != "schema"})
    test_dir = tmp_path / "test"
    shutil.copytree(phantoms / "DCM" / "ID000", test_dir / "DCM" / "ID000")
    by_card, told = tmp_path / "by_card.csv", tmp_path / "told.csv"
    common = ["infer", str(test_dir), "--weights", str(strict), "--device", "cpu", "--out"]
    assert train_handbone.main(common + [str(by_card)]) == 0
    assert train_handbone.main(common + [str(told), "--threshold", "0"]) == 0
    assert all(row[2] == "" for row in list(csv.reader(open(by_card)))[1:])          # the card's 1.0: no bone
    assert all(row[2] != "" for row in list(csv.reader(open(told)))[1:])            # told 0: every pixel is bone
    with pytest.raises(SystemExit, match="different thresholds"):
        train_handbone.main(["infer", str(test_dir), "--weights", str(strict), str(trained), "--device", "cpu",
                             "--out", str(tmp_path / "x.csv")])


def test_an_hrnet_encoder_builds_under_unet_and_keeps_the_input_size():
    network = handbone.build_network(handbone.default_architecture("unet", "tu-hrnet_w18_small")).eval()
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 29, 64, 64)


def test_hrnet_cannot_be_dilated_so_pan_asks_for_stride_32_and_deeplabv3plus_is_refused():
    architecture = handbone.default_architecture("pan", "tu-hrnet_w18_small")
    assert architecture["options"]["encoder_output_stride"] == 32
    handbone.build_network(architecture)  # smp's default stride 16 failed here with a bare AssertionError
    with pytest.raises(ValueError, match="HRNet"):
        handbone.default_architecture("deeplabv3plus", "tu-hrnet_w18")
    with pytest.raises(ValueError, match="encoder_output_stride 32"):
        handbone.build_network({**architecture, "options": {}})
    with pytest.raises(SystemExit, match="cannot build deeplabv3plus"):
        train_handbone.architecture_from(train_handbone.parse_args(
            ["data", "--out", "out", "--arch", "deeplabv3plus", "--encoder", "tu-hrnet_w18", "--size", "256"]))
