"""``python -m train.handbone DATA --out OUT --tune N``: the seed's optuna search over model size, lr and epochs.

    pip install -e ".[tune]"      # optuna is an extra; the base install does not need it
    python -m train.handbone DATA --out weights/handbone --tune 20 [--tune-sizes 256 512 1024] \\
        [--tune-lr 1e-3 1e-2] [--tune-epochs 10 40] [every other training flag ...]

Each of the N trials is a full k-fold run of the framework (same folds, same ``--seed``) into
``OUT/tune/trial{k}/`` with its own card; its objective is that card's pooled out-of-fold
Dice (higher is better). The sampler is optuna's TPE seeded by ``--seed`` (random for its
first 10 trials, as optuna's default). Written as the trials finish:
``OUT/tune/trials.csv`` (trial, state, dice, size, lr, epochs, seconds, folder) and, at the
end, ``OUT/tune/best.json`` (best params, Dice, and the command that trains with them into
OUT). The best is also printed on stderr. Trials run one after another in one process, so
``--tune`` is refused under torchrun: tune with ``python -m``, then train the best command
with torchrun. A trial that runs out of GPU memory is recorded as failed and the search goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from tasks import handbone
from tasks.cards import read_card
from train.core.reporting import write_rows

INSTALL_HINT = 'pip install -e ".[tune]"'
# Flags a trial's command line sets itself (each with how many values it takes; "+" = one or more).
_TUNE_FLAGS = {"--tune": 1, "--tune-sizes": "+", "--tune-lr": 2, "--tune-epochs": 2}
_TRIAL_FLAGS = {"--out": 1, "--size": 1, "--lr": 1, "--epochs": 1}


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--tune*`` flags of ``python -m train.handbone`` (no optuna needed to parse them)."""
    group = parser.add_argument_group("hyper-parameter search (optuna; pip install -e \".[tune]\")")
    group.add_argument("--tune", type=int, default=0, metavar="N",
                       help="run N optuna TPE trials (seeded by --seed), each a full k-fold run into "
                            "OUT/tune/trial{k}/, scored by its pooled out-of-fold Dice; writes OUT/tune/trials.csv "
                            "and OUT/tune/best.json (params + the command to train with them); 0 = plain training")
    group.add_argument("--tune-sizes", type=int, nargs="+", default=[256, 512, 1024], metavar="SIZE",
                       help="model sizes the search chooses from")
    group.add_argument("--tune-lr", type=float, nargs=2, default=[1e-3, 1e-2], metavar=("LOW", "HIGH"),
                       help="learning-rate range, sampled log-uniformly")
    group.add_argument("--tune-epochs", type=int, nargs=2, default=[10, 40], metavar=("LOW", "HIGH"),
                       help="epochs range (integers, both ends included)")
    return parser


def _import_optuna():
    try:
        import optuna
    except ImportError as exc:
        raise SystemExit(f"--tune needs optuna, which is an optional extra: {INSTALL_HINT}") from exc
    return optuna


def strip_options(argv: Sequence[str], options: dict[str, Any]) -> list[str]:
    """``argv`` without the given options and their values (``--opt V``, ``--opt=V``, ``--opt V1 V2 ...``)."""
    kept: list[str] = []
    tokens = list(argv)
    k = 0
    while k < len(tokens):
        token = tokens[k]
        name = token.split("=", 1)[0]
        if name not in options:
            kept.append(token)
            k += 1
            continue
        k += 1
        if "=" in token:
            continue
        count = options[name]
        if count == "+":
            while k < len(tokens) and not _is_flag(tokens[k]):
                k += 1
        else:
            k += int(count)
    return kept


def _is_flag(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)
        return False  # a negative number is a value
    except ValueError:
        return True


def _check(args: argparse.Namespace) -> None:
    """Refuse a search that cannot run, before any trial trains."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--tune runs its trials one after another in one process and is not supported under "
                         "torchrun: run it with python -m train.handbone, then train the command in "
                         "OUT/tune/best.json with torchrun")
    if args.resume:
        raise SystemExit("--tune does not resume a search; drop --resume (each trial trains from scratch)")
    if args.tune < 1:
        raise SystemExit(f"--tune needs 1 or more trials, not {args.tune}")
    low, high = args.tune_lr
    if not 0 < low <= high:
        raise SystemExit(f"--tune-lr needs 0 < LOW <= HIGH, got {low:g} {high:g}")
    low, high = args.tune_epochs
    if not 1 <= low <= high:
        raise SystemExit(f"--tune-epochs needs 1 <= LOW <= HIGH, got {low} {high}")
    options = {"encoder_depth": args.encoder_depth, "decoder_channels": args.decoder_channels}
    architecture = handbone.default_architecture(args.arch, args.encoder, **options)
    for size in args.tune_sizes:
        try:
            handbone.check_model_size(size, architecture)
        except ValueError as exc:
            raise SystemExit(f"--tune-sizes: {exc}") from exc


@contextlib.contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
    """Run with ``sys.argv`` as the trial's own command, so its card records how to repeat it."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "train.handbone", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _command(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "train.handbone", *argv])


def _params_argv(base: Sequence[str], out: Path, params: dict[str, Any]) -> list[str]:
    return [*base, "--out", str(out), "--size", str(params["size"]), "--lr", f"{params['lr']:.6g}",
            "--epochs", str(params["epochs"])]


def run_tune(args: argparse.Namespace, argv: Sequence[str],
             parse_args: Callable[[Sequence[str]], argparse.Namespace], train: Callable[[argparse.Namespace], Any]) -> int:
    """Run the search ``args`` asks for (``argv``: the command line it was parsed from). The trainer passes
    its own ``parse_args`` and ``train`` (one trial's k-fold run), so this module never imports it."""
    _check(args)
    optuna = _import_optuna()
    out = Path(args.out)
    folder = out / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    base = strip_options(argv, {**_TUNE_FLAGS, **_TRIAL_FLAGS})
    rows: list[dict[str, Any]] = []

    def objective(trial) -> float:
        params = {"size": trial.suggest_categorical("size", list(args.tune_sizes)),
                  "lr": float(f"{trial.suggest_float('lr', *args.tune_lr, log=True):.6g}"),
                  "epochs": trial.suggest_int("epochs", *args.tune_epochs)}
        trial_out = folder / f"trial{trial.number}"
        trial_argv = _params_argv(base, trial_out, params)
        trial.set_user_attr("params", params)
        trial.set_user_attr("folder", str(trial_out))
        print(f"tune: trial {trial.number + 1}/{args.tune}: size {params['size']}, lr {params['lr']:g}, "
              f"epochs {params['epochs']} -> {trial_out}", file=sys.stderr)
        started = time.time()
        try:
            trial_args = parse_args(trial_argv)
            if trial_args.tune:  # an option spelling strip_options missed: never recurse
                raise SystemExit(f"tune: could not remove --tune from the trial's command {trial_argv}")
            with _argv(trial_argv):
                train(trial_args)
        finally:
            trial.set_user_attr("seconds", round(time.time() - started, 1))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        dice = read_card(trial_out)["metrics"]["pooled"].get("dice")
        return float("nan") if dice is None else float(dice)

    def record(study, trial) -> None:
        params = trial.user_attrs.get("params", trial.params)
        dice = trial.value if trial.value is not None and math.isfinite(trial.value) else None
        rows.append({"trial": trial.number, "state": trial.state.name, "dice": dice, **params,
                     "seconds": trial.user_attrs.get("seconds"), "folder": trial.user_attrs.get("folder")})
        write_rows(folder / "trials.csv", rows)
        print(f"tune: trial {trial.number}: {trial.state.name}, dice {dice}", file=sys.stderr)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed),
                                study_name=f"handbone-{out.name}")
    study.optimize(objective, n_trials=args.tune, callbacks=[record], catch=(torch.OutOfMemoryError,))
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SystemExit(f"tune: no trial finished with a Dice; see {folder / 'trials.csv'}")
    best = max(complete, key=lambda trial: trial.value)
    params = best.user_attrs["params"]
    command = _command(_params_argv(base, out, params))
    summary = {
        "trial": best.number, "dice": best.value, "params": params, "folder": best.user_attrs["folder"],
        "command": command, "n_trials": len(study.trials), "n_complete": len(complete),
        "objective": "pooled out-of-fold Dice of the trial's card (higher is better)",
        "sampler": f"optuna TPESampler(seed={args.seed}), optuna {optuna.__version__}",
        "search_space": {"size": list(args.tune_sizes), "lr": {"low": args.tune_lr[0], "high": args.tune_lr[1],
                                                               "log": True},
                         "epochs": {"low": args.tune_epochs[0], "high": args.tune_epochs[1]}},
    }
    (folder / "best.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"tune: best trial {best.number}: dice {best.value:.4g} with size {params['size']}, lr {params['lr']:g}, "
          f"epochs {params['epochs']} ({folder / 'best.json'}); train with:\n  {command}", file=sys.stderr)
    return 0
