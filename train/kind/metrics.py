"""How well the image-kind gate lets right images through and refuses wrong ones, and where its thresholds sit.

The gate refuses an image sent to a task of kind ``k`` when the model's probability that it is
not ``k`` reaches that kind's threshold ``refuse_at[k]``: ``1 - p[k] >= refuse_at[k]``. For a set
of records with true kinds this gives, per task kind, the share of its own images let through
(``pass``) and, per true kind, the share of the requests sending it to another task that are
refused (``refuse``; ``refuse_by_task`` splits it by task).

Each task kind's threshold is chosen by one rule (``choose_thresholds``: the grid value with the
largest worst margin to the targets for that task, its own images let through >= 99 % and the
images of every other kind refused >= 97 %), so each task trades its own passes against its own
refusals. The reported figures never see the images they describe: the records of fold ``f``
are judged with the thresholds the rule picks on the other folds' out-of-fold records
(``cross_fold_gate``); the card's served thresholds are the rule applied to all of them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tasks import kind
from train.core.metrics import classification_metrics

PASS_TARGET, REFUSE_TARGET = 0.99, 0.97
THRESHOLD_GRID = tuple(round(float(v), 3) for v in
                       np.concatenate([np.arange(0.5, 0.95, 0.05), [0.95, 0.97, 0.98, 0.99, 0.995, 0.999]]))
TASK_KIND_NAMES = [k for k in kind.KINDS if k in kind.TASK_KINDS.values()]
Thresholds = Mapping[str, float]


def _probabilities(records: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([[record[f"p_{name}"] for name in kind.KINDS] for record in records], dtype=np.float64
                    ).reshape(len(records), len(kind.KINDS))


def _decisions(records: Sequence[dict[str, Any]], refuse_at: Sequence[Thresholds]) -> list[dict[str, bool]]:
    """Per record, whether a request to each task kind would be refused at that record's thresholds."""
    probabilities = _probabilities(records)
    return [{name: bool(1 - p[kind.KINDS.index(name)] >= limits[name]) for name in TASK_KIND_NAMES}
            for p, limits in zip(probabilities, refuse_at)]


def _mean(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _rates(truth: list[str], decisions: list[dict[str, bool]]) -> dict[str, Any]:
    pairs = list(zip(truth, decisions))
    return {
        "n": len(pairs),
        "pass_pooled": _mean([not d[t] for t, d in pairs if t in TASK_KIND_NAMES]),
        "pass": {name: _mean([not d[name] for t, d in pairs if t == name]) for name in TASK_KIND_NAMES},
        "refuse": {name: _mean([d[task] for t, d in pairs if t == name for task in TASK_KIND_NAMES if task != name])
                   for name in kind.KINDS},
        "refuse_by_task": {task: {name: _mean([d[task] for t, d in pairs if t == name])
                                  for name in kind.KINDS if name != task} for task in TASK_KIND_NAMES},
    }


def _uniform(refuse_at: float | Thresholds) -> dict[str, float]:
    return dict(refuse_at) if isinstance(refuse_at, Mapping) else {name: float(refuse_at) for name in TASK_KIND_NAMES}


def gate_rates(records: Sequence[dict[str, Any]], refuse_at: float | Thresholds) -> dict[str, Any]:
    """Pass and refusal rates of the gate at ``refuse_at`` (one value, or one per task kind) over records
    with ``target`` and ``p_<kind>``."""
    limits = _uniform(refuse_at)
    truth = [kind.KINDS[record["target"]] for record in records]
    return {"refuse_at": limits, **_rates(truth, _decisions(records, [limits] * len(records)))}


def _margin(rates: dict[str, Any], task: str) -> float:
    margins = [rates["pass"][task] - PASS_TARGET] + [r - REFUSE_TARGET for r in rates["refuse_by_task"][task].values()]
    margins = [m for m in margins if np.isfinite(m)]
    return min(margins) if margins else -np.inf


def choose_thresholds(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per task kind, the grid value of ``refuse_at`` with the largest worst margin to that task's targets
    (ties: the more lenient)."""
    chosen = {}
    table = {value: gate_rates(records, value) for value in THRESHOLD_GRID}
    for task in TASK_KIND_NAMES:
        best, best_margin = THRESHOLD_GRID[-1], -np.inf
        for value in THRESHOLD_GRID:
            margin = _margin(table[value], task)
            if margin >= best_margin:
                best, best_margin = value, margin
        chosen[task] = best
    return chosen


def cross_fold_gate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Gate rates over all ``records`` (each with a ``fold``), each fold judged at the thresholds chosen
    on the other folds' records only."""
    chosen = {}
    for fold in sorted({record["fold"] for record in records}):
        others = [record for record in records if record["fold"] != fold]
        chosen[fold] = choose_thresholds(others) if others else _uniform(THRESHOLD_GRID[-1])
    truth = [kind.KINDS[record["target"]] for record in records]
    decisions = _decisions(records, [chosen[record["fold"]] for record in records])
    return {"thresholds_per_fold": {str(f): v for f, v in chosen.items()}, **_rates(truth, decisions)}


def kind_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Classification metrics (with per-kind precision and recall) on the real images, the phantoms'
    share recognised, and, once records carry their ``fold`` (pooled out of fold), the gate figures."""
    real = [record for record in records if record.get("real", True)]
    synthetic = [record for record in records if not record.get("real", True)]
    metrics = classification_metrics([r["target"] for r in real], _probabilities(real), kind.KINDS)
    matrix = np.asarray(metrics["confusion_matrix"])
    metrics["recall"] = metrics.pop("sensitivity")
    metrics["precision"] = {name: (float(matrix[c, c] / matrix[:, c].sum()) if matrix[:, c].sum() else float("nan"))
                            for c, name in enumerate(kind.KINDS)}
    metrics["min_recall"] = float(np.nanmin(list(metrics["recall"].values()))) if real else float("nan")
    if synthetic:
        metrics["synthetic"] = {"n": len(synthetic), "accuracy": _mean([r["predicted"] == r["target"] for r in synthetic])}
    if real and all("fold" in record for record in real):
        metrics["gate"] = cross_fold_gate(real)
        listed = [record for record in real if not record.get("extra", False)]
        if 0 < len(listed) < len(real):  # the manifest's images alone, comparable with a run without --extra
            metrics["gate_manifest_only"] = cross_fold_gate(listed)
    return metrics
