"""The kind trainer's --extra folders (more real images of one kind, one family, a bounded draw without
near-duplicates) and --scene-p (photos laid into the fold's own 'other' pictures)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_kind_gate import write_kinds_folder
from tasks import kind
from train.kind import trainer as train_kind
from train.kind.data import KindImages, _in_scene, augmented, extra_items, parse_extra, read_kinds


def write_extra_chest(root: Path, manifest_root: Path, n: int = 6) -> Path:
    """``root/a/images`` and ``root/b/images`` with ``n`` new gray films in all, plus one copy of a manifest film."""
    rng = np.random.default_rng(1)
    for k in range(n):
        folder = root / ("a" if k % 2 else "b") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(50, 50), dtype=np.uint8)).save(folder / f"film_{k}.png")
    shutil.copy(manifest_root / "chest" / "alpha_0.png", root / "a" / "images" / "copy_of_alpha_0.png")
    (root / "a" / "masks").mkdir()
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(root / "a" / "masks" / "film_1.png")
    return root


def test_parse_extra_reads_kind_path_family_and_a_licence_with_colons():
    spec = parse_extra("chest=data/q/Train/*/images:quex:terms: research only")
    assert (spec.kind, spec.pattern, spec.family, spec.licence) == ("chest", "data/q/Train/*/images", "quex",
                                                                     "terms: research only")
    default = parse_extra("hand=data/more/hands")
    assert default.family == "hands" and default.licence == "unstated"
    with pytest.raises(SystemExit):
        parse_extra("xray=data/films")


def test_extra_images_are_drawn_up_to_the_limit_in_their_family_without_duplicates(tmp_path):
    data = write_kinds_folder(tmp_path / "kinds")
    extra = write_extra_chest(tmp_path / "extra", data)
    manifest = read_kinds(data)
    spec = parse_extra(f"chest={extra}/*/images:alpha-chest:open terms")
    items, report = extra_items([spec], manifest, limit=4, seed=0)
    assert len(items) == 4 and all(i.kind == "chest" and i.family == "alpha-chest" and i.real and i.extra
                                   for i in items)
    assert all(i.licence == "open terms" and i.item.startswith("extra/alpha-chest/chest/") for i in items)
    everything, report = extra_items([spec], manifest, limit=100, seed=0)
    names = {i.path.name for i in everything}
    assert "copy_of_alpha_0.png" not in names and len(names) == 6  # the copy of a manifest film is skipped
    assert report[0]["found"] == 7 and report[0]["near_duplicates_skipped"] == 1 and report[0]["taken"] == 6
    assert not any("masks" in i.item for i in everything)


def test_train_kind_with_extra_records_the_folder_in_the_card_and_grades_the_manifest_alone(tmp_path):
    data = write_kinds_folder(tmp_path / "kinds")
    extra = write_extra_chest(tmp_path / "extra", data)
    out = tmp_path / "weights" / "kind"
    assert train_kind.main([str(data), "--out", str(out), "--phantoms", "0", "--plain", "4",
                            "--phantom-dir", str(tmp_path / "gen"), "--size", "32", "--widths", "4", "8",
                            "--folds", "2", "--epochs", "1", "--batch-size", "8", "--seed", "0",
                            "--extra", f"chest={extra}/*/images:beta-chest:open terms", "--extra-limit", "3",
                            "--scene-p", "0.5"]) == 0
    card = json.loads((out / "card.json").read_text())
    folder = card["data"]["extra"]["folders"][0]
    assert folder["family"] == "beta-chest" and folder["taken"] == 3 and folder["licence"] == "open terms"
    sources = {row["source"]: row for row in card["data"]["sources"]}
    assert sources[f"{extra}/*/images"]["licences"] == ["open terms"] and sources[f"{extra}/*/images"]["n"] == 3
    assert card["data"]["real_kind_counts"]["chest"] == 6 + 3
    pooled = card["metrics"]["pooled"]
    assert pooled["gate"]["n"] == len(kind_real(card)) and pooled["gate_manifest_only"]["n"] == 30
    assert "laid into" in card["training"]["augmentation"]
    splits = json.loads((out / "splits.json").read_text())
    val = [set(fold["val"]) for fold in splits]
    extra_folds = {k for k, names in enumerate(val) for n in names if n.startswith("extra/")}
    beta_folds = {k for k, names in enumerate(val) for n in names if n.startswith("chest/beta_")}
    assert extra_folds == beta_folds  # the extra films travel with the family they were given


def kind_real(card: dict) -> list[str]:
    """One entry per real image the card counts."""
    return ["x"] * sum(card["data"]["real_kind_counts"].values())


def test_a_photo_in_a_scene_keeps_the_scene_size_and_the_photo_inside():
    rand = iter(np.linspace(0.1, 0.9, 50)).__next__
    photo = np.full((40, 60, 3), (200, 50, 50), np.uint8)
    scene = np.full((80, 100, 3), (0, 0, 255), np.uint8)
    laid = _in_scene(photo, scene, rand)
    assert laid.shape == scene.shape
    assert (laid[..., 0] > 150).any() and (laid[..., 2] == 255).any()


def test_kind_images_lay_photos_only_into_their_own_training_folds_colour_others():
    pictures = {0: np.full((30, 30, 3), 120, np.uint8), 1: np.full((30, 30, 3), 30, np.uint8),
                2: np.zeros((30, 30), np.uint8), 3: np.full((30, 30, 3), 200, np.uint8)}
    labels = ["photo", "other", "other", "other"]
    spec = {"size": [16, 16], "fit": "letterbox", "pad_value": 0, "mean": [0.5] * 4, "std": [0.25] * 4}
    dataset = KindImages(pictures.__getitem__, labels, [0, 1, 2], spec, train=True, seed=0, scene_p=1.0,
                         scenes=[1, 2, 3])
    assert dataset.scenes == [1, 2]  # 3 is outside the fold; 2 (gray) is dropped when drawn
    x, target, index = dataset[0]
    assert x.shape == (4, 16, 16) and kind.KINDS[target] == "photo" and index == 0
    view, label = augmented(pictures[0], "photo", torch.Generator().manual_seed(0), pictures[1], 1.0)
    assert label == "photo" and view.ndim == 3
