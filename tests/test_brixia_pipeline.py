"""Brixia pipeline pieces on known inputs: score parsing, metadata, alignment, regions, STN start, scorer and loss."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from daemon.handlers.base import Settings
from daemon.handlers.brixia import BrixiaHandler
from tasks import brixia
from train.brixia import labels as brixia_labels
from train.brixia import loss as brixia_loss
from tasks.cards import CardError
from train.brixia.metrics import region_metrics
from train.phantoms.brixia import write_brixia_phantoms


@pytest.mark.parametrize("value, expected", [
    ("012301", [0, 1, 2, 3, 0, 1]),
    ("12301", [0, 1, 2, 3, 0, 1]),       # the leading zero lost by a spreadsheet
    (12301, [0, 1, 2, 3, 0, 1]),
    (12301.0, [0, 1, 2, 3, 0, 1]),
    ("12301.0", [0, 1, 2, 3, 0, 1]),
    (0, [0] * 6),
    ("333333", [3] * 6),
])
def test_brixia_score_is_left_padded_to_six_regions(value, expected):
    assert brixia_labels.parse_brixia_score(value) == expected


@pytest.mark.parametrize("value", ["1234567", "000004", "12a", "", None, True, 1.5, "-1"])
def test_bad_brixia_scores_are_refused(value):
    with pytest.raises(ValueError):
        brixia_labels.parse_brixia_score(value)


def test_metadata_is_read_as_published(tmp_path):
    write_brixia_phantoms(tmp_path, n=12, size=(64, 64), seed=2)
    rows = brixia_labels.read_metadata(tmp_path / "metadata_global_v2.csv")
    assert len(rows) == 12 and all(len(r["scores"]) == 6 and r["global"] == sum(r["scores"]) for r in rows)
    consensus = brixia_labels.read_consensus(tmp_path / "metadata_consensus_v1.csv")
    held_out = [r for r in rows if r["consensus"]]
    assert held_out and {r["Filename"] for r in held_out} == set(consensus)
    for row in held_out:
        assert consensus[row["Filename"]]["mode"] == row["scores"]
    # Filename says .dcm; the converted PNG is found under the same stem, a real DICOM as named
    for row in rows:
        path = brixia_labels.resolve_image(tmp_path / "images", row["Filename"])
        assert path is not None and path.stem == row["Filename"][:-4]


def test_a_global_score_that_disagrees_with_the_regions_is_an_error(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("Filename;BrixiaScore;BrixiaScoreGlobal;Subject\na.dcm;12;3;1\nb.dcm;12;4;2\n")
    with pytest.raises(ValueError, match="line 3.*not the sum"):
        brixia_labels.read_metadata(path)
    (tmp_path / "comma.csv").write_text("Filename,BrixiaScore\na.dcm,12\n")
    with pytest.raises(ValueError, match="';'-separated"):
        brixia_labels.read_metadata(tmp_path / "comma.csv")


def _lungs(size: int = 128, angle: float = 0.0, scale: float = 1.0, shift=(0, 0)) -> np.ndarray:
    """(3, S, S) masks: two upright elliptic lungs and a heart, then posed by a rotation/scale/shift."""
    masks = np.zeros((3, size, size), np.uint8)
    cv2.ellipse(masks[0], (size * 3 // 10, size // 2), (size // 8, size * 3 // 10), 0, 0, 360, 1, -1)
    cv2.ellipse(masks[1], (size * 7 // 10, size // 2), (size // 9, size * 3 // 10), 0, 0, 360, 1, -1)
    cv2.ellipse(masks[2], (size * 55 // 100, size * 65 // 100), (size // 8, size // 10), 0, 0, 360, 1, -1)
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
    matrix[:, 2] += shift
    return np.stack([cv2.warpAffine(m, matrix, (size, size), flags=cv2.INTER_NEAREST) for m in masks]) > 0


def test_regions_are_thirds_of_each_lung_by_height():
    masks = np.zeros((3, 90, 60), bool)
    masks[0, 10:70, 5:25] = True       # right lung: image left, rows 10..69
    masks[1, 20:80, 35:55] = True      # left lung: rows 20..79
    regions = brixia.region_masks(masks)
    assert regions.shape == (6, 90, 60)
    for k, rows in enumerate([(10, 30), (30, 50), (50, 70), (20, 40), (40, 60), (60, 80)]):
        filled = np.flatnonzero(regions[k].any(axis=1))
        assert (filled[0], filled[-1] + 1) == rows, brixia.REGIONS[k]
    assert regions[:3, :, 30:].sum() == 0 and regions[3:, :, :30].sum() == 0   # A-C right lung, D-F left
    assert (regions.sum(0) <= 1).all() and regions[:3].sum() == masks[0].sum()


def test_mask_alignment_undoes_a_pose():
    upright = _lungs()
    posed = _lungs(angle=12, scale=0.8, shift=(9, -6))
    thetas = [brixia.mask_theta(m[0], m[1]) for m in (upright, posed)]
    aligned = [brixia.warp_array(m, t, mode="nearest") for m, t in zip((upright, posed), thetas)]
    for masks in aligned:
        rows, cols = np.nonzero(masks[0] | masks[1])
        x0, y0, x1, y1 = brixia.CANONICAL_BOX
        assert abs(cols.min() - (x0 + 1) / 2 * 128) <= 3 and abs(cols.max() + 1 - (x1 + 1) / 2 * 128) <= 3
        assert abs(rows.min() - (y0 + 1) / 2 * 128) <= 3 and abs(rows.max() + 1 - (y1 + 1) / 2 * 128) <= 3
        # the lungs are level again: their centroids share a row
        assert abs(np.nonzero(masks[0])[0].mean() - np.nonzero(masks[1])[0].mean()) < 1.5
    overlap = [(aligned[0][k] & aligned[1][k]).sum() / (aligned[0][k] | aligned[1][k]).sum() for k in range(2)]
    assert min(overlap) > 0.9
    back = brixia.warp_array(aligned[1], brixia.invert_theta(thetas[1]), mode="nearest")
    assert (back[0] & posed[0]).sum() / (back[0] | posed[0]).sum() > 0.95


def test_mask_alignment_refuses_what_is_not_two_lungs():
    masks = _lungs()
    assert brixia.mask_theta(masks[0], np.zeros_like(masks[1])) is None        # one lung missing
    assert brixia.mask_theta(masks[1], masks[0]) is None                      # sides swapped (mirrored film)
    results = brixia.align_batch([np.zeros_like(masks)], stn=None, device=torch.device("cpu"))
    assert results[0][1] == "identity" and np.allclose(results[0][0], brixia.identity_theta())


def test_stn_starts_as_the_identity():
    stn = brixia.build_stn(brixia.default_stn(64, (8, 16)))
    masks = torch.from_numpy(_lungs(64)[:2].astype(np.float32))[None]
    theta = stn(masks)
    assert torch.allclose(theta, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))
    image = torch.rand(1, 1, 64, 64)
    assert torch.allclose(brixia.warp(image, theta), image, atol=1e-5)
    assert brixia.plausible_theta(theta[0].detach().numpy())
    assert not brixia.plausible_theta(np.array([[-1, 0, 0], [0, 1, 0]], np.float32))   # a mirror


def test_scorer_heads_see_their_region():
    torch.manual_seed(0)
    scorer = brixia.build_scorer(brixia.default_scorer("resnet10t", stage=2)).eval()
    image = torch.randn(1, 1, 64, 64)
    regions = torch.from_numpy(brixia.region_masks(_lungs(64)).astype(np.float32))[None]
    logits = scorer(image, regions)
    assert logits.shape == (1, 6, 4)
    # changing the image inside region A changes head A more than head F (pooled inside the mask)
    changed = image.clone()
    changed[:, :, regions[0, 0] > 0] += 3
    delta = (scorer(changed, regions) - logits).abs().sum(-1)[0]
    assert delta[0] > delta[5]


def test_region_loss_is_cross_entropy_on_logits_plus_the_ordinal_term():
    logits, targets = torch.randn(5, 6, 4), torch.randint(0, 4, (5, 6))
    plain = brixia_loss.RegionLoss()(logits, targets)
    assert torch.isclose(plain, torch.nn.functional.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1)))
    ordinal = brixia_loss.RegionLoss(0.5)(logits, targets)
    expected = brixia.expected_scores(torch.softmax(logits, -1))
    assert torch.isclose(ordinal, plain + 0.5 * (expected - targets).abs().mean())


def test_region_metrics_and_box_iou():
    truth = np.array([[0, 1, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1]])
    predicted = np.array([[0, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 3]])
    metrics = region_metrics(truth, predicted)
    assert metrics["accuracy"] == pytest.approx(10 / 12) and metrics["mae"] == pytest.approx(3 / 12)
    assert metrics["global_mae"] == pytest.approx(1.5) and metrics["per_region"]["D"]["mae"] == 0.5
    identity = brixia.identity_theta()
    assert brixia.box_iou(identity, identity) == pytest.approx(1.0)
    half = identity.copy()
    half[0, 2] = 0.8    # shifted by half the box's width
    assert brixia.box_iou(half, identity) == pytest.approx(1 / 3, abs=0.01)


def test_an_stn_that_disagrees_with_the_lungs_is_not_used():
    posed = _lungs(angle=15, scale=0.8, shift=(10, -8))
    identity_stn = [brixia.build_stn(brixia.default_stn(64, (8, 16))).eval()]   # untrained: returns the identity
    ((theta, method),) = brixia.align_batch([posed], identity_stn, torch.device("cpu"))
    assert method == "masks" and np.allclose(theta, brixia.mask_theta(posed[0], posed[1]))
    ((theta, method),) = brixia.align_batch([posed], identity_stn, torch.device("cpu"), method="none")
    assert method == "identity"


def test_the_cards_alignment_limits_replace_the_defaults():
    assert brixia.alignment_limits(None) == brixia.alignment_limits({"canonical_box": [-0.8, -0.8, 0.8, 0.8]}) \
        == brixia.DEFAULT_ALIGNMENT
    limits = brixia.alignment_limits({"canonical_box": [-0.7, -0.6, 0.7, 0.6],
                                      "alignment_limits": {"max_tilt_deg": 10, "min_lung_fraction": 0.01}})
    assert limits == brixia.AlignmentLimits((-0.7, -0.6, 0.7, 0.6), 0.01, 10.0, brixia.STN_AGREEMENT)
    tilted = _lungs(angle=12)
    assert brixia.mask_theta(tilted[0], tilted[1]) is not None and brixia.mask_theta(tilted[0], tilted[1], limits) is None
    upright = _lungs()
    aligned = brixia.warp_array(upright, brixia.mask_theta(upright[0], upright[1], limits), mode="nearest")
    rows, cols = np.nonzero(aligned[0] | aligned[1])
    assert abs(cols.min() - (1 - 0.7) / 2 * 128) <= 3 and abs(rows.min() - (1 - 0.6) / 2 * 128) <= 3   # the card's box
    for bad in ({"alignment_limits": {"max_tilt_deg": "35"}}, {"alignment_limits": {"tilt": 3}},
                {"canonical_box": [0.8, -0.8, -0.8, 0.8]}, {"alignment_limits": {"stn_agreement": 2}}):
        with pytest.raises(CardError, match="output"):
            brixia.alignment_limits(bad)


def test_the_handler_aligns_with_the_cards_limits(tmp_path):
    """The committed card with a lung-area floor no lung reaches: the example film is not aligned at all."""
    folder = tmp_path / "brixia"
    shutil.copytree(REPO / "weights" / "brixia", folder)
    settings = Settings(device=torch.device("cpu"))

    def alignment(handler):
        job = handler.validate({"task": "brixia", "img_path": str(REPO / "examples" / "brixia_chest_333323.png"),
                                "destination_path": str(tmp_path / "out"), "alignment": "masks", "cams": False})
        prepared = handler.preprocess(job)
        prepared.check_film = False   # what is asserted is the alignment, whatever the film check says
        return handler.infer([prepared])[0].method

    assert alignment(BrixiaHandler.load(folder, settings)) == "masks"
    card = json.loads((folder / "card.json").read_text())
    card["output"]["alignment_limits"] = {"min_lung_fraction": 0.9}
    (folder / "card.json").write_text(json.dumps(card))
    assert alignment(BrixiaHandler.load(folder, settings)) == "identity"
