"""Brixia validation records, metrics and plots for the three stages.

- seg: Dice per structure (right lung, left lung, heart) in the model frame, mean = selection score.
- stn: IoU between the canonical box placed by the predicted theta and by the target theta
  (``box_iou``, 1 = the STN reproduces the mask-derived alignment), and the mean corner error.
- score: per region and pooled accuracy and MAE, global-score (0-18) MAE and Pearson/Spearman
  correlation; the consensus test set against ModeA-F and MeanA-F. The seed reported per-region
  accuracy only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tasks import brixia
from tasks.frames import dice_per_class
from train.metrics import _pyplot


# ---------------------------------------------------------------- segmentation

def seg_records(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
    """Dice of each structure per image (threshold 0.5, largest component as served)."""
    probabilities = torch.sigmoid(outputs.float()).numpy()
    truth = targets.numpy() > 0.5
    records = []
    for index, probs, true in zip(indices.tolist(), probabilities, truth):
        predicted = brixia.clean_masks(probs)
        dice = dice_per_class(predicted, true).tolist()
        records.append({"index": int(index), "dice": float(np.mean(dice)),
                        **{f"dice_{name}": d for name, d in zip(brixia.STRUCTURES, dice)}})
    return records


def seg_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"n": 0, "dice": float("nan")}
    per = {name: float(np.mean([r[f"dice_{name}"] for r in records])) for name in brixia.STRUCTURES}
    return {"n": len(records), "dice": float(np.mean(list(per.values()))), "dice_per_structure": per}


# ---------------------------------------------------------------- STN

def stn_records(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
    records = []
    for index, predicted, target in zip(indices.tolist(), outputs.float().numpy(), targets.float().numpy()):
        corner_error = np.linalg.norm(brixia.box_corners(predicted) - brixia.box_corners(target), axis=1).mean() / 2
        records.append({"index": int(index), "box_iou": brixia.box_iou(predicted, target),
                        "corner_error": float(corner_error)})
    return records


def stn_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"n": 0, "box_iou": float("nan")}
    return {"n": len(records), "box_iou": float(np.mean([r["box_iou"] for r in records])),
            "corner_error": float(np.mean([r["corner_error"] for r in records])),
            "corner_error_note": "mean distance of the box corners, as a fraction of the frame's side"}


def stn_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between thetas, corners of the canonical box weighted in (what alignment sees)."""
    box = torch.tensor(brixia.CANONICAL_BOX, dtype=torch.float32, device=predicted.device)
    corners = torch.stack([torch.stack([box[0], box[1]]), torch.stack([box[2], box[1]]),
                           torch.stack([box[2], box[3]]), torch.stack([box[0], box[3]])])
    corners = torch.cat([corners, torch.ones(4, 1, device=predicted.device)], dim=1)   # (4, 3)
    placed_p = corners @ predicted.float().transpose(1, 2)
    placed_t = corners @ target.float().transpose(1, 2)
    return torch.nn.functional.mse_loss(placed_p, placed_t) + torch.nn.functional.mse_loss(predicted.float(), target.float())


# ---------------------------------------------------------------- scores

def score_records(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
    """Per image: probabilities, predicted and true score of each region, and the global scores."""
    probabilities = torch.softmax(outputs.float(), dim=-1).numpy()
    records = []
    for index, probs, true in zip(indices.tolist(), probabilities, targets.numpy()):
        predicted = probs.argmax(axis=-1)
        record: dict[str, Any] = {"index": int(index)}
        for r, region in enumerate(brixia.REGIONS):
            record[f"true_{region}"] = int(true[r])
            record[f"pred_{region}"] = int(predicted[r])
            record.update({f"p_{region}{level}": float(probs[r, level]) for level in range(brixia.SCORE_LEVELS)})
        record["true_global"] = int(true.sum())
        record["pred_global"] = int(predicted.sum())
        record["expected_global"] = float((probs * np.arange(brixia.SCORE_LEVELS)).sum())
        records.append(record)
    return records


def _correlations(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(truth) < 3 or np.std(truth) == 0 or np.std(predicted) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(truth, predicted)[0]), float(spearmanr(truth, predicted)[0])


def region_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Metrics of (N, 6) true and predicted region scores."""
    from sklearn.metrics import confusion_matrix

    truth, predicted = np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if len(truth) == 0:
        return {"n": 0, "accuracy": float("nan"), "mae": float("nan")}
    per_region = {}
    for r, region in enumerate(brixia.REGIONS):
        per_region[region] = {
            "accuracy": float(np.mean(truth[:, r] == predicted[:, r])),
            "mae": float(np.mean(np.abs(truth[:, r] - predicted[:, r]))),
            "confusion_matrix": confusion_matrix(truth[:, r], predicted[:, r],
                                                 labels=list(range(brixia.SCORE_LEVELS))).tolist(),
        }
    true_global, pred_global = truth.sum(1), predicted.sum(1)
    pearson, spearman = _correlations(true_global, pred_global)
    return {
        "n": int(len(truth)),
        "accuracy": float(np.mean(truth == predicted)),
        "mae": float(np.mean(np.abs(truth - predicted))),
        "global_mae": float(np.mean(np.abs(true_global - pred_global))),
        "global_pearson": pearson,
        "global_spearman": spearman,
        "per_region": per_region,
    }


def score_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    truth = np.array([[r[f"true_{g}"] for g in brixia.REGIONS] for r in records]).reshape(-1, len(brixia.REGIONS))
    predicted = np.array([[r[f"pred_{g}"] for g in brixia.REGIONS] for r in records]).reshape(-1, len(brixia.REGIONS))
    return region_metrics(truth, predicted)


def consensus_metrics(predicted: np.ndarray, consensus: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Predicted (N, 6) scores against the consensus raters: ModeA-F (as labels) and MeanA-F."""
    mode = np.array([c["mode"] for c in consensus])
    mean = np.array([c["mean"] for c in consensus], dtype=np.float64)
    result = region_metrics(mode, predicted)
    result["mae_vs_mean"] = float(np.mean(np.abs(mean - predicted))) if len(mean) else float("nan")
    result["global_mae_vs_mean"] = float(np.mean(np.abs(mean.sum(1) - predicted.sum(1)))) if len(mean) else float("nan")
    return result


def plot_score_report(records: Sequence[dict[str, Any]], metrics: dict[str, Any], out: str | Path) -> list[Path]:
    """``region_confusion.png`` (one matrix per region) and ``global_scatter.png`` (true vs predicted 0-18)."""
    plt = _pyplot()
    out = Path(out)
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for ax, region in zip(axes.T.ravel(), brixia.REGIONS):   # columns: right lung A-C, left lung D-F
        matrix = np.asarray(metrics["per_region"][region]["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > matrix.max() / 2 else "black")
        acc = metrics["per_region"][region]["accuracy"]
        ax.set(title=f"{region}: acc {acc:.2f}", xlabel="predicted", ylabel="true", xticks=range(4), yticks=range(4))
    fig.suptitle("Out-of-fold confusion per region")
    fig.tight_layout()
    confusion_path = out / "region_confusion.png"
    fig.savefig(confusion_path, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    truth = [r["true_global"] for r in records]
    predicted = [r["pred_global"] for r in records]
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, size=(2, len(truth)))
    ax.scatter(np.add(truth, jitter[0]), np.add(predicted, jitter[1]), s=10, alpha=0.6)
    ax.plot([0, brixia.MAX_GLOBAL], [0, brixia.MAX_GLOBAL], color="grey", lw=1)
    ax.set(xlim=(-0.5, 18.5), ylim=(-0.5, 18.5), xlabel="true global score", ylabel="predicted global score",
           title=f"Global score: MAE {metrics['global_mae']:.2f}, r {metrics['global_pearson']:.2f}")
    fig.tight_layout()
    scatter_path = out / "global_scatter.png"
    fig.savefig(scatter_path, dpi=90)
    plt.close(fig)
    return [confusion_path, scatter_path]


def plot_seg_report(records: Sequence[dict[str, Any]], metrics: dict[str, Any], out: str | Path) -> list[Path]:
    """``dice_per_structure.png``: pooled out-of-fold Dice of each structure."""
    plt = _pyplot()
    values = [metrics["dice_per_structure"][name] for name in brixia.STRUCTURES]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(range(3), values, color=["tab:blue", "tab:orange", "tab:red"])
    for k, value in enumerate(values):
        ax.text(k, value + 0.01, f"{value:.3f}", ha="center")
    ax.set(xticks=range(3), xticklabels=brixia.STRUCTURES, ylim=(0, 1.08), ylabel="Dice",
           title=f"Out-of-fold segmentation Dice (mean {metrics['dice']:.3f})")
    fig.tight_layout()
    path = Path(out) / "dice_per_structure.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
