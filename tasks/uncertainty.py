"""How sure the fold ensemble is: the ``uncertainty`` record of every ok reply, from the folds' own outputs.

Shared by every task: the spread of fold probabilities and the predictive entropy of their mean
(classifiers), the fold disagreement of masks (segmenters), the spread of any per-fold score.
With a single fold model there is no disagreement to measure; the fields that need several
folds are then ``null`` and ``single_fold`` says why, rather than a reassuring zero.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from tasks.frames import dice_per_class

SINGLE_FOLD = "one fold model answered: fold disagreement cannot be measured (serve all folds, not --fold)"


def single_fold_note(folds: int) -> dict[str, Any]:
    """``{"folds": n}`` plus, with fewer than two folds, ``single_fold`` saying the spread is not measured."""
    return {"folds": int(folds)} if folds > 1 else {"folds": int(folds), "single_fold": SINGLE_FOLD}


def entropy(probabilities: np.ndarray) -> float:
    """Shannon entropy (nats) of one probability vector."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0, 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def spread(values: np.ndarray) -> np.ndarray | None:
    """Standard deviation over the first axis (the folds), or None with fewer than two folds."""
    values = np.asarray(values, dtype=np.float64)
    return values.std(axis=0) if len(values) > 1 else None


def _rounded(value: Any, digits: int = 6) -> Any:
    if value is None:
        return None
    array = np.round(np.asarray(value, dtype=np.float64), digits)
    return array.tolist() if array.ndim else float(array)


def classification_uncertainty(fold_probabilities: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """From ``(folds, classes)`` probabilities: each fold's probabilities, their spread (std per class and
    its maximum), the predictive entropy of the mean (nats; ``normalised`` divides by ln(classes)), and
    the mutual information between prediction and fold (entropy of the mean minus mean entropy: the
    part of the uncertainty that is fold disagreement)."""
    folds = np.asarray(fold_probabilities, dtype=np.float64)
    mean = folds.mean(axis=0)
    total = entropy(mean)
    std = spread(folds)
    record = single_fold_note(len(folds))
    record.update({
        "fold_probabilities": [dict(zip(labels, _rounded(row))) for row in folds],
        "probability_std": dict(zip(labels, _rounded(std))) if std is not None else None,
        "max_probability_std": _rounded(std.max()) if std is not None else None,
        "predictive_entropy": _rounded(total),
        "predictive_entropy_normalised": _rounded(total / np.log(len(mean))) if len(mean) > 1 else None,
        "mutual_information": _rounded(max(0.0, total - float(np.mean([entropy(row) for row in folds]))))
                              if len(folds) > 1 else None,
    })
    return record


def pairwise_dice_disagreement(fold_masks: np.ndarray) -> np.ndarray | None:
    """From ``(folds, classes, H, W)`` bool masks: per class, 1 - the mean Dice over every pair of folds
    (0: the folds draw the same mask; two empty masks agree). None with fewer than two folds."""
    fold_masks = np.asarray(fold_masks, dtype=bool)
    if len(fold_masks) < 2:
        return None
    dice = [dice_per_class(a, b) for a, b in itertools.combinations(fold_masks, 2)]
    return 1.0 - np.mean(dice, axis=0)


def segmentation_uncertainty(fold_masks: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """The ``uncertainty`` record of a segmenter: each class's fold disagreement and their mean."""
    disagreement = pairwise_dice_disagreement(fold_masks)
    record = single_fold_note(len(fold_masks))
    record.update({
        "class_disagreement": dict(zip(labels, _rounded(disagreement))) if disagreement is not None else None,
        "mean_disagreement": _rounded(disagreement.mean()) if disagreement is not None else None,
    })
    return record


def score_spread(fold_scores: np.ndarray, labels: Sequence[str]) -> dict[str, Any] | None:
    """Std over folds of per-fold scores ``(folds, len(labels))`` keyed by label, or None with one fold
    (e.g. each region's expected score across folds)."""
    std = spread(fold_scores)
    return dict(zip(labels, _rounded(std))) if std is not None else None
