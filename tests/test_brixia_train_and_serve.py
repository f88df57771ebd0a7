"""Brixia end to end on phantoms: the three trainer stages (2 folds x 1 epoch) give one card, and a hospital
system asks the real daemon for region scores of PNG and DICOM chest X-rays."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, Daemon
from daemon.handlers.base import Settings
from daemon.registry import load_registry
from tasks import brixia
from train.brixia import labels as brixia_labels
from tasks.bundle import select_entries
from tasks.cards import read_card, sha256_file, verify_folds
from train.brixia import trainer as train_brixia
from train import synthetic

TINY = ["--folds", "2", "--epochs", "1", "--batch-size", "8", "--seed", "0"]
SEG = ["--size", "64", "--arch", "unet", "--encoder", "tu-resnet10t", "--encoder-depth", "3",
       "--decoder-channels", "16", "8", "8"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("chests")
    synthetic.generate("brixia", data, n=16, size=(96, 96), seed=4)
    return data


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    out = runs / "weights" / "brixia"
    assert train_brixia.main(["seg", str(phantoms / "images"), str(phantoms / "masks"), "--out", str(runs / "seg"),
                              *SEG, *TINY]) == 0
    assert train_brixia.main(["stn", str(phantoms / "masks"), "--out", str(runs / "stn"), "--size", "64",
                              "--stn-size", "32", "--channels", "8", "16", *TINY]) == 0
    assert train_brixia.main(["score", str(phantoms), "--metadata", str(phantoms / "metadata_global_v2.csv"),
                              "--consensus", str(phantoms / "metadata_consensus_v1.csv"), "--seg", str(runs / "seg"),
                              "--stn", str(runs / "stn"), "--out", str(out), "--backbone", "resnet10t",
                              "--stage", "2", "--demo", "--half", *TINY]) == 0
    return out


def test_each_stage_writes_its_card_and_the_score_card_bundles_them(trained):
    runs = trained.parent.parent
    seg, stn = read_card(runs / "seg"), read_card(runs / "stn")
    assert seg["task"] == "brixia-seg" and set(seg["metrics"]["pooled"]["dice_per_structure"]) == set(brixia.STRUCTURES)
    assert stn["task"] == "brixia-stn" and 0 <= stn["metrics"]["pooled"]["box_iou"] <= 1
    assert (runs / "seg" / "dice_per_structure.png").is_file()
    card = read_card(trained)
    verify_folds(trained, card)
    assert card["task"] == "brixia" and card["demo"] is True and card["labels"] == list("ABCDEF")
    assert set(card["architecture"]) == {"seg", "stn", "score"}
    models = [(fold["model"], fold["fold"], bool(fold.get("shared"))) for fold in card["folds"]]
    assert models == [("seg", 0, True), ("seg", 1, True), ("stn", 0, True), ("stn", 1, True),
                      ("score", 0, False), ("score", 1, False)]
    for fold in card["folds"]:   # the bundled copies are byte-identical to the stage outputs
        if fold["model"] != "score":
            assert fold["sha256"] == sha256_file(runs / fold["model"] / f"fold{fold['fold']}.safetensors")
    pooled = card["metrics"]["pooled"]
    assert {"accuracy", "mae", "global_mae", "global_pearson", "global_spearman", "per_region"} <= set(pooled)
    consensus = card["metrics"]["consensus"]
    assert consensus["n"] == card["data"]["n_consensus_held_out"] >= 1 and "mae_vs_mean" in consensus
    assert (trained / "region_confusion.png").is_file() and (trained / "global_scatter.png").is_file()
    # the card records the limits its training films were aligned with; the daemon reads them back
    assert card["output"]["alignment_limits"] == brixia.DEFAULT_ALIGNMENT.record()["alignment_limits"]
    assert brixia.alignment_limits(card["output"]) == brixia.DEFAULT_ALIGNMENT


def test_consensus_images_are_held_out_and_subjects_never_split(trained, phantoms):
    rows = brixia_labels.read_metadata(phantoms / "metadata_global_v2.csv")
    held_out = {r["Filename"] for r in rows if r["consensus"]}
    subject = {r["Filename"]: r["Subject"] for r in rows}
    splits = json.loads((trained / "splits.json").read_text())
    for fold in splits:
        assert not held_out & (set(fold["train"]) | set(fold["val"]))
        assert not {subject[f] for f in fold["train"]} & {subject[f] for f in fold["val"]}
    oof = list(csv.DictReader(open(trained / "oof_predictions.csv")))
    assert len(oof) == len(rows) - len(held_out) and {"pred_A", "true_F", "p_C3", "pred_global"} <= set(oof[0])


def test_fold_choice_keeps_the_shared_segmenter_and_stn(trained):
    card = read_card(trained)
    chosen = [card["folds"][k] for k in select_entries(card, 1)]
    assert [(f["model"], f["fold"]) for f in chosen] == [("seg", 0), ("seg", 1), ("stn", 0), ("stn", 1), ("score", 1)]
    registry = load_registry(trained.parent, Settings(device=torch.device("cpu"), fold=1), tasks=["brixia"])
    assert registry.unavailable == {}
    assert registry.handlers["brixia"].bundle.folds_used() == {"seg": 2, "stn": 2, "score": 1}


@pytest.mark.slow
def test_score_stage_under_torchrun_with_two_cpu_processes(trained, phantoms, tmp_path):
    """Every rank segments and aligns the images, validation is sharded and gathered, rank 0 bundles."""
    runs = trained.parent.parent
    out = tmp_path / "weights" / "brixia"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on GPU hosts
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train.brixia", "score", str(phantoms), "--metadata", str(phantoms / "metadata_global_v2.csv"),
               "--seg", str(runs / "seg"), "--stn", str(runs / "stn"), "--out", str(out), "--backbone", "resnet10t",
               "--stage", "2", *TINY]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    card = read_card(out)
    verify_folds(out, card)
    held_out = card["data"]["n_consensus_held_out"]
    assert card["training"]["world_size"] == 2 and card["metrics"]["pooled"]["n"] == 16 - held_out
    oof = sorted(int(row["index"]) for row in csv.DictReader(open(out / "oof_predictions.csv")))
    assert oof == list(range(16 - held_out))   # each training image validated exactly once
    registry = load_registry(out.parent, Settings(device=torch.device("cpu")), tasks=["brixia"])
    assert registry.unavailable == {} and registry.handlers["brixia"].bundle.folds_used() == {"seg": 2, "stn": 2, "score": 2}


@pytest.fixture(scope="module")
def daemon(trained):
    process = Daemon(str(trained.parent), "--device", "cpu", "--tasks", "brixia")
    yield process
    process.close()


def _palette_labels(path: str) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "P"
    return np.asarray(image)


@pytest.mark.parametrize("name", ["brixia_0001.png", "brixia_0003.dcm", "brixia_0004.png"])
def test_png_16bit_png_and_dicom_chests_get_scores_and_files_at_input_size(daemon, phantoms, tmp_path, name):
    image = phantoms / "images" / name
    reply = daemon.ask({"task": "brixia", "id": name, "img_path": str(image), "destination_path": str(tmp_path)})
    if reply["result"] == "fail":   # an untrained 1-epoch segmenter may find no lungs: then it says so
        assert reply["error"]["code"] == "unreadable_image" and "lung" in reply["error"]["message"]
        return
    assert reply["task"] == "brixia" and reply["id"] == name
    assert list(reply["region_scores"]) == list("ABCDEF") and all(s in range(4) for s in reply["region_scores"].values())
    assert reply["global_score"] == sum(reply["region_scores"].values())
    for region, probabilities in reply["probabilities"].items():
        assert len(probabilities) == 4 and sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert int(np.argmax(probabilities)) == reply["region_scores"][region]
    assert reply["alignment"] in ("stn", "masks", "identity") and reply["image_size"] == [96, 96]
    labels = _palette_labels(reply["mask_img_path"])
    assert labels.shape == (96, 96) and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert np.asarray(Image.open(reply["overlay_img_path"])).shape == (96, 96, 3)
    assert sorted(reply["cam_img_paths"]) == list("ABCDEF")
    for path in reply["cam_img_paths"].values():
        assert Path(path).parent == tmp_path and np.asarray(Image.open(path)).shape == (96, 96, 3)


def test_alignment_and_cam_options_and_bad_requests(daemon, phantoms, tmp_path):
    image = str(phantoms / "images" / "brixia_0002.png")
    reply = daemon.ask({"task": "brixia", "img_path": image, "destination_path": str(tmp_path),
                        "alignment": "none", "cams": False})
    if reply["result"] == "ok":
        assert reply["alignment"] == "identity" and reply["cam_img_paths"] is None
    bad = [({"alignment": "sideways"}, "invalid_request"), ({"cams": "yes"}, "invalid_request"),
           ({"img_path": str(tmp_path / "missing.png")}, "file_not_found"), ({"colour": 1}, "invalid_request")]
    for change, code in bad:
        request = {"task": "brixia", "img_path": image, "destination_path": str(tmp_path), **change}
        reply = daemon.ask(request)
        assert reply["result"] == "fail" and reply["error"]["code"] == code, reply
    assert daemon.ask({"op": "health"})["result"] == "ok"
