"""Synthetic panoramic dental X-ray phantoms for the osteo task: C1 (healthy) and C3 (osteoporosis) folders.

Each phantom is an 8-bit gray PNG: a dark field under a bright, smooth, low-frequency exposure
gradient (what the rolling ball removes), a U-shaped mandible with trabecular texture, upper
and lower teeth, and the mandibular inferior cortex as a bright band along the lower border.
The class lives only in that cortex, as in the mandibular cortical index: C1 has a thick,
homogeneous, bright cortex with a smooth inner margin; C3 a thin, dimmer, porous cortex with an
eroded (scalloped) inner margin. Thickness ranges overlap a little and every other feature
varies per image, plus noise, so the task is learnable but not trivial. Never clinical data.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DEFAULT_SIZE = (225, 477)  # (height, width): a sixth of a real ~1348x2863 panoramic
LABELS = ("C1", "C3")
# Cortex per class, in fractions of the image height (thickness) and grey levels.
CORTEX = {
    "C1": {"thickness": (0.028, 0.048), "erosion": (0.0, 0.15), "holes_per_arch": (0, 8), "level": (205, 240)},
    "C3": {"thickness": (0.012, 0.030), "erosion": (0.3, 0.7), "holes_per_arch": (40, 110), "level": (165, 215)},
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _smooth_wave(u: np.ndarray, rng: np.random.Generator, terms: int = 4, cycles: tuple = (3, 20)) -> np.ndarray:
    """A random smooth function of the arch coordinate, roughly in [-1, 1]."""
    wave = np.zeros_like(u)
    for _ in range(terms):
        wave += np.sin(np.pi * rng.uniform(*cycles) * u + rng.uniform(0, 2 * np.pi)) / terms
    return wave * np.sqrt(terms) / 1.5


def _layer(size: tuple[int, int], draw, blur: float) -> tuple[np.ndarray, np.ndarray]:
    """(premultiplied value, alpha) of shapes drawn by ``draw(value_draw, mask_draw)``, edge-softened."""
    height, width = size
    value, mask = Image.new("F", (width, height), 0.0), Image.new("L", (width, height), 0)
    draw(ImageDraw.Draw(value), ImageDraw.Draw(mask))
    alpha = np.asarray(mask, dtype=np.float32) / 255.0
    value = np.asarray(value, dtype=np.float32) * alpha
    if blur > 0:
        alpha = ndimage.gaussian_filter(alpha, blur)
        value = ndimage.gaussian_filter(value, blur)
    return value, alpha


def osteo_phantom(label: str, size: tuple[int, int] = DEFAULT_SIZE,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """One phantom panoramic X-ray of class ``label`` (C1 or C3) as uint8 (height, width)."""
    if label not in CORTEX:
        raise ValueError(f"osteo phantoms are C1 or C3, not {label!r}")
    rng = rng or np.random.default_rng()
    height, width = size
    scale = height / DEFAULT_SIZE[0]  # pixel sizes of blur and noise grow with the image
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = yy / height, xx / width

    # Mandible: inferior border y_b(u), lowest at the chin, rising toward the rami.
    x0, half = 0.5 + rng.normal(0, 0.02), rng.uniform(0.37, 0.43)
    u = (x - x0) / half
    uc = np.clip(u, -1, 1)
    border0, sag, body = rng.uniform(0.68, 0.74), rng.uniform(0.08, 0.14), rng.uniform(0.22, 0.28)
    y_border = border0 + sag * (1 - uc ** 2)
    y_crest = y_border - body
    edge = 1.2 / height
    inside_arch = _sigmoid((1.0 - np.abs(u)) * half * width / 1.5)
    body_mask = _sigmoid((y_border - y) / edge) * _sigmoid((y - y_crest) / edge) * inside_arch
    ramus_mask = (_sigmoid((np.abs(u) - 0.84) * half * width / 1.5) * _sigmoid((1.05 - np.abs(u)) * half * width / 1.5)
                  * _sigmoid((y - rng.uniform(0.18, 0.26)) / edge) * _sigmoid((y_border - y) / edge))
    bone = np.maximum(body_mask, ramus_mask)

    texture = ndimage.gaussian_filter(rng.normal(size=(height, width)).astype(np.float32), 1.3 * scale)
    texture /= texture.std() + 1e-6
    image = rng.uniform(10, 30) + np.zeros((height, width), np.float32)
    trabecular = rng.uniform(85, 115) + 14 * texture
    image = image * (1 - bone) + trabecular * bone

    # Inferior cortex: the class sign.
    spec = CORTEX[label]
    thickness = rng.uniform(*spec["thickness"]) * (0.7 + 0.3 * (1 - uc ** 2))
    erosion = rng.uniform(*spec["erosion"])
    inner = thickness * (1 - erosion * np.maximum(0, _smooth_wave(uc, rng, cycles=(6, 30))))
    cortex = _sigmoid((y_border - y) / edge) * _sigmoid((y - (y_border - inner)) / edge) * _sigmoid(
        (0.98 - np.abs(u)) * half * width / 1.5)
    level = rng.uniform(*spec["level"])
    cortex_value = level + 6 * texture

    def holes(value_draw, mask_draw):
        count = int(rng.integers(*spec["holes_per_arch"], endpoint=True))
        for _ in range(count):
            hu = rng.uniform(-0.95, 0.95)
            hx = (x0 + hu * half) * width
            t = rng.uniform(*spec["thickness"]) * (0.7 + 0.3 * (1 - hu ** 2))
            hy = (border0 + sag * (1 - hu ** 2) - rng.uniform(0.15, 0.85) * t) * height
            r = max(0.8, rng.uniform(0.2, 0.45) * t * height)
            box = [hx - r * rng.uniform(1, 1.8), hy - r, hx + r * rng.uniform(1, 1.8), hy + r]
            value_draw.ellipse(box, fill=1.0)
            mask_draw.ellipse(box, fill=int(rng.uniform(160, 255)))

    _, hole_alpha = _layer(size, holes, 0.5 * scale)
    cortex_value = cortex_value * (1 - hole_alpha) + trabecular * hole_alpha
    image = image * (1 - cortex) + cortex_value * cortex

    # Teeth: lower row on the alveolar crest, upper row mirrored above the occlusal plane.
    def teeth(value_draw, mask_draw):
        count = int(rng.integers(13, 16, endpoint=True))
        spacing = 1.6 / count
        crown, root = rng.uniform(0.06, 0.08), rng.uniform(0.10, 0.14)
        for i in range(count):
            if rng.random() < 0.08:
                continue  # a missing tooth
            tu = -0.8 + (i + 0.5) * spacing + rng.normal(0, 0.01)
            tx = (x0 + tu * half) * width
            crest = border0 + sag * (1 - tu ** 2) - body
            w = 0.36 * spacing * half * width * rng.uniform(0.85, 1.05)
            radius = max(1, int(w * 0.5))
            bright = rng.uniform(185, 225)
            occlusal = crest - crown - 0.005
            for top, bottom in ((crest - crown, crest + 0.01), (occlusal - 0.01 - crown, occlusal - 0.01)):
                box = [tx - w, top * height, tx + w, bottom * height]
                value_draw.rounded_rectangle(box, radius=radius, fill=float(bright))
                mask_draw.rounded_rectangle(box, radius=radius, fill=255)
            # Roots taper away from the crowns: down into the mandible, up into the maxilla.
            for base, tip in ((crest, crest + root), (occlusal - 0.01 - crown, occlusal - 0.01 - crown - root)):
                polygon = [(tx - 0.9 * w, base * height), (tx + 0.9 * w, base * height),
                           (tx + 0.3 * w, tip * height), (tx - 0.3 * w, tip * height)]
                value_draw.polygon(polygon, fill=float(bright - 45))
                mask_draw.polygon(polygon, fill=255)

    teeth_value, teeth_alpha = _layer(size, teeth, 0.8 * scale)
    image = image * (1 - teeth_alpha) + teeth_value

    # Exposure: bright smooth low-frequency gradient (blobs + ramp) over everything.
    gradient = np.zeros_like(image)
    for _ in range(int(rng.integers(2, 4, endpoint=True))):
        cx, cy, sigma = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.9), rng.uniform(0.25, 0.55)
        gradient += rng.uniform(30, 70) * np.exp(-(((x - cx) * width / height) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
    angle = rng.uniform(0, 2 * np.pi)
    gradient += rng.uniform(0, 30) * (np.cos(angle) * x + np.sin(angle) * y)
    image = image + gradient

    image = ndimage.gaussian_filter(image, 0.6 * scale)
    image += rng.normal(0, rng.uniform(3, 8), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_osteo_phantoms(out: str | Path, n: int = 20, size: tuple[int, int] = DEFAULT_SIZE,
                         seed: int = 0) -> dict[str, Any]:
    """Write ``n`` phantoms (half C1, half C3) as ``OUT/C1/c1_0000.png`` ..., plus ``synthetic.json`` and ``groups.csv``.

    ``groups.csv`` (image,patient) pairs consecutive phantoms of a class into one fake patient,
    for trying ``--groups``.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts = {"C1": n // 2 + n % 2, "C3": n // 2}
    rows = []
    for label, count in counts.items():
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{label}/{label.lower()}_{i:04d}.png"
            Image.fromarray(osteo_phantom(label, size, rng), mode="L").save(out / name, optimize=True)
            rows.append({"image": name, "patient": f"{label.lower()}-p{i // 2:04d}"})
    with open(out / "groups.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    note = {"task": "osteo", "description": (f"synthetic osteo phantoms (train.synthetic osteo, seed {seed}, "
                                             f"{size[0]}x{size[1]}): C1 thick homogeneous inferior cortex, "
                                             "C3 thin porous eroded cortex; not clinical data"),
            "n": n, "size": list(size), "seed": seed, "class_counts": counts}
    (out / "synthetic.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return note
