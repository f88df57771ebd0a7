"""Hand-bone masks as the competition and the annotators see them: polygons, RLE, Dice, geometry, folds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks import handbone
from train import synthetic
from train.core.folds import fold_splits
from train.handbone.data import augmented, find_cases, model_sample
from train.core.losses import SegmentationLoss
from train.handbone.metrics import dice_metrics
from train.phantoms.handbone import handbone_phantom


@pytest.fixture(scope="module")
def phantom():
    image, annotations = handbone_phantom((120, 160), np.random.default_rng(3))
    return image, annotations


def test_there_are_29_classes_in_the_seed_order():
    assert len(handbone.CLASSES) == 29 and len(set(handbone.CLASSES)) == 29
    assert handbone.CLASSES[:19] == [f"finger-{k}" for k in range(1, 20)]
    assert handbone.CLASSES[19:] == ["Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate",
                                     "Triquetrum", "Pisiform", "Radius", "Ulna"]


def test_polygons_fill_a_multilabel_mask_that_survives_the_rle_round_trip(phantom):
    image, annotations = phantom
    masks = handbone.annotation_masks(annotations, *image.shape)
    assert masks.shape == (29, 120, 160) and masks.dtype == bool
    assert all(mask.any() for mask in masks)
    pisiform, triquetrum = masks[handbone.CLASSES.index("Pisiform")], masks[handbone.CLASSES.index("Triquetrum")]
    assert (pisiform & triquetrum).any()  # bones overlap: one channel each, never a single label map
    for mask in masks:
        assert np.array_equal(handbone.rle_decode(handbone.rle_encode(mask), *mask.shape), mask)


def test_rle_is_one_based_start_length_pairs_in_row_major_order():
    mask = np.zeros((3, 4), bool)
    mask[0, 1:3] = True   # flat 1, 2 -> starts at 2 (1-based), length 2
    mask[1, 3] = True     # flat 7
    mask[2, 0] = True     # flat 8: joins the run at 7
    assert handbone.rle_encode(mask) == "2 2 8 2"
    assert handbone.rle_encode(np.zeros((5, 5), bool)) == ""
    assert not handbone.rle_decode("", 5, 5).any()
    with pytest.raises(ValueError):
        handbone.rle_decode("20 10", 3, 4)


def test_rle_rows_are_the_seed_csv_rows_in_class_order(phantom):
    image, annotations = phantom
    masks = handbone.annotation_masks(annotations, *image.shape)
    rows = handbone.rle_rows("image_with_underscores.png", masks)
    assert [row[1] for row in rows] == handbone.CLASSES
    assert all(row[0] == "image_with_underscores.png" and row[2] for row in rows)


def test_mask_polygons_fill_back_to_the_same_mask(phantom):
    image, annotations = phantom
    masks = handbone.annotation_masks(annotations, *image.shape)
    recovered = handbone.annotation_masks(handbone.polygon_annotations(masks), *image.shape)
    assert handbone.dice_per_class(recovered, masks).min() > 0.99
    entry = handbone.polygon_annotations(masks)[0]
    assert {"id", "type", "attributes", "points", "label"} <= set(entry) and entry["type"] == "poly_seg"


def test_dice_on_known_masks_counts_a_class_absent_from_both_as_one():
    predicted = np.zeros((3, 4, 4), bool)
    truth = np.zeros((3, 4, 4), bool)
    predicted[0, 0, :4] = True
    truth[0, 0, 2:] = True
    truth[0, 1, :2] = True       # 2 of 4 predicted pixels right, 4 true: Dice 2*2/8
    truth[1, 2, 2] = True        # missed entirely: ~0
    dice = handbone.dice_per_class(predicted, truth)
    assert dice[0] == pytest.approx(0.5, abs=1e-4) and dice[1] < 1e-3 and dice[2] == pytest.approx(1.0)
    records = [{f"dice_{name}": 1.0 for name in handbone.CLASSES}, {f"dice_{name}": 0.5 for name in handbone.CLASSES}]
    records[1]["dice_Ulna"] = 0.0
    metrics = dice_metrics(records, handbone.CLASSES)
    assert metrics["dice_per_class"]["Ulna"] == 0.5 and metrics["dice_per_class"]["Radius"] == 0.75
    assert metrics["dice"] == pytest.approx((28 * 0.75 + 0.5) / 29)


def test_letterbox_keeps_the_aspect_ratio_and_maps_back_to_the_input_size():
    spec = handbone.default_input_spec(64, "letterbox")
    gray = np.full((100, 200), 200, np.uint8)
    frame, geometry = handbone.fit_to_model(gray, spec)
    assert frame.shape == (64, 64) and (geometry.top, geometry.inner_height, geometry.inner_width) == (16, 32, 64)
    assert frame[:16].max() == 0 and frame[16:48].min() == 200
    probabilities = np.zeros((2, 64, 64), np.float32)
    probabilities[0, 16:48] = 0.9          # the whole image, not the padding
    masks = handbone.masks_at_input(probabilities, geometry)
    assert masks.shape == (2, 100, 200) and masks[0].all() and not masks[1].any()
    stretched, geometry = handbone.fit_to_model(gray, handbone.default_input_spec(64, "resize"))
    assert stretched.min() == 200 and handbone.masks_at_input(probabilities, geometry)[0].mean() == pytest.approx(0.5)


def test_training_samples_use_the_serving_normalisation_and_move_masks_with_the_image(tmp_path):
    synthetic.generate("handbone", tmp_path, n=2, size=(96, 128), seed=1)
    case = find_cases(tmp_path)[0]
    spec = handbone.default_input_spec(64)
    stacked = model_sample(case, spec, handbone.CLASSES)
    assert stacked.shape == (30, 64, 64)
    from tasks.imaging import read_image
    served, _ = handbone.preprocess(read_image(case.image), spec)
    assert torch.equal(handbone.to_tensor(stacked[0], spec), served)
    image, masks = augmented(stacked[0], stacked[1:], torch.Generator().manual_seed(0), elastic=True)
    assert image.shape == (64, 64) and masks.shape == (29, 64, 64) and set(np.unique(masks)) <= {0, 1}


def test_grouped_folds_never_split_a_patient(tmp_path):
    synthetic.generate("handbone", tmp_path, n=10, size=(64, 64), seed=4)
    cases = find_cases(tmp_path)
    groups = [case.patient for case in cases]
    assert len(set(groups)) == 5 and all(groups.count(g) == 2 for g in groups)
    for train, val in fold_splits([0] * len(cases), 5, seed=0, groups=groups):
        assert not {groups[i] for i in train} & {groups[i] for i in val}


def test_the_phantom_json_has_the_seed_schema(tmp_path):
    synthetic.main(["handbone", str(tmp_path), "--n", "2", "--size", "80", "96"])
    files = sorted(tmp_path.glob("outputs_json/ID000/*.json"))
    assert len(files) == 2 and len(list(tmp_path.glob("DCM/ID000/*.png"))) == 2
    annotations = json.loads(files[0].read_text())["annotations"]
    assert sorted(a["label"] for a in annotations) == sorted(handbone.CLASSES)
    assert all(a["type"] == "poly_seg" and len(a["points"]) >= 3 and len(a["points"][0]) == 2 for a in annotations)


def test_the_loss_is_weighted_bce_dice_iou_and_prefers_the_right_answer():
    targets = torch.zeros(1, 2, 8, 8)
    targets[:, 0, 2:6, 2:6] = 1
    good, bad = targets * 20 - 10, -(targets * 20 - 10)
    loss = SegmentationLoss((1, 1, 1))
    assert loss(good, targets) < 0.1 < loss(bad, targets)
    assert SegmentationLoss((0, 1, 0))(good, targets) < SegmentationLoss((1, 0, 0))(bad, targets)
    with pytest.raises(ValueError):
        SegmentationLoss((1, 1))
