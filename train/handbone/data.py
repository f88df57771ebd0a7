"""Hand-bone training data: the seed's layout (``DCM/IDxxx/*.png`` + ``outputs_json/IDxxx/*.json``), samples and augmentations.

A sample is the image and its 29 masks brought to the model frame by ``tasks.handbone``
(the preprocessing the daemon serves with), then, for training only, augmented together:

- horizontal flip, p=0.5 (a left hand looks like a mirrored right hand; the seed flipped too);
- rotation by up to +-10 degrees and scaling by 0.9..1.1 about the centre, p=0.5 (image
  bilinear, masks nearest, black fill);
- brightness +-0.1 and contrast 0.8..1.2 (on the 0..1 image), p=0.5;
- elastic deformation (``--elastic``, p=0.3): a smooth random displacement field (sigma 1/20
  of the side, up to 1/50 of the side), as the seed's k-fold run used ``ElasticTransform``.

Draws come from a torch generator seeded per fold, so runs are reproducible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from tasks import handbone
from tasks.imaging import ImageReadError, image_dimensions, is_image_file, read_image
from train.core.samples import FoldSamples



@dataclass
class Case:
    """One training image: its item name (relative to DATA), files, and patient (the IDxxx folder)."""
    item: str
    image: Path
    annotation: Path
    patient: str


def find_cases(data: str | Path) -> list[Case]:
    """Every image under ``DATA/DCM`` with its JSON under ``DATA/outputs_json`` (same relative path, ``.json``)."""
    data = Path(data)
    images_root, json_root = data / "DCM", data / "outputs_json"
    if not images_root.is_dir() or not json_root.is_dir():
        raise SystemExit(f"{data} must hold DCM/IDxxx/*.png and outputs_json/IDxxx/*.json (the seed's layout)")
    cases, missing = [], []
    for image in sorted(p for p in images_root.rglob("*") if is_image_file(p)
                        and not p.name.startswith(".")):
        relative = image.relative_to(images_root)
        annotation = (json_root / relative).with_suffix(".json")
        if not annotation.is_file():
            missing.append(str(relative))
            continue
        patient = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        cases.append(Case(image.relative_to(data).as_posix(), image, annotation, patient))
    if missing:
        raise SystemExit(f"{len(missing)} image(s) under {images_root} have no JSON under {json_root}, "
                         f"e.g. {missing[:3]}")
    if not cases:
        raise SystemExit(f"no images under {images_root}")
    return cases


def read_annotations(path: Path) -> list[dict[str, Any]]:
    """The ``annotations`` list of a seed JSON file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot read annotations from {path}: {exc}") from exc


def original_masks(case: Case, classes: list[str]) -> np.ndarray:
    """``(C, H, W)`` bool masks of a case at the image's own size (what validation Dice compares with)."""
    height, width = image_dimensions(case.image)
    return handbone.annotation_masks(read_annotations(case.annotation), height, width, classes)


def model_sample(case: Case, input_spec: dict[str, Any], classes: list[str]) -> np.ndarray:
    """Image and masks in the model frame as one uint8 array ``(1 + C, S, S)`` (cacheable, compact)."""
    try:
        gray = read_image(case.image, color="gray")
    except ImageReadError as exc:
        raise SystemExit(f"cannot read training image {case.image}: {exc}") from exc
    frame, geometry = handbone.fit_to_model(gray, input_spec)
    masks = handbone.annotation_masks(read_annotations(case.annotation), *gray.shape, classes)
    return np.concatenate([frame[None], handbone.fit_masks_to_model(masks, geometry).astype(np.uint8)])


def _affine(image: np.ndarray, masks: np.ndarray, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
    image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    masks = cv2.warpAffine(np.ascontiguousarray(masks.transpose(1, 2, 0)), matrix, (size, size),
                           flags=cv2.INTER_NEAREST, borderValue=0)
    return image, masks.reshape(size, size, -1).transpose(2, 0, 1)


def _elastic(image: np.ndarray, masks: np.ndarray, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    field = torch.randn(2, size, size, generator=generator).numpy()
    sigma, strength = size / 20, size / 50
    dx, dy = (cv2.GaussianBlur(f, (0, 0), sigma) for f in field)
    dx, dy = (d / (np.abs(d).max() + 1e-8) * strength for d in (dx, dy))
    xs, ys = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    map_x, map_y = (xs + dx).astype(np.float32), (ys + dy).astype(np.float32)
    image = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
    remapped = [cv2.remap(m, map_x, map_y, cv2.INTER_NEAREST, borderValue=0) for m in masks]
    return image, np.stack(remapped)


def augmented(image: np.ndarray, masks: np.ndarray, generator: torch.Generator | None,
              elastic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The training augmentations of the module docstring, applied to uint8 image and masks alike."""
    draws = torch.rand(8, generator=generator).tolist()
    if draws[0] < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    image, masks = np.ascontiguousarray(image), np.ascontiguousarray(masks)
    if draws[1] < 0.5:
        image, masks = _affine(image, masks, angle=(draws[2] * 2 - 1) * 10, scale=0.9 + 0.2 * draws[3])
    if draws[4] < 0.5:
        contrast, brightness = 0.8 + 0.4 * draws[5], (draws[6] * 2 - 1) * 0.1
        values = (image.astype(np.float32) / 255 - 0.5) * contrast + 0.5 + brightness
        image = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    if elastic and draws[7] < 0.3:
        image, masks = _elastic(image, masks, generator)
    return image, masks


class HandboneSamples(FoldSamples):
    """Cases -> (normalised input (3, S, S), float masks (C, S, S), item index)."""

    def __init__(self, sample: Callable[[int], np.ndarray], indices: list[int], input_spec: dict[str, Any],
                 train: bool, elastic: bool = False, seed: int | None = None):
        super().__init__(indices, train, seed)
        self.sample, self.input_spec, self.elastic = sample, input_spec, elastic

    def __getitem__(self, position: int):
        index = self.indices[position]
        stacked = self.sample(index)
        image, masks = stacked[0], stacked[1:]
        if self.train:
            image, masks = augmented(image, masks, self.rng(), self.elastic)
        return (handbone.to_tensor(image, self.input_spec), torch.from_numpy(np.ascontiguousarray(masks)).float(),
                index)


def geometry_of(case: Case, input_spec: dict[str, Any]) -> handbone.Geometry:
    """The model-frame geometry of a case, from its header only."""
    return handbone.model_geometry(*image_dimensions(case.image), input_spec)


def handbone_frame_samples(cases: Sequence[Any], input_spec: dict[str, Any], classes: list[str],
                           sample=None) -> list[tuple[np.ndarray, handbone.Geometry]]:
    """The ground-truth masks of hand-bone training cases in the model frame, with their geometry
    (``sample(i)``: a cached ``model_sample`` of case i, when the trainer has one)."""
    frames = []
    for k, case in enumerate(tqdm(cases, desc="quality", leave=False)):
        stacked = sample(k) if sample is not None else model_sample(case, input_spec, classes)
        frames.append((stacked[1:].astype(bool), geometry_of(case, input_spec)))
    return frames
