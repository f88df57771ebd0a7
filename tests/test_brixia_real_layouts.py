"""The real chest X-ray layouts the brixia trainer reads (JSRT label maps, COVID-QU-Ex, the Cohen subset's
annotations), written tiny by the tests, and the pieces that make real films work: the intensity window,
the film check, losses that skip what a source does not label, and the scorer's transfer and opacity inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import brixia
from train.brixia import loss as brixia_loss
from train.brixia import transfer as brixia_transfer
from tasks.brixia_film import film_measures, film_problem, limits_from_masks
from tasks.intensity import apply_intensity, default_intensity
from train.brixia.sources import (case_targets, cohen_group, covid_qu_ex_cases, folder_cases, jsrt_cases,
                                  read_cohen_annotations, split_lungs)
from train.core.losses import IGNORE, SegmentationLoss


def chest_masks(size: int = 64, heart_shift: float = 0.1) -> np.ndarray:
    """(3, S, S) bool right lung (image left), left lung, heart leaning to the image right by ``heart_shift``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    right = ((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    left = ((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    heart = ((xx - 0.5 - heart_shift * 0.4) / 0.12) ** 2 + ((yy - 0.65) / 0.12) ** 2 < 1
    return np.stack([right & ~heart, left & ~heart, heart])


def _png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# ---------------------------------------------------------------- readers

def test_jsrt_label_maps_give_three_labelled_structures_and_no_opacity(tmp_path):
    masks = chest_masks(48)
    label_map = np.zeros((48, 48), np.uint8)
    for value, mask in zip((150, 200, 250), masks):
        label_map[mask] = value
    _png(tmp_path / "jsrt" / "images" / "JPCLN001.png", np.full((48, 48), 90))
    _png(tmp_path / "jsrt" / "masks" / "JPCLN001.png", label_map)
    _png(tmp_path / "jsrt" / "images" / "JPCLN002.png", np.full((48, 48), 90))   # no label map: left out
    (case,) = jsrt_cases(tmp_path / "jsrt")
    assert case.key == "jsrt/JPCLN001" and case.source == "jsrt"
    targets, labelled = case_targets(case, 4, (48, 48))
    assert labelled.tolist() == [True, True, True, False]
    assert (targets[:3] == masks).all() and not targets[3].any()
    with pytest.raises(SystemExit, match="three pixel values"):
        jsrt_cases(tmp_path / "jsrt", values=(150, 200))


def test_covid_qu_ex_lungs_are_split_and_empty_infection_folders_are_unlabelled_unless_normal(tmp_path):
    masks = chest_masks(64)
    lungs = (masks[0] | masks[1]) * 255
    infection = (masks[0] & (np.arange(64)[:, None] > 40)) * 255
    root = tmp_path / "Infection Segmentation Data" / "Train"
    for cls, opacity in (("COVID-19", infection), ("Non-COVID", np.zeros((64, 64))), ("Normal", np.zeros((64, 64)))):
        for name in ("a.png", "b (1).png"):
            _png(root / cls / "images" / name, np.full((64, 64), 120))
            _png(root / cls / "lung masks" / name, lungs)
            _png(root / cls / "infection masks" / name, opacity)
    cases = covid_qu_ex_cases(tmp_path)
    assert len(cases) == 6
    by_source = {case.source: case for case in cases}
    assert set(by_source) == {"covid-qu-ex/COVID-19", "covid-qu-ex/Non-COVID", "covid-qu-ex/Normal"}
    covid, labelled = case_targets(by_source["covid-qu-ex/COVID-19"], 4, (64, 64))
    assert labelled.tolist() == [True, True, False, True]          # no heart labels in COVID-QU-Ex
    assert (covid[0] == masks[0]).all() and (covid[1] == masks[1]).all() and covid[3].any()
    assert case_targets(by_source["covid-qu-ex/Non-COVID"], 4, (64, 64))[1].tolist() == [True, True, False, False]
    assert case_targets(by_source["covid-qu-ex/Normal"], 4, (64, 64))[1].tolist() == [True, True, False, True]
    with pytest.raises(SystemExit, match="no COVID-QU-Ex class folder"):
        covid_qu_ex_cases(tmp_path / "Infection Segmentation Data" / "Train" / "COVID-19" / "images")


def test_uid_named_films_without_extension_keep_their_whole_name_and_stem_clashes_are_refused(tmp_path):
    from dicom_factory import write_dicom

    masks = chest_masks()
    uids = ["1.2.840.113619.2.55.3", "1.2.840.113619.2.55.4"]   # a PACS export: no extension, dots in the name
    (tmp_path / "images").mkdir()
    for uid in uids:
        write_dicom(tmp_path / "images" / uid, np.full((64, 64), 100, np.uint8))
        for name, mask in zip(("right_lung", "left_lung", "heart"), masks):
            _png(tmp_path / "masks" / name / f"{uid}.png", mask * 255)
    cases = folder_cases(tmp_path / "images", tmp_path / "masks")
    assert [case.key.rsplit("/", 1)[1] for case in cases] == uids     # two films, not one "1.2.840.113619.2.55"
    assert [case.image.name for case in cases] == uids
    _png(tmp_path / "images" / f"{uids[0]}.png", np.zeros((64, 64)))   # the same film twice: which one?
    with pytest.raises(SystemExit, match="same name stem"):
        folder_cases(tmp_path / "images", tmp_path / "masks")


def test_touching_lungs_are_cut_at_their_narrowest_column():
    masks = chest_masks(64)
    joined = masks[0] | masks[1]
    joined[30:34, 20:45] = True                                   # a bridge: one connected piece
    right, left = split_lungs(joined)
    assert right.any() and left.any() and not (right & left).any() and ((right | left) == joined).all()
    assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
    assert split_lungs(np.zeros((8, 8), bool))[0].sum() == 0


def test_cohen_annotations_with_each_reader(tmp_path):
    csv = tmp_path / "public-annotations.csv"
    csv.write_text("filename,S-A,S-B,S-C,S-D,S-E,S-F,S-Global,J-A,J-B,J-C,J-D,J-E,J-F,J-Global\n"
                   "covid-19-pneumonia-23-day1.jpg,0,1,2,3,0,1,7,1,1,2,3,0,0,7\n"
                   "covid-19-pneumonia-23-day9.jpg,3,3,3,3,3,3,18,3,3,3,2,3,3,17\n", encoding="utf-8")
    senior = read_cohen_annotations(csv, "senior")
    assert senior[0]["target"] == [0, 1, 2, 3, 0, 1] and senior[0]["junior"] == [1, 1, 2, 3, 0, 0]
    assert senior[0]["reference"] == senior[0]["scores"] == [0, 1, 2, 3, 0, 1] and senior[0]["global"] == 7
    assert senior[0]["Subject"] == senior[1]["Subject"]           # follow-up films of one patient
    assert read_cohen_annotations(csv, "junior")[1]["target"] == [3, 3, 3, 2, 3, 3]
    mean = np.array(read_cohen_annotations(csv, "mean")[0]["target"])
    assert mean.shape == (6, 4) and mean[0].tolist() == [0.5, 0.5, 0, 0] and mean[1].tolist() == [0, 1, 0, 0]
    assert read_cohen_annotations(csv, "mean")[0]["reference"] == [0, 1, 2, 3, 0, 1]   # metrics stay on the senior
    csv.write_text(csv.read_text().replace(",7,1,1", ",8,1,1"), encoding="utf-8")
    with pytest.raises(SystemExit, match="S-Global 8 is not the sum"):
        read_cohen_annotations(csv)
    with pytest.raises(SystemExit, match="--reader"):
        read_cohen_annotations(csv, "resident")


@pytest.mark.parametrize("a, b", [("16654_1_1.png", "16654_4_1.jpg"), ("covid-19-caso-70-1-PA.jpg", "covid-19-caso-70-2-APS.jpg"),
                                  ("nejmoa2001191_f1-PA.jpeg", "nejmoa2001191_f4.jpeg"),
                                  ("1-s2.0-S0929664620300449-gr2_lrg-a.jpg", "1-s2.0-S0929664620300449-gr2_lrg-d.jpg"),
                                  ("pneumococcal-pneumonia-day0.jpg", "pneumococcal-pneumonia-day35.jpg")])
def test_films_of_one_patient_share_a_group(a, b):
    assert cohen_group(a) == cohen_group(b)


def test_different_cases_keep_different_groups():
    names = ["covid-19-pneumonia-12.jpg", "covid-19-pneumonia-15-PA.jpg", "pneumocystis-pneumonia-8.jpg",
             "01E392EE-69F9-4E33-BFCE-E5C968654078.jpeg", "03BF7561-A9BA-4C3C-B8A0-D3E585F73F3C.jpeg"]
    assert len({cohen_group(name) for name in names}) == len(names)


# ---------------------------------------------------------------- preprocessing and the film check

def test_center_percentile_window_stretches_the_body_and_ignores_border_text():
    rng = np.random.default_rng(0)
    frame = rng.integers(100, 140, size=(64, 64)).astype(np.uint8)        # a washed-out photographed film
    stretched = apply_intensity(frame, default_intensity())
    assert stretched.min() == 0 and stretched.max() == 255
    marked = frame.copy()
    marked[:4, :20] = 255                                                 # burned-in text in a corner
    assert (apply_intensity(marked, default_intensity())[8:56, 8:56] == stretched[8:56, 8:56]).all()
    assert (apply_intensity(frame, {"policy": "none"}) == frame).all() and apply_intensity(frame, None) is frame
    flat = np.full((32, 32), 77, np.uint8)
    assert (apply_intensity(flat, default_intensity()) == flat).all()     # nothing to stretch
    with pytest.raises(ValueError, match="policy"):
        default_intensity("clahe")


def test_preprocess_applies_the_cards_intensity_policy():
    gray = np.random.default_rng(1).integers(90, 150, size=(80, 120)).astype(np.uint8)
    spec = brixia.default_input_spec(64, "resize")
    assert spec["intensity"]["policy"] == "center-percentile"
    _, frame, _ = brixia.preprocess(gray, spec)
    _, plain, _ = brixia.preprocess(gray, {**spec, "intensity": {"policy": "none"}})
    assert frame.max() - frame.min() > plain.max() - plain.min()


def test_film_check_passes_a_frontal_film_and_refuses_mirrored_lateral_and_heartless_ones():
    masks = chest_masks(64)
    assert film_problem(masks) is None
    assert film_measures(masks)["heart_lean"] > 0
    mirrored_heart = masks.copy()
    mirrored_heart[2] = masks[2][:, ::-1]                 # heart leaning to the image's left
    assert "mirrored" in film_problem(mirrored_heart)
    swapped = np.stack([masks[1], masks[0], masks[2]])     # the "right" lung found on the image's right
    assert "mirrored" in film_problem(swapped)
    lateral = masks.copy()
    lateral[1] = False
    lateral[1, 52:62, 38:52] = True                        # lungs one above the other: not side by side
    assert "side by side" in film_problem(lateral)
    heartless = masks.copy()
    heartless[2] = False
    assert "heart" in film_problem(heartless) and "lungs" in film_problem(heartless)
    lungless = masks.copy()
    lungless[1] = False
    assert "no left lung" in film_problem(lungless)


def test_film_limits_come_from_the_training_masks():
    limits = limits_from_masks([chest_masks(64, shift) for shift in (0.05, 0.1, 0.2)])
    assert limits["measured"]["n"] == 3 and limits["min_heart_lean"] <= 0.0
    assert limits["min_lung_fraction"] < limits["measured"]["lung_fraction"][0]
    assert film_problem(chest_masks(64), limits) is None
    assert "defaults" in limits_from_masks([])["source"]


# ---------------------------------------------------------------- losses and the scorer

def test_segmentation_loss_skips_channels_a_source_does_not_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    targets = (torch.rand(2, 4, 16, 16) > 0.5).float()
    loss = SegmentationLoss((1, 1, 0))
    partial = targets.clone()
    partial[0, 2] = IGNORE                                  # image 0 has no heart label
    value = loss(logits, partial)
    value.backward()
    assert logits.grad[0, 2].abs().max() == 0 and logits.grad[1, 2].abs().max() > 0
    changed = targets.clone()
    changed[0, 2] = 1 - changed[0, 2]                        # what an unlabelled channel holds cannot matter
    changed[0, 2] = IGNORE
    assert torch.isclose(loss(logits, changed), value)
    assert torch.isclose(loss(logits, targets), SegmentationLoss((1, 1, 0))(logits, targets))
    everything_ignored = torch.full_like(targets, IGNORE)
    assert loss(logits, everything_ignored) == 0


def test_region_loss_takes_a_mean_of_readers_as_a_distribution():
    logits = torch.randn(3, 6, 4)
    scores = torch.randint(0, 4, (3, 6))
    one_hot = torch.nn.functional.one_hot(scores, 4).float()
    assert torch.isclose(brixia_loss.RegionLoss(0.5)(logits, one_hot), brixia_loss.RegionLoss(0.5)(logits, scores))
    half = (one_hot + torch.nn.functional.one_hot((scores + 1).clamp_max(3), 4).float()) / 2
    assert brixia_loss.RegionLoss()(logits, half) > 0


def test_median_and_argmax_decisions():
    probabilities = torch.tensor([[0.4, 0.05, 0.04, 0.51], [0.1, 0.6, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]])
    assert brixia.decide_scores(probabilities, "median").tolist() == [3, 1, 3]
    assert brixia.decide_scores(torch.tensor([[0.3, 0.3, 0.3, 0.1]]), "median").tolist() == [1]
    assert brixia.decide_scores(probabilities, "argmax").tolist() == [3, 1, 3]
    assert brixia.decide_scores(torch.tensor([[0.45, 0.1, 0.0, 0.45]]), "median").tolist() == [1]
    with pytest.raises(ValueError):
        brixia.decide_scores(probabilities, "mode")


def test_scorer_with_opacity_inputs_and_a_shared_head():
    torch.manual_seed(0)
    regions = torch.from_numpy(brixia.region_masks(chest_masks(64)).astype(np.float32))[None]
    opacity = torch.zeros(1, 1, 64, 64)
    opacity[..., 40:, :32] = 0.9                                          # the right lower zone (region C)
    stats = brixia.region_opacity(regions, opacity)[0]
    assert stats.shape == (6, 2) and stats[2, 1] > 0.5 and stats[0, 1] == 0 and stats[3:, 0].max() == 0
    for shared in (False, True):
        scorer = brixia.build_scorer({**brixia.default_scorer("resnet10t", stage=2), "opacity": True,
                                      "shared_head": shared}).eval()
        assert len(scorer.heads) == (1 if shared else 6)
        image = torch.randn(1, 1, 64, 64)
        logits = scorer(image, regions, opacity)
        assert logits.shape == (1, 6, 4)
        assert not torch.equal(logits, scorer(image, regions, torch.zeros_like(opacity)))
        with pytest.raises(ValueError, match="opacity"):
            scorer(image, regions)


def test_scorer_trunk_starts_from_the_segmenters_encoder():
    segmenter = brixia.build_segmenter(brixia.default_segmenter("unet", "tu-resnet10t", opacity=True, encoder_depth=3,
                                                                decoder_channels=[16, 8, 8]))
    scorer = brixia.build_scorer(brixia.default_scorer("resnet10t", stage=2))
    state = brixia_transfer.trunk_state_from_segmenter(segmenter.state_dict(), scorer)
    scorer.trunk.load_state_dict(state, strict=True)
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scorer.eval().features(image), segmenter.eval().encoder(image)[-1])
    deeper = brixia.build_scorer(brixia.default_scorer("resnet10t", stage=4))
    with pytest.raises(ValueError, match="encoder-depth"):
        brixia_transfer.trunk_state_from_segmenter(segmenter.state_dict(), deeper)


# ---------------------------------------------------------------- the pose classifier

def test_the_eight_poses_are_the_turns_and_mirrors_of_a_film():
    from tasks.brixia_orient import POSES, apply_pose

    frame = np.arange(16, dtype=np.uint8).reshape(4, 4)
    posed = [apply_pose(frame, k) for k in range(len(POSES))]
    assert (posed[0] == frame).all() and (posed[1] == frame[:, ::-1]).all()
    assert (posed[2] == np.rot90(frame, -1)).all() and (posed[4] == frame[::-1, ::-1]).all()
    assert (posed[6] == np.rot90(frame, 1)).all()
    assert len({p.tobytes() for p in posed}) == 8                  # all different


def test_pose_problem_refuses_below_the_upright_floor_and_names_the_likeliest_pose():
    from tasks.brixia_orient import pose_problem

    assert pose_problem(np.array([0.9, 0.1, 0, 0, 0, 0, 0, 0])) is None
    assert pose_problem(np.array([0.3, 0.45, 0.25, 0, 0, 0, 0, 0]), min_upright=0.2) is None  # above the floor
    assert "mirrored" in pose_problem(np.array([0.3, 0.45, 0.25, 0, 0, 0, 0, 0]), min_upright=0.35)
    message = pose_problem(np.array([0.05, 0.9, 0.05, 0, 0, 0, 0, 0]), min_upright=0.2)
    assert "mirrored" in message and "0.90" in message and "below 0.20" in message
    assert "upside down" in pose_problem(np.eye(8)[4])


def test_the_upright_floor_is_the_highest_that_lets_99_percent_of_upright_films_through():
    from tasks.brixia_orient import choose_min_upright
    from train.brixia.metrics import orient_card_output

    upright = [{"true_pose": 0, "p_upright": p, "fold": k % 2} for k, p in enumerate(np.linspace(0.22, 1.0, 200))]
    upright[0]["p_upright"] = 0.12                                   # one unsure upright film in 200 may be refused
    mirrored = [{"true_pose": 1, "p_upright": p, "fold": k % 2} for k, p in enumerate(np.linspace(0.0, 0.4, 100))]
    assert choose_min_upright(upright + mirrored) == 0.2
    output = orient_card_output(upright + mirrored, {})["output"]
    assert output["min_upright"] == 0.2 and output["cross_fold"]["upright_passed"] >= 0.99
    assert output["cross_fold"]["mirrored_refused"] == pytest.approx(0.5, abs=0.02)   # p_upright < 0.2


def test_orient_net_and_its_metrics():
    from tasks.brixia_orient import build_orient, default_orient, pose_probabilities
    from train.brixia.metrics import orient_metrics, orient_records

    net = build_orient(default_orient(size=32, channels=(4, 8))).eval()
    probabilities = pose_probabilities([net], torch.randn(3, 1, 64, 64))
    assert probabilities.shape == (3, 8) and torch.allclose(probabilities.sum(-1), torch.ones(3))
    logits = torch.full((4, 8), -5.0)
    logits[0, 0] = logits[1, 1] = logits[2, 0] = logits[3, 4] = 5.0   # right, right, a mirrored film let through, right
    metrics = orient_metrics(orient_records(logits, torch.tensor([0, 1, 1, 4]), torch.arange(4)), min_upright=0.5)
    assert metrics["accuracy"] == 0.75 and metrics["upright_passed"] == 1.0
    assert metrics["mirrored_refused"] == 0.5 and metrics["turned_refused"] == pytest.approx(2 / 3)


def test_the_film_check_asks_the_pose_first_then_the_anatomy():
    from tasks.brixia_film import film_refusal

    masks = np.zeros((3, 100, 100), bool)
    masks[0, 20:80, 15:45] = masks[1, 20:80, 55:85] = True
    masks[2, 50:75, 45:68] = True                                   # a frontal film the right way round
    upright, mirrored = np.eye(8)[0], np.eye(8)[1]
    assert film_refusal(masks) is None and film_refusal(masks, pose=upright, min_upright=0.2) is None
    assert "mirrored" in film_refusal(masks, pose=mirrored, min_upright=0.2)
    flipped = np.ascontiguousarray(masks[[1, 0, 2], :, ::-1])         # the anatomy says mirrored too
    assert "mirrored" in film_refusal(flipped)
    assert film_refusal(flipped, pose=mirrored).startswith("the film looks mirrored")   # the pose's verdict first
