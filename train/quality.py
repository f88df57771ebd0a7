"""Record the quality ranges of a card from its training data: the trainers call it, and so can you, afterwards.

    python -m train.quality osteo    DATA --card weights/osteo    [--margin 0.25]
    python -m train.quality scar     DATA --card weights/scar     [--images DIR] [--margin 0.25]
    python -m train.quality handbone DATA --card weights/handbone [--margin 0.25] [--min-piece-fraction 0.0005]

Each task's measures (``tasks.<task>.quality_measures``) are taken of every training image (and,
for scar, every clinical row); ``tasks.quality.record_ranges`` turns them into the card's
``quality`` record, which the daemon checks each reply against. Only that record is rewritten:
the fold files and their sha256 stay as they are, so a committed card gains its ranges without
retraining. DATA must be the data the card was trained on (rebuild phantoms with the command in
the trainer's docstring; the same seed gives the same images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from tasks import handbone, osteo, quality, scar
from tasks.cards import read_card, write_card
from tasks.imaging import ImageReadError, read_image

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


def handbone_frame_samples(cases: Sequence[Any], input_spec: dict[str, Any], classes: list[str],
                           sample=None) -> list[tuple[np.ndarray, handbone.Geometry]]:
    """The ground-truth masks of hand-bone training cases in the model frame, with their geometry
    (``sample(i)``: a cached ``train.handbone_data.model_sample`` of case i, when the trainer has one)."""
    from train.handbone_data import geometry_of, model_sample

    frames = []
    for k, case in enumerate(tqdm(cases, desc="quality", leave=False)):
        stacked = sample(k) if sample is not None else model_sample(case, input_spec, classes)
        frames.append((stacked[1:].astype(bool), geometry_of(case, input_spec)))
    return frames


def describe(data: Path, n: int, what: str) -> str:
    """The record's ``source``: what the data is (a phantom folder's own note) and where it was read."""
    from train.reporting import data_source

    folder = data if data.is_dir() else data.parent
    return f"{data_source(folder, what)}; {n} training {what} under {data}"


def record_for(task: str, data: Path, card: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The quality record of ``card`` computed from ``data`` (the trainer's own data discovery)."""
    margin = args.margin
    if task == "osteo":
        from train.osteo import find_images

        items, _, _ = find_images(data)
        return osteo_record([data / item for item in items], describe(data, len(items), "images"), margin)
    if task == "scar":
        from train.scar_data import load_data

        modes = {entry.get("model") for entry in card["folds"]}
        mode = "combined" if {"image", "combined"} & modes and modes & {"clinical", "combined"} else \
            "image" if modes & {"image"} else "clinical"
        loaded = load_data(data, mode, args.images, None, False)
        return scar_record(loaded.image_paths, loaded.features, loaded.feature_names,
                           describe(data, len(loaded.items), "rows"), margin)
    if task == "handbone":
        from train.handbone_data import find_cases

        cases, classes = find_cases(data), list(card["labels"])
        frames = handbone_frame_samples(cases, card["input"], classes)
        return handbone_record(frames, classes, describe(data, len(cases), "masks"), margin, args.min_piece_fraction)
    raise SystemExit(f"no quality measures for task {task!r}; known: osteo, scar, handbone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("task", choices=("osteo", "scar", "handbone"))
    parser.add_argument("data", type=Path, help="the data the card was trained on, in the trainer's layout")
    parser.add_argument("--card", type=Path, required=True, help="folder of the card.json to write the record into")
    parser.add_argument("--images", type=Path, default=None, help="scar: folder of the photos (as train.scar)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="ranges are widened by this times the larger of their span and the median")
    parser.add_argument("--min-piece-fraction", type=float, default=DEFAULT_MIN_PIECE_FRACTION,
                        help="handbone: specks smaller than this fraction of the image are not pieces")
    args = parser.parse_args(argv)
    card = read_card(args.card)
    if card["task"] != args.task:
        raise SystemExit(f"{args.card} holds a {card['task']!r} card, not {args.task!r}")
    card["quality"] = record_for(args.task, args.data, card, args)
    write_card(args.card, card)
    print(f"wrote the quality ranges of {card['quality']['n']} training samples into {args.card}/card.json",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
