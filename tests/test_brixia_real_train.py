"""train.brixia on the public layouts, end to end: seg from a JSRT-style and a COVID-QU-Ex-style set in one run,
score from a Cohen-subset public-annotations.csv with the transfer pieces on, and the daemon serving the card.
The films are phantoms rewritten by the test into those layouts (tests never need ../shared)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import Daemon
from tasks import brixia
from tasks.cards import read_card, verify_folds
from tasks.imaging import read_image
from train.brixia import trainer as train_brixia
from train import synthetic

TINY = ["--folds", "2", "--epochs", "1", "--batch-size", "8", "--seed", "0"]
SEG = ["--size", "64", "--arch", "unet", "--encoder", "tu-resnet10t", "--encoder-depth", "3",
       "--decoder-channels", "16", "8", "8"]


def _png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Phantoms rewritten as a JSRT set (label maps), a COVID-QU-Ex set (one lung mask, infection masks) and
    the Cohen subset (public-annotations.csv with a senior and a junior reader)."""
    root = tmp_path_factory.mktemp("public")
    phantoms = root / "phantoms"
    synthetic.generate("brixia", phantoms, n=18, size=(96, 96), seed=5)
    rows = {row["Filename"]: row for row in csv.DictReader(open(phantoms / "metadata_global_v2.csv"), delimiter=";")}
    cohen = []
    for k, (filename, row) in enumerate(sorted(rows.items())):
        stem = filename.rsplit(".", 1)[0]
        image = next(p for p in (phantoms / "images").iterdir() if p.stem == stem)
        gray = read_image(image, color="gray")
        masks = [read_image(phantoms / "masks" / s / f"{stem}.png", color="gray") > 0 for s in brixia.STRUCTURES]
        if k < 6:                                          # JSRT: label maps 150 / 200 / 250
            label_map = np.zeros(gray.shape, np.uint8)
            for value, mask in zip((150, 200, 250), masks):
                label_map[mask] = value
            _png(root / "jsrt" / "images" / f"{stem}.png", gray)
            _png(root / "jsrt" / "masks" / f"{stem}.png", label_map)
        elif k < 12:                                       # COVID-QU-Ex: lungs in one mask, no heart
            cls = "COVID-19" if k < 10 else "Normal"
            folder = root / "covid" / "Train" / cls
            _png(folder / "images" / f"{stem}.png", gray)
            _png(folder / "lung masks" / f"{stem}.png", (masks[0] | masks[1]) * 255)
            infection = masks[0] & (np.arange(gray.shape[0])[:, None] > gray.shape[0] * 0.55) if cls == "COVID-19" \
                else np.zeros_like(masks[0])
            _png(folder / "infection masks" / f"{stem}.png", infection * 255)
        scores = [int(c) for c in str(row["BrixiaScore"]).zfill(6)]
        junior = [min(3, s + (k % 2)) for s in scores]
        _png(root / "cohen" / "public-cohen-subset" / f"{stem}.png", gray)
        cohen.append([f"{stem}.png", *scores, sum(scores), *junior, sum(junior)])
    with open(root / "cohen" / "public-annotations.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", *[f"S-{r}" for r in "ABCDEF"], "S-Global", *[f"J-{r}" for r in "ABCDEF"], "J-Global"])
        writer.writerows(cohen)
    return root


@pytest.fixture(scope="module")
def trained(layouts):
    seg = layouts / "runs" / "seg"
    assert train_brixia.main(["seg", "--jsrt", str(layouts / "jsrt"), "--covid-qu-ex", str(layouts / "covid"),
                              "--out", str(seg), *SEG, *TINY]) == 0
    orient = layouts / "runs" / "orient"
    assert train_brixia.main(["orient", "--jsrt", str(layouts / "jsrt"), "--covid-qu-ex", str(layouts / "covid"),
                              "--out", str(orient), "--size", "64", "--orient-size", "32", "--channels", "4", "8",
                              *TINY]) == 0
    out = layouts / "runs" / "weights" / "brixia"
    assert train_brixia.main(["score", str(layouts / "cohen"), "--metadata",
                              str(layouts / "cohen" / "public-annotations.csv"), "--reader", "mean",
                              "--seg", str(seg), "--orient", str(orient), "--out", str(out), "--backbone", "resnet10t",
                              "--stage", "2",
                              "--trunk-from-seg", "--trunk-lr", "0.1", "--opacity", "--shared-head",
                              "--ordinal-weight", "0.5", "--demo", "--half", *TINY]) == 0
    return out


@pytest.mark.slow
def test_seg_card_names_its_sources_labels_and_film_limits(trained):
    seg = read_card(trained.parent.parent / "seg")
    assert seg["labels"] == ["right_lung", "left_lung", "heart", "opacity"]
    sources = seg["data"]["sources"]
    assert sources["jsrt"]["labels"] == ["right_lung", "left_lung", "heart"] and sources["jsrt"]["n_images"] == 6
    assert sources["covid-qu-ex/COVID-19"]["labels"] == ["right_lung", "left_lung", "opacity"]
    assert "non-commercial" in sources["jsrt"]["note"] and "Qatar" in sources["covid-qu-ex/Normal"]["note"]
    per_source = seg["metrics"]["pooled"]["dice_per_source"]
    assert per_source["jsrt"]["heart"] is not None and per_source["jsrt"]["opacity"] is None
    assert per_source["covid-qu-ex/COVID-19"]["heart"] is None and per_source["covid-qu-ex/COVID-19"]["opacity"] is not None
    limits = seg["output"]["film_limits"]
    assert limits["measured"]["n"] == 6 and limits["min_lung_fraction"] > 0
    assert seg["input"]["intensity"]["policy"] == "center-percentile"


@pytest.mark.slow
def test_score_card_is_measured_against_the_senior_reader_with_the_junior_beside(trained):
    card = read_card(trained)
    verify_folds(trained, card)
    assert card["data"]["reader"] == "mean" and "senior" in card["data"]["reference"]
    assert "CC BY-NC-SA 4.0, so non-commercial" in card["data"]["licence"]          # the Cohen scores' terms
    assert "jsrt" in card["data"]["stages"]["seg"]["sources"] and "orient" in card["data"]["stages"]
    assert card["architecture"]["score"]["opacity"] is True and card["architecture"]["score"]["shared_head"] is True
    assert "segmenter encoder" in card["training"]["trunk"] and card["output"]["decision"] == "median"
    pooled = card["metrics"]["pooled"]
    human = pooled["second_reader"]
    assert 0 < human["mae"] <= 0.5                  # the junior adds 1 to some regions of every other film
    assert {"mae", "global_mae", "accuracy", "global_spearman"} <= set(human)
    assert {"argmax", "expected_global_mae"} <= set(pooled)
    assert card["output"]["film_limits"]["measured"]["n"] == 6
    assert [f["model"] for f in card["folds"] if f.get("shared")] == ["seg", "seg", "orient", "orient"]
    assert card["architecture"]["orient"]["poses"][:2] == ["upright", "mirrored"] and 0 < card["output"]["orient_min_upright"] <= 0.5
    orient = read_card(trained.parent.parent / "orient")
    assert {"accuracy", "upright_passed", "mirrored_refused", "per_pose"} <= set(orient["metrics"]["pooled"])
    assert orient["output"]["min_upright"] == card["output"]["orient_min_upright"]
    check = card["metrics"]["film_check"]
    assert ("quality" in card) == (check["refused"] < check["films_checked"])   # ranges from the films let through
    if "quality" in card:
        assert card["quality"]["n"] == check["films_checked"] - check["refused"]
    assert card["metrics"]["film_check"]["films_checked"] == 18
    oof = list(csv.DictReader(open(trained / "oof_predictions.csv")))
    assert len(oof) == 18 and {"pred_A", "true_A", "reader2_A", "argmax_A"} <= set(oof[0])
    splits = json.loads((trained / "splits.json").read_text())
    assert sorted(sum((fold["val"] for fold in splits), [])) == sorted(row["item"] for row in oof)


@pytest.mark.slow
def test_the_daemon_serves_the_card_with_region_opacity(trained, layouts, tmp_path):
    daemon = Daemon(str(trained.parent), "--device", "cpu", "--tasks", "brixia")
    try:
        image = sorted((layouts / "cohen" / "public-cohen-subset").iterdir())[0]
        reply = daemon.ask({"task": "brixia", "img_path": str(image), "destination_path": str(tmp_path)})
        if reply["result"] == "ok":
            assert set(reply["region_opacity"]) == set("ABCDEF")
            assert all(0 <= v["extent"] <= 1 for v in reply["region_opacity"].values())
            assert reply["uncertainty"]["folds"] == 2 and set(reply["uncertainty"]["expected_score_std"]) == set("ABCDEF")
            assert reply["quality"]["ok"] in (True, False)
        else:   # a 1-epoch segmenter may not find a frontal film: then it says why
            assert reply["error"]["code"] == "unreadable_image" and "lung" in reply["error"]["message"]
        assert daemon.ask({"op": "health"})["result"] == "ok"
    finally:
        daemon.close()
