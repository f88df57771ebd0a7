"""Scar metrics and plots: the shared classification metrics plus top-2 accuracy, and one-vs-rest ROC curves.

The seed reported top-1 and top-2 accuracy only and computed AUC offline; here every fold and the
pooled out-of-fold predictions get accuracy, top-2 accuracy, macro one-vs-rest ROC-AUC, per-class
sensitivity/specificity and the confusion matrix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks import scar
from train.core.metrics import _pyplot, classification_plots, records_metrics, roc_auc


def _probabilities(records: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([[r[f"p_{label}"] for label in scar.LABELS] for r in records], dtype=np.float64
                    ).reshape(len(records), len(scar.LABELS))


def top_k_accuracy(targets: Sequence[int], probabilities: np.ndarray, k: int = 2) -> float:
    """Share of items whose true class is among the k most probable (NaN without items)."""
    if len(targets) == 0:
        return float("nan")
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean([t in row for t, row in zip(targets, top)]))


def scar_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of validation records (``classification_records`` with the scar labels)."""
    metrics = records_metrics(records, scar.LABELS)
    metrics["top2_accuracy"] = top_k_accuracy([r["target"] for r in records], _probabilities(records), 2)
    return metrics


def plot_ovr_roc(records: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """One ROC curve per severity class against the rest; None when fewer than two classes occur."""
    from sklearn.metrics import roc_curve

    targets = np.array([r["target"] for r in records])
    probabilities = _probabilities(records)
    if len(np.unique(targets)) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for c, label in enumerate(scar.LABELS):
        positive = targets == c
        if 0 < positive.sum() < len(targets):
            fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
            ax.plot(fpr, tpr, lw=1.8, label=f"severity {label}: AUC {roc_auc(positive, probabilities[:, c]):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def scar_plots(records: Sequence[dict[str, Any]], metrics: dict[str, Any], out: str | Path) -> list[Path]:
    """Pooled out-of-fold ``confusion_matrix.png`` and ``roc.png`` (one-vs-rest) in a run folder."""
    written = classification_plots(records, metrics, out, scar.LABELS)
    roc = plot_ovr_roc(records, Path(out) / "roc.png", "Out-of-fold ROC, one vs rest")
    return written + ([roc] if roc is not None else [])
