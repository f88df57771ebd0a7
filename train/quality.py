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
from typing import Any

from tasks.cards import read_card, write_card
from train.core.quality import (DEFAULT_MARGIN, DEFAULT_MIN_PIECE_FRACTION, describe, handbone_record,
                                osteo_record, scar_record)
from train.core.reporting import command_parser

def record_for(task: str, data: Path, card: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The quality record of ``card`` computed from ``data`` (the trainer's own data discovery)."""
    margin = args.margin
    if task == "osteo":
        from train.osteo.trainer import find_images

        items, _, _ = find_images(data)
        return osteo_record([data / item for item in items], describe(data, len(items), "images"), margin)
    if task == "scar":
        from train.scar.data import load_data

        modes = {entry.get("model") for entry in card["folds"]}
        mode = "combined" if {"image", "combined"} & modes and modes & {"clinical", "combined"} else \
            "image" if modes & {"image"} else "clinical"
        loaded = load_data(data, mode, args.images, None, False)
        return scar_record(loaded.image_paths, loaded.features, loaded.feature_names,
                           describe(data, len(loaded.items), "rows"), margin)
    if task == "handbone":
        from train.handbone.data import find_cases, handbone_frame_samples

        cases, classes = find_cases(data), list(card["labels"])
        frames = handbone_frame_samples(cases, card["input"], classes)
        return handbone_record(frames, classes, describe(data, len(cases), "masks"), margin, args.min_piece_fraction)
    raise SystemExit(f"no quality measures for task {task!r}; known: osteo, scar, handbone")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m train.quality", __doc__.split("\n\n")[0])
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
