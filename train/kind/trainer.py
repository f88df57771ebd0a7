"""Train the image-kind model (panoramic / chest / hand / photo / other) that gates every request, k-fold, into a card.

    python -m train.kind DATA --out weights/kind [--phantoms 40] [--plain 40] [--size 112] [--folds 5] ...

DATA is the kinds layout: ``<kind>/<file>`` with ``manifest.csv`` (file, kind, source_repo,
license, ...), e.g. ``../shared/data/kinds``. Added to it: ``--phantoms`` phantoms of every task
(``train.synthetic``, written once into ``--phantom-dir``) labelled with the kind their task
takes, so the demo inputs pass their gate, and ``--plain`` generated non-pictures (flat, noise,
stripes) labelled ``other``. Folds are grouped by source family (``train/kind/data.py``), so
every out-of-fold figure is on sources the fold's model never saw. The network and the
preprocessing are ``tasks.kind`` (letterbox with an inside channel, colour kept), the code the
daemon gates with; augmentations are in ``train/kind/data.py``.

Each fold keeps its last epoch (nothing is chosen on its validation fold). The gate threshold
(``gate.refuse_at``: refuse when P(not the task's kind) reaches it) is chosen by the rule in
``train/kind/metrics.py``; the reported pass and refusal rates judge each fold at the threshold
chosen on the other folds only. The card lists every source with its licence: the real images
are research / non-commercial / unstated, so the card is for internal research use.

Committed weights (weights/kind/, 3 MB: five fp16 folds of 0.6 MB), from the repository root:

    OMP_NUM_THREADS=1 python -m train.kind ../shared/data/kinds --out weights/kind --phantoms 40 --plain 40 \\
        --size 112 --folds 5 --epochs 30 --batch-size 32 --lr 3e-3 --seed 0 --half \\
        --extra "chest=../shared/data/jsrt/images:moritzhauschulz:research use (JSRT/SCR terms)" \\
        --extra "chest=../shared/data/covid-qu-ex/Train/*/images:jas127:COVID-QU-Ex (Tahir et al., Qatar Univ.; Kaggle), as published by its authors (research)" \\
        --extra "chest=../shared/data/brixia-cohen/public-cohen-subset:joseph-bae:Cohen covid-chestxray-dataset per-image licences (Apache-2.0, CC BY, CC BY-NC-SA); BrixIA scores CC BY-NC-SA 4.0"

``--extra`` adds 120 frontal chest films from each pack (``--extra-limit``), each in the family of
the manifest rows it shares an origin with (JSRT: the manifest's JSRT films, moritzhauschulz;
COVID-QU-Ex: jas127; the Cohen collection's frontal films: joseph-bae, the manifest's Cohen
lateral films and CT slices), and skips any that nearly duplicates an image already taken (79
JSRT films drawn, mostly the manifest's own 70; 4 COVID-QU-Ex films; 6 Cohen films, copies of
COVID-QU-Ex films among them), so no film sits in two folds (card: ``data.extra``).

On the 2-core machine (alone) this took 10.0 min wall and 9.7 CPU-minutes, and a second run wrote
the same out-of-fold records. OMP_NUM_THREADS=1 on purpose: on a busy machine two intra-op threads
made each step several times more CPU-expensive (the threads spin waiting for each other). Out of
fold on the 1055 real images (695 of the manifest, 360 extra chest films), sources never seen by
the fold's model: accuracy 0.920, balanced accuracy 0.891; the gate's figures and the confusion
matrix are in the card and README.md ("kind card").
"""
from __future__ import annotations

import argparse
import functools
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from tasks import kind
from train.core.cache import PreprocessCache
from train.core.loop import TrainTask, add_training_arguments, run_trainer
from train.kind.data import (DUPLICATE_AT, KindImages, KindItem, extra_items, parse_extra, phantom_items, read_kinds,
                             shrunk_image, write_phantoms, write_plain_images)
from train.kind.metrics import choose_thresholds, gate_rates, kind_metrics
from train.core.metrics import classification_plots, classification_records
from train.core.reporting import command_parser

USE = ("internal research use only: the real training images come from public research repositories "
       "whose terms are research-only, non-commercial or unstated (see data.sources); not for clinical "
       "or commercial use")
DICOM_SUPPORTED_REFUSE_AT = 0.99  # fixed a priori: a header naming the kind needs a near-certain picture against it
AUGMENTATION = ("per image: radiographs tile-shuffled into 'other' p 0.08, photos on a coloured ground p 0.3, colour "
                "'other' to gray p 0.3, black bars p 0.15; flips, any quarter turn (hand/photo/other), rotation "
                "+-15 deg, crop 80-100 % per side; brightness/contrast/gamma, photo colour jitter, faint tint of gray "
                "films, blur, noise, JPEG; burned-in text and boxes (train.kind.data.augmented)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m train.kind",
        "Train the image-kind gate (panoramic / chest / hand / photo / other) with k-fold grouped by "
        "source family and write fold weights plus card.json.")
    parser.add_argument("data", type=Path, help="kinds folder: <kind>/<file> and manifest.csv")
    parser.add_argument("--extra", type=str, action="append", default=[], metavar="KIND=PATH[:FAMILY[:LICENCE]]",
                        help="more real images of KIND: every image file under PATH (glob patterns allowed, e.g. "
                             "Train/*/images), in source family FAMILY (default: PATH's last folder name; give the "
                             "family of the manifest rows they share an origin with), licence as stated; repeatable")
    parser.add_argument("--extra-limit", type=int, default=120,
                        help="at most this many images drawn from each --extra folder (near-duplicates of images "
                             "already taken are skipped)")
    parser.add_argument("--phantoms", type=int, default=40, help="phantoms per task from train.synthetic (0: none)")
    parser.add_argument("--plain", type=int, default=40, help="generated flat/noise/stripe images of kind other (0: none)")
    parser.add_argument("--phantom-dir", type=Path, default=None,
                        help="where phantoms and plain images are written and reused (default: a folder in the "
                             "system temp dir named after --phantoms, --plain and --seed)")
    parser.add_argument("--scene-p", type=float, default=0.0,
                        help="probability that a training photo is laid into a colour picture of the fold's real "
                             "'other' images (a wound photographed with the room around it; 0: never)")
    parser.add_argument("--size", type=int, default=kind.INPUT_SIZE, help="square model side")
    parser.add_argument("--widths", type=int, nargs="+", default=list(kind.WIDTHS), help="channels per stage")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    add_training_arguments(parser, epochs=30, batch_size=32, lr=3e-3, folds=5)
    return parser.parse_args(argv)


def _sources(items: list[KindItem]) -> list[dict[str, Any]]:
    """One row per source repository: kinds, image count, licence(s) as the manifest states them."""
    table: dict[str, dict[str, Any]] = defaultdict(lambda: {"kinds": Counter(), "licences": set()})
    for item in items:
        table[item.source]["kinds"][item.kind] += 1
        table[item.source]["family"] = item.family
        table[item.source]["licences"].add(item.licence)
    return [{"source": source, "family": row["family"], "n": sum(row["kinds"].values()), "kinds": dict(row["kinds"]),
             "licences": sorted(row["licences"])} for source, row in sorted(table.items())]


def gather_items(args: argparse.Namespace) -> tuple[list[KindItem], list[dict[str, Any]]]:
    """The real images of DATA and the ``--extra`` folders plus the phantoms and plain images the arguments ask
    for, and what each extra folder gave (for the card)."""
    items = read_kinds(args.data)
    extra_report: list[dict[str, Any]] = []
    if args.extra:
        extra, extra_report = extra_items([parse_extra(spec) for spec in args.extra], items, args.extra_limit,
                                          args.seed)
        items += extra
    if args.phantoms or args.plain:
        folder = args.phantom_dir or Path(tempfile.gettempdir()) / f"kind_extra_n{args.phantoms}_p{args.plain}_s{args.seed}"
        if args.phantoms:
            items += phantom_items(write_phantoms(folder / "phantoms", args.phantoms, args.seed), folder)
        if args.plain:
            items += write_plain_images(folder / "plain", args.plain, args.seed)
    return items, extra_report


def card_gate(records: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's ``gate`` record: the served thresholds (the rule on all out-of-fold real records) and
    the figures at them; the honest figures, each fold judged at thresholds chosen without it, are
    ``metrics.pooled.gate``."""
    real = [record for record in records if record.get("real", True)]
    refuse_at = choose_thresholds(real)
    synthetic = [record for record in records if not record.get("real", True)]
    return {"gate": {
        "refuse_at": refuse_at,
        "refuse_at_with_dicom_support": {k: max(v, DICOM_SUPPORTED_REFUSE_AT) for k, v in refuse_at.items()},
        "rule": "refuse a request to a task of kind k when 1 - P(k) >= refuse_at[k] (P: mean over folds)",
        "chosen_by": "train.kind.metrics.choose_thresholds on all out-of-fold real records; the reported figures "
                     "(metrics.pooled.gate) judge each fold at the values the same rule picked on the other folds",
        "task_kinds": dict(kind.TASK_KINDS),
        "out_of_fold_at_refuse_at": gate_rates(real, refuse_at),
        "synthetic_at_refuse_at": gate_rates(synthetic, refuse_at) if synthetic else None,
    }}


def build_task(args: argparse.Namespace) -> TrainTask:
    """The kind ``TrainTask``: manifest + phantoms, family-grouped folds, small CNN, weighted CE."""
    items, extra_report = gather_items(args)
    names = [item.item for item in items]
    if len(set(names)) != len(names):
        raise SystemExit("two training images share a name; rename the phantom folder or the manifest rows")
    labels = [item.kind for item in items]
    input_spec = kind.default_input_spec(args.size)
    architecture = kind.default_architecture(args.widths, args.dropout)
    cache = PreprocessCache(functools.partial(shrunk_image, input_spec=input_spec),
                            {"input": input_spec, "pipeline": "tasks.kind.shrunk"})
    counts = Counter(labels)
    # Every kind weighs the same in the loss, however many images it has.
    weights = torch.tensor([len(items) / (len(kind.KINDS) * max(counts[name], 1)) for name in kind.KINDS])
    loss = torch.nn.CrossEntropyLoss(weight=weights)

    def records(outputs, targets, indices):
        rows = classification_records(outputs, targets, indices, labels=kind.KINDS)
        for row in rows:
            item = items[row["index"]]
            row.update(real=item.real, family=item.family, extra=item.extra)
        return rows

    real = [item for item in items if item.real]
    scenes = [index for index, item in enumerate(items) if item.real and item.kind == "other"]
    return TrainTask(
        name=kind.TASK,
        items=names,
        strata=[kind.KINDS.index(label) for label in labels],
        groups=[item.family for item in items],
        dataset=lambda indices, train, fit_rows: KindImages(lambda i: cache.get(items[i].path), labels, indices, input_spec, train,
                                                  scene_p=args.scene_p, scenes=scenes),
        build_model=lambda: kind.build_network(architecture),
        loss=loss,
        records=records,
        metrics=kind_metrics,
        score_key="balanced_accuracy",
        keep_last=True,
        report=functools.partial(classification_plots, labels=kind.KINDS),
        prepare=lambda context: cache.fill([item.path for item in items], context, desc="decode"),
        make_optimizer=lambda parameters, lr: torch.optim.AdamW(parameters, lr=lr, weight_decay=args.weight_decay),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs),
        card_from_results=card_gate,
        card={
            "task": kind.TASK,
            "name": f"kind-cnn{args.size}",
            "architecture": architecture,
            "input": input_spec,
            "labels": list(kind.KINDS),
            "use": USE,
            "data": {
                "root": str(args.data), "n_images": len(items), "n_real": len(real),
                "kind_counts": {name: counts[name] for name in kind.KINDS},
                "real_kind_counts": dict(Counter(item.kind for item in real)),
                "families": sorted({item.family for item in items}),
                "sources": _sources(items),
                "extra": {"folders": extra_report, "limit_per_folder": args.extra_limit,
                          "duplicate_rule": f"an extra image is skipped when its 24x24 centre-square gray "
                                            f"thumbnail correlates >= {DUPLICATE_AT} with one already taken"}
                if args.extra else None,
                "folds": "StratifiedGroupKFold by kind, grouped by source family (the repository owner; "
                         "phantom-<task>, plain): every figure is on families the fold's model never saw",
            },
            "training": {"optimizer": f"AdamW(weight_decay={args.weight_decay:g})",
                         "scheduler": f"CosineAnnealingLR(T_max={args.epochs})",
                         "loss": "CrossEntropyLoss, kinds weighted equally", "selection": "last epoch of each fold",
                         "augmentation": AUGMENTATION + (f"; otherwise laid into a colour real 'other' picture of the "
                                                         f"fold p {args.scene_p:g} (train.kind.data._in_scene)"
                                                         if args.scene_p else ""),
                         "initialisation": "random"},
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_trainer(lambda: build_task(args), args, module="train.kind")

