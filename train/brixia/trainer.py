"""Train the Brixia pipeline in three stages; the last one writes the card the daemon serves.

    python -m train.brixia seg IMAGES MASKS --out runs/brixia_seg [--arch unet --encoder resnet34 --size 512]
    python -m train.brixia stn MASKS --out runs/brixia_stn [--size 512 --stn-size 128]
    python -m train.brixia score DATA --metadata metadata_global_v2.csv [--consensus metadata_consensus_v1.csv] \\
        --seg runs/brixia_seg [--stn runs/brixia_stn] --out weights/brixia [--backbone resnet34]
    torchrun --nproc_per_node=N -m train.brixia <stage> ...                          # DDP, any stage

``seg``: lung/heart segmentation (smp, three sigmoid channels right lung / left lung / heart)
from one folder of images and one folder of masks per structure (``MASKS/right_lung``,
``MASKS/left_lung``, ``MASKS/heart``, or the usual variants: see ``train/brixia/data.py``);
k-fold, BCE + Dice, best epoch by mean Dice. ``stn``: the spatial transformer that aligns the
lungs, trained on the same masks posed by random affines, with the mask-derived affine of
``tasks.brixia.mask_theta`` as its target (no hand registration). ``score``: the region scorer
on BrixIA (``;``-separated metadata, ``BrixiaScore`` left-padded to six digits; images as
DICOM or converted PNG under DATA, DATA/images or DATA/dicom_clean): every image goes through
the trained segmenter and alignment once (cached), then a ResNet with one 4-way head per region
is trained with patient-grouped (``Subject``) stratified k-fold; the consensus images are held
out and scored at the end against ModeA-F and MeanA-F. The score card bundles the segmenter and
STN folds, so ``weights/brixia`` is all the daemon needs.

Differences from the seed, on purpose: CE on logits (the seed applied softmax twice), k-fold
grouped by patient (the seed: one random split), a global score (sum) with MAE and
correlations, a working STN target, no HybridGNet (GPL, torch_geometric).

The committed ``weights/brixia`` (real films; every source and licence in the card). Phantoms join
the segmentation sources so the quick-start examples stay readable; the real packs are those of
``../shared/DATA.md`` (JSRT label maps, COVID-QU-Ex lung + infection masks, the Cohen subset
scored by the BrixIA radiologists):

    python -m train.synthetic brixia runs/bx_phantoms --n 120 --size 256 256 --seed 2
    SOURCES="runs/bx_phantoms/images runs/bx_phantoms/masks --jsrt ../shared/data/jsrt \
        --covid-qu-ex ../shared/data/covid-qu-ex"
    python -m train.brixia seg $SOURCES --out runs/seg_real --size 256 --arch unet --encoder tu-resnet10t \
        --encoder-depth 4 --decoder-channels 48 32 24 16 --folds 2 --epochs 10 --val-every 10 --batch-size 8 \
        --lr 3e-3 --seed 0 --half --demo --cache-dir runs/cache_seg
    python -m train.brixia orient $SOURCES --out runs/orient_real --size 256 --orient-size 128 --folds 2 \
        --epochs 12 --val-every 12 --batch-size 32 --lr 3e-3 --seed 0 --half --demo --cache-dir runs/cache_orient
    python -m train.brixia score ../shared/data/brixia-cohen \
        --metadata ../shared/data/brixia-cohen/public-annotations.csv --seg runs/seg_real \
        --orient runs/orient_real --backbone resnet10t --stage 3 --folds 3 --epochs 30 --val-every 30 \
        --batch-size 16 --lr 1e-3 --seed 0 --half --demo --trunk-from-seg --trunk-lr 0.1 --opacity \
        --ordinal-weight 0.5 --out weights/brixia --cache-dir runs/cache_score

Measured on the shared 2-core CPU machine (other trainers and test suites running beside):
seg 7068 s (1837 films, 2 folds x 10 epochs), orient 344 s, score 994 s (149 films,
3 folds x 30 epochs). No STN: with real films the mask-derived alignment is used. The phantom
pipeline the tests use (``tests/test_brixia_train_and_serve.py``) still trains all three stages in
seconds. On CUDA the same commands run unchanged (CUDA is used when present; ``--amp`` for float16; ``torchrun`` for DDP).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks import brixia, brixia_chain, brixia_orient, cards
from tasks.bundle import build_bundle, load_bundle
from tasks.nets.smp_models import set_output_prior
from tasks.weights import load_state_dict
from train.core.cache import PreprocessCache
from train.core.loop import TrainTask, add_training_arguments, run_kfold
from tasks import quality
from tasks.brixia_film import limits_from_masks, quality_measures
from train.core.distributed import DistributedContext, setup_distributed, shutdown_distributed
from tasks.intensity import POLICIES, default_intensity
from train.brixia import labels, loss, transfer
from train.brixia.data import (OrientSamples, ScoreSamples, SegSamples, StnSamples, mask_sample,
                               read_gray, seg_sample)
from train.brixia.metrics import (ScoreRecords, SegRecords, consensus_metrics, orient_card_output, orient_metrics, orient_records,
                                  plot_score_report, plot_seg_report, score_metrics, seg_metrics, stn_loss, stn_metrics,
                                  stn_records)
from train.brixia.sources import (JSRT_VALUES, READERS, SOURCE_NOTES, covid_qu_ex_cases, find_mask_cases,
                                  folder_cases, is_cohen_annotations, jsrt_cases, read_cohen_annotations)
from train.core.losses import SegmentationLoss
from train.core.metrics import json_safe
from train.core.reporting import data_source

STAGES = ("seg", "stn", "orient", "score")
QUALITY_MARGIN = 0.25  # the output check's ranges: training min-max widened by this (tasks.quality)
IMAGE_FOLDERS = (".", "images", "dicom_clean", "png", "public-cohen-subset")
SEG_PRIOR = 0.1   # a lung or the heart covers roughly a tenth of a chest film


# ---------------------------------------------------------------- arguments

def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The segmentation sources (seg and orient stages): per-structure folders, JSRT, COVID-QU-Ex."""
    parser.add_argument("images", type=Path, nargs="?", help="folder of chest X-rays (PNG/JPEG/DICOM), with MASKS")
    parser.add_argument("masks", type=Path, nargs="?", help="folder with one sub-folder of mask PNGs per structure "
                                                            "(right_lung, left_lung, heart[, opacity]), names as the images")
    parser.add_argument("--jsrt", type=Path, action="append", default=[], metavar="ROOT",
                        help="a JSRT/SCR-style label-map set: ROOT/images/*.png + ROOT/masks/*.png (repeatable)")
    parser.add_argument("--jsrt-values", type=int, nargs=3, default=list(JSRT_VALUES),
                        metavar=("RIGHT", "LEFT", "HEART"), help="pixel values of right lung, left lung and heart in the "
                                                                 "label maps")
    parser.add_argument("--covid-qu-ex", type=Path, action="append", default=[], metavar="ROOT",
                        help="COVID-QU-Ex Infection Segmentation Data: every class folder under ROOT with images/, "
                             "'lung masks/', 'infection masks/' (repeatable)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.brixia",
        description="Train the Brixia chest X-ray pipeline: seg (lungs, heart, opacity), stn (alignment), orient "
                    "(pose check), score (regions A-F, 0-3 each). Each stage writes a card; the score card bundles "
                    "the others and is what the daemon serves. Multi-GPU/CPU: torchrun --nproc_per_node=N -m train.brixia STAGE ...")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    seg = stages.add_parser("seg", help="lung/heart (+ opacity) segmentation", formatter_class=fmt,
                            description="Train the smp segmenter: sigmoid channels right lung, left lung, heart and, "
                                        "when a source labels it, lung opacity. Sources can be combined in one run; "
                                        "a channel a source does not label contributes no loss.")
    add_source_arguments(seg)
    seg.add_argument("--opacity", choices=("auto", "on", "off"), default="auto",
                     help="a fourth channel for lung opacity (auto: when a source labels it)")
    seg.add_argument("--arch", default="Unet", help="smp architecture (Unet, UnetPlusPlus, FPN, ...)")
    seg.add_argument("--encoder", default="resnet34", help="smp encoder, or timm with the tu- prefix")
    seg.add_argument("--encoder-weights", default="none", help="'none' or 'imagenet' (downloads: needs internet)")
    seg.add_argument("--encoder-depth", type=int, default=None, help="encoder stages (3-5; smp default 5)")
    seg.add_argument("--decoder-channels", type=int, nargs="+", default=None, help="Unet decoder channels")
    seg.add_argument("--size", type=int, default=512, help="square frame side (every stage uses the seg card's)")
    seg.add_argument("--fit", default="resize", choices=brixia.FITS, help="stretch to the frame or letterbox")
    seg.add_argument("--intensity", default="center-percentile", choices=POLICIES,
                     help="grey-level policy applied to every frame (tasks.intensity), recorded in the card")
    seg.add_argument("--loss", type=float, nargs=3, default=[1.0, 1.0, 0.0], metavar=("BCE", "DICE", "IOU"),
                     help="weights of BCE, Dice and IoU loss")
    seg.add_argument("--cache-dir", type=Path, default=None,
                     help="keep the preprocessed samples here between runs (default: memory only)")
    add_training_arguments(seg, epochs=40, batch_size=8, lr=1e-3, folds=5)

    stn = stages.add_parser("stn", help="spatial transformer aligning the lungs", formatter_class=fmt,
                            description="Train the lung STN on posed masks against the mask-derived affine.")
    stn.add_argument("masks", type=Path, help="the same mask folder as for seg")
    stn.add_argument("--size", type=int, default=512, help="frame side the masks are brought to (as seg)")
    stn.add_argument("--fit", default="resize", choices=brixia.FITS, help="as seg")
    stn.add_argument("--stn-size", type=int, default=128, help="side of the STN's own mask input")
    stn.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 64], help="conv widths")
    add_training_arguments(stn, epochs=30, batch_size=32, lr=1e-3, folds=5)

    orient = stages.add_parser("orient", help="pose classifier: refuses mirrored and rotated films", formatter_class=fmt,
                               description="Train the eight-pose classifier (upright, mirrored, rotated) on the "
                                           "segmentation films, each shown in a random pose (self-supervised).")
    add_source_arguments(orient)
    orient.add_argument("--size", type=int, default=512, help="frame side the films are brought to (as seg)")
    orient.add_argument("--fit", default="resize", choices=brixia.FITS, help="as seg")
    orient.add_argument("--intensity", default="center-percentile", choices=POLICIES, help="as seg")
    orient.add_argument("--orient-size", type=int, default=128, help="side of the classifier's own input")
    orient.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="conv widths")
    orient.add_argument("--cache-dir", type=Path, default=None, help="keep the model frames here between runs")
    add_training_arguments(orient, epochs=10, batch_size=32, lr=2e-3, folds=2)

    score = stages.add_parser("score", help="region scorer; writes the served card", formatter_class=fmt,
                              description="Train the six-region scorer on BrixIA and bundle seg + stn into its card.")
    score.add_argument("data", type=Path, help="folder with the images (also looked up in images/, dicom_clean/, png/, "
                                               "public-cohen-subset/)")
    score.add_argument("--metadata", type=Path, required=True,
                       help="the BrixIA metadata_global_v2.csv (';'-separated) or the Cohen subset's "
                            "public-annotations.csv (filename, S-A..S-F, J-A..J-F)")
    score.add_argument("--reader", choices=READERS, default="senior",
                       help="public-annotations.csv: which radiologist to train on (mean: half each); metrics are "
                            "always against the senior reader, with the junior's agreement beside")
    score.add_argument("--consensus", type=Path, default=None,
                       help="metadata_consensus_v1.csv: ModeA-F/MeanA-F of the held-out consensus images")
    score.add_argument("--seg", type=Path, required=True, help="folder of the seg stage's card")
    score.add_argument("--stn", type=Path, default=None,
                       help="folder of the stn stage's card (without it the mask-derived alignment is served)")
    score.add_argument("--orient", type=Path, default=None,
                       help="folder of the orient stage's card: the daemon then refuses mirrored and rotated films")
    score.add_argument("--backbone", default="resnet34", help="timm ResNet (resnet34 as the paper; resnet10t small)")
    score.add_argument("--stage", dest="trunk_stage", type=int, default=4,
                       help="last ResNet stage used (4 = all; 3 halves the feature stride and drops most weights)")
    score.add_argument("--pretrained", action="store_true", help="ImageNet trunk weights from timm (downloads)")
    score.add_argument("--trunk-from-seg", action="store_true",
                       help="start the trunk from the segmenter's encoder (fold 0; needs --encoder tu-BACKBONE)")
    score.add_argument("--trunk-lr", type=float, default=1.0,
                       help="learning-rate factor of the trunk (e.g. 0.1 to keep a transferred trunk close to it; "
                            "0 freezes it)")
    score.add_argument("--opacity", action="store_true",
                       help="feed each region head its mean opacity and opacity extent from the segmenter's "
                            "opacity channel (a seg card trained with one)")
    score.add_argument("--shared-head", action="store_true", help="one head for all six regions (with a region code)")
    score.add_argument("--decision", choices=brixia.DECISIONS, default="median",
                       help="a region's score from its predicted distribution: median (least expected absolute "
                            "error) or argmax")
    score.add_argument("--dropout", type=float, default=0.2, help="dropout before each region head")
    score.add_argument("--ordinal-weight", type=float, default=0.0,
                       help="weight of the mean |expected - true score| term added to the cross-entropy")
    score.add_argument("--cache-dir", type=Path, default=None,
                       help="keep the segmented+aligned samples here between runs (default: memory only)")
    add_training_arguments(score, epochs=50, batch_size=16, lr=1e-3, folds=5)
    args = parser.parse_args(argv)
    if getattr(args, "encoder_weights", None) and args.encoder_weights.lower() in ("none", "null", ""):
        args.encoder_weights = None
    return args


# ---------------------------------------------------------------- stage tasks

def _sampler(compute, cases: list, params: dict[str, Any], key, folder: Path | None = None) -> callable:
    cache = PreprocessCache(lambda path: compute(by_key[str(path)]), params, folder)
    by_key = {str(key(case)): case for case in cases}
    return lambda index: cache.get(key(cases[index]))


def seg_cases(args: argparse.Namespace) -> list:
    """Every film of every segmentation source given on the command line (sorted within a source)."""
    if (args.images is None) != (args.masks is None):
        raise SystemExit("give both IMAGES and MASKS (per-structure folders), or neither")
    cases = []
    if args.images is not None:
        cases += folder_cases(args.images, args.masks)
    for root in args.jsrt:
        cases += jsrt_cases(root, args.jsrt_values)
    for root in args.covid_qu_ex:
        cases += covid_qu_ex_cases(root)
    if not cases:
        raise SystemExit("no segmentation data: give IMAGES MASKS, --jsrt ROOT and/or --covid-qu-ex ROOT")
    keys = [case.key for case in cases]
    if len(set(keys)) != len(keys):
        raise SystemExit("the same film is given twice (two sources share a folder?)")
    return cases


def seg_task(args: argparse.Namespace) -> TrainTask:
    cases = seg_cases(args)
    labels_opacity = any(case.masks[3] is not None for case in cases)
    opacity = labels_opacity if args.opacity == "auto" else args.opacity == "on"
    if opacity and not labels_opacity:
        raise SystemExit("--opacity on, but no source labels opacity (COVID-QU-Ex infection masks, or an "
                         "'opacity' mask folder)")
    input_spec = brixia.default_input_spec(args.size, args.fit, default_intensity(args.intensity))
    architecture = brixia.default_segmenter(args.arch, args.encoder, opacity=opacity, encoder_depth=args.encoder_depth,
                                            decoder_channels=args.decoder_channels)
    labels = brixia.segmenter_labels(architecture)
    try:
        brixia.build_segmenter(architecture)
    except Exception as exc:
        raise SystemExit(f"cannot build {args.arch} with encoder {args.encoder!r}: {exc}") from exc
    sample = _sampler(functools.partial(seg_sample, input_spec=input_spec, channels=len(labels)), cases,
                      {"input": input_spec, "labels": labels}, key=lambda case: case.image, folder=args.cache_dir)
    sources = [case.source for case in cases]
    counts = {source: sources.count(source) for source in sorted(set(sources))}
    labelled = {source: [name for c, name in enumerate(labels)
                         if any(case.masks[c] is not None for case in cases if case.source == source)]
                for source in counts}

    def build() -> torch.nn.Module:
        """Random (or pretrained-encoder) segmenter whose output bias starts at the logit of a structure's
        typical share of the frame: from 0 every pixel starts at probability 0.5 and the first
        epochs only learn that most of the frame is background."""
        try:
            return set_output_prior(brixia.build_segmenter(architecture, encoder_weights=args.encoder_weights),
                                    SEG_PRIOR)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from exc

    card = {"task": "brixia-seg", "name": f"brixia-seg-{args.arch.lower()}-{args.encoder}-{args.size}",
            "architecture": architecture, "input": input_spec, "labels": labels,
            "output": {"activation": "sigmoid", "multilabel": True, "threshold": 0.5},
            "data": {"n_images": len(cases), "sources": {source: {"n_images": n, "labels": labelled[source],
                                                                  "note": SOURCE_NOTES.get(source.split("/")[0], "")}
                                                         for source, n in counts.items()},
                     "source": data_source(Path(args.images or (args.jsrt + args.covid_qu_ex)[0]),
                                           "chest X-rays with lung/heart masks")},
            "training": {"loss": "{:g}*BCE + {:g}*Dice + {:g}*IoU over the labelled (image, channel) pairs".format(*args.loss),
                         "optimizer": "AdamW(weight_decay=1e-5)", "scheduler": "cosine",
                         "augmentation": "rotation +-10, scale 0.9-1.1, shift +-5% (p 0.7), brightness/contrast "
                                         "(p 0.7); never a horizontal flip (it swaps the lungs)"}}

    heart = labels.index("heart")
    card["output"]["film_limits"] = limits_from_masks(
        [sample(k)[1:4] == 1 for k, case in enumerate(cases)
         if case.masks[0] is not None and case.masks[1] is not None and case.masks[heart] is not None])

    return TrainTask(
        name="brixia-seg", items=[case.key for case in cases], strata=[sorted(counts).index(s) for s in sources],
        dataset=lambda indices, train, fit_rows: SegSamples(sample, indices, input_spec, train),
        build_model=build, loss=SegmentationLoss(args.loss), records=SegRecords(labels, sources), metrics=seg_metrics,
        score_key="dice", report=plot_seg_report,
        make_optimizer=lambda parameters, lr: torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-5),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs)),
        card=card,
    )


def stn_task(args: argparse.Namespace) -> TrainTask:
    cases = find_mask_cases(args.masks)
    input_spec = brixia.default_input_spec(args.size, args.fit)
    architecture = brixia.default_stn(args.stn_size, args.channels)
    sample = _sampler(functools.partial(mask_sample, input_spec=input_spec), cases, {"input": input_spec},
                      key=lambda case: case.masks[0])
    return TrainTask(
        name="brixia-stn", items=[case.stem for case in cases], strata=[0] * len(cases),
        dataset=lambda indices, train, fit_rows: StnSamples(sample, indices, input_spec, train, stn_size=args.stn_size),
        build_model=lambda: brixia.build_stn(architecture), loss=stn_loss, records=stn_records,
        metrics=stn_metrics, score_key="box_iou",
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs)),
        card={"task": "brixia-stn", "name": f"brixia-stn-{args.stn_size}", "architecture": architecture,
              "input": input_spec, "labels": ["theta"],
              "data": {"masks": str(args.masks), "n_images": len(cases)},
              "training": {"target": "tasks.brixia.mask_theta of the posed masks (canonical box "
                                     f"{list(brixia.CANONICAL_BOX)})",
                           "loss": "MSE of theta + MSE of the canonical box corners it places",
                           "augmentation": "every sample posed: rotation +-20, scale 0.75-1.15, shift +-12%"}},
    )


def orient_task(args: argparse.Namespace) -> TrainTask:
    cases = seg_cases(args)
    input_spec = brixia.default_input_spec(args.size, args.fit, default_intensity(args.intensity))
    architecture = brixia_orient.default_orient(args.orient_size, args.channels)
    sample = _sampler(lambda case: brixia.prepare_frame(read_gray(case.image), input_spec)[0], cases,
                      {"input": input_spec, "frame": True}, key=lambda case: case.image, folder=args.cache_dir)
    sources = [case.source for case in cases]
    counts = {source: sources.count(source) for source in sorted(set(sources))}
    return TrainTask(
        name="brixia-orient", items=[case.key for case in cases], strata=[sorted(counts).index(s) for s in sources],
        dataset=lambda indices, train, fit_rows: OrientSamples(sample, indices, input_spec, train, orient_size=args.orient_size),
        build_model=lambda: brixia_orient.build_orient(architecture), loss=torch.nn.CrossEntropyLoss(),
        records=orient_records, metrics=orient_metrics, score_key="accuracy", card_from_results=orient_card_output,
        make_optimizer=lambda parameters, lr: torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs)),
        card={"task": "brixia-orient", "name": f"brixia-orient-{args.orient_size}", "architecture": architecture,
              "input": input_spec, "labels": list(brixia_orient.POSES),
              "data": {"n_images": len(cases), "sources": {source: {"n_images": n,
                                                                    "note": SOURCE_NOTES.get(source.split("/")[0], "")}
                                                           for source, n in counts.items()}},
              "training": {"target": "the pose each film was shown in (self-supervised: no labels needed)",
                           "loss": "cross-entropy over the 8 poses",
                           "augmentation": "a random pose per sample, then rotation +-10, scale 0.9-1.1, "
                                           "brightness/contrast; validation: film k in pose k mod 8"}},
    )


def load_stage(folder: Path, expected_task: str, device: torch.device) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    """A seg or stn card and its fold networks (verified by sha256), in eval mode on ``device``."""
    build = {"brixia-seg": brixia.build_segmenter, "brixia-stn": brixia.build_stn,
             "brixia-orient": brixia_orient.build_orient}[expected_task]
    try:
        card = cards.read_card(folder)
        if card["task"] != expected_task:
            raise SystemExit(f"{folder} holds a {card['task']!r} card; expected {expected_task!r} "
                             f"(run `python -m train.brixia {expected_task.split('-')[1]} ...` first)")
        bundle = load_bundle(folder, build, device)
    except cards.CardError as exc:
        raise SystemExit(f"cannot use {folder}: {exc}") from exc
    return bundle.card, bundle.only()


class Pipeline:
    """The daemon's segment -> film check -> align -> regions (+ aligned opacity) chain
    (``tasks.brixia_chain``) on training films; also notes for every film the alignment used and
    whether the daemon's film check would refuse it."""

    def __init__(self, seg_card: dict[str, Any], seg: list[torch.nn.Module], stn: list[torch.nn.Module],
                 device: torch.device, opacity: bool = False, orient: list[torch.nn.Module] | None = None,
                 min_upright: float | None = None):
        self.input_spec, self.device = seg_card["input"], device
        self.models = brixia_chain.ChainModels(seg, stn, orient or [], (seg_card.get("output") or {}).get("film_limits"),
                                               min_upright, opacity=opacity)
        self.methods: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self.measures: dict[str, dict[str, float]] = {}   # film name -> quality measures (films not refused)

    def _read(self, path: Path, align: bool) -> brixia_chain.FilmReading:
        """One film through the chain (refused films sampled too: they are still learnt from); its film
        check noted."""
        tensor, frame, _ = brixia.preprocess(read_gray(path), self.input_spec)
        (reading,) = brixia_chain.read_films(self.models, tensor[None].to(self.device), [frame], self.device,
                                             sample_refused=True, align=align)
        name = Path(path).name
        if reading.refusal is not None:
            self.refused[name] = reading.refusal
        else:  # the output check's ranges come from the films the daemon would score
            self.measures[name] = quality_measures(reading.masks)
        return reading

    def checked(self, path: Path) -> bool:
        name = Path(path).name
        return name in self.refused or name in self.measures

    def check(self, path: Path) -> None:
        """The film check alone, for a film whose sample came from the cache (or another rank)."""
        self._read(path, align=False)

    def __call__(self, path: Path) -> np.ndarray:
        reading = self._read(path, align=True)
        self.methods[reading.method] = self.methods.get(reading.method, 0) + 1
        return reading.sample


def find_images(data: Path, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows whose image exists (with ``path`` set), and the Filenames not found."""
    folders = [data / name for name in IMAGE_FOLDERS if (data / name).is_dir()]
    found, missing = [], []
    for row in rows:
        path = next((p for p in (labels.resolve_image(f, row["Filename"]) for f in folders) if p is not None), None)
        if path is None:
            missing.append(row["Filename"])
        else:
            found.append({**row, "path": path})
    return found, missing


def _grouped_adamw(parameters, lr: float) -> torch.optim.Optimizer:
    """AdamW whose parameter groups follow each parameter's ``lr_factor`` (set on the trunk by
    ``--trunk-lr``; 0 means frozen, left out)."""
    groups: dict[float, list] = {}
    for parameter in parameters:
        groups.setdefault(float(getattr(parameter, "lr_factor", 1.0)), []).append(parameter)
    return torch.optim.AdamW([{"params": params, "lr": lr * factor} for factor, params in sorted(groups.items())
                              if factor > 0], lr=lr, weight_decay=1e-4)


def seg_encoder_state(seg_dir: Path, seg_card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fold 0 of the segmenter card: the weights whose encoder a transferred scorer trunk starts from."""
    return load_state_dict(cards.fold_paths(seg_dir, seg_card)[0])


def score_task(args: argparse.Namespace, context: DistributedContext, pipeline: Pipeline,
               rows: list[dict[str, Any]], stage_cards: dict[str, Any]) -> TrainTask:
    input_spec = pipeline.input_spec
    architecture = {**brixia.default_scorer(args.backbone, args.trunk_stage, args.dropout),
                    "opacity": bool(args.opacity), "shared_head": bool(args.shared_head)}
    try:
        probe = brixia.build_scorer(architecture)
    except Exception as exc:
        raise SystemExit(f"cannot build the scorer with backbone {args.backbone!r} stage {args.trunk_stage}: {exc}") from exc
    trunk_state = None
    if args.trunk_from_seg:
        try:
            trunk_state = transfer.trunk_state_from_segmenter(seg_encoder_state(args.seg, stage_cards["seg"]), probe)
        except ValueError as exc:
            raise SystemExit(f"--trunk-from-seg: {exc}") from None
    params = {"input": input_spec, "seg": [f["sha256"] for f in stage_cards["seg"]["folds"]],
              "stn": [f["sha256"] for f in stage_cards["stn"]["folds"]] if stage_cards.get("stn") else None,
              "mask_theta": list(brixia.CANONICAL_BOX), "opacity": bool(args.opacity)}
    cache = PreprocessCache(pipeline, params, args.cache_dir)
    paths = [row["path"] for row in rows]
    cache.fill(paths, context, desc="segment + align")
    targets = [row.get("target", row["scores"]) for row in rows]
    reference = [row.get("reference", row["scores"]) for row in rows]
    second_reader = [row["junior"] for row in rows] if all("junior" in row for row in rows) else None

    def build() -> torch.nn.Module:
        try:
            network = brixia.build_scorer(architecture, pretrained=args.pretrained)
        except Exception as exc:
            raise SystemExit(f"cannot build the scorer: {exc}") from exc
        if trunk_state is not None:
            network.trunk.load_state_dict(trunk_state, strict=True)
        for parameter in network.trunk.parameters():
            parameter.lr_factor = args.trunk_lr
            parameter.requires_grad_(args.trunk_lr > 0)
        return network

    subjects = [row.get("Subject") or row["Filename"] for row in rows]
    reader = args.reader if second_reader is not None else "metadata BrixiaScore"
    return TrainTask(
        name=brixia.TASK, items=[row["Filename"] for row in rows],
        strata=[min(sum(ref) // 4, 3) for ref in reference], groups=subjects,
        dataset=lambda indices, train, fit_rows: ScoreSamples(lambda index: cache.get(paths[index]), indices, input_spec, train,
                                                    targets=targets),
        build_model=build, loss=loss.RegionLoss(args.ordinal_weight),
        records=ScoreRecords(reference, second_reader, args.decision),
        metrics=score_metrics, score_key="accuracy", report=plot_score_report,
        make_optimizer=_grouped_adamw,
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs)),
        card={"task": brixia.TASK,
              "name": f"brixia-{args.backbone}-s{args.trunk_stage}-{input_spec['size'][0]}",
              "architecture": {"seg": stage_cards["seg"]["architecture"],
                               "stn": stage_cards["stn"]["architecture"] if stage_cards.get("stn") else None,
                               **({"orient": stage_cards["orient"]["architecture"]} if stage_cards.get("orient")
                                  else {}),
                               "score": architecture},
              "input": input_spec, "labels": list(brixia.REGIONS),
              "output": {"levels": brixia.SCORE_LEVELS, "global": "sum of the six region scores (0-18)",
                         "decision": args.decision,
                         "alignment": "stn" if stage_cards.get("stn") else "masks",
                         **brixia.DEFAULT_ALIGNMENT.record(),   # what the chain aligned the training films with
                         "film_limits": (stage_cards["seg"].get("output") or {}).get("film_limits"),
                         **({"orient_min_upright": stage_cards["orient"]["output"]["min_upright"]}
                            if stage_cards.get("orient") else {})},
              "data": {"root": str(args.data), "metadata": str(args.metadata), "n_images": len(rows),
                       "n_subjects": len(set(subjects)), "reader": reader,
                       "reference": "senior radiologist (S-A..S-F)" if second_reader is not None else
                                    "metadata BrixiaScore",
                       "source": data_source(Path(args.data), f"Brixia-scored films, {args.metadata}"),
                       "licence": SOURCE_NOTES["cohen" if is_cohen_annotations(args.metadata) else "brixia"]},
              "training": {"loss": f"mean CE over 6 regions + {args.ordinal_weight:g} * |E[score] - score|",
                           "optimizer": "AdamW(weight_decay=1e-4)", "scheduler": "cosine",
                           "trunk": ("segmenter encoder (fold 0)" if trunk_state is not None else
                                     "ImageNet (timm)" if args.pretrained else "random init") +
                                    f", lr x{args.trunk_lr:g}",
                           "folds": "StratifiedGroupKFold by Subject (patient, from the file names for the Cohen "
                                    "subset), strata = global score // 4",
                           "augmentation": "rotation +-5, scale 0.95-1.05, shift +-3% (p 0.6), brightness/contrast "
                                           "(p 0.7) on the aligned image and regions; no flips",
                           "alignment_methods": pipeline.methods}},
    )


# ---------------------------------------------------------------- the score card

def _bundle(out: Path, card: dict[str, Any], stage_cards: dict[str, Any], stage_dirs: dict[str, Path]) -> dict[str, Any]:
    """Copy the seg (and stn) fold files next to the scorer folds and list them in the card."""
    entries = []
    for model in ("seg", "stn", "orient"):
        stage = stage_cards.get(model)
        if stage is None:
            continue
        for k, fold in enumerate(stage["folds"]):
            name = f"{model}_fold{fold.get('fold', k)}.safetensors"
            shutil.copyfile(stage_dirs[model] / fold["file"], out / name)
            entries.append({"file": name, "sha256": cards.sha256_file(out / name), "model": model,
                            "fold": fold.get("fold", k), "shared": True, "metrics": fold.get("metrics")})
    card["folds"] = entries + [{**fold, "model": "score"} for fold in card["folds"]]
    card["components"] = {model: {"name": stage["name"], "version": stage["version"],
                                  "pooled": stage.get("metrics", {}).get("pooled"),
                                  "command": stage.get("training", {}).get("command")}
                          for model, stage in stage_cards.items() if stage is not None}
    # what every bundled model learned from, with its licence, so the one card names all the data
    card["data"]["stages"] = {model: stage.get("data") for model, stage in stage_cards.items() if stage is not None}
    return card


def evaluate_consensus(out: Path, card: dict[str, Any], pipeline: Pipeline, rows: list[dict[str, Any]],
                       consensus: dict[str, dict[str, Any]] | None, device: torch.device) -> dict[str, Any] | None:
    """Score the held-out consensus images with the mean of the fold scorers."""
    if not rows:
        return None
    entries = [fold for fold in card["folds"] if fold.get("model") == "score"]
    networks = build_bundle(card, entries, [load_state_dict(out / fold["file"]) for fold in entries],
                            {"score": brixia.build_scorer}, device)["score"]
    predicted, truth = [], []
    decision = card["output"].get("decision", "argmax")
    with torch.no_grad():
        for row in rows:
            inputs = {key: value[None].to(device)
                      for key, value in brixia.scorer_inputs(pipeline(row["path"]), pipeline.input_spec).items()}
            probabilities = torch.stack([torch.softmax(n(**inputs).float(), -1) for n in networks]).mean(0)[0]
            predicted.append(brixia.decide_scores(probabilities, decision).cpu().numpy())
            entry = (consensus or {}).get(row["Filename"])
            truth.append(entry if entry is not None else {"mode": row["scores"], "mean": row["scores"]})
    result = consensus_metrics(np.array(predicted), truth)
    result["reference"] = "ModeA-F / MeanA-F of metadata_consensus_v1.csv" if consensus else \
        "BrixiaScore of the metadata (no --consensus file given)"
    return result


def run_score(args: argparse.Namespace, context: DistributedContext) -> None:
    for name, path in (("--metadata", args.metadata), ("--consensus", args.consensus)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{name} {path} does not exist")
    try:
        if is_cohen_annotations(args.metadata):
            rows = read_cohen_annotations(args.metadata, args.reader)
        else:
            rows = labels.read_metadata(args.metadata)
        consensus = labels.read_consensus(args.consensus) if args.consensus else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rows, missing = find_images(args.data, rows)
    if missing:
        print(f"warning: {len(missing)} metadata image(s) not found under {args.data} (e.g. {missing[0]}); "
              "they are left out", file=sys.stderr)
    consensus_rows = [row for row in rows if row["consensus"]]
    training_rows = [row for row in rows if not row["consensus"]]
    if not training_rows:
        raise SystemExit(f"no training images: none of {args.metadata}'s non-consensus rows has an image under {args.data}")
    seg_card, seg = load_stage(args.seg, "brixia-seg", context.device)
    stn_card, stn = load_stage(args.stn, "brixia-stn", context.device) if args.stn else (None, [])
    orient_card, orient = load_stage(args.orient, "brixia-orient", context.device) if args.orient else (None, [])
    if orient_card is not None and orient_card["input"] != seg_card["input"]:
        raise SystemExit("the orient stage was trained on another frame or intensity policy than the segmenter: "
                         "train both with the same --size, --fit and --intensity")
    if stn_card is not None and stn_card["input"]["size"] != seg_card["input"]["size"]:
        raise SystemExit(f"the STN was trained on a {stn_card['input']['size']} frame, the segmenter on "
                         f"{seg_card['input']['size']}: train both with the same --size")
    if args.opacity and brixia.OPACITY not in brixia.segmenter_labels(seg_card["architecture"]):
        raise SystemExit(f"--opacity needs a segmenter with an opacity channel; {args.seg} has "
                         f"{', '.join(brixia.segmenter_labels(seg_card['architecture']))} (train seg with COVID-QU-Ex)")
    pipeline = Pipeline(seg_card, seg, stn, context.device, opacity=args.opacity, orient=orient,
                        min_upright=orient_card["output"].get("min_upright") if orient_card is not None else None)
    stage_cards = {"seg": seg_card, "stn": stn_card, "orient": orient_card}
    task = score_task(args, context, pipeline, training_rows, stage_cards)
    card = run_kfold(task, args, context, module="train.brixia")
    if not context.is_main:
        return
    out = Path(args.out)
    card = _bundle(out, card, stage_cards, {"seg": args.seg, "stn": args.stn, "orient": args.orient})
    card["metrics"]["consensus"] = evaluate_consensus(out, card, pipeline, consensus_rows, consensus, context.device)
    card["data"]["n_consensus_held_out"] = len(consensus_rows)
    training_names = {Path(row["path"]).name for row in training_rows}
    for row in training_rows:   # films whose sample came from the cache were not checked on the way
        if not pipeline.checked(row["path"]):
            pipeline.check(row["path"])
    refused = {name: why for name, why in pipeline.refused.items() if name in training_names}
    card["metrics"]["film_check"] = {
        "films_checked": len(training_rows), "refused": len(refused), "refused_films": refused,
        "note": "frontal training films the daemon's film check (tasks.brixia_film, and the pose classifier "
                "when bundled) would refuse"}
    measured = [m for name, m in pipeline.measures.items() if name in training_names]
    if measured:
        card["quality"] = quality.record_ranges(
            measured, margin=QUALITY_MARGIN, source=f"the segmenter's masks of the {len(measured)} training films "
            "the film check lets through")
    cards.write_card(out, json_safe(card))
    pooled = card["metrics"]["pooled"]
    print(f"brixia score card {out / cards.CARD_FILE}: out-of-fold region accuracy {pooled['accuracy']:.3f}, "
          f"region MAE {pooled['mae']:.3f}, global MAE {pooled['global_mae']:.2f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    context = setup_distributed()
    started = time.time()
    try:
        if args.stage == "seg":
            run_kfold(seg_task(args), args, context, module="train.brixia")
        elif args.stage == "stn":
            run_kfold(stn_task(args), args, context, module="train.brixia")
        elif args.stage == "orient":
            run_kfold(orient_task(args), args, context, module="train.brixia")
        else:
            run_score(args, context)
    except BaseException:
        shutdown_distributed(context, clean=False)
        raise
    shutdown_distributed(context)
    if context.is_main:
        print(f"brixia {args.stage}: done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0

