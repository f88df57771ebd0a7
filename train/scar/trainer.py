"""Train the scar severity models (image, clinical, combined) with k-fold cross-validation into one card.

    python -m train.scar image    DATA --out weights/scar [--width 64 --layers 3 4 6 3 --input-size 224 224] ...
    python -m train.scar clinical DATA --out weights/scar ...
    python -m train.scar combined DATA --out weights/scar [--init-from-branches] ...
    python -m train.scar import   seed_checkpoint.pth.tar --out weights/scar [--table TABLE | --features a,b,...]
    torchrun --nproc_per_node=N -m train.scar image DATA --out weights/scar ...          # DDP

DATA is the seed's table (xlsx/xls/csv with ``img_name``, ``Cls`` 0-3, an optional ``patient``
column -> grouped folds, and the clinical columns, all numeric, in the order the model reads
them) or a folder holding one such table, with the photos in ``--images`` (default: the
table's ``images/`` folder, else its own folder). The image model also reads the seed's class
folders (``DATA/<class>/`` or ``DATA/{train,val}/<class>/``). Each model trains into
``OUT/<model>/`` (splits.json, logs/, plots, oof_predictions.csv); its fold weights land in
``OUT/<model>_fold<k>.safetensors`` and its records in the shared ``OUT/card.json``.
The three models split identically (same items, folds and seed), so ``--init-from-branches``
starts each combined fold from the same fold's image and clinical weights.

Kept from the seed: cross-entropy, SGD (lr 0.01, momentum 0.1, weight decay 1e-5), lr x0.1 every
30 epochs, batch 16, epochs 100/50/100, the best epoch by validation accuracy, the seed's photo
mean/std and 224x224 resize. Changed on purpose: the clinical scaler is fitted on each fold's
training rows only and stored in the card (the seed refit it on validation rows), all features
are standardised (the seed: age, BMI, Delta_date only), missing values are refused (the seed
set them to 0), folds are stratified per patient when a patient column exists, every fold
keeps its own best checkpoint, the clinical MLP is put in train mode for training. ``--augment``
(off by default, as the seed) adds horizontal flips, +-10 degree rotations and brightness/contrast
jitter to the photos.

Demo weights (synthetic phantoms, committed in weights/scar/; on 2 CPU cores
about 3 + 1 + 1 minutes when the machine is otherwise idle, much longer when it is shared):

    python -m train.synthetic scar /tmp/scar_phantoms --n 360 --seed 1
    python -m train.scar image /tmp/scar_phantoms --out weights/scar --width 8 --layers 1 1 1 1 \\
        --head 64 32 --dropout 0 --input-size 96 96 --folds 2 --epochs 12 --batch-size 8 --lr 0.02 \\
        --momentum 0.9 --lr-step 10 --augment --half --demo
    python -m train.scar clinical /tmp/scar_phantoms --out weights/scar --folds 2 --epochs 60 \\
        --lr 0.05 --momentum 0.9 --lr-step 40 --half --demo
    python -m train.scar combined /tmp/scar_phantoms --out weights/scar --init-from-branches --folds 2 \\
        --epochs 10 --batch-size 8 --lr 0.02 --momentum 0.9 --lr-step 8 --augment --half --demo

Each run records its quality ranges in the card (photo colour, clinical values); the committed
card got them afterwards, from the same phantoms rebuilt, without retraining:

    python -m train.synthetic scar /tmp/q_scar --n 360 --seed 1
    python -m train.quality scar /tmp/q_scar --card weights/scar
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks import scar
from tasks.weights import load_state_dict
from train.scar import card as scar_card
from train.core.loop import TrainTask, add_training_arguments, run_kfold
from train.core.distributed import setup_distributed, shutdown_distributed
from train.core.metrics import classification_records
from train.core.reporting import data_source
from train.scar.data import PhotoStore, ScarData, ScarFold, fold_scaler, load_data
from train.scar.results import scar_metrics, scar_plots
from train.core.quality import describe, scar_record

DEFAULTS = {"image": {"epochs": 100}, "clinical": {"epochs": 50}, "combined": {"epochs": 100}}


def _card_architecture(out: Path, model: str) -> dict[str, Any]:
    card = json.loads((out / "card.json").read_text(encoding="utf-8")) if (out / "card.json").is_file() else {}
    record = card.get("architecture", {}).get(model)
    if record is None:
        raise SystemExit(f"--init-from-branches needs a trained {model} model in {out / 'card.json'}; "
                         f"run `python -m train.scar {model} DATA --out {out}` first")
    return record


def _branch_initialiser(out: Path, architecture: dict[str, Any]):
    """fold -> a combined network whose branches start from that fold's image and clinical weights."""
    def build(fold: int) -> torch.nn.Module:
        network = scar.build_network("combined", architecture)
        for model, branch in (("image", network.cnn), ("clinical", network.mlp)):
            splits = [json.loads((out / name / "splits.json").read_text(encoding="utf-8")) for name in (model, "combined")]
            if splits[0][fold]["val"] != splits[1][fold]["val"]:
                raise SystemExit(f"fold {fold} of the {model} run holds other validation items than the combined "
                                 "run: train both on the same table with the same --folds and --seed")
            branch.load_state_dict(load_state_dict(out / scar_card.weight_name(model, fold)), strict=True)
        return network
    return build


def architecture_for(args: argparse.Namespace, n_features: int) -> dict[str, Any]:
    """The record of the model being trained, from the flags (or the card's branches with --init-from-branches)."""
    image = scar.image_architecture(width=args.width, layers=args.layers, head=args.head, dropout=args.dropout)
    if args.mode == "image":
        return image
    clinical = scar.clinical_architecture(n_features, dropout=args.mlp_dropout)
    if args.mode == "clinical":
        return clinical
    if getattr(args, "init_from_branches", False):
        image, clinical = _card_architecture(args.out, "image"), _card_architecture(args.out, "clinical")
        if clinical["n_features"] != n_features:
            raise SystemExit(f"the card's clinical model reads {clinical['n_features']} features, the table has {n_features}")
    return scar.combined_architecture(image, clinical)


def build_task(args: argparse.Namespace, data: ScarData) -> TrainTask:
    """The ``TrainTask`` of one scar model over ``data``."""
    mode, out = args.mode, Path(args.out)
    architecture = architecture_for(args, len(data.feature_names))
    input_spec = scar.default_input_spec(args.input_size)
    photos = PhotoStore(data.image_paths, input_spec) if mode != "clinical" else None
    scalers: dict[frozenset, dict] = {}

    def dataset(indices, train, fit_rows):
        clinical = None
        if mode != "image":
            key = frozenset(fit_rows)
            if key not in scalers:
                scalers[key] = fold_scaler(data.features, sorted(key))
            clinical = scar.standardise(data.features, scalers[key])
        return ScarFold(indices, data.targets, photos=photos, clinical=clinical,
                        augment=bool(train and args.augment and photos is not None))

    build_model = functools.partial(scar.build_network, mode, architecture)
    counts = np.bincount(data.targets, minlength=len(scar.LABELS))
    task = TrainTask(
        name=scar.TASK, items=data.items, strata=data.targets, groups=data.groups, dataset=dataset,
        build_model=build_model, loss=torch.nn.CrossEntropyLoss(),
        records=functools.partial(classification_records, labels=scar.LABELS), metrics=scar_metrics,
        score_key=args.select, report=scar_plots,
        make_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=args.momentum,
                                                          weight_decay=args.weight_decay),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step, args.lr_gamma),
        card={
            "task": scar.TASK, "name": f"scar-{mode}", "architecture": architecture, "labels": list(scar.LABELS),
            "input": {"photo": input_spec if photos is not None else None,
                      "clinical_features": data.feature_names if mode != "image" else None},
            "data": {"root": str(args.data), "n_items": len(data.items), "source": data_source(args.data if Path(args.data).is_dir() else Path(args.data).parent, data.source),
                     "class_counts": {label: int(c) for label, c in zip(scar.LABELS, counts)},
                     "grouped_by_patient": data.groups is not None},
            "quality": scar_record(data.image_paths if photos is not None else None,
                                   data.features if mode != "image" else None, data.feature_names,
                                   describe(Path(args.data), len(data.items), "rows")),
            "training": {"model": mode, "optimizer": f"SGD(momentum={args.momentum}, weight_decay={args.weight_decay})",
                         "scheduler": f"StepLR(step={args.lr_step} epochs, gamma={args.lr_gamma})",
                         "loss": "CrossEntropyLoss", "selection": f"best validation {args.select} (ties: lower val loss)",
                         "augmentation": ("hflip p=0.5, rotation +-10 deg p=0.5, brightness/contrast x[0.9,1.1]"
                                          if args.augment and photos is not None else "none"),
                         "scaler": "StandardScaler fitted on each fold's training rows" if mode != "image" else None,
                         "initialisation": ("image/clinical branches from the same fold's weights"
                                            if getattr(args, "init_from_branches", False) else "random")},
        },
    )
    if mode == "combined" and getattr(args, "init_from_branches", False):
        task.fold_model = _branch_initialiser(out, architecture)
    return task


def _fold_scalers(out: Path, mode: str, data: ScarData) -> dict[int, dict] | None:
    """Each fold's scaler, refitted from the run's splits.json exactly as the fold's dataset fitted it."""
    if mode == "image":
        return None
    splits = json.loads((out / mode / "splits.json").read_text(encoding="utf-8"))
    index = {name: i for i, name in enumerate(data.items)}
    return {k: fold_scaler(data.features, sorted(index[n] for n in fold["train"])) for k, fold in enumerate(splits)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.scar", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in scar.MODES:
        p = sub.add_parser(mode, help=f"train the {mode} model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("data", type=Path, help="the table (xlsx/xls/csv) or a folder holding it"
                       + (" (or class folders)" if mode == "image" else ""))
        if mode != "clinical":
            p.add_argument("--images", type=Path, default=None, help="folder of the photos named by img_name")
            p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                           help="photo size the network reads (default: as the card's other photo models, "
                                "else the seed's 224 224)")
            p.add_argument("--augment", action="store_true", help="flip/rotate/brightness-contrast jitter training photos")
        p.add_argument("--patient-column", default=None, help="table column of patient ids -> grouped folds "
                                                              "(default: 'patient' when present)")
        p.add_argument("--drop-incomplete", action="store_true", help="drop table rows with missing values "
                                                                      "instead of refusing the table")
        p.add_argument("--width", type=int, default=64, help="CBAM-ResNet base width (64 = ResNet-50)")
        p.add_argument("--layers", type=int, nargs=4, default=[3, 4, 6, 3], help="bottleneck blocks per stage")
        p.add_argument("--head", type=int, nargs=2, default=None, help="head hidden sizes (default 8*width, width)")
        p.add_argument("--dropout", type=float, default=0.5, help="dropout of the image head")
        p.add_argument("--mlp-dropout", type=float, default=0.5, help="dropout of the clinical MLP")
        p.add_argument("--momentum", type=float, default=0.1, help="SGD momentum (the seed: 0.1)")
        p.add_argument("--weight-decay", type=float, default=1e-5, help="SGD weight decay")
        p.add_argument("--lr-step", type=int, default=30, help="epochs between learning-rate decays")
        p.add_argument("--lr-gamma", type=float, default=0.1, help="learning-rate decay factor")
        p.add_argument("--select", default="accuracy", choices=("accuracy", "roc_auc"),
                       help="validation metric that picks each fold's best epoch")
        if mode == "combined":
            p.add_argument("--init-from-branches", action="store_true",
                           help="start each fold from OUT's image and clinical weights of the same fold")
        add_training_arguments(p, epochs=DEFAULTS[mode]["epochs"], batch_size=16, lr=0.01, folds=5)
    imp = sub.add_parser("import", help="import a seed checkpoint into OUT/card.json")
    from train.scar.seed_import import add_import_arguments
    add_import_arguments(imp)
    args = parser.parse_args(argv)
    if args.mode == "clinical":
        args.images, args.augment = None, False
    if args.mode != "import" and getattr(args, "input_size", None) is None:
        args.input_size = scar_card.card_photo_size(args.out) or list(scar.INPUT_SIZE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "import":
        from train.scar.seed_import import run_import
        return run_import(args)
    data = load_data(args.data, args.mode, args.images, args.patient_column, args.drop_incomplete)
    context = setup_distributed()
    if args.mode == "clinical" and not context.distributed:
        # An MLP over a few hundred rows gains nothing from intra-op threads, and on a busy machine
        # their synchronisation made each step ~100x slower (46 ms per BatchNorm1d call measured).
        torch.set_num_threads(1)
    out = Path(args.out)
    try:
        task = build_task(args, data)
        if context.is_main:
            scar_card.check_compatible(out, args.mode, task.card["input"]["photo"], task.card["input"]["clinical_features"])
            if args.resume:
                scar_card.restore_for_resume(out, args.mode)
        context.barrier()
        run_args = argparse.Namespace(**{**vars(args), "out": out / args.mode})  # the run's own folder
        run_card = run_kfold(task, run_args, context, module="train.scar")
        if context.is_main:
            input_spec = task.card["input"]["photo"]
            names = data.feature_names if args.mode != "image" else None
            card = scar_card.publish_run(out, args.mode, run_card, input_spec=input_spec, feature_names=names,
                                         scalers=_fold_scalers(out, args.mode, data))
            pooled = card["metrics"][args.mode]
            print(f"{args.mode}: pooled accuracy {pooled['accuracy']:.3f}, top-2 {pooled['top2_accuracy']:.3f}, "
                  f"macro ROC-AUC {pooled['roc_auc']}; card {out / 'card.json'}", file=sys.stderr)
    except BaseException:
        shutdown_distributed(context, clean=False)
        raise
    shutdown_distributed(context)
    return 0

