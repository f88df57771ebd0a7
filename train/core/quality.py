"""The quality ranges a trainer records into its card from the training data (``tasks.quality.record_ranges``
over each task's ``quality_measures``), which the daemon checks every reply against."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from tasks import handbone, osteo, quality, scar
from tasks.imaging import ImageReadError, read_image
from train.core.reporting import data_source

DEFAULT_MARGIN = 0.25
DEFAULT_MIN_PIECE_FRACTION = 0.0005  # of the image area: smaller specks do not count as a piece of bone


def _read(path: Path, color: str) -> np.ndarray:
    try:
        return read_image(path, color=color)
    except ImageReadError as exc:
        raise SystemExit(f"cannot read training image {path}: {exc}") from exc


def osteo_record(paths: Sequence[Path], source: str, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """Aspect, brightness, contrast and symmetry ranges of the training panoramics."""
    samples = [osteo.quality_measures(_read(path, "gray")) for path in tqdm(paths, desc="quality", leave=False)]
    return quality.record_ranges(samples, margin=margin, source=source)


def scar_record(image_paths: Sequence[Path] | None, features: np.ndarray | None, feature_names: Sequence[str],
                source: str, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """Colour ranges of the training photos and value ranges of the clinical features (what the data has)."""
    rows = len(image_paths) if image_paths is not None else len(features)
    samples = []
    for k in tqdm(range(rows), desc="quality", leave=False):
        sample = scar.clinical_quality_measures(features[k] if features is not None else None, feature_names)
        if image_paths is not None:
            sample.update(scar.quality_measures(_read(image_paths[k], "rgb")))
        samples.append(sample)
    return quality.record_ranges(samples, margin=margin, source=source)


def handbone_record(frame_samples: Sequence[tuple[np.ndarray, handbone.Geometry]], classes: Sequence[str],
                    source: str, margin: float = DEFAULT_MARGIN,
                    min_piece_fraction: float = DEFAULT_MIN_PIECE_FRACTION) -> dict[str, Any]:
    """Bones found, pieces and area ranges of the training masks, in the model frame the daemon measures in.

    ``frame_samples``: per training image, its ``(C, S, S)`` bool masks in the model frame and its geometry.
    """
    samples = [handbone.quality_measures(masks, geometry, classes, min_piece_fraction)
               for masks, geometry in frame_samples]
    return quality.record_ranges(samples, margin=margin, source=source,
                                 parameters={"min_piece_fraction": min_piece_fraction})


def describe(data: Path, n: int, what: str) -> str:
    """The record's ``source``: what the data is (a phantom folder's own note) and where it was read."""
    folder = data if data.is_dir() else data.parent
    return f"{data_source(folder, what)}; {n} training {what} under {data}"
