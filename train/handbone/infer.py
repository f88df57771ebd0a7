"""Batch inference for the hand-bone task: every fold of one or more cards, mean probability, the seed's CSV.

    python -m train.handbone infer TEST_DIR --weights weights/handbone [OTHER_CARD ...] --out submission.csv [--tta]

Images are found under ``TEST_DIR/DCM`` when it exists (the seed's test layout), else anywhere
under TEST_DIR. Each card preprocesses with its own input record; the sigmoid probabilities of
all fold networks of all cards are averaged (each network counts once; a horizontal flip is
averaged in with ``--tta``), mapped back to the image's own size and thresholded at the cards'
``output.threshold`` (as the daemon serves them; ``--threshold`` overrides it). The
CSV has the header ``image_name,class,rle`` and 29 rows per image in class order; RLE is
1-based start/length pairs over the row-major mask at the image's size (2048x2048 for the
seed's data). Names with ``_`` or commas are quoted by the csv module, never split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tasks import cards, handbone
from tasks.imaging import is_image_file, read_image
from tasks.bundle import Bundle, load_bundle
from train.core.reporting import command_parser



def load_card(folder: str | Path, device: torch.device, fold: int | None = None) -> Bundle:
    """A handbone card's fold networks (sha256-checked), in eval mode on ``device``."""
    try:
        return load_bundle(folder, handbone.build_network, device, fold, task=handbone.TASK)
    except cards.CardError as exc:
        raise SystemExit(f"cannot use {folder}: {exc}") from exc


def find_images(test_dir: str | Path) -> list[Path]:
    root = Path(test_dir)
    if (root / "DCM").is_dir():
        root = root / "DCM"
    images = sorted(p for p in root.rglob("*") if is_image_file(p)
                    and not p.name.startswith("."))
    if not images:
        raise SystemExit(f"no images under {root}")
    return images


def predict_masks(gray: np.ndarray, loaded: list[Bundle], device: torch.device, tta: bool = False,
                  threshold: float = handbone.DEFAULT_THRESHOLD) -> np.ndarray:
    """``(C, H, W)`` bool masks of one image: the mean probability of every network of every card.

    Cards that share an input record are averaged in the model frame; otherwise each group's
    mean is mapped back to the image's size first, one class at a time to bound memory.
    """
    groups: dict[str, list[tuple[np.ndarray, int, handbone.Geometry]]] = {}
    for item in loaded:
        tensor, geometry = handbone.preprocess(gray, item.card["input"])
        probabilities = handbone.ensemble_probabilities(item.only(), tensor[None].to(device), tta)[0]
        key = json.dumps(item.card["input"], sort_keys=True)
        groups.setdefault(key, []).append((probabilities.cpu().numpy(), len(item.only()), geometry))
    total = sum(weight for members in groups.values() for _, weight, _ in members)
    means = [(sum(p * w for p, w, _ in members) / sum(w for _, w, _ in members),
              sum(w for _, w, _ in members) / total, members[0][2]) for members in groups.values()]
    if len(means) == 1:
        probabilities, _, geometry = means[0]
        return handbone.masks_at_input(probabilities, geometry, threshold)
    height, width = gray.shape
    masks = np.empty((means[0][0].shape[0], height, width), dtype=bool)
    for k in range(len(masks)):
        mean = sum(share * handbone.probabilities_at_input(p[k:k + 1], g)[0] for p, share, g in means)
        masks[k] = mean > threshold
    return masks


def check_labels(loaded: list[Bundle]) -> list[str]:
    labels = loaded[0].card["labels"]
    for item in loaded[1:]:
        if item.card["labels"] != labels:
            raise SystemExit(f"cards {loaded[0].folder} and {item.folder} have different labels: cannot ensemble")
    return labels


def card_threshold(loaded: list[Bundle]) -> float:
    """The threshold every card records (``tasks.handbone.card_threshold``); cards that disagree must be told one."""
    try:
        thresholds = {handbone.card_threshold(item.card) for item in loaded}
    except cards.CardError as exc:
        raise SystemExit(f"cannot use the cards: {exc}") from exc
    if len(thresholds) > 1:
        raise SystemExit(f"the cards record different thresholds {sorted(thresholds)}: choose one with --threshold")
    return thresholds.pop()


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(handbone.seed_csv(rows), encoding="utf-8")
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m train.handbone infer",
        "Segment every image under TEST_DIR with the mean of all folds of one or more handbone cards "
        "and write the seed's submission CSV (image_name,class,rle).")
    parser.add_argument("test_dir", type=Path, help="folder with DCM/IDxxx/*.png (or images anywhere below)")
    parser.add_argument("--weights", type=Path, nargs="+", required=True,
                        help="one or more card folders (weights/handbone ...); all their folds are ensembled")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--tta", action="store_true", help="also average a horizontally flipped pass")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability above which a pixel belongs to a bone (default: the cards' "
                             "output.threshold, as the daemon serves them; they must agree)")
    parser.add_argument("--fold", type=int, default=None, help="use only this fold of each card")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error("--threshold must lie in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    loaded = [load_card(folder, device, args.fold) for folder in args.weights]
    labels = check_labels(loaded)
    threshold = args.threshold if args.threshold is not None else card_threshold(loaded)
    images = find_images(args.test_dir)
    rows: list[tuple[str, str, str]] = []
    for path in tqdm(images, desc="infer", file=sys.stderr):
        gray = read_image(path, color="gray")
        masks = predict_masks(gray, loaded, device, args.tta, threshold)
        rows += handbone.rle_rows(path.name, masks, labels)
    write_csv(args.out, rows)
    networks = sum(len(item.only()) for item in loaded)
    print(f"wrote {args.out}: {len(images)} image(s) x {len(labels)} classes, {networks} network(s)"
          f"{' + flip TTA' if args.tta else ''}", file=sys.stderr)
    return 0
