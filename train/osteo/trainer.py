"""Train the osteoporosis classifier (C1 healthy vs C3 osteoporosis) on class folders, k-fold, into a card.

    python -m train.osteo DATA --out weights/osteo [--arch efficientnet-b0] [--folds 5] [--epochs 100] ...
    torchrun --nproc_per_node=N -m train.osteo DATA --out weights/osteo ...      # DDP

DATA holds one folder per class, ``C1/`` and ``C3/`` (or ``C1/`` and ``C2C3/`` for the seed's C1
vs C2+C3 variant), with images in any format ``tasks.imaging`` reads. Preprocessing is
``tasks.osteo.preprocess`` (rolling ball radius 180, resize to --input-size, gray->RGB, ImageNet
normalisation), the same code the daemon serves with; the rolling-ball result at model size is
cached per file (``OUT/cache``) and computed once for all folds and epochs.

Differences from the seed, on purpose:
- Augmentation: the seed doubled the training fold with augmented copies (half vertically
  flipped, half rotated by +-10..30 degrees). Here every training image is, freshly each epoch,
  flipped vertically with p=0.5 and rotated by a random +-[10, 30] degrees with p=0.5 (on the
  preprocessed gray image at model size, black fill), so an epoch is as long as the fold.
- Folds are stratified (patient-grouped with --groups) with a fixed seed; the seed's KFold was
  neither. ROC-AUC comes from probabilities (the seed used hard labels).
- The network has a 2-way head (the seed kept the 1000-way ImageNet head and trained logits 0
  and 1) and starts from random weights (no download; the seed used ImageNet weights).
Kept: Adam (lr 1e-3), ReduceLROnPlateau(factor 0.1, patience 5) on the validation loss,
cross-entropy, batch size 4, 100 epochs by default.

Demo weights (synthetic phantoms, committed in weights/osteo/; measured 34 min wall, ~23 CPU
minutes, on 2 cores shared with other jobs at load ~7; pooled out-of-fold ROC-AUC 0.947).
--precise-bn matters here: after a few dozen steps EfficientNet's BatchNorm running statistics
are still far off and eval-mode outputs collapse to a constant (validation AUC 0.5):

    python -m train.synthetic osteo /tmp/osteo_phantoms --n 60 --size 674 1431 --seed 1
    python -m train.osteo /tmp/osteo_phantoms --out weights/osteo --arch efficientnet-b0 \\
        --width-coefficient 0.35 --depth-coefficient 0.4 --folds 2 --epochs 6 --batch-size 4 \\
        --lr 1e-3 --precise-bn 3 --seed 0 --half --demo --cache /tmp/osteo_cache
    python -m train.synthetic osteo /tmp/osteo_examples --n 2 --size 449 954 --seed 7
    cp /tmp/osteo_examples/C1/c1_0000.png examples/osteo_c1.png
    cp /tmp/osteo_examples/C3/c3_0000.png examples/osteo_c3.png

The trainer records the card's quality ranges (``train/quality.py``); the committed card got
them afterwards, from the same phantoms rebuilt, without retraining:

    python -m train.synthetic osteo /tmp/q_osteo --n 60 --size 674 1431 --seed 1
    python -m train.quality osteo /tmp/q_osteo --card weights/osteo
"""
from __future__ import annotations

import argparse
import functools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks import osteo
from tasks.imaging import is_image_file
from train.core.cache import PreprocessCache
from train.core.loop import TrainTask, add_training_arguments, run_trainer
from train.core.samples import FoldSamples
from train.core.metrics import classification_plots, classification_records, records_metrics
from train.core.quality import DEFAULT_MARGIN, describe, osteo_record
from train.core.reporting import command_parser, data_source

ROTATION_RANGE = (10.0, 30.0)


def find_images(data: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(item names relative to DATA, class index per item, label names) from the class folders."""
    data = Path(data)
    second = [name for name in ("C3", "C2C3") if (data / name).is_dir()]
    if not (data / "C1").is_dir() or len(second) != 1:
        raise SystemExit(f"{data} must hold class folders C1/ and C3/ (or C1/ and C2C3/); "
                         f"found {sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else 'nothing'}")
    labels = ["C1", second[0]]
    items, targets = [], []
    for target, label in enumerate(labels):
        files = sorted(p for p in (data / label).rglob("*")
                       if is_image_file(p) and not p.name.startswith("."))
        items += [p.relative_to(data).as_posix() for p in files]
        targets += [target] * len(files)
    counts = Counter(targets)
    if min(counts.get(0, 0), counts.get(1, 0)) == 0:
        raise SystemExit(f"{data}: both {labels[0]}/ and {labels[1]}/ need images (found {dict(counts)})")
    return items, targets, labels


def augmented(gray: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The seed's augmentations, drawn per call: vertical flip (p=0.5), rotation by +-[10, 30] degrees (p=0.5)."""
    draws = torch.rand(4, generator=generator).tolist()
    if draws[0] < 0.5:
        gray = np.ascontiguousarray(gray[::-1])
    if draws[1] < 0.5:
        angle = ROTATION_RANGE[0] + draws[2] * (ROTATION_RANGE[1] - ROTATION_RANGE[0])
        angle = angle if draws[3] < 0.5 else -angle
        gray = np.asarray(Image.fromarray(gray, mode="L").rotate(angle, resample=Image.BILINEAR))
    return gray


class OsteoImages(FoldSamples):
    """Preprocessed osteo images (cached rolling ball at model size) -> (input tensor, class, item index)."""

    def __init__(self, paths: list[Path], targets: list[int], indices: list[int], cache: PreprocessCache,
                 input_spec: dict[str, Any], train: bool, seed: int | None = None):
        super().__init__(indices, train, seed)
        self.paths, self.targets, self.cache, self.input_spec = paths, targets, cache, input_spec

    def __getitem__(self, position: int):
        index = self.indices[position]
        gray = self.cache.get(self.paths[index])
        if self.train:
            gray = augmented(gray, self.rng())
        return osteo.to_tensor(gray, self.input_spec), self.targets[index], index


def preprocessed_gray(path: Path, input_spec: dict[str, Any]) -> np.ndarray:
    """Read an image as 8-bit gray and run the serving preprocessing; the gray image at model size."""
    from tasks.imaging import ImageReadError, read_image

    try:
        gray = read_image(path, color="gray")
    except ImageReadError as exc:
        raise SystemExit(f"cannot read training image {path}: {exc}") from exc
    return osteo.preprocessed_gray(gray, input_spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m train.osteo",
        "Train the osteoporosis EfficientNet (C1 vs C3, or C1 vs C2C3) with k-fold cross-validation "
        "and write fold weights plus card.json. Multi-GPU/CPU: torchrun --nproc_per_node=N -m train.osteo ...")
    parser.add_argument("data", type=Path, help="folder with class folders C1/ and C3/ (or C1/ and C2C3/)")
    parser.add_argument("--arch", default="efficientnet-b0",
                        help="efficientnet-pytorch variant, efficientnet-b0 .. efficientnet-b7")
    parser.add_argument("--width-coefficient", type=float, default=None,
                        help="override the variant's width coefficient (channels), e.g. 0.5 for a small demo net")
    parser.add_argument("--depth-coefficient", type=float, default=None,
                        help="override the variant's depth coefficient (blocks), e.g. 0.5 for a small demo net")
    parser.add_argument("--input-size", type=int, nargs=2, default=list(osteo.INPUT_SIZE), metavar=("H", "W"),
                        help="network input height and width after the rolling ball (the seed: 449 954)")
    parser.add_argument("--cache", default=None,
                        help="folder for preprocessed images (default OUT/cache); 'none' keeps them in memory only")
    add_training_arguments(parser, epochs=100, batch_size=4, lr=1e-3, folds=5)
    return parser.parse_args(argv)


def build_task(args: argparse.Namespace) -> TrainTask:
    """The osteo ``TrainTask``: class-folder data, cached preprocessing, EfficientNet, CE, ROC-AUC selection."""
    items, targets, labels = find_images(args.data)
    paths = [Path(args.data) / item for item in items]
    input_spec = osteo.default_input_spec(tuple(args.input_size))
    overrides = {key: value for key, value in (("width_coefficient", args.width_coefficient),
                                               ("depth_coefficient", args.depth_coefficient)) if value is not None}
    architecture = osteo.default_architecture(args.arch, num_classes=2, **overrides)
    osteo.build_network(architecture)  # fail now, not after preprocessing, on a bad variant or override
    cache_dir = None if str(args.cache).lower() == "none" else Path(args.cache or Path(args.out) / "cache")
    cache = PreprocessCache(functools.partial(preprocessed_gray, input_spec=input_spec),
                            {"input": input_spec, "pipeline": "tasks.osteo.preprocess"}, cache_dir)
    suffix = "".join(f"-{k[0]}{v:g}" for k, v in overrides.items())
    counts = Counter(targets)
    return TrainTask(
        name=osteo.TASK,
        items=items,
        strata=targets,
        dataset=lambda indices, train, fit_rows: OsteoImages(paths, targets, indices, cache, input_spec, train),
        build_model=lambda: osteo.build_network(architecture),
        loss=torch.nn.CrossEntropyLoss(),
        records=functools.partial(classification_records, labels=labels),
        metrics=functools.partial(records_metrics, labels=labels),
        score_key="roc_auc",
        report=functools.partial(classification_plots, labels=labels),
        prepare=lambda context: cache.fill(paths, context, desc="rolling ball"),
        card={
            "task": osteo.TASK,
            "name": f"osteo-{args.arch}{suffix}{'-demo' if args.demo else ''}",
            "architecture": architecture,
            "input": input_spec,
            "labels": labels,
            "data": {"root": str(args.data), "n_images": len(items),
                     "class_counts": {label: counts[i] for i, label in enumerate(labels)},
                     "source": data_source(Path(args.data), f"class folders under {args.data}")},
            "quality": osteo_record(paths, describe(Path(args.data), len(items), "images"), DEFAULT_MARGIN),
            "training": {"optimizer": "Adam", "scheduler": "ReduceLROnPlateau(factor=0.1, patience=5, val_loss)",
                         "loss": "CrossEntropyLoss", "selection": "best validation ROC-AUC (ties: lower val loss)",
                         "augmentation": "per epoch: vertical flip p=0.5, rotation +-[10,30] deg p=0.5",
                         "initialisation": "random (no ImageNet weights)"},
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_trainer(lambda: build_task(args), args, module="train.osteo")

