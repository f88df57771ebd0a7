"""Intensity policies for X-rays from many sources: one window, recorded in the card, used by trainer and daemon.

Real chest films arrive as 8-bit JPEGs from papers, 16-bit PNGs, DICOMs windowed by the
reader, photographed films and figure crops: their grey levels differ far more than their
anatomy. ``center-percentile`` stretches the ``low``..``high`` percentiles of the central part
of the model frame (``center``: the share of width and height kept, so the black borders,
burned-in text and markers near the edges do not set the window) onto 0..255. It runs on the
model frame (e.g. 256 x 256), so it costs well under a millisecond and sees the same pixels at
training and serving time.
"""
from __future__ import annotations

from typing import Any

import numpy as np

POLICIES = ("none", "center-percentile")
MIN_SPAN = 8.0   # a window narrower than this many grey levels (a flat image) is not stretched


def default_intensity(policy: str = "center-percentile", low: float = 1.0, high: float = 99.0,
                      center: float = 0.8) -> dict[str, Any]:
    """The card's ``input.intensity`` record."""
    if policy not in POLICIES:
        raise ValueError(f"intensity policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if policy == "none":
        return {"policy": "none"}
    if not 0 <= low < high <= 100 or not 0 < center <= 1:
        raise ValueError(f"center-percentile needs 0 <= low < high <= 100 and 0 < center <= 1 "
                         f"(got low={low}, high={high}, center={center})")
    return {"policy": policy, "low": float(low), "high": float(high), "center": float(center)}


def central_box(shape: tuple[int, int], center: float) -> tuple[slice, slice]:
    """Rows and columns of the central ``center`` share of an image."""
    height, width = shape
    dy, dx = round(height * (1 - center) / 2), round(width * (1 - center) / 2)
    return slice(dy, max(dy + 1, height - dy)), slice(dx, max(dx + 1, width - dx))


def apply_intensity(frame: np.ndarray, intensity: dict[str, Any] | None) -> np.ndarray:
    """uint8 gray frame -> uint8 frame under the card's policy (no record or ``none``: unchanged)."""
    if not intensity or intensity.get("policy", "none") == "none":
        return frame
    if intensity["policy"] != "center-percentile":
        raise ValueError(f"unknown intensity policy {intensity['policy']!r}; known: {', '.join(POLICIES)}")
    rows, cols = central_box(frame.shape, float(intensity.get("center", 0.8)))
    low, high = np.percentile(frame[rows, cols], [float(intensity.get("low", 1.0)), float(intensity.get("high", 99.0))])
    if high - low < MIN_SPAN:
        return frame
    lut = np.clip(np.rint((np.arange(256, dtype=np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return lut[frame]
