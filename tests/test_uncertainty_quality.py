"""Every ok reply says how much its folds disagree (``uncertainty``) and whether its input and output look
like what the model was trained on (``quality``), with the ranges the trainer recorded in the card."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import Daemon, write_tiny_osteo_card
from tasks import cards, quality, uncertainty
from train import quality as train_quality
from train.synthetic import generate


# ---------------------------------------------------------------- the shared pieces

def test_a_single_fold_says_so_instead_of_reporting_no_spread():
    record = uncertainty.classification_uncertainty(np.array([[0.2, 0.8]]), ["C1", "C3"])
    assert record["folds"] == 1 and "single_fold" in record
    assert record["probability_std"] is None and record["max_probability_std"] is None
    assert record["mutual_information"] is None
    assert record["predictive_entropy"] == pytest.approx(-(0.2 * np.log(0.2) + 0.8 * np.log(0.8)), abs=1e-6)


def test_several_folds_give_their_spread_entropy_and_mutual_information():
    folds = np.array([[0.1, 0.9], [0.5, 0.5]])
    record = uncertainty.classification_uncertainty(folds, ["C1", "C3"])
    assert record["folds"] == 2 and "single_fold" not in record
    assert record["probability_std"] == {"C1": pytest.approx(0.2), "C3": pytest.approx(0.2)}
    assert record["fold_probabilities"] == [{"C1": 0.1, "C3": 0.9}, {"C1": 0.5, "C3": 0.5}]
    mean_entropy = (uncertainty.entropy(folds[0]) + uncertainty.entropy(folds[1])) / 2
    assert record["mutual_information"] == pytest.approx(uncertainty.entropy([0.3, 0.7]) - mean_entropy, abs=1e-6)
    assert 0 < record["predictive_entropy_normalised"] <= 1
    agreeing = uncertainty.classification_uncertainty(np.array([[0.3, 0.7]] * 3), ["C1", "C3"])
    assert agreeing["max_probability_std"] == 0 and agreeing["mutual_information"] == pytest.approx(0, abs=1e-9)


def test_mask_disagreement_is_one_minus_the_mean_pairwise_dice():
    same = np.zeros((3, 2, 8, 8), bool)
    same[:, 0, :4] = True  # class 0: every fold the same half; class 1: every fold empty
    assert uncertainty.pairwise_dice_disagreement(same) == pytest.approx([0, 0], abs=1e-6)
    apart = same.copy()
    apart[1, 0] = ~apart[0, 0]  # fold 1 draws the other half: its two pairs have Dice 0, the third pair 1
    record = uncertainty.segmentation_uncertainty(apart, ["a", "b"])
    assert record["class_disagreement"]["a"] == pytest.approx(2 / 3, abs=1e-4)
    assert record["mean_disagreement"] == pytest.approx(1 / 3, abs=1e-4)
    single = uncertainty.segmentation_uncertainty(same[:1], ["a", "b"])
    assert single["class_disagreement"] is None and single["mean_disagreement"] is None and "single_fold" in single


def test_ranges_are_widened_and_checked():
    record = quality.record_ranges([{"aspect": 2.0}, {"aspect": 2.2}], margin=0.25, source="test")
    assert record["ranges"]["aspect"]["min"] == pytest.approx(2.0 - 0.25 * 2.1)
    assert quality.assess({"aspect": 2.1}, record) == {"ok": True, "reasons": []}
    verdict = quality.assess({"aspect": 1.0}, record, {"aspect": "aspect ratio"})
    assert verdict["ok"] is False and verdict["reasons"][0].startswith("aspect ratio 1 is outside")
    assert quality.assess({"aspect": 1.0}, None) == {"ok": None, "reasons": [quality.NOT_RECORDED]}


def test_scar_quality_tells_a_photo_from_a_radiograph():
    from tasks import scar
    from train.phantoms.scar import scar_photo

    photo = scar.quality_measures(scar_photo(0.5, (90, 120), np.random.default_rng(0)))
    film = scar.quality_measures(np.repeat(np.random.default_rng(0).integers(0, 256, (90, 120, 1), np.uint8), 3, 2))
    assert photo["saturation"] > 0.1 and film["saturation"] == 0 and film["colourfulness"] == 0


# ---------------------------------------------------------------- recorded by the trainer, checked by the daemon

@pytest.fixture(scope="module")
def osteo_weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    phantoms = root / "phantoms"
    generate("osteo", phantoms, n=6, size=(120, 256), seed=3)
    card = write_tiny_osteo_card(root / "weights" / "osteo", folds=2)
    before = json.loads((card / "card.json").read_text())
    assert train_quality.main(["osteo", str(phantoms), "--card", str(card)]) == 0
    return {"root": root, "phantoms": phantoms, "card": card, "before": before}


def test_train_quality_adds_the_ranges_and_leaves_every_other_field_alone(osteo_weights):
    after = cards.read_card(osteo_weights["card"])
    record = after.pop("quality")
    assert after == osteo_weights["before"]  # folds and their sha256 untouched
    assert record["n"] == 6 and set(record["ranges"]) == {"aspect", "mean", "contrast", "symmetry"}
    cards.verify_folds(osteo_weights["card"], after)


def test_osteo_replies_carry_uncertainty_and_quality(osteo_weights, tmp_path):
    square = tmp_path / "square.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200), np.uint8)).save(square)
    pano = next((osteo_weights["phantoms"] / "C1").iterdir())
    daemon = Daemon(str(osteo_weights["card"].parent), "--device", "cpu")
    try:
        ok = daemon.ask({"img_path": str(pano), "destination_path": str(tmp_path)})
        assert ok["result"] == "ok", ok
        assert ok["uncertainty"]["folds"] == 2 and set(ok["uncertainty"]["probability_std"]) == {"C1", "C3"}
        assert len(ok["uncertainty"]["fold_probabilities"]) == 2
        assert ok["quality"] == {"ok": True, "reasons": []}
        odd = daemon.ask({"img_path": str(square), "destination_path": str(tmp_path)})
        assert odd["result"] == "ok" and odd["quality"]["ok"] is False
        assert any(reason.startswith("aspect 1 is outside") for reason in odd["quality"]["reasons"])
        one = Daemon(str(osteo_weights["card"].parent), "--device", "cpu", "--fold", "1")
        try:
            single = one.ask({"img_path": str(pano), "destination_path": str(tmp_path)})
            assert single["uncertainty"]["folds"] == 1 and single["uncertainty"]["probability_std"] is None
            assert single["uncertainty"]["single_fold"].startswith("one fold model answered")
        finally:
            one.close()
    finally:
        daemon.close()


def test_brixia_uncertainty_is_the_fold_spread_of_each_regions_expected_score():
    from daemon.handlers.brixia import score_uncertainty

    folds = np.zeros((2, 6, 4))
    folds[0, :, 1] = 1.0                     # fold 0: every region expected 1
    folds[1, :, 1] = 1.0
    folds[1, 0] = [0, 0, 0, 1]               # fold 1 says 3 for A
    record = score_uncertainty(folds)
    assert record["folds"] == 2 and "single_fold" not in record
    assert record["expected_score_std"]["A"] == pytest.approx(1.0) and record["expected_score_std"]["B"] == 0
    assert record["max_expected_score_std"] == pytest.approx(1.0)
    assert record["expected_global_score_std"] == pytest.approx(1.0)    # globals 6 and 8
    single = score_uncertainty(folds[:1])
    assert single["expected_score_std"] is None and "one fold" in single["single_fold"]


def test_brixia_quality_measures_the_lungs_and_heart_against_the_recorded_ranges():
    from tasks.brixia_film import QUALITY_LABELS, quality_measures

    masks = np.zeros((3, 100, 100), bool)
    masks[0, 20:80, 15:45] = masks[1, 20:80, 55:80] = True      # right lung 30 wide, left 25
    masks[2, 50:75, 45:65] = True                                 # heart leaning to the left lung
    measures = quality_measures(masks)
    assert measures["lung_balance"] == pytest.approx(30 / 25) and measures["heart_lean"] > 0
    record = quality.record_ranges([measures], margin=0.25, source="test")
    assert quality.assess(measures, record, QUALITY_LABELS)["ok"] is True
    small = masks.copy()
    small[0] = False
    small[0, 40:60, 30:40] = True                                 # a right lung far smaller than in training
    verdict = quality.assess(quality_measures(small), record, QUALITY_LABELS)
    assert verdict["ok"] is False and any(reason.startswith("right lung area") for reason in verdict["reasons"])
    no_heart = quality_measures(masks * np.array([1, 1, 0], bool)[:, None, None])
    assert "heart_lean" not in no_heart                           # not measurable: left out, not zero
