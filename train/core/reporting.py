"""What a training run leaves beside its weights: per-fold CSV logs, curve plots, OOF predictions, card stamps.

Only rank 0 calls these. Layout under OUT (nnU-Net style): ``logs/fold{k}.csv`` (one row per
epoch), ``logs/fold{k}.png`` (loss and score curves), ``oof_predictions.csv`` (one row per item,
predicted by the fold that did not train on it).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a ``python -m train...`` command: its name, what it does, and defaults in ``--help``."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def version_string() -> str:
    """A date-based model version, e.g. ``2025.11.25-2113`` (UTC)."""
    return time.strftime("%Y.%m.%d-%H%M", time.gmtime())


def command_line(module: str) -> str:
    """The command that started this run, as a user would type it (``python -m train.osteo ...``)."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def scalar_items(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, non-nested entries of a metrics dict (what fits in a CSV column)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows as CSV, columns in first-seen order (a later row may add columns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    tmp.replace(path)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _number(value: Any) -> float:
    """A plottable float: missing, empty, None or non-numeric values are NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_fold_curves(rows: Sequence[dict[str, Any]], score_key: str, path: str | Path, title: str) -> Path:
    """Save train/val loss and the selection score per epoch (nnU-Net's ``progress.png``).

    Epochs without validation (``--val-every``) have no validation loss or score: those curves
    join the validated epochs only.
    """
    from train.core.metrics import _pyplot

    plt = _pyplot()
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, label, style in ((ax_loss, "train_loss", "train", {}), (ax_loss, "val_loss", "val", {}),
                                    (ax_score, score_key, None, {"color": "tab:green"})):
        points = [(_number(row.get("epoch")), _number(row.get(key))) for row in rows]
        points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        axis.plot([x for x, _ in points], [y for _, y in points], "o-", label=label, **style)
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax_loss.legend()
    ax_score.set(xlabel="epoch", ylabel=score_key, title=f"{title}: {score_key}", ylim=(-0.02, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def data_source(folder: Path, otherwise: str) -> str:
    """How the training data came to be: the phantom generator's note (``synthetic.json``) when
    the data folder holds one, else ``otherwise`` (a description of the real layout)."""
    note = Path(folder) / "synthetic.json"
    if not note.is_file():
        return otherwise
    try:
        return json.loads(note.read_text(encoding="utf-8")).get("description", "synthetic phantoms")
    except (OSError, json.JSONDecodeError):
        return "synthetic phantoms"
