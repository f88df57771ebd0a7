"""Train the 29-class hand-bone segmentation (smp) with patient-grouped k-fold into a card; ``infer`` writes the seed's CSV.

    python -m train.handbone DATA --out weights/handbone --arch unet --encoder resnet34 --size 1024 --folds 5 \\
        [--encoder-weights imagenet] [--loss 1 1 1] [--elastic] [--epochs 40] [--batch-size 8] [--lr 1e-4] [--amp]
    torchrun --nproc_per_node=N -m train.handbone DATA --out weights/handbone ...          # DDP
    python -m train.handbone DATA --out weights/handbone --tune 20 [--tune-sizes 256 512 1024] \
        [--tune-lr 1e-3 1e-2] [--tune-epochs 10 40] ...     # optuna search (pip install -e ".[tune]")
    python -m train.handbone infer TEST_DIR --weights weights/handbone [more cards ...] --out submission.csv [--tta]

DATA is the seed's layout: ``DCM/IDxxx/*.png`` and ``outputs_json/IDxxx/*.json`` (polygons with
the 29 labels). Folds are grouped by the patient folder ``IDxxx`` (a patient's two hands are
never split), written to ``OUT/splits.json`` and reused by ``--resume``. Architectures: unet,
unetplusplus, fpn, deeplabv3plus, manet, pan; encoders: any smp encoder or timm one with the
``tu-`` prefix (``tu-hrnet_w18``, ``tu-hrnet_w48``, ...). ``--encoder-weights imagenet`` downloads
pretrained encoder weights (needs internet on first use); the default trains from scratch.

Preprocessing is ``tasks.handbone`` (fit to the square model size by letterbox or resize, gray
to 3 channels, ImageNet mean/std), the same code the daemon serves with. Augmentations are in
``train/handbone/data.py`` (flip, small rotation/scale, brightness/contrast, optional elastic).
Loss: weighted BCE + Dice + IoU (``--loss`` weights as the seed). Optimiser AdamW (the seed's
AdamP is not a dependency) with weight decay 1e-6, cosine learning rate. The best epoch of each
fold by validation Dice, computed at each image's own resolution (``train/handbone/metrics.py``),
is kept. Validation runs every ``--val-every N`` epochs and after the last one (default every
epoch; the seed validated every 2), and the best epoch is chosen among those. Plots:
``logs/fold{k}.png`` (curves) and ``dice_per_class.png``; the card holds the per-class and mean
Dice per fold and pooled out of fold.

``--tune N`` (``train/handbone/tune.py``) is the seed's optuna search: N TPE trials seeded by
``--seed`` over the model size (``--tune-sizes``), lr (log-uniform in ``--tune-lr``) and epochs
(``--tune-epochs``), each a full k-fold run into ``OUT/tune/trial{k}/`` scored by its pooled
out-of-fold Dice; ``OUT/tune/trials.csv`` lists them and ``OUT/tune/best.json`` holds the best
params and the command that trains with them. optuna is the ``tune`` extra; a search runs in one
process (refused under torchrun: train the best command with torchrun afterwards).

Differences from the seed, on purpose: one normalisation for training, validation and serving
(the seed's inference skipped it); validation Dice at full resolution (the seed compared at
model size in its k-fold script); all folds ensembled by mean probability (the seed's k-fold
inference used 3 of 5 folds and a unanimous vote); image names may contain ``_``.

Demo weights (synthetic phantoms, for weights/handbone/; the card records the time and Dice):

    python -m train.synthetic handbone /tmp/hb2 --n 48 --size 256 256 --seed 1
    python -m train.handbone /tmp/hb2 --out weights/handbone --arch unet \\
        --encoder tu-resnet10t --encoder-depth 4 --decoder-channels 48 32 24 16 --size 256 \\
        --folds 2 --epochs 70 --batch-size 4 --lr 5e-3 --seed 0 --half --demo

On the idle 2-core machine this took 21.9 min wall (42 CPU-min) for pooled out-of-fold Dice
0.926 and reproduced the committed weights bit for bit. The trainer records the quality ranges
(bones found, pieces and areas of the training masks); the committed card got them afterwards,
without retraining: ``python -m train.synthetic handbone /tmp/q_hb --n 48 --size 256 256 --seed 1``
then ``python -m train.quality handbone /tmp/q_hb --card weights/handbone``. With ``--epochs 45`` this reached pooled out-of-fold Dice 0.863 (still rising when the cosine
schedule ended; ~9 s an epoch on 2 idle CPU cores); 32 phantoms, 40 epochs and lr 3e-3 gave ~0.7.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch

from tasks import handbone
from tasks.nets.smp_models import set_output_prior
from train.core.cache import PreprocessCache
from train.core.loop import TrainTask, add_training_arguments, run_trainer
from train.handbone.data import HandboneSamples, find_cases, handbone_frame_samples, model_sample
from train.core.reporting import command_parser, data_source
from train.core.losses import SegmentationLoss
from train.handbone.metrics import DiceRecords, dice_metrics, plot_dice_per_class
from train.handbone.tune import add_tune_arguments, run_tune
from train.core.quality import describe, handbone_record

AUGMENTATION = ("per sample: horizontal flip p=0.5; rotation +-10 deg and scale 0.9-1.1 p=0.5; brightness +-0.1 "
                "and contrast 0.8-1.2 p=0.5; elastic p=0.3 when --elastic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m train.handbone",
        "Train the hand-bone segmentation (29 classes, smp) with patient-grouped k-fold and write "
        "fold weights plus card.json. Inference: python -m train.handbone infer --help. "
        "Multi-GPU/CPU: torchrun --nproc_per_node=N -m train.handbone ...")
    parser.add_argument("data", type=Path, help="folder with DCM/IDxxx/*.png and outputs_json/IDxxx/*.json")
    parser.add_argument("--arch", default="unet", choices=sorted(handbone.ARCHITECTURES),
                        help="smp architecture")
    parser.add_argument("--encoder", default="resnet34",
                        help="smp encoder name, or a timm one with the tu- prefix (tu-hrnet_w18, tu-resnet10t ...)")
    parser.add_argument("--encoder-weights", default="none",
                        help="'none' (train from scratch) or 'imagenet' (downloaded on first use: needs internet)")
    parser.add_argument("--encoder-depth", type=int, default=None,
                        help="encoder stages used (3-5; smp default 5); the size must be a multiple of 2**depth")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=None,
                        help="decoder channels, one per encoder stage (Unet, UnetPlusPlus, MAnet)")
    parser.add_argument("--size", type=int, default=1024, help="square model input side (the seed: 512 or 1024)")
    parser.add_argument("--fit", default="letterbox", choices=handbone.FITS,
                        help="how an image is brought to the model size: keep its aspect ratio and pad "
                             "(letterbox) or stretch (resize); square images are the same either way")
    parser.add_argument("--loss", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("BCE", "DICE", "IOU"),
                        help="weights of BCE, Dice and IoU loss (the seed's --loss)")
    parser.add_argument("--elastic", action="store_true", help="add elastic deformation to the augmentations")
    parser.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay (the seed: 1e-6)")
    parser.add_argument("--scheduler", default="cosine", choices=("cosine", "plateau", "none"),
                        help="learning-rate schedule: cosine to 0 over --epochs, x0.1 on a validation-loss "
                             "plateau (patience 5), or constant (the seed)")
    parser.add_argument("--cache", default="memory", choices=("memory", "none"),
                        help="keep images and masks at model size in memory after first use (fast; needs "
                             "about 30 x size^2 bytes per image) or read them again every epoch")
    add_training_arguments(parser, epochs=40, batch_size=8, lr=1e-4, folds=5)
    add_tune_arguments(parser)
    args = parser.parse_args(argv)
    if args.encoder_weights.lower() in ("none", "null", ""):
        args.encoder_weights = None
    return args


def architecture_from(args: argparse.Namespace) -> dict[str, Any]:
    """The card's architecture record from the command line; checks the size against the encoder stride."""
    options = {"encoder_depth": args.encoder_depth, "decoder_channels": args.decoder_channels}
    try:
        architecture = handbone.default_architecture(args.arch, args.encoder, **options)
        handbone.check_model_size(args.size, architecture)
        handbone.build_network(architecture)  # fail now, not after reading data, on a bad encoder or option
    except Exception as exc:
        raise SystemExit(f"cannot build {args.arch} with encoder {args.encoder!r}: {exc}") from exc
    return architecture


def network_builder(architecture: dict[str, Any], encoder_weights: str | None, prior: float = 0.05):
    """``build_model`` for the TrainTask: random init, or pretrained encoder weights (clear failure offline).

    The output bias starts at the logit of ``prior`` (a bone covers a few percent of an image):
    from a bias of 0 every pixel starts at probability 0.5 and the first epochs are spent
    learning that most pixels are background.
    """
    def build() -> torch.nn.Module:
        try:
            return set_output_prior(handbone.build_network(architecture, encoder_weights=encoder_weights), prior)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from exc
    return build


def build_task(args: argparse.Namespace) -> TrainTask:
    """The handbone ``TrainTask``: seed-layout data, model-frame samples, smp network, BCE+Dice+IoU, Dice selection."""
    architecture = architecture_from(args)
    cases = find_cases(args.data)
    classes = list(handbone.CLASSES)
    input_spec = handbone.default_input_spec(args.size, args.fit)
    compute = functools.partial(model_sample, input_spec=input_spec, classes=classes)
    if args.cache == "memory":
        cache = PreprocessCache(lambda path: compute(by_path[str(path)]), {"input": input_spec})
        by_path = {str(case.image): case for case in cases}
        sample = lambda index: cache.get(cases[index].image)
    else:
        sample = lambda index: compute(cases[index])
    epochs = args.epochs
    schedulers = {
        "cosine": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)),
        "plateau": lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=5),
        "none": lambda optimizer: None,
    }
    patients = sorted({case.patient for case in cases})
    name = f"handbone-{architecture['arch'].lower()}-{args.encoder}-{args.size}{'-demo' if args.demo else ''}"
    return TrainTask(
        name=handbone.TASK,
        items=[case.item for case in cases],
        strata=[0] * len(cases),
        groups=[case.patient for case in cases],
        dataset=lambda indices, train, fit_rows: HandboneSamples(sample, indices, input_spec, train, elastic=args.elastic),
        build_model=network_builder(architecture, args.encoder_weights),
        loss=SegmentationLoss(args.loss),
        records=DiceRecords(cases, input_spec, classes),
        metrics=functools.partial(dice_metrics, classes=classes),
        score_key="dice",
        report=functools.partial(plot_dice_per_class, classes=classes),
        make_optimizer=lambda parameters, lr: torch.optim.AdamW(parameters, lr=lr, weight_decay=args.weight_decay),
        make_scheduler=schedulers[args.scheduler],
        card={
            "task": handbone.TASK,
            "name": name,
            "architecture": architecture,
            "input": input_spec,
            "labels": classes,
            "output": {"activation": "sigmoid", "multilabel": True, "threshold": handbone.DEFAULT_THRESHOLD},
            "data": {"root": str(args.data), "n_images": len(cases), "n_patients": len(patients),
                     "source": data_source(Path(args.data), f"DCM/ + outputs_json/ under {args.data}")},
            "quality": handbone_record(handbone_frame_samples(cases, input_spec, classes, sample), classes,
                                       describe(Path(args.data), len(cases), "masks")),
            "training": {"optimizer": f"AdamW(weight_decay={args.weight_decay:g})", "scheduler": args.scheduler,
                         "loss": "{:g}*BCE + {:g}*Dice + {:g}*IoU".format(*args.loss),
                         "selection": "best validation Dice at original resolution (mean over images, then classes)",
                         "folds": "GroupKFold by patient folder (StratifiedGroupKFold, one stratum)",
                         "augmentation": AUGMENTATION,
                         "initialisation": args.encoder_weights or "random (no pretrained encoder)"},
        },
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "infer":
        from train.handbone.infer import main as infer_main

        return infer_main(argv[1:])
    args = parse_args(argv)
    if args.tune:
        return run_tune(args, argv, parse_args, train)
    return train(args)


def train(args: argparse.Namespace) -> int:
    """One k-fold run of ``args`` into its card."""
    return run_trainer(lambda: build_task(args), args, module="train.handbone")

