"""The shared k-fold trainer: a task describes itself as a ``TrainTask``; ``run_kfold`` does the rest.

A task trainer (``train/osteo/trainer.py`` is the model to copy) parses its arguments with
``add_training_arguments``, calls ``setup_distributed()``, builds a ``TrainTask`` (items and
their stratification labels, a dataset factory, a network builder, a loss, per-sample records,
a metric function, the selection score and its card fields), and calls
``run_kfold(task, args, context, module="train.<task>")``, then ``shutdown_distributed``.

Per fold ``run_kfold`` trains with DDP when launched by torchrun (DistributedSampler for
training, validation sharded without padding and gathered so metrics are exact), AMP on CUDA,
tqdm on stderr; validates every ``--val-every`` epochs and after the last one; keeps the best
validated epoch by the task's score (ties and NaN scores fall back to the lower validation loss)
as ``OUT/fold{k}.safetensors``; logs ``OUT/logs/fold{k}.csv`` (every epoch; the validation
columns are empty on epochs without validation) and
``.png``; marks the fold done (``OUT/logs/fold{k}.done.json``) so ``--resume`` skips it. At
the end it pools the out-of-fold records into ``oof_predictions.csv`` and metrics, lets the
task draw its plots, and writes the card.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from tasks.cards import sha256_file, write_card
from tasks.weights import save_state_dict
from train.core.distributed import DistributedContext, setup_distributed, shutdown_distributed
from train.core.folds import load_or_write_splits, read_groups
from train.core.metrics import json_safe
from train.core.reporting import command_line, plot_fold_curves, scalar_items, version_string, write_rows

Records = list[dict[str, Any]]


def _adam(parameters, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=lr)


def _plateau(optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=5)


@dataclass
class TrainTask:
    """Everything task-specific the k-fold loop needs.

    ``dataset(indices, train, fit_rows)`` returns a Dataset over those items yielding ``(input,
    target, index)`` with ``index`` the item's position in ``items`` and ``input`` a tensor or a
    dict of tensors; ``train`` asks for augmentation and nothing else; ``fit_rows`` are the fold's
    training rows, the only rows any statistic the inputs depend on may be fitted from (scar's
    clinical scaler), for the training, validation and calibration sets alike. ``records(outputs, targets,
    indices)`` turns a validation batch into small per-item dicts (probabilities, predicted
    class, a Dice...); they are gathered across ranks, written to ``oof_predictions.csv``
    and fed to ``metrics(records) -> dict``, whose ``score_key`` entry (higher is better)
    picks the best epoch. ``card`` holds the fixed card fields (task, name, architecture,
    input, labels, data, and extra ``training`` notes).
    """

    name: str
    items: list[str]
    strata: list[int]
    dataset: Callable[[list[int], bool, list[int]], Dataset]
    build_model: Callable[[], torch.nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    records: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Records]
    metrics: Callable[[Records], dict[str, Any]]
    card: dict[str, Any]
    score_key: str = "roc_auc"
    groups: list[str] | None = None
    make_optimizer: Callable[[Any, float], torch.optim.Optimizer] = _adam
    make_scheduler: Callable[[torch.optim.Optimizer], Any] = _plateau
    report: Callable[[Records, dict[str, Any], Path], None] | None = None
    prepare: Callable[[DistributedContext], None] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # When set, builds fold k's network instead of ``build_model`` (e.g. from that fold's earlier weights).
    fold_model: Callable[[int], torch.nn.Module] | None = None
    # Keep the last validated epoch rather than the best one by ``score_key``: nothing about the
    # checkpoint is then chosen on the validation fold, so its out-of-fold figures stay unbiased.
    keep_last: bool = False
    # Card fields computed from the pooled out-of-fold records and metrics (e.g. an operating threshold).
    card_from_results: Callable[[Records, dict[str, Any]], dict[str, Any]] | None = None

    def fold_dataset(self, indices: list[int], train: bool, fit_rows: list[int]) -> Dataset:
        """The dataset over ``indices`` of a fold whose training rows are ``fit_rows``."""
        return self.dataset(indices, train, fit_rows)


def add_training_arguments(parser: argparse.ArgumentParser, *, epochs: int = 100, batch_size: int = 4,
                           lr: float = 1e-3, folds: int = 5) -> argparse.ArgumentParser:
    """The flags every ``python -m train.<task>`` shares (defaults per task)."""
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: fold*.safetensors, card.json, splits.json, logs/, plots, "
                             "oof_predictions.csv (e.g. weights/<task>)")
    parser.add_argument("--folds", type=int, default=folds, help=f"number of cross-validation folds (default {folds})")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"epochs per fold (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"training batch size per process; under torchrun the global batch is this x N "
                             f"(default {batch_size})")
    parser.add_argument("--lr", type=float, default=lr, help=f"initial learning rate (default {lr:g})")
    parser.add_argument("--groups", type=Path, default=None,
                        help="CSV with columns image,patient (image = path relative to DATA or bare file name): "
                             "folds are grouped so one patient is never in two folds")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (torch.autocast + GradScaler) on CUDA; ignored with a warning on CPU")
    parser.add_argument("--resume", action="store_true",
                        help="reuse OUT/splits.json and skip folds whose best checkpoint and done marker exist")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split, initialisation and "
                                                            "augmentation (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank (default 0)")
    parser.add_argument("--half", action="store_true",
                        help="store fold weights as float16 safetensors (half the size; widened on load)")
    parser.add_argument("--val-every", type=int, default=1, metavar="N",
                        help="validate on epochs divisible by N and always on the last one; the best checkpoint is "
                             "chosen among validated epochs, and a ReduceLROnPlateau schedule steps (and counts its "
                             "patience) only on them (default 1: every epoch)")
    parser.add_argument("--precise-bn", type=int, default=0, metavar="N",
                        help="before each validation, recompute BatchNorm statistics from N unaugmented training "
                             "batches; needed for short trainings (demo weights), whose running statistics have "
                             "not converged (0 = off, as the seed)")
    parser.add_argument("--demo", action="store_true",
                        help="mark the card as demo weights (trained on synthetic phantoms, never clinical)")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _selection_key(score: float | None, val_loss: float) -> tuple[float, float]:
    """Higher is better: the score first (NaN counts as worst), the lower validation loss breaks ties."""
    score = -math.inf if score is None or not math.isfinite(score) else float(score)
    loss = -math.inf if not math.isfinite(val_loss) else -float(val_loss)
    return score, loss


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A batch's tensors moved to ``device``, through dicts, lists and tuples (a task's inputs may be
    several tensors, e.g. the brixia scorer's image, regions and opacity map)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, non_blocking) for value in batch)
    return batch


def forward(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)``, or ``model(**inputs)`` when a dataset yields its inputs as a dict."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _train_epoch(task: TrainTask, model, loader, optimizer, scaler, context: DistributedContext,
                 amp: bool, desc: str) -> float:
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not context.is_main, leave=False, file=sys.stderr)
    for inputs, targets, _ in bar:
        inputs, targets = to_device(inputs, context.device, True), to_device(targets, context.device, True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=context.device.type, enabled=amp):
            loss = task.loss(forward(model, inputs), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * len(targets)
        count += len(targets)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    total, count = context.sum(total, count)
    return total / max(count, 1)


@torch.no_grad()
def _validate(task: TrainTask, model, dataset: Dataset, batch_size: int, workers: int,
              context: DistributedContext, amp: bool) -> tuple[float, Records]:
    # The bare module, not the DDP wrapper: ranks hold different numbers of batches, and a DDP
    # forward would wait for the others to broadcast buffers.
    network = _unwrap(model)
    network.eval()
    shard = Subset(dataset, list(range(context.rank, len(dataset), context.world_size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
    total, count, records = 0.0, 0, []
    for inputs, targets, indices in loader:
        inputs, targets = to_device(inputs, context.device), to_device(targets, context.device)
        with torch.autocast(device_type=context.device.type, enabled=amp):
            outputs = forward(network, inputs)
        outputs = outputs.float()
        total += float(task.loss(outputs, targets)) * len(targets)
        count += len(targets)
        records += task.records(outputs.cpu(), targets.cpu(), indices.cpu())
    total, count = context.sum(total, count)
    gathered = [record for part in context.gather(records) for record in part]
    return total / max(count, 1), sorted(gathered, key=lambda record: record["index"])


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, dataset: Dataset, batch_size: int, workers: int,
                           context: DistributedContext, max_batches: int, seed: int = 0) -> None:
    """Recompute BatchNorm running statistics from training batches ("precise BN").

    EfficientNet's BN momentum (0.01 in PyTorch terms) needs hundreds of steps before its running
    statistics match the weights; until then eval-mode outputs collapse to a constant and
    validation AUC is meaningless. A short training (demo weights) recomputes them as a plain
    average over ``max_batches`` unaugmented training batches before each validation. Under DDP
    every rank uses its shard and the statistics are averaged across ranks.
    """
    network = _unwrap(model)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches <= 0 or len(dataset) == 0:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    network.train()
    shard = Subset(dataset, list(range(context.rank, len(dataset), context.world_size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    for batch, (inputs, _, _) in enumerate(loader):
        if batch >= max_batches:
            break
        forward(network, to_device(inputs, context.device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        if context.distributed:
            for buffer in (norm.running_mean, norm.running_var):
                torch.distributed.all_reduce(buffer)
                buffer /= context.world_size


def validation_interval(args: argparse.Namespace) -> int:
    """``--val-every`` (1 when a caller's namespace lacks it); below 1 is an error."""
    val_every = getattr(args, "val_every", None)
    val_every = 1 if val_every is None else int(val_every)
    if val_every < 1:
        raise SystemExit(f"--val-every must be 1 or more, not {val_every}")
    return val_every


def _train_fold(task: TrainTask, args, context: DistributedContext, fold: int,
                train_idx: list[int], val_idx: list[int], out: Path, amp: bool) -> dict[str, Any]:
    seed_everything(args.seed + 1000 * fold)
    model = (task.build_model() if task.fold_model is None else task.fold_model(fold)).to(context.device)
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = task.make_optimizer(model.parameters(), args.lr)
    scheduler = task.make_scheduler(optimizer)
    scaler = torch.amp.GradScaler(context.device.type, enabled=amp)
    train_set = task.fold_dataset(train_idx, True, train_idx)
    val_set = task.fold_dataset(val_idx, False, train_idx)
    calibration_set = task.fold_dataset(train_idx, False, train_idx) if getattr(args, "precise_bn", 0) else None
    sampler = None
    if context.distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(
            train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=args.seed + fold)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, drop_last=False, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed + fold))
    checkpoint = out / f"fold{fold}.safetensors"
    rows: list[dict[str, Any]] = []
    best_key, best = (-math.inf, -math.inf), None
    val_every = validation_interval(args)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for epoch in range(1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_epoch(task, model, loader, optimizer, scaler, context, amp,
                                  desc=f"fold {fold} epoch {epoch}/{args.epochs}")
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": math.nan}
        validated = epoch % val_every == 0 or epoch == args.epochs
        if validated:
            if calibration_set is not None:
                recalibrate_batch_norm(model, calibration_set, args.batch_size, args.workers, context,
                                       args.precise_bn, seed=args.seed + epoch)
            val_loss, records = _validate(task, model, val_set, args.batch_size, args.workers, context, amp)
            metrics = task.metrics(records)
            key = _selection_key(metrics.get(task.score_key), val_loss)
            if best is None or key > best_key or task.keep_last:
                best_key = key
                best = {"best_epoch": epoch, "metrics": metrics, "records": records, "val_loss": val_loss}
                if context.is_main:
                    save_state_dict(_unwrap(model).state_dict(), checkpoint, half=args.half)
            if plateau:
                scheduler.step(val_loss)  # its patience counts validations, not epochs
            row.update(val_loss=val_loss, **scalar_items(metrics))
        if scheduler is not None and not plateau:
            scheduler.step()
        rows.append(row)
        if context.is_main:
            write_rows(out / "logs" / f"fold{fold}.csv", rows)
            plot_fold_curves(rows, task.score_key, out / "logs" / f"fold{fold}.png", f"fold {fold}")
            if validated:
                score = metrics.get(task.score_key)
                tqdm.write(f"fold {fold} epoch {epoch}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
                           f"{task.score_key} {score if score is None else round(score, 4)} "
                           f"(best epoch {best['best_epoch']})", file=sys.stderr)
            else:
                tqdm.write(f"fold {fold} epoch {epoch}: train_loss {train_loss:.4f} "
                           f"(validation every {val_every} epochs)", file=sys.stderr)
    return {"fold": fold, "file": checkpoint.name, "n_train": len(train_idx), "n_val": len(val_idx), **best}


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return {key: plain(value) for key, value in vars(args).items()}


def run_kfold(task: TrainTask, args: argparse.Namespace, context: DistributedContext, module: str) -> dict | None:
    """Train every fold of ``task`` into ``args.out`` and write its card; returns the card on rank 0."""
    started = time.time()
    out = Path(args.out)
    amp = bool(args.amp)
    if amp and context.device.type != "cuda":
        warnings.warn("--amp needs CUDA; training in float32 on CPU", stacklevel=2)
        amp = False
    if context.is_main:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    groups = task.groups
    if groups is None and getattr(args, "groups", None):
        groups = read_groups(args.groups, task.items)
    splits = load_or_write_splits(out, task.items, task.strata, args.folds, args.seed, groups,
                                  reuse=args.resume, write=context.is_main)
    finished = {fold for fold in range(len(splits))
                if args.resume and (out / "logs" / f"fold{fold}.done.json").is_file()
                and (out / f"fold{fold}.safetensors").is_file()}
    if task.prepare is not None and len(finished) < len(splits):
        task.prepare(context)
    context.barrier()
    summaries = []
    for fold, (train_idx, val_idx) in enumerate(splits):
        done = out / "logs" / f"fold{fold}.done.json"
        if fold in finished:
            summaries.append(json.loads(done.read_text(encoding="utf-8")))
            if context.is_main:
                tqdm.write(f"fold {fold}: done in an earlier run, skipped (--resume)", file=sys.stderr)
            continue
        if context.is_main:
            done.unlink(missing_ok=True)  # a marker from an older run must not vouch for this fold
        summary = _train_fold(task, args, context, fold, train_idx, val_idx, out, amp)
        if context.is_main:
            done.write_text(json.dumps(json_safe(summary)) + "\n", encoding="utf-8")
        summaries.append(summary)
        context.barrier()
    if not context.is_main:
        return None
    return _finish(task, args, context, out, summaries, time.time() - started, module)


def _finish(task: TrainTask, args, context: DistributedContext, out: Path, summaries: list[dict],
            elapsed: float, module: str) -> dict:
    """Pool the out-of-fold records, draw the task's plots and write the card (rank 0)."""
    oof = []
    for summary in summaries:
        for record in summary["records"]:
            oof.append({"item": task.items[record["index"]], "fold": summary["fold"], **record})
    oof.sort(key=lambda record: record["index"])
    write_rows(out / "oof_predictions.csv", oof)
    pooled = task.metrics(oof)
    if task.report is not None:
        task.report(oof, pooled, out)
    folds = [{"file": s["file"], "sha256": sha256_file(out / s["file"]), "fold": s["fold"],
              "n_train": s["n_train"], "n_val": s["n_val"], "best_epoch": s["best_epoch"],
              "metrics": s["metrics"]} for s in summaries]
    card = dict(task.card)
    if task.card_from_results is not None:
        card.update(task.card_from_results(oof, pooled))
    card.setdefault("task", task.name)
    training = {**_hyperparameters(args), **task.hyperparameters, **card.pop("training", {}),
                "seed": args.seed, "world_size": context.world_size, "device": context.device.type,
                "amp": bool(args.amp and context.device.type == "cuda"), "torch": torch.__version__,
                "elapsed_s": round(elapsed, 1), "command": command_line(module)}
    card.update({
        "version": version_string(),
        "demo": bool(args.demo),
        "folds": folds,
        "metrics": {"pooled": pooled, "folds": [s["metrics"] for s in summaries]},
        "training": training,
    })
    card = json_safe(card)
    write_card(out, card)
    tqdm.write(f"wrote {out / 'card.json'}: pooled {task.score_key} "
               f"{pooled.get(task.score_key)} in {elapsed:.0f} s", file=sys.stderr)
    return card


def run_trainer(build_task: Callable[[], TrainTask], args: argparse.Namespace, module: str) -> int:
    """A trainer's whole ``main``: join torchrun's process group if launched by it, run every
    fold and write the card, then leave the group (cleanly, or without the barrier after a
    failure, since the other ranks may never reach it)."""
    context = setup_distributed()
    try:
        run_kfold(build_task(), args, context, module=module)
    except BaseException:
        shutdown_distributed(context, clean=False)
        raise
    shutdown_distributed(context)
    return 0
