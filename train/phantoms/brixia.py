"""Synthetic frontal chest X-ray phantoms for the brixia task, in the BrixIA layout: images, lung/heart masks, CSVs.

Each phantom is a PA chest radiograph (bright = dense, patient's right on the image left): a
dark background around a soft-tissue thorax, two dark lung fields with rounded apices and
domed bases (the right lung, image left, a little wider and shorter), a bright heart low in the
middle reaching toward the image right, the spine and mediastinum as a bright midline strip,
clavicles and ribs as bright bands across the lungs, the abdomen bright under the diaphragm.
A random pose (rotation, scale, shift) moves everything, so a model has to align; lung shape,
exposure, contrast, blur and noise vary too.

The Brixia score lives in blotchy opacities inside the lungs. Each lung mask (as posed in the
image) is cut by image rows into upper, middle and lower thirds of its height: regions A, B, C
on the right lung (image left), D, E, F on the left lung (image right). Region score 0 leaves
the region clear; 1, 2, 3 cover about 15 %, 40 %, 80 % of it with faint, moderate, dense
opacity (``OPACITY``), clipped to that region of the lung mask. Scores are drawn per study from
a latent severity with a lower-zone bias, so neighbours correlate and 3 is the rarest.

Layout of ``write_brixia_phantoms`` (see its docstring): ``images/<stem>.png`` (8-bit, one PNG
in five 16-bit) or ``images/<stem>.dcm`` (DICOM CR MONOCHROME1, DX MONOCHROME2 12-bit),
``masks/{right_lung,left_lung,heart}/<stem>.png`` (0/255), ``metadata_global_v2.csv`` and
``metadata_consensus_v1.csv`` (``;``-separated, as the BrixIA release). Never clinical data.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

DEFAULT_SIZE = (256, 256)  # (height, width)
STRUCTURES = ("right_lung", "left_lung", "heart")
REGIONS = "ABCDEF"  # A-C: right lung (image left) upper/middle/lower; D-F: left lung (image right)
# Region score -> (fraction of the region covered, opacity density as a fraction of the
# soft-tissue-minus-air contrast, so 1.0 makes a covered lung pixel as bright as soft tissue).
OPACITY = {0: (0.0, 0.0), 1: (0.15, 0.60), 2: (0.40, 0.80), 3: (0.80, 1.00)}
GLOBAL_COLUMNS = ["Filename", "StudyDate", "Modality", "StudyId", "BrixiaScore", "BrixiaScoreGlobal",
                  "ConsensusTestset", "Subject", "Sex", "AgeAtStudyDateFiveYear"]
CONSENSUS_COLUMNS = (["Filename"] + [f"Mean{r}" for r in REGIONS] + [f"Mode{r}" for r in REGIONS]
                     + ["S-Global", "J-Global"])
AIR = 0.30  # lung darkening below soft tissue, in the renderer's 0..1 density units
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


# ---------------------------------------------------------------- scores

def parse_scores(scores: Sequence[int] | str | int) -> tuple[int, ...]:
    """Six region scores (A..F) from a sequence of ints or a BrixiaScore value (``"120003"``, ``120003``, ``"3"``).

    A BrixiaScore that lost its leading zeros (spreadsheet style) is left-padded to six digits.
    """
    if isinstance(scores, (str, int, np.integer)):
        text = str(int(scores)) if not isinstance(scores, str) else scores.strip()
        scores = [int(c) for c in text.zfill(6)]
    values = tuple(int(s) for s in scores)
    if len(values) != 6 or any(s not in (0, 1, 2, 3) for s in values):
        raise ValueError(f"Brixia scores are six region scores 0-3, not {values!r}")
    return values


def brixia_score_string(scores: Sequence[int]) -> str:
    """The BrixiaScore CSV value as a spreadsheet writes it: the six digits as an integer, no leading zeros."""
    return str(int("".join(str(int(s)) for s in scores)))


def draw_scores(rng: np.random.Generator, severity: float | None = None) -> tuple[int, ...]:
    """Six region scores A..F: a latent severity plus a per-lung offset and a lower-zone bias.

    Neighbouring regions correlate; zeros and ones are common, threes the rarest.
    """
    if severity is None:
        severity = rng.uniform(-1.1, 2.7)
    zone_bias = (-0.45, 0.0, 0.35)  # upper, middle, lower
    scores = []
    for _lung in range(2):
        side = rng.normal(0, 0.4)
        for bias in zone_bias:
            latent = severity + side + bias + rng.normal(0, 0.55)
            scores.append(int(np.clip(np.rint(latent), 0, 3)))
    return tuple(scores)


# ---------------------------------------------------------------- geometry

def _pose_grid(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Unit coordinates (u right, v down, 0..1 before pose) of every pixel under a random pose.

    The pose rotates (+-8 degrees), scales (0.85-1.05) and shifts (+-6 % of the size) the
    picture about the image centre; returned grids are its inverse, evaluated at pixel centres.
    """
    height, width = size
    angle = rng.uniform(-8.0, 8.0)
    scale = rng.uniform(0.85, 1.05)
    shift_x, shift_y = rng.uniform(-0.06, 0.06) * width, rng.uniform(-0.06, 0.06) * height
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    x = xx + 0.5 - width / 2 - shift_x
    y = yy + 0.5 - height / 2 - shift_y
    a = math.radians(angle)
    # inverse rotation, then inverse scale, in pixel units (rotation is rigid in the image)
    xr = (x * math.cos(a) + y * math.sin(a)) / scale
    yr = (-x * math.sin(a) + y * math.cos(a)) / scale
    pose = {"angle": angle, "scale": scale, "shift_x": shift_x / width, "shift_y": shift_y / height}
    return xr / width + 0.5, yr / height + 0.5, pose


def _lung_params(rng: np.random.Generator, right: bool) -> dict[str, float]:
    """Shape of one lung in unit coordinates; ``s`` runs laterally from the lung's centre line."""
    size = rng.uniform(0.9, 1.1)
    if right:  # patient's right, image left: wider, shorter (higher dome over the liver)
        p = {"cx": 0.33, "lateral": 0.155, "medial": 0.095, "top": 0.16, "dome": 0.68, "angle": 0.79}
    else:
        p = {"cx": 0.67, "lateral": 0.135, "medial": 0.085, "top": 0.15, "dome": 0.72, "angle": 0.82}
    p["cx"] += rng.normal(0, 0.008) * (-1 if right else 1)
    p["lateral"] *= size * rng.uniform(0.93, 1.07)
    p["medial"] *= rng.uniform(0.9, 1.1)
    p["top"] += rng.normal(0, 0.015)
    p["dome"] += rng.normal(0, 0.02)
    p["angle"] = max(p["angle"] + rng.normal(0, 0.02), p["dome"] + 0.06)
    p["cardiac"] = p["dome"] + rng.uniform(0.01, 0.05)
    p["peak"] = rng.uniform(-0.01, 0.04)  # dome summit, laterally from the centre line
    p["round_lateral"] = rng.uniform(0.32, 0.46)  # how far down (fraction of height) the apex rounds
    p["round_medial"] = rng.uniform(0.10, 0.18)
    p["flare"] = rng.uniform(0.08, 0.28)
    return p


def _profile(t: np.ndarray, round_to: float, flare: float) -> np.ndarray:
    """Half-width profile (0..~1) of a lung along its height ``t`` (0 apex, 1 costophrenic angle)."""
    cap = np.sqrt(np.clip(1 - (1 - np.clip(t, 0, None) / round_to) ** 2, 0, 1))
    return np.where(t < round_to, cap, 1 + flare * (t - round_to))


def _lung_base(s: np.ndarray, p: dict[str, float]) -> np.ndarray:
    """Diaphragm dome under a lung: v of the lung base at lateral coordinate ``s``."""
    lateral_end = p["lateral"] * (1 + p["flare"] * 0.7)
    lat = np.clip((s - p["peak"]) / max(lateral_end - p["peak"], 1e-6), 0, None)
    med = np.clip((p["peak"] - s) / (p["medial"] + p["peak"]), 0, None)
    return p["dome"] + (p["angle"] - p["dome"]) * lat ** 2 + (p["cardiac"] - p["dome"]) * med ** 2


def _lung_shape(u: np.ndarray, v: np.ndarray, p: dict[str, float], right: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lung mask, diaphragm v per pixel) of one lung drawn in unit coordinates."""
    s = (p["cx"] - u) if right else (u - p["cx"])
    t = (v - p["top"]) / (p["angle"] - p["top"])
    base = _lung_base(s, p)
    inside = ((t >= 0) & (s <= p["lateral"] * _profile(t, p["round_lateral"], p["flare"]))
              & (s >= -p["medial"] * _profile(t, p["round_medial"], 0.0)) & (v <= base))
    return inside, base


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, angle_deg: float) -> np.ndarray:
    """Rotated ellipse value (<= 1 inside); ``angle_deg`` turns the ``au`` axis toward +v."""
    a = math.radians(angle_deg)
    du, dv = u - cu, v - cv
    x = du * math.cos(a) + dv * math.sin(a)
    y = -du * math.sin(a) + dv * math.cos(a)
    return (x / au) ** 2 + (y / av) ** 2


def _band(v: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """Soft band profile (1 on the centre line, ~0 beyond ``half``), for ribs and clavicles."""
    return np.exp(-(((v - centre) / half) ** 4))


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise normalised to unit standard deviation (float32)."""
    field = cv2.GaussianBlur(rng.normal(0, 1, size).astype(np.float32), (0, 0), max(sigma, 0.3))
    return field / max(float(field.std()), 1e-6)


def region_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Brixia regions A..F as boolean masks: each lung mask cut into thirds of its row extent.

    A, B, C = upper, middle, lower third of ``right_lung`` (image left); D, E, F of ``left_lung``.
    Thirds are by image rows of the lung as it lies in the image (after pose); a row belongs to
    third ``k`` when ``(row - top) * 3 // height == k``.
    """
    regions = {}
    for lung, names in (("right_lung", "ABC"), ("left_lung", "DEF")):
        mask = np.asarray(masks[lung], dtype=bool)
        rows = np.flatnonzero(mask.any(axis=1))
        third = np.full(mask.shape[0], -1)
        if rows.size:
            top, extent = rows[0], rows[-1] - rows[0] + 1
            index = np.arange(mask.shape[0])
            third = np.where((index >= top) & (index <= rows[-1]), (index - top) * 3 // extent, -1)
        for k, name in enumerate(names):
            regions[name] = mask & (third == k)[:, None]
    return regions


# ---------------------------------------------------------------- rendering

def render_chest(rng: np.random.Generator, size: tuple[int, int], scores: Sequence[int] | str | int
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """One phantom as float32 (H, W) in 0..255 (unclipped noise aside), its masks and its pose.

    The anatomy, pose, exposure and noise take the same draws from ``rng`` whatever ``scores``
    are: the same generator state with other scores gives the same chest with other opacities.
    """
    scores = parse_scores(scores)
    height, width = size
    side = min(height, width)
    u, v, pose = _pose_grid(size, rng)
    du = np.abs(u - 0.5)

    right_p, left_p = _lung_params(rng, True), _lung_params(rng, False)
    right_shape, right_base = _lung_shape(u, v, right_p, True)
    left_shape, left_base = _lung_shape(u, v, left_p, False)
    heart_c = (0.565 + rng.normal(0, 0.012), left_p["dome"] - rng.uniform(0.065, 0.09))
    heart_axes = (0.175 * rng.uniform(0.88, 1.12), 0.12 * rng.uniform(0.9, 1.1))
    heart = _ellipse(u, v, *heart_c, *heart_axes, rng.uniform(15, 30)) <= 1.0
    body_axes = (0.445 * rng.uniform(0.95, 1.05), 0.56)
    body = ((du / body_axes[0]) ** 3 + (np.abs(v - 0.58) / body_axes[1]) ** 3 <= 1.0) | ((du < 0.085) & (v < 0.2))
    heart &= body & (v <= np.where(u < 0.5, right_base, left_base) + 0.012)  # resting on the diaphragm
    masks = {"right_lung": right_shape & ~heart & body, "left_lung": left_shape & ~heart & body, "heart": heart}

    px = 1.0 / side  # one pixel in unit coordinates (roughly)

    def soft(mask: np.ndarray, sigma: float) -> np.ndarray:  # edge-softened float mask, sigma in units of side
        return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(sigma * side, 0.3))

    image = np.full(size, 0.04, np.float32)
    image += 0.40 * soft(body, 0.006) * (1 + 0.12 * np.clip(1 - (du / 0.4) ** 2, 0, 1)).astype(np.float32)
    diaphragm = np.where(u < 0.5, right_base, left_base)
    image += 0.07 * soft(body & (v > diaphragm + px), 0.01)  # abdomen (liver, stomach) under the domes
    image += 0.10 * soft((du < 0.075) & body, 0.004)  # mediastinum
    spine = (du < 0.032) & body
    image += (0.07 + 0.03 * np.cos(2 * np.pi * v / rng.uniform(0.055, 0.07))).astype(np.float32) * soft(spine, 0.003)
    image += rng.uniform(0.11, 0.15) * soft(heart, 0.004)

    lungs = masks["right_lung"] | masks["left_lung"]
    lung_f = lungs.astype(np.float32)
    hilum = np.zeros(size, np.float32)
    for p, sign in ((right_p, -1), (left_p, 1)):
        hu, hv = p["cx"] - sign * p["medial"] * 0.6, p["top"] + 0.42 * (p["angle"] - p["top"])
        hilum += np.exp(-(((u - hu) / 0.06) ** 2 + ((v - hv) / 0.09) ** 2)).astype(np.float32)
    texture = _smooth_noise(rng, size, 0.008 * side)
    image -= AIR * lung_f * (1 - 0.25 * hilum - 0.05 * texture)

    # Ribs: posterior arcs (rise from the spine, fall laterally) and fainter anterior ribs.
    spacing = rng.uniform(0.058, 0.068)
    start = rng.uniform(0.11, 0.14)
    ribs = np.zeros(size, np.float32)
    reach = (du > 0.03) & (du < 0.42)
    for k in range(11):
        v0 = start + k * spacing
        centre = v0 - 0.35 * du + 1.3 * du ** 2
        ribs += (_band(v, centre, 0.011 + 0.0006 * k) * reach).astype(np.float32)
        anterior = v0 + 0.02 + 0.35 * np.clip(0.38 - du, 0, None)
        ribs += (0.45 * _band(v, anterior, 0.008) * ((du > 0.12) & (du < 0.38))).astype(np.float32)
    clavicle = (_band(v, 0.165 - 0.25 * (du - 0.06) + 0.5 * (du - 0.06) ** 2 + rng.normal(0, 0.01), 0.014)
                * ((du > 0.05) & (du < 0.33))).astype(np.float32)
    bone_weight = soft(body, 0.004) * (0.5 + 0.5 * soft(lungs, 0.004))  # ribs show mostly over the lungs
    image += (rng.uniform(0.05, 0.075) * ribs + 0.12 * clavicle) * bone_weight

    # Exposure, blur and noise: drawn before the opacities so scores never change them.
    blur = rng.uniform(0.5, 1.0) * side / 256
    gain, offset, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.03, 0.04), rng.uniform(0.85, 1.2)
    noise = rng.normal(0, rng.uniform(0.008, 0.025), size).astype(np.float32)
    opacity_rng = np.random.default_rng(rng.integers(1 << 62))

    regions = region_masks(masks)
    opacity = np.zeros(size, np.float32)
    for name, score in zip(REGIONS, scores):
        field = (_smooth_noise(opacity_rng, size, 0.035 * side)
                 + 0.5 * _smooth_noise(opacity_rng, size, 0.012 * side))
        grain = _smooth_noise(opacity_rng, size, 0.006 * side)
        region = regions[name]
        coverage, density = OPACITY[score]
        if not coverage or not region.any():
            continue
        level = np.quantile(field[region], 1 - coverage)
        blotch = soft(region & (field >= level), 0.012) * (0.9 + 0.1 * np.clip(grain, -2, 2) / 2)
        opacity += density * blotch * region
    image += AIR * opacity

    image = cv2.GaussianBlur(image, (0, 0), blur)
    image = np.clip(image * gain + offset, 0, None) ** gamma + noise
    return (image * 255).astype(np.float32), masks, pose


def chest_phantom(rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE,
                  scores: Sequence[int] | str | int = (0, 0, 0, 0, 0, 0)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One phantom chest X-ray: (uint8 image (H, W), {structure: bool mask (H, W)} for ``STRUCTURES``).

    ``scores`` are the six region scores A..F (0-3); see ``render_chest`` for the draw order.
    """
    image, masks, _ = render_chest(rng, tuple(size), scores)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


# ---------------------------------------------------------------- files

def _write_dicom(path: Path, stored: np.ndarray, *, photometric: str, modality: str, bits_stored: int,
                 window: tuple[float, float] | None, row: dict[str, Any], uid_seed: str) -> None:
    """Uncompressed (explicit VR little endian) 16-bit CR/DX file; UIDs derived from ``uid_seed``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = modality
    ds.StudyDate = row["StudyDate"]
    ds.StudyID = str(row["StudyId"])[-16:]
    ds.PatientName = "Phantom^Brixia"
    ds.PatientID = str(row["Subject"])
    ds.PatientSex = row["Sex"]
    ds.PatientAge = f"{int(row['AgeAtStudyDateFiveYear']):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageComments = "synthetic phantom (train.phantoms.brixia), not clinical data"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(stored.astype("<u2")).tobytes()
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)


def _save_image(folder: Path, stem: str, index: int, image: np.ndarray, row: dict[str, Any], seed: int) -> str:
    """Write one phantom in the format its index picks; returns the file name written."""
    clipped = np.clip(image, 0, 255) / 255.0
    kind = index % 10
    if kind == 2:  # CR, MONOCHROME1: stored high = dark, 10 bits, no window (read min-max, inverted)
        stored = np.rint((1 - clipped) * 1023).astype(np.uint16)
        _write_dicom(folder / f"{stem}.dcm", stored, photometric="MONOCHROME1", modality="CR", bits_stored=10,
                     window=None, row=row, uid_seed=f"brixia-phantom-{seed}-{stem}")
        return f"{stem}.dcm"
    if kind == 5:  # DX, MONOCHROME2, 12 of 16 bits, offset, window over the rendered range
        low, top = 160, 3900
        stored = np.rint(low + clipped * (top - low)).astype(np.uint16)
        _write_dicom(folder / f"{stem}.dcm", stored, photometric="MONOCHROME2", modality="DX", bits_stored=12,
                     window=((low + top) / 2, top - low), row=row, uid_seed=f"brixia-phantom-{seed}-{stem}")
        return f"{stem}.dcm"
    if index % 5 == 3:  # 16-bit gray PNG: 0..4095 or 0..65535
        top = 4095 if kind == 3 else 65535
        Image.fromarray(np.rint(clipped * top).astype(np.uint16)).save(folder / f"{stem}.png", optimize=True)
        return f"{stem}.png"
    Image.fromarray(np.rint(clipped * 255).astype(np.uint8), mode="L").save(folder / f"{stem}.png", optimize=True)
    return f"{stem}.png"


def _consensus_rows(n: int, subjects: list[int], rng: np.random.Generator) -> set[int]:
    """Indices of the consensus test set: ~10 % of images (>= 2 from n = 10), single-study subjects only."""
    count = max(2, round(n / 10)) if n >= 10 else round(n / 10)
    studies = {s: subjects.count(s) for s in subjects}
    single = [i for i in range(n) if studies[subjects[i]] == 1]
    pool = single if len(single) >= count else list(range(n))
    return {int(i) for i in rng.choice(pool, size=min(count, len(pool)), replace=False)}


def write_brixia_phantoms(out: str | Path, n: int = 20, size: tuple[int, int] = DEFAULT_SIZE,
                          seed: int = 0) -> dict[str, Any]:
    """Write ``n`` chest phantoms in the BrixIA layout into ``out``; returns the note (also ``out/synthetic.json``).

    - ``images/brixia_0001.png`` ...: 8-bit gray PNG; index % 5 == 3 (0-based) 16-bit gray PNG
      (0..4095 or 0..65535); index % 10 == 2 a DICOM CR MONOCHROME1 (10 bits stored) and
      index % 10 == 5 a DICOM DX MONOCHROME2 (12 of 16 bits, WindowCenter/Width), as ``.dcm``.
    - ``masks/{right_lung,left_lung,heart}/<stem>.png``: 8-bit 0/255; right = patient's right =
      image left; lung masks exclude the heart.
    - ``metadata_global_v2.csv`` (``;``): Filename (always ``<stem>.dcm``), StudyDate, Modality,
      StudyId, BrixiaScore (six digits A..F as an integer, leading zeros dropped), BrixiaScoreGlobal,
      ConsensusTestset, Subject (some subjects have two studies), Sex, AgeAtStudyDateFiveYear.
    - ``metadata_consensus_v1.csv`` (``;``): the ConsensusTestset rows with noisy rater means
      (MeanA-F), the true scores (ModeA-F), S-Global (their sum) and J-Global (+-1).
    """
    out = Path(out)
    size = tuple(int(s) for s in size)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in STRUCTURES:
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)

    # Studies first (subjects, dates, scores), then images, so metadata draws never move the images.
    rows, scores, subjects = [], [], []
    subject, last = 0, None
    first_day = datetime.date(2020, 3, 1)
    for i in range(n):
        follow_up = last is not None and subjects.count(subject) == 1 and rng.random() < 0.35
        if follow_up:
            severity = last["severity"] + rng.normal(0, 0.7)
            day = last["day"] + int(rng.integers(2, 12))
            sex, age = last["sex"], last["age"]
        else:
            subject += 1
            severity = rng.uniform(-1.1, 2.7)
            day = int(rng.integers(0, 60))
            sex, age = ("M" if rng.random() < 0.62 else "F"), int(5 * rng.integers(6, 18))
        region = draw_scores(rng, severity)
        last = {"severity": severity, "day": day, "sex": sex, "age": age}
        subjects.append(subject)
        scores.append(region)
        rows.append({"Filename": f"brixia_{i + 1:04d}.dcm",
                     "StudyDate": (first_day + datetime.timedelta(days=day)).strftime("%Y%m%d"),
                     "Modality": "CR" if i % 10 == 2 else "DX" if i % 10 == 5 else
                     ("DX" if rng.random() < 0.3 else "CR"),
                     "StudyId": 100001 + i, "BrixiaScore": brixia_score_string(region),
                     "BrixiaScoreGlobal": sum(region), "ConsensusTestset": 0, "Subject": 1000 + subject,
                     "Sex": sex, "AgeAtStudyDateFiveYear": age})
    consensus = _consensus_rows(n, subjects, rng)
    consensus_rows = []
    for i in sorted(consensus):
        rows[i]["ConsensusTestset"] = 1
        means = np.clip(np.array(scores[i]) + rng.normal(0, 0.25, 6), 0, 3)
        total = sum(scores[i])
        consensus_rows.append({"Filename": rows[i]["Filename"],
                               **{f"Mean{r}": f"{m:.2f}" for r, m in zip(REGIONS, means)},
                               **{f"Mode{r}": s for r, s in zip(REGIONS, scores[i])},
                               "S-Global": total, "J-Global": int(np.clip(total + rng.integers(-1, 2), 0, 18))})

    written = {}
    for i, row in enumerate(rows):
        stem = row["Filename"][:-4]
        image, masks, _ = render_chest(rng, size, scores[i])
        written[stem] = _save_image(out / "images", stem, i, image, row, seed)
        for name in STRUCTURES:
            Image.fromarray(masks[name].astype(np.uint8) * 255, mode="L").save(
                out / "masks" / name / f"{stem}.png", optimize=True)

    for name, columns, table in (("metadata_global_v2.csv", GLOBAL_COLUMNS, rows),
                                 ("metadata_consensus_v1.csv", CONSENSUS_COLUMNS, consensus_rows)):
        with open(out / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter=";", lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)

    region_counts = {str(k): int(sum(s.count(k) for s in scores)) for k in range(4)}
    global_counts: dict[str, int] = {}
    for s in sorted(sum(s) for s in scores):
        global_counts[str(s)] = global_counts.get(str(s), 0) + 1
    note = {"task": "brixia",
            "description": (f"synthetic chest X-ray phantoms (train.synthetic brixia, seed {seed}, "
                            f"{size[0]}x{size[1]}): lungs, heart, ribs under a random pose; region scores "
                            "0-3 as blotchy opacity covering ~0/15/40/80 % of each lung third; not clinical data"),
            "n": n, "size": list(size), "seed": seed,
            "class_counts": region_counts, "global_score_counts": global_counts,
            "subjects": subject, "consensus": len(consensus_rows),
            "files": {"png8": sum(1 for i, f in enumerate(written.values()) if f.endswith(".png") and i % 5 != 3),
                      "png16": sum(1 for i, f in enumerate(written.values()) if f.endswith(".png") and i % 5 == 3),
                      "dicom": sum(1 for f in written.values() if f.endswith(".dcm"))},
            "layout": {
                "images": "images/<stem>.png (8-bit gray; 0-based index % 5 == 3: 16-bit gray) or images/<stem>.dcm "
                          "(index % 10 == 2: CR MONOCHROME1 10-bit; index % 10 == 5: DX MONOCHROME2 12-bit with "
                          "window); read images/<Filename> if present, else images/<stem>.png",
                "masks": "masks/{right_lung,left_lung,heart}/<stem>.png, 8-bit 0/255; right_lung = patient's "
                         "right = image left; lung masks exclude the heart",
                "metadata_global_v2.csv": "';'-separated " + ";".join(GLOBAL_COLUMNS) + "; Filename is always "
                                          "<stem>.dcm; BrixiaScore A..F digits without leading zeros (zfill(6))",
                "metadata_consensus_v1.csv": "';'-separated " + ";".join(CONSENSUS_COLUMNS),
                "regions": "A,B,C = upper/middle/lower third (by image rows) of right_lung (image left); D,E,F "
                           "the same of left_lung (image right)"}}
    (out / "synthetic.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return note
