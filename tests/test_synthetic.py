"""Synthetic osteo phantoms: the class-folder layout the trainer reads, reproducible by seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from train import synthetic
from train.phantoms.osteo import osteo_phantom


def test_osteo_phantoms_are_written_as_gray_pngs_in_class_folders(tmp_path):
    assert synthetic.main(["osteo", str(tmp_path), "--n", "5", "--size", "90", "190", "--seed", "3"]) == 0
    c1, c3 = sorted((tmp_path / "C1").glob("*.png")), sorted((tmp_path / "C3").glob("*.png"))
    assert (len(c1), len(c3)) == (3, 2)
    for path in c1 + c3:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (190, 90)
    note = json.loads((tmp_path / "synthetic.json").read_text())
    assert note["task"] == "osteo" and note["class_counts"] == {"C1": 3, "C3": 2}
    assert "not clinical" in note["description"]
    groups = (tmp_path / "groups.csv").read_text().splitlines()
    assert groups[0] == "image,patient" and len(groups) == 6


def test_the_same_seed_gives_the_same_phantoms(tmp_path):
    synthetic.generate("osteo", tmp_path / "a", n=2, size=(60, 128), seed=7)
    synthetic.generate("osteo", tmp_path / "b", n=2, size=(60, 128), seed=7)
    assert (tmp_path / "a/C1/c1_0000.png").read_bytes() == (tmp_path / "b/C1/c1_0000.png").read_bytes()


def test_the_c1_cortex_is_thicker_and_brighter_than_the_c3_cortex():
    # Bright detail (above the smooth exposure) below the teeth: the inferior cortex, the class sign.
    def bright_border_pixels(label, seed):
        image = osteo_phantom(label, (225, 477), np.random.default_rng(seed)).astype(float)
        detail = image - ndimage.gaussian_filter(image, 20)
        return np.mean(detail[150:] > 60)

    c1 = np.mean([bright_border_pixels("C1", seed) for seed in range(4)])
    c3 = np.mean([bright_border_pixels("C3", seed) for seed in range(4)])
    assert c1 > 1.5 * c3


def test_an_unknown_task_or_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no phantom generator"):
        synthetic.generate("nonsense", tmp_path, n=1)
    with pytest.raises(ValueError, match="C1 or C3"):
        osteo_phantom("C2")
