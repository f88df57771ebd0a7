"""Synthetic hand X-ray phantoms for the handbone task, in the seed's layout: ``DCM/IDxxx/*.png`` + ``outputs_json/IDxxx/*.json``.

Each phantom is an 8-bit gray PNG of a hand seen palm-down (fingers up): soft tissue around
29 bones drawn as polygons, each bone a superellipse with a bright cortical rim. Bone densities
add up, so where two bones overlap (metacarpal bases over the distal carpal row, the pisiform
over the triquetrum, neighbouring carpals) the image is brighter, as on a radiograph. The JSON
holds exactly those polygons with the seed's schema (``{"annotations": [{"id", "type":
"poly_seg", "attributes", "points": [[x, y], ...], "label"}]}``), so the masks the trainer fills
from it are the bones in the image. Every patient folder holds a right hand and a mirrored
left hand, as the seed's data did. Pose, proportions, exposure and noise vary per image. Never
clinical data.

Finger numbering of the phantoms: finger-1..3 thumb (distal phalanx, proximal phalanx,
metacarpal), then four bones per finger from the index to the little finger (distal, middle,
proximal phalanx, metacarpal): finger-4..7, 8..11, 12..15, 16..19.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from tasks.handbone import CLASSES

DEFAULT_SIZE = (512, 512)
# Carpals and forearm in unit coordinates (x right, y down; thumb on the left):
# name -> (centre x, centre y, half length, half width, angle in degrees from vertical, squareness)
FIXED_BONES = {
    "Radius": (0.40, 1.00, 0.20, 0.085, 3, 4.0),
    "Ulna": (0.615, 1.01, 0.19, 0.055, -3, 4.0),
    "Scaphoid": (0.385, 0.765, 0.060, 0.040, 35, 2.2),
    "Lunate": (0.485, 0.775, 0.045, 0.042, 0, 2.2),
    "Triquetrum": (0.575, 0.760, 0.042, 0.038, -20, 2.2),
    "Pisiform": (0.600, 0.780, 0.027, 0.025, 0, 2.0),
    "Trapezium": (0.355, 0.690, 0.042, 0.036, 30, 2.4),
    "Trapezoid": (0.420, 0.675, 0.033, 0.030, 0, 2.4),
    "Capitate": (0.490, 0.680, 0.055, 0.036, 0, 2.6),
    "Hamate": (0.565, 0.680, 0.048, 0.036, -10, 2.4),
}
# Fingers: base of the metacarpal (x, y), direction (degrees from vertical, + toward the little
# finger), bone half widths and lengths from the metacarpal outward.
FINGERS = [
    {"base": (0.365, 0.640), "angle": -38, "width": 0.030, "lengths": [0.16, 0.11, 0.080]},  # thumb
    {"base": (0.430, 0.625), "angle": -8, "width": 0.028, "lengths": [0.20, 0.13, 0.075, 0.060]},
    {"base": (0.500, 0.620), "angle": 0, "width": 0.029, "lengths": [0.21, 0.14, 0.085, 0.062]},
    {"base": (0.565, 0.625), "angle": 8, "width": 0.027, "lengths": [0.20, 0.13, 0.080, 0.060]},
    {"base": (0.625, 0.640), "angle": 17, "width": 0.025, "lengths": [0.17, 0.11, 0.065, 0.055]},
]
JOINT_GAP = 0.010


def _finger_labels() -> list[list[str]]:
    """Class names per finger, metacarpal first (the order bones are laid out from the wrist)."""
    labels, number = [], 1
    for finger in FINGERS:
        count = len(finger["lengths"])
        labels.append([f"finger-{number + count - 1 - i}" for i in range(count)])
        number += count
    return labels


def superellipse(cx: float, cy: float, half_length: float, half_width: float, angle_deg: float,
                 squareness: float, n: int = 28) -> np.ndarray:
    """Polygon (n, 2) of a rotated superellipse; the long axis points ``angle_deg`` from vertical."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = half_width * np.sign(c) * np.abs(c) ** (2 / squareness)
    y = half_length * np.sign(s) * np.abs(s) ** (2 / squareness)
    a = math.radians(angle_deg)
    return np.stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)], axis=1)


def hand_polygons(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The 29 bone polygons of one random hand in unit coordinates (before pose)."""
    polygons = {}
    for name, (cx, cy, length, width, angle, square) in FIXED_BONES.items():
        jitter = rng.uniform(0.92, 1.08)
        polygons[name] = superellipse(cx + rng.normal(0, 0.004), cy + rng.normal(0, 0.004), length * jitter,
                                      width * jitter, angle + rng.normal(0, 4), square)
    spread = rng.uniform(0.7, 1.3)
    for finger, names in zip(FINGERS, _finger_labels()):
        angle = finger["angle"] * spread + rng.normal(0, 2)
        x, y = finger["base"]
        width = finger["width"] * rng.uniform(0.9, 1.1)
        for k, (length, name) in enumerate(zip(finger["lengths"], names)):
            length *= rng.uniform(0.92, 1.08)
            angle += rng.normal(0, 3) if k else 0.0
            a = math.radians(angle)
            dx, dy = math.sin(a), -math.cos(a)
            half = length / 2
            cx, cy = x + dx * half, y + dy * half
            polygons[name] = superellipse(cx, cy, half, width * (1 - 0.1 * k), angle, 3.0 if k == 0 else 2.6)
            x, y = x + dx * (length + JOINT_GAP), y + dy * (length + JOINT_GAP)
    return {name: polygons[name] for name in CLASSES}


def _pose(polygons: dict[str, np.ndarray], size: tuple[int, int], rng: np.random.Generator,
          mirror: bool) -> dict[str, np.ndarray]:
    """Place unit-coordinate polygons in pixels: mirror, rotate, scale and shift around the centre."""
    height, width = size
    side = min(height, width)
    angle = math.radians(rng.uniform(-10, 10))
    scale = rng.uniform(0.92, 1.05) * side
    shift = np.array([width / 2, height / 2]) + rng.normal(0, 0.02, 2) * side
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    placed = {}
    for name, points in polygons.items():
        centred = (points - np.array([0.5, 0.58])) * np.array([-1.0 if mirror else 1.0, 1.0])
        placed[name] = np.rint(centred @ rotation.T * scale + shift).astype(np.int32)
    return placed


def render(polygons: dict[str, np.ndarray], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A radiograph-like uint8 image of the placed bone polygons."""
    height, width = size
    scale = min(height, width) / DEFAULT_SIZE[0]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.uniform(8, 25) + rng.uniform(0, 20) * (xx / width if rng.random() < 0.5 else yy / height)
    masks = {}
    for name, points in polygons.items():
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [points], 1)
        masks[name] = mask
    union = np.clip(sum(masks.values()), 0, 1).astype(np.uint8)
    radius = max(2, int(14 * scale))
    tissue = cv2.dilate(union, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    tissue = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), 4 * scale)
    image = image + rng.uniform(35, 55) * tissue
    rim = max(1, int(round(3 * scale)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1, 2 * rim + 1))
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.5 * scale)
    for mask in masks.values():
        level = rng.uniform(55, 85)
        cortex = mask - cv2.erode(mask, kernel)
        image = image + mask * (level + 6 * texture) + cortex * rng.uniform(25, 45)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.6 * scale)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, rng.uniform(2, 5), (height, width))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def handbone_phantom(size: tuple[int, int] = DEFAULT_SIZE, rng: np.random.Generator | None = None,
                     mirror: bool = False) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One phantom: (uint8 image (H, W), the seed-format ``annotations`` list of its 29 bones)."""
    rng = rng or np.random.default_rng()
    polygons = _pose(hand_polygons(rng), size, rng, mirror)
    image = render(polygons, size, rng)
    annotations = [{"id": f"{k:04d}-{rng.integers(1 << 30):08x}", "type": "poly_seg", "attributes": {},
                    "points": points.tolist(), "label": name} for k, (name, points) in enumerate(polygons.items())]
    return image, annotations


def write_handbone_phantoms(out: str | Path, n: int = 20, size: tuple[int, int] = DEFAULT_SIZE,
                            seed: int = 0) -> dict[str, Any]:
    """Write ``n`` phantoms, two hands (right, mirrored left) per patient folder ``IDxxx``, plus ``synthetic.json``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(n):
        patient = f"ID{i // 2:03d}"
        name = f"image{seed:04d}{i:09d}"
        image, annotations = handbone_phantom(tuple(size), rng, mirror=bool(i % 2))
        (out / "DCM" / patient).mkdir(parents=True, exist_ok=True)
        (out / "outputs_json" / patient).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(out / "DCM" / patient / f"{name}.png", optimize=True)
        (out / "outputs_json" / patient / f"{name}.json").write_text(
            json.dumps({"annotations": annotations}), encoding="utf-8")
    note = {"task": "handbone", "description": (f"synthetic hand-bone phantoms (train.synthetic handbone, seed {seed}, "
                                                f"{size[0]}x{size[1]}): 29 labelled, partly overlapping bone "
                                                "polygons; not clinical data"),
            "n": n, "size": list(size), "seed": seed, "patients": (n + 1) // 2,
            "class_counts": {"images": n, "patients": (n + 1) // 2}}
    (out / "synthetic.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return note
