"""Synthetic Brixia chest phantoms: the BrixIA layout (images, masks, ';' CSVs), readable images, learnable opacities."""
from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from tasks.imaging import read_image
from train import synthetic
from train.phantoms.brixia import (CONSENSUS_COLUMNS, GLOBAL_COLUMNS, REGIONS, STRUCTURES, chest_phantom,
                                   parse_scores, region_masks)

SIZE = (128, 128)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("brixia")
    note = synthetic.generate("brixia", out, n=12, size=SIZE, seed=4)
    return out, note


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


def image_path(out, filename):
    """How a reader resolves a Filename: images/<Filename> first, else images/<stem>.png."""
    path = out / "images" / filename
    return path if path.exists() else out / "images" / (filename.rsplit(".", 1)[0] + ".png")


def test_layout_and_csv_columns(phantoms):
    out, note = phantoms
    header = (out / "metadata_global_v2.csv").read_text().splitlines()[0]
    assert header == ";".join(GLOBAL_COLUMNS) == ("Filename;StudyDate;Modality;StudyId;BrixiaScore;BrixiaScoreGlobal;"
                                                  "ConsensusTestset;Subject;Sex;AgeAtStudyDateFiveYear")
    assert (out / "metadata_consensus_v1.csv").read_text().splitlines()[0] == ";".join(CONSENSUS_COLUMNS)
    rows = read_rows(out / "metadata_global_v2.csv")
    assert [r["Filename"] for r in rows] == [f"brixia_{i:04d}.dcm" for i in range(1, 13)]
    stems = [r["Filename"][:-4] for r in rows]
    dicoms = sorted(p.name for p in (out / "images").glob("*.dcm"))
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(dicoms) >= 2 and len(dicoms) + len(pngs) == 12
    for stem in stems:
        assert image_path(out, stem + ".dcm").exists()
        for name in STRUCTURES:
            mask = np.asarray(Image.open(out / "masks" / name / f"{stem}.png"))
            assert mask.dtype == np.uint8 and mask.shape == SIZE and set(np.unique(mask)) <= {0, 255}
            assert mask.any()
    for r in rows:
        assert r["Modality"] in ("CR", "DX") and len(r["StudyDate"]) == 8 and r["StudyDate"].startswith("2020")
        assert r["Sex"] in ("M", "F") and int(r["AgeAtStudyDateFiveYear"]) % 5 == 0
        scores = [int(c) for c in r["BrixiaScore"].zfill(6)]
        assert len(r["BrixiaScore"]) <= 6 and int(r["BrixiaScoreGlobal"]) == sum(scores)
    subjects = [r["Subject"] for r in rows]
    assert len(set(subjects)) < len(subjects)  # some subjects have two studies
    consensus = [r for r in rows if r["ConsensusTestset"] == "1"]
    assert 2 <= len(consensus) <= 3 and all(r["ConsensusTestset"] in ("0", "1") for r in rows)
    note_file = json.loads((out / "synthetic.json").read_text())
    assert note_file == note and note["n"] == 12 and note["size"] == list(SIZE) and note["seed"] == 4
    assert sum(note["class_counts"].values()) == 6 * 12 and "not clinical" in note["description"]


def test_brixia_score_drops_leading_zeros_and_consensus_modes_match(phantoms):
    out, _ = phantoms
    rows = {r["Filename"]: r for r in read_rows(out / "metadata_global_v2.csv")}
    for r in rows.values():
        assert r["BrixiaScore"] == str(int(r["BrixiaScore"]))  # never zero-padded
    padded = [r for r in rows.values() if r["BrixiaScore"].zfill(6)[0] == "0"]
    assert padded and all(len(r["BrixiaScore"]) < 6 for r in padded)
    consensus = read_rows(out / "metadata_consensus_v1.csv")
    assert sorted(r["Filename"] for r in consensus) == sorted(f for f, r in rows.items() if r["ConsensusTestset"] == "1")
    for c in consensus:
        modes = [int(c[f"Mode{r}"]) for r in REGIONS]
        assert modes == list(parse_scores(rows[c["Filename"]]["BrixiaScore"]))
        assert int(c["S-Global"]) == sum(modes) == int(rows[c["Filename"]]["BrixiaScoreGlobal"])
        assert abs(int(c["J-Global"]) - sum(modes)) <= 1
        for region, mode in zip(REGIONS, modes):
            mean = c[f"Mean{region}"]
            assert len(mean.split(".")[1]) == 2 and 0 <= float(mean) <= 3 and abs(float(mean) - mode) < 1.0


def test_masks_follow_the_radiological_convention(phantoms):
    out, _ = phantoms
    for path in sorted((out / "masks" / "right_lung").glob("*.png")):
        centroid = {name: np.argwhere(np.asarray(Image.open(out / "masks" / name / path.name)) > 0).mean(axis=0)
                    for name in STRUCTURES}
        assert centroid["right_lung"][1] < SIZE[1] / 2 < centroid["left_lung"][1]  # patient's right = image left
        assert centroid["right_lung"][1] < centroid["heart"][1] < centroid["left_lung"][1]
        heart = np.asarray(Image.open(out / "masks" / "heart" / path.name)) > 0
        for lung in ("right_lung", "left_lung"):
            assert not (heart & (np.asarray(Image.open(out / "masks" / lung / path.name)) > 0)).any()


def test_every_image_reads_back_with_dark_lungs_and_a_bright_heart(phantoms):
    out, _ = phantoms
    kinds = set()
    for r in read_rows(out / "metadata_global_v2.csv"):
        path = image_path(out, r["Filename"])
        stem = path.stem
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            kinds.add((ds.PhotometricInterpretation, int(ds.BitsStored)))
            assert ds.Modality == r["Modality"] and ds.Rows == SIZE[0]
        else:
            with Image.open(path) as image:
                kinds.add(image.mode)
        image = read_image(path, color="gray")
        assert image.shape == SIZE and image.dtype == np.uint8
        masks = {name: np.asarray(Image.open(out / "masks" / name / f"{stem}.png")) > 0 for name in STRUCTURES}
        lungs = image[masks["right_lung"] | masks["left_lung"]].mean()
        assert lungs + 25 < image[masks["heart"]].mean(), path.name
        assert image[:4, :4].mean() < lungs  # dark background outside the body
    assert {"L", "I;16", ("MONOCHROME1", 10), ("MONOCHROME2", 12)} <= kinds


def test_dicom_window_and_inversion(phantoms):
    out, _ = phantoms
    mono2 = [p for p in (out / "images").glob("*.dcm") if pydicom.dcmread(p).PhotometricInterpretation == "MONOCHROME2"]
    ds = pydicom.dcmread(mono2[0])
    assert float(ds.WindowWidth) > 1000 and ds.pixel_array.max() < 4096 and ds.pixel_array.dtype == np.uint16
    mono1 = [p for p in (out / "images").glob("*.dcm") if pydicom.dcmread(p).PhotometricInterpretation == "MONOCHROME1"]
    stored = pydicom.dcmread(mono1[0]).pixel_array
    lungs = np.asarray(Image.open(out / "masks" / "right_lung" / f"{mono1[0].stem}.png")) > 0
    heart = np.asarray(Image.open(out / "masks" / "heart" / f"{mono1[0].stem}.png")) > 0
    assert stored[lungs].mean() > stored[heart].mean() + 100  # stored high = dark: air is high


def test_opacity_raises_intensity_only_in_its_region():
    clear, masks = chest_phantom(np.random.default_rng(11), SIZE, (0, 0, 0, 0, 0, 0))
    dense, masks_again = chest_phantom(np.random.default_rng(11), SIZE, (0, 0, 3, 0, 0, 0))
    assert all((masks[name] == masks_again[name]).all() for name in STRUCTURES)  # same chest
    regions = region_masks(masks)
    c = regions["C"]
    assert dense[c].mean() > clear[c].mean() + 20
    outside = ~ndimage.binary_dilation(masks["right_lung"], iterations=4)  # the final blur spreads ~2 px
    assert np.array_equal(dense[outside], clear[outside])  # nothing leaks out of the lung
    assert np.array_equal(dense[regions["A"]], clear[regions["A"]])  # nor into the upper third
    levels = [chest_phantom(np.random.default_rng(11), SIZE, [k] * 6)[0][c].mean() for k in range(4)]
    assert levels == sorted(levels) and levels[1] > levels[0] + 2


def test_regions_split_each_lung_in_row_thirds():
    _, masks = chest_phantom(np.random.default_rng(2), SIZE, "123")
    regions = region_masks(masks)
    assert np.array_equal(regions["A"] | regions["B"] | regions["C"], masks["right_lung"])
    assert np.array_equal(regions["D"] | regions["E"] | regions["F"], masks["left_lung"])
    rows = {name: np.flatnonzero(regions[name].any(axis=1)) for name in REGIONS}
    assert rows["A"].max() < rows["B"].min() and rows["B"].max() < rows["C"].min()
    assert rows["D"].max() < rows["E"].min() and rows["E"].max() < rows["F"].min()
    assert parse_scores("123") == (0, 0, 0, 1, 2, 3) == parse_scores(123)
    with pytest.raises(ValueError):
        parse_scores((0, 4, 0, 0, 0, 0))


def test_the_same_seed_gives_the_same_files(phantoms, tmp_path):
    out, _ = phantoms
    again = tmp_path / "again"
    synthetic.generate("brixia", again, n=12, size=SIZE, seed=4)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
