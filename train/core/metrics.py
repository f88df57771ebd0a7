"""Classification metrics and their plots: accuracy, ROC-AUC from probabilities, sensitivity/specificity, confusion.

Used per fold and pooled out-of-fold by every classifying trainer. The osteo seed computed AUC
from hard labels; here it always comes from probabilities. Undefined values (AUC of a set with a
single class, sensitivity without positives) are NaN, never an exception; ``json_safe`` turns them
into ``null`` for cards.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def roc_auc(targets: Sequence[int], scores: Sequence[float]) -> float:
    """Binary ROC-AUC of ``scores`` (probability of class 1); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    targets = np.asarray(targets)
    if len(np.unique(targets)) < 2:
        return float("nan")
    return float(roc_auc_score(targets, np.asarray(scores, dtype=np.float64)))


def macro_roc_auc(targets: Sequence[int], probabilities: np.ndarray) -> float:
    """One-vs-rest ROC-AUC averaged over the classes present in ``targets`` (NaN if fewer than two)."""
    targets = np.asarray(targets)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    aucs = [roc_auc(targets == c, probabilities[:, c]) for c in range(probabilities.shape[1])
            if 0 < np.sum(targets == c) < len(targets)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def classification_metrics(targets: Sequence[int], probabilities: np.ndarray,
                           labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of predictions ``probabilities`` (N, C) against integer ``targets`` (N,).

    The predicted class is the argmax (ties go to the lower class, as ``prob > 0.5`` would for two).
    For two classes, class 1 is the positive one (osteo: C3): sensitivity = TP / (TP + FN),
    specificity = TN / (TN + FP), and ``roc_auc`` is the AUC of P(class 1). For more classes
    ``roc_auc`` is the macro one-vs-rest AUC and sensitivity/specificity are per class.
    """
    from sklearn.metrics import confusion_matrix

    targets = np.asarray(targets, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(targets), len(labels))
    predicted = probabilities.argmax(axis=1) if len(targets) else np.zeros(0, dtype=np.int64)
    matrix = confusion_matrix(targets, predicted, labels=list(range(len(labels))))
    per_class_sens = [_ratio(matrix[c, c], matrix[c].sum()) for c in range(len(labels))]
    per_class_spec = [_ratio(matrix.sum() - matrix[c].sum() - matrix[:, c].sum() + matrix[c, c],
                             matrix.sum() - matrix[c].sum()) for c in range(len(labels))]
    result: dict[str, Any] = {
        "n": int(len(targets)),
        "accuracy": _ratio(np.trace(matrix), matrix.sum()),
        "balanced_accuracy": float(np.nanmean(per_class_sens)) if not all(map(math.isnan, per_class_sens)) else float("nan"),
    }
    if len(labels) == 2:
        result["roc_auc"] = roc_auc(targets, probabilities[:, 1])
        result["sensitivity"] = per_class_sens[1]
        result["specificity"] = per_class_spec[1]
    else:
        result["roc_auc"] = macro_roc_auc(targets, probabilities)
        result["sensitivity"] = dict(zip(labels, per_class_sens))
        result["specificity"] = dict(zip(labels, per_class_spec))
    result["confusion_matrix"] = matrix.tolist()
    result["labels"] = list(labels)
    return result


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(targets: Sequence[int], scores: Sequence[float], path: str | Path, title: str = "ROC") -> Path | None:
    """Save the binary ROC curve of ``scores`` (probability of class 1); None when it is undefined."""
    from sklearn.metrics import roc_curve

    targets = np.asarray(targets)
    if len(np.unique(targets)) < 2:
        return None
    fpr, tpr, _ = roc_curve(targets, np.asarray(scores, dtype=np.float64))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc(targets, scores):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "Confusion matrix") -> Path:
    """Save a confusion matrix (rows: true class, columns: predicted) with counts written in."""
    matrix = np.asarray(matrix)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def classification_records(outputs, targets, indices, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per-item validation records of a classifier: softmax probability per label, predicted and true class."""
    import torch

    probabilities = torch.softmax(outputs.float(), dim=1).numpy()
    return [{"index": int(index), "target": int(target), "predicted": int(probs.argmax()),
             **{f"p_{label}": float(p) for label, p in zip(labels, probs)}}
            for index, target, probs in zip(indices.tolist(), targets.tolist(), probabilities)]


def records_metrics(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """``classification_metrics`` over records written by ``classification_records``."""
    targets = [record["target"] for record in records]
    probabilities = np.array([[record[f"p_{label}"] for label in labels] for record in records],
                             dtype=np.float64).reshape(len(records), len(labels))
    return classification_metrics(targets, probabilities, labels)


def classification_plots(records: Sequence[dict[str, Any]], metrics: dict[str, Any], out: str | Path,
                         labels: Sequence[str]) -> list[Path]:
    """Pooled out-of-fold ``roc.png`` (two classes) and ``confusion_matrix.png`` in ``out``."""
    out = Path(out)
    written = [plot_confusion(metrics["confusion_matrix"], labels, out / "confusion_matrix.png",
                              title="Out-of-fold confusion matrix")]
    if len(labels) == 2:
        roc = plot_roc([r["target"] for r in records], [r[f"p_{labels[1]}"] for r in records],
                       out / "roc.png", title=f"Out-of-fold ROC ({labels[1]} vs {labels[0]})")
        if roc is not None:
            written.append(roc)
    return written
