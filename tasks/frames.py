"""Where an input of any size sits in a square model frame, and how outputs go back to the input's size.

Tasks that segment (handbone, brixia) bring an image to the card's square model size by
``letterbox`` (keep the aspect ratio, pad) or ``resize`` (stretch) and must map every output
back onto the input's own pixels; the ``Geometry`` of ``fit_to_model`` records how.
``dice_per_class`` compares such masks, in the trainers of both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

FITS = ("letterbox", "resize")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Geometry:
    """Where an input of ``height`` x ``width`` sits in the square model frame of side ``size``.

    The image occupies rows ``top:top+inner_height`` and columns ``left:left+inner_width``; the
    rest is padding (letterbox) or nothing (resize: the inner box is the whole frame).
    """
    height: int
    width: int
    size: int
    top: int
    left: int
    inner_height: int
    inner_width: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("height", "width", "size", "top", "left", "inner_height", "inner_width")}


def model_geometry(height: int, width: int, input_spec: dict[str, Any]) -> Geometry:
    """The mapping of an input of ``height`` x ``width`` into the card's model frame."""
    size = int(input_spec["size"][0])
    if input_spec.get("fit", "letterbox") == "resize":
        return Geometry(height, width, size, 0, 0, size, size)
    scale = size / max(height, width)
    inner_h, inner_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    return Geometry(height, width, size, (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w)


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < array.shape[1] * array.shape[0]
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def fit_to_model(gray: np.ndarray, input_spec: dict[str, Any]) -> tuple[np.ndarray, Geometry]:
    """8-bit gray image of any size -> (uint8 image at model size, its Geometry)."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("model-frame preprocessing expects an 8-bit grayscale image")
    geometry = model_geometry(*gray.shape, input_spec)
    frame = np.full((geometry.size, geometry.size), int(input_spec.get("pad_value", 0)), dtype=np.uint8)
    frame[geometry.top:geometry.top + geometry.inner_height, geometry.left:geometry.left + geometry.inner_width] = \
        _resize(gray, geometry.inner_width, geometry.inner_height)
    return frame, geometry


def fit_masks_to_model(masks: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(C, H, W)`` bool masks -> ``(C, S, S)`` bool masks in the model frame (area-weighted, >= 0.5)."""
    frame = np.zeros((masks.shape[0], geometry.size, geometry.size), dtype=bool)
    for k, mask in enumerate(masks):
        inner = _resize(mask.astype(np.float32), geometry.inner_width, geometry.inner_height)
        frame[k, geometry.top:geometry.top + geometry.inner_height,
              geometry.left:geometry.left + geometry.inner_width] = inner >= 0.5
    return frame


def probabilities_at_input(probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(C, S, S)`` model-frame probabilities -> ``(C, H, W)`` float32 at the input's size (bilinear)."""
    inner = probabilities[:, geometry.top:geometry.top + geometry.inner_height,
                          geometry.left:geometry.left + geometry.inner_width]
    out = np.empty((probabilities.shape[0], geometry.height, geometry.width), dtype=np.float32)
    for k, channel in enumerate(inner):
        out[k] = cv2.resize(np.ascontiguousarray(channel, dtype=np.float32), (geometry.width, geometry.height),
                            interpolation=cv2.INTER_LINEAR)
    return out


def masks_at_input(probabilities: np.ndarray, geometry: Geometry, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(C, S, S)`` probabilities -> ``(C, H, W)`` bool masks at the input's size, one class at a time
    (a 2048x2048 input never holds all 29 float maps at once)."""
    masks = np.empty((probabilities.shape[0], geometry.height, geometry.width), dtype=bool)
    for k in range(probabilities.shape[0]):
        masks[k] = probabilities_at_input(probabilities[k:k + 1], geometry)[0] > threshold
    return masks


def dice_per_class(predicted: np.ndarray, truth: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Dice of each class of ``(C, H, W)`` bool masks, as the seed: (2|A&B| + eps) / (|A| + |B| + eps),
    so a class absent from both counts as 1."""
    predicted, truth = predicted.reshape(len(predicted), -1), truth.reshape(len(truth), -1)
    inter = np.count_nonzero(predicted & truth, axis=1).astype(np.float64)
    total = np.count_nonzero(predicted, axis=1) + np.count_nonzero(truth, axis=1)
    return (2 * inter + eps) / (total + eps)
