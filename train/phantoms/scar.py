"""Synthetic post-thyroidectomy scar phantoms: neck photos plus a clinical table, in the seed's layout.

Writes ``OUT/images/scar_0000.jpg ...`` and ``OUT/clinical.xlsx`` (or ``.csv``) with the columns
``img_name``, ``Cls`` (severity 0-3), ``patient`` and 11 numeric clinical features (age, sex,
BMI, Delta_date, ...). Severity is the quartile of a hidden score ``z = 1.0 u_img + 0.85 u_clin
+ 0.3 e`` built from two independent parts: ``u_img`` is drawn into the photo (scar width,
redness and raised texture, each with its own noise) and ``u_clin`` is a fixed linear function of
the clinical features (younger, higher BMI, recent surgery, keloid history, smoking, infection
-> worse). Skin tone, lighting, scar position, curvature and tilt vary as nuisances. Neither
branch alone can know the whole score, so the combined model should beat both, as in the seed's
paper. Never clinical data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.stats import norm

DEFAULT_SIZE = (96, 128)  # (height, width); phone photos are larger, the daemon takes any size
WEIGHTS = {"image": 1.0, "clinical": 0.85, "noise": 0.3}
FEATURES = ["age", "sex", "BMI", "Delta_date", "smoking", "diabetes", "hypertension", "keloid_history",
            "wound_infection", "drain", "thyroiditis"]
# Coefficients of the clinical part of the severity score, per standardised feature.
CLINICAL_EFFECT = {"age": -0.8, "BMI": 0.7, "Delta_date": -0.6, "keloid_history": 0.9, "smoking": 0.5,
                   "wound_infection": 0.5, "diabetes": 0.2}
SKIN_TONES = np.array([[236, 201, 178], [225, 184, 153], [205, 160, 125], [180, 132, 98], [150, 105, 75]], np.float32)
SCAR_RED = np.array([196, 72, 78], np.float32)


def clinical_rows(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The 11 features for ``n`` patients, drawn independently of each other."""
    return {
        "age": np.round(rng.uniform(20, 75, n)).astype(float),
        "sex": (rng.random(n) < 0.25).astype(float),  # 1 = male; thyroid surgery patients are mostly women
        "BMI": np.round(rng.normal(24.0, 3.5, n).clip(16, 40), 1),
        "Delta_date": np.round(np.exp(rng.uniform(np.log(30), np.log(720), n))),  # days since surgery
        "smoking": (rng.random(n) < 0.2).astype(float),
        "diabetes": (rng.random(n) < 0.1).astype(float),
        "hypertension": (rng.random(n) < 0.2).astype(float),
        "keloid_history": (rng.random(n) < 0.15).astype(float),
        "wound_infection": (rng.random(n) < 0.1).astype(float),
        "drain": (rng.random(n) < 0.5).astype(float),
        "thyroiditis": (rng.random(n) < 0.3).astype(float),
    }


def clinical_score(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The clinical part of the severity score, standardised to mean 0, std 1 over the rows."""
    total = np.zeros(len(rows["age"]))
    for name, effect in CLINICAL_EFFECT.items():
        value = np.log(rows[name]) if name == "Delta_date" else rows[name]
        total += effect * (value - value.mean()) / (value.std() + 1e-9)
    return (total - total.mean()) / (total.std() + 1e-9)


def severity_classes(u_img: np.ndarray, u_clin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quartile class (0-3) of z = w_i u_img + w_c u_clin + w_e e under z's own normal distribution."""
    z = WEIGHTS["image"] * u_img + WEIGHTS["clinical"] * u_clin + WEIGHTS["noise"] * rng.normal(size=len(u_img))
    sd = np.sqrt(sum(w * w for w in WEIGHTS.values()))
    return np.digitize(z, norm.ppf([0.25, 0.5, 0.75]) * sd).astype(int)


def scar_photo(u_img: float, size: tuple[int, int] = DEFAULT_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """One neck photo (H, W, 3) uint8 whose scar width, redness and texture grow with ``u_img``."""
    rng = rng or np.random.default_rng()
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Skin: a tone between two palette entries, lit from one side, with blotches and pores.
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    low = int(tone)
    skin = SKIN_TONES[low] * (1 - (tone - low)) + SKIN_TONES[min(low + 1, len(SKIN_TONES) - 1)] * (tone - low)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.05, 0.18) * (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2
    blotch = ndimage.gaussian_filter(rng.normal(size=(height, width)), 0.08 * height)
    blotch /= blotch.std() + 1e-6
    image = skin[None, None, :] * (light * (1 + 0.025 * blotch))[..., None]

    # Scar: a smile-shaped transverse line; thickness, redness and texture carry u_img.
    scale = height / 120  # sizes below are in pixels of a 120-pixel-high photo
    thickness = np.clip(2.4 + 0.8 * u_img + rng.normal(0, 0.3), 0.8, 5.0) * scale
    redness = float(np.clip(0.5 + 0.18 * u_img + rng.normal(0, 0.06), 0.15, 0.95))
    roughness = float(np.clip(0.35 + 0.22 * u_img + rng.normal(0, 0.1), 0.0, 1.0))
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    half = width * rng.uniform(0.28, 0.4)
    curve = -rng.uniform(0.0, 0.25) * height / half ** 2  # ends up: a Kocher incision's 'smile'
    tilt = rng.uniform(-0.12, 0.12)
    centre = cy + tilt * (xx - cx) + curve * (xx - cx) ** 2
    slope = tilt + 2 * curve * (xx - cx)
    distance = np.abs(yy - centre) / np.sqrt(1 + slope ** 2)
    along = np.clip((half - np.abs(xx - cx)) / (0.15 * half), 0, 1)  # tapered ends
    profile = np.exp(-0.5 * (distance / thickness) ** 2) * along
    bumps = ndimage.gaussian_filter1d(rng.normal(size=width), 1.2)
    bumps = (bumps / (bumps.std() + 1e-6))[None, :]
    local = np.clip(redness * (1 + 0.35 * roughness * bumps), 0, 1) * profile
    image = image * (1 - local[..., None]) + SCAR_RED[None, None, :] * light[..., None] * local[..., None]
    # Raised (hypertrophic) scars catch the light: a bright rim on the lit side, stronger when rough.
    rim = np.exp(-0.5 * ((yy - centre + 1.2 * thickness) / (0.6 * thickness + 0.4)) ** 2) * along
    image += (45 * roughness * np.clip(bumps, 0, None) * rim)[..., None]
    # Suture marks: a nuisance every scar has, unrelated to severity.
    for _ in range(int(rng.integers(0, 6))):
        sx = cx + rng.uniform(-0.8, 0.8) * half
        sy = cy + tilt * (sx - cx) + curve * (sx - cx) ** 2
        for dy in (-3 * scale, 3 * scale):
            r2 = (xx - sx) ** 2 + (yy - sy - dy) ** 2
            image *= (1 - 0.12 * np.exp(-r2 / (0.8 * scale) ** 2))[..., None]

    image += rng.normal(0, rng.uniform(2, 5), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_scar_phantoms(out: str | Path, n: int = 40, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
                        table: str = "xlsx") -> dict[str, Any]:
    """Write ``n`` phantom photos and their clinical table (``clinical.xlsx`` or ``clinical.csv``) into ``out``."""
    import pandas as pd

    if table not in ("xlsx", "csv"):
        raise ValueError(f"table must be 'xlsx' or 'csv', not {table!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = clinical_rows(n, rng)
    u_clin = clinical_score(rows)
    u_img = rng.normal(size=n)
    classes = severity_classes(u_img, u_clin, rng)
    names = []
    for i in range(n):
        name = f"scar_{i:04d}.jpg"
        Image.fromarray(scar_photo(float(u_img[i]), size, rng)).save(out / "images" / name, quality=92)
        names.append(name)
    frame = pd.DataFrame({"img_name": names, "Cls": classes, "patient": [f"p{i:04d}" for i in range(n)],
                          **{name: rows[name] for name in FEATURES}})
    if table == "xlsx":
        frame.to_excel(out / "clinical.xlsx", index=False)
    else:
        frame.to_csv(out / "clinical.csv", index=False)
    counts = {str(c): int((classes == c).sum()) for c in range(4)}
    note = {"task": "scar", "description": (f"synthetic scar phantoms (train.synthetic scar, seed {seed}, "
                                            f"{size[0]}x{size[1]}): severity = quartile of 1.0*image part "
                                            "(scar width/redness/texture) + 0.85*clinical part + 0.3*noise; "
                                            "not clinical data"),
            "n": n, "size": list(size), "seed": seed, "class_counts": counts, "features": FEATURES,
            "table": f"clinical.{table}", "images": "images"}
    (out / "synthetic.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return note
