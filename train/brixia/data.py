"""Brixia training data: lung/heart mask folders, the BrixIA metadata, and the datasets of the three stages.

Segmentation data is "one folder of images, one folder of masks per structure", as the public
lung-mask sets ship them: ``MASKS/<structure>/<stem>.png`` (also ``<stem>_mask.png``), with the
structure folders named ``right_lung``/``left_lung``/``heart`` or the usual variants
(``rightMask``, ``leftMask``, ``right lung`` ...). Right and left are the patient's: the right
lung is on the image's left.

Augmentations never flip horizontally (that would swap right and left lung and the regions):
segmentation and scoring draw a small rotation (+-10 / +-5 degrees), scale (0.9-1.1 / 0.95-1.05),
shift (+-5 / +-3 %) and brightness/contrast; the STN draws larger poses (+-20 degrees, scale
0.75-1.15, shift +-12 %) so it learns to undo them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from tasks import brixia, brixia_orient
from tasks.frames import fit_masks_to_model, fit_to_model
from tasks.imaging import ImageReadError, read_image
from train.brixia.sources import UNLABELLED, MaskCase, SegCase, case_targets
from train.core.samples import FoldSamples

def read_mask(path: Path) -> np.ndarray:
    """A mask PNG -> bool (any non-zero pixel is inside)."""
    try:
        return read_image(path, color="gray") > 0
    except ImageReadError as exc:
        raise SystemExit(f"cannot read mask {path}: {exc}") from exc


def read_gray(path: Path) -> np.ndarray:
    try:
        return read_image(path, color="gray")
    except ImageReadError as exc:
        raise SystemExit(f"cannot read training image {path}: {exc}") from exc


def case_masks(case: MaskCase) -> np.ndarray:
    """(3, H, W) bool masks of a case at their own size."""
    masks = [read_mask(path) for path in case.masks]
    if len({m.shape for m in masks}) != 1:
        raise SystemExit(f"masks of {case.stem} differ in size: {[m.shape for m in masks]}")
    return np.stack(masks)


def seg_sample(case: SegCase, input_spec: dict[str, Any], channels: int) -> np.ndarray:
    """Image and masks in the model frame as one uint8 (1 + channels, S, S) array (cacheable): masks
    0/1, a channel the source does not label filled with ``UNLABELLED``."""
    gray = read_gray(case.image)
    masks, labelled = case_targets(case, channels, gray.shape)
    frame, geometry = brixia.prepare_frame(gray, input_spec)
    fitted = fit_masks_to_model(masks, geometry).astype(np.uint8)
    fitted[~labelled] = UNLABELLED
    return np.concatenate([frame[None], fitted])


def mask_sample(case: MaskCase, input_spec: dict[str, Any]) -> np.ndarray:
    """The three masks alone in the model frame, uint8 (3, S, S) (the STN's data)."""
    masks = case_masks(case)
    frame, geometry = fit_to_model(np.zeros(masks.shape[1:], np.uint8), input_spec)
    return fit_masks_to_model(masks, geometry).astype(np.uint8)


# ---------------------------------------------------------------- augmentation

def random_affine(arrays: list[np.ndarray], draws: list[float], rotation: float, scale: tuple[float, float],
                  shift: float, nearest_from: int = 1) -> list[np.ndarray]:
    """Rotate/scale/shift (S, S) uint8 arrays alike about the centre (``draws``: three numbers in
    [0, 1)); arrays from index ``nearest_from`` on are masks (nearest neighbour)."""
    size = arrays[0].shape[-1]
    angle = (draws[0] * 2 - 1) * rotation
    factor = scale[0] + (scale[1] - scale[0]) * draws[1]
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, factor)
    matrix[:, 2] += (np.array([draws[2], (draws[2] * 7.31) % 1.0]) * 2 - 1) * shift * size
    out = []
    for k, array in enumerate(arrays):
        flags = cv2.INTER_NEAREST if k >= nearest_from else cv2.INTER_LINEAR
        out.append(cv2.warpAffine(array, matrix, (size, size), flags=flags, borderValue=0))
    return out


def jitter_intensity(image: np.ndarray, draws: list[float]) -> np.ndarray:
    """Brightness +-0.1 and contrast 0.8-1.2 on a uint8 image."""
    contrast, brightness = 0.8 + 0.4 * draws[0], (draws[1] * 2 - 1) * 0.1
    values = (image.astype(np.float32) / 255 - 0.5) * contrast + 0.5 + brightness
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)


class _Samples(FoldSamples):
    def __init__(self, sample: Callable[[int], np.ndarray], indices: list[int], input_spec: dict[str, Any],
                 train: bool, seed: int | None = None):
        super().__init__(indices, train, seed)
        self.sample, self.input_spec = sample, input_spec

    def draws(self, count: int) -> list[float]:
        """``count`` uniform draws from the augmentation RNG (``FoldSamples.rng``)."""
        return torch.rand(count, generator=self.rng()).tolist()


class SegSamples(_Samples):
    """-> (normalised image (1, S, S), float masks (C, S, S) with -1 on channels not labelled, index)."""

    def __getitem__(self, position: int):
        index = self.indices[position]
        stacked = self.sample(index)
        image, masks = stacked[0], stacked[1:]
        unlabelled = (masks == UNLABELLED).all(axis=(1, 2))
        if self.train:
            draws = self.draws(6)
            if draws[0] < 0.7:
                warped = random_affine([image, *masks], draws[1:4], rotation=10, scale=(0.9, 1.1), shift=0.05)
                image, masks = warped[0], np.stack(warped[1:])
            if draws[4] < 0.7:
                image = jitter_intensity(image, self.draws(2))
        target = torch.from_numpy(np.ascontiguousarray(masks)).float()
        target[torch.from_numpy(unlabelled)] = -1.0
        return brixia.to_tensor(image, self.input_spec), target, index


class StnSamples(_Samples):
    """-> (two lung masks at STN size (2, s, s), target theta (2, 3), index).

    Every sample is posed by a random affine (training: fresh each time; validation: fixed per
    item) and its target is ``tasks.brixia.mask_theta`` of the posed masks, so the STN learns to
    undo poses it has never seen without hand registration.
    """

    def __init__(self, *args, stn_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stn_size = stn_size

    def __getitem__(self, position: int):
        index = self.indices[position]
        masks = self.sample(index)
        fixed = None if self.train else torch.Generator().manual_seed(index)   # validation: the same poses every epoch
        for _ in range(5):
            draws = self.draws(3) if fixed is None else torch.rand(3, generator=fixed).tolist()
            posed = np.stack(random_affine(list(masks), draws, rotation=20, scale=(0.75, 1.15), shift=0.12,
                                           nearest_from=0)) > 0
            theta = brixia.mask_theta(posed[0], posed[1])
            if theta is not None:
                break
        else:
            posed = masks > 0
            theta = brixia.mask_theta(posed[0], posed[1])
            if theta is None:
                theta = brixia.identity_theta()
        return brixia.stn_input(posed, self.stn_size), torch.from_numpy(theta), index


class OrientSamples(_Samples):
    """-> (the frame in a pose, at the classifier's side (1, s, s), the pose index, index).

    Training draws a random pose per sample and a small rotation/scale and intensity jitter;
    validation shows film ``k`` in pose ``k mod 8``, so every pose is measured."""

    def __init__(self, *args, orient_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.orient_size = orient_size

    def __getitem__(self, position: int):
        index = self.indices[position]
        frame = self.sample(index)
        if self.train:
            draws = self.draws(6)
            pose = min(int(draws[0] * len(brixia_orient.POSES)), len(brixia_orient.POSES) - 1)
            frame = random_affine([frame], draws[1:4], rotation=10, scale=(0.9, 1.1), shift=0.05)[0]
            if draws[4] < 0.7:
                frame = jitter_intensity(frame, self.draws(2))
        else:
            pose = index % len(brixia_orient.POSES)
        posed = brixia_orient.apply_pose(frame, pose)
        return brixia_orient.orient_input(brixia.to_tensor(posed, self.input_spec), self.orient_size), \
            torch.tensor(pose, dtype=torch.long), index


class ScoreSamples(_Samples):
    """-> (scorer inputs {image, regions[, opacity]}, targets, index): targets are region scores (6,)
    long, or score distributions (6, 4) float for a mean of readers."""

    def __init__(self, *args, targets: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets = targets

    def __getitem__(self, position: int):
        index = self.indices[position]
        packed = self.sample(index)
        if self.train:
            draws = self.draws(6)
            if draws[0] < 0.6:
                warped = random_affine(list(packed), draws[1:4], rotation=5, scale=(0.95, 1.05), shift=0.03)
                packed = np.stack(warped)
            if draws[4] < 0.7:
                packed = packed.copy()
                packed[0] = jitter_intensity(packed[0], self.draws(2))
        target = np.asarray(self.targets[index])
        target = torch.from_numpy(target.astype(np.float32)) if target.ndim == 2 else \
            torch.from_numpy(target.astype(np.int64))
        return brixia.scorer_inputs(packed, self.input_spec), target, index
