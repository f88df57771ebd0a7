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

from tasks import brixia, brixia_orient
from tasks.frames import dice_per_class
from train.core.metrics import _pyplot


# ---------------------------------------------------------------- segmentation

class SegRecords:
    """Validation batch -> per image the Dice of each labelled channel (NaN where the source does not
    label it), as served: threshold 0.5, largest component for the lungs and heart; the opacity
    channel as thresholded."""

    def __init__(self, labels: Sequence[str], sources: Sequence[str]):
        self.labels, self.sources = list(labels), list(sources)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
        probabilities = torch.sigmoid(outputs.float()).numpy()
        records = []
        for index, probs, target in zip(indices.tolist(), probabilities, targets.numpy()):
            predicted = np.concatenate([brixia.clean_masks(probs), probs[len(brixia.STRUCTURES):] > 0.5])
            labelled = (target.reshape(len(target), -1) >= 0).all(-1)
            dice = dice_per_class(predicted, target > 0.5)
            record: dict[str, Any] = {"index": int(index), "source": self.sources[index]}
            record.update({f"dice_{name}": (float(d) if ok else float("nan"))
                           for name, d, ok in zip(self.labels, dice, labelled)})
            anatomy = [record[f"dice_{name}"] for name in brixia.STRUCTURES if f"dice_{name}" in record]
            anatomy = [d for d in anatomy if not np.isnan(d)]
            record["dice"] = float(np.mean(anatomy)) if anatomy else float("nan")
            records.append(record)
        return records


def _nanmean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def seg_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice per channel over the images that label it, per source too; ``dice`` (the selection
    score) = the mean of the three anatomical structures' Dice."""
    if not records:
        return {"n": 0, "dice": float("nan")}
    labels = [key[len("dice_"):] for key in records[0] if key.startswith("dice_")]

    def per_channel(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
        return {name: _nanmean([r[f"dice_{name}"] for r in rows]) for name in labels}

    per = per_channel(records)
    anatomy = [per[name] for name in brixia.STRUCTURES if per.get(name) is not None]
    sources = sorted({r.get("source", "all") for r in records})
    per_source = {source: {"n": sum(r.get("source", "all") == source for r in records),
                           **per_channel([r for r in records if r.get("source", "all") == source])}
                  for source in sources}
    return {"n": len(records), "dice": float(np.mean(anatomy)) if anatomy else float("nan"),
            "dice_per_structure": per, "dice_per_source": per_source}


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


# ---------------------------------------------------------------- orientation

def orient_records(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
    probabilities = torch.softmax(outputs.float(), dim=-1).numpy()
    return [{"index": int(index), "true_pose": int(true), "pred_pose": int(probs.argmax()),
             "p_upright": float(probs[brixia_orient.UPRIGHT])}
            for index, probs, true in zip(indices.tolist(), probabilities, targets.tolist())]


def orient_metrics(records: Sequence[dict[str, Any]], min_upright: float | None = None) -> dict[str, Any]:
    """Pose accuracy; how often an upright film passes and a turned or mirrored one is refused by the
    daemon's rule (P(upright) below ``min_upright``; by default the floor ``choose_min_upright`` picks on
    these records); mirrored-or-not accuracy; accuracy per pose."""
    if not records:
        return {"n": 0, "accuracy": float("nan")}
    if min_upright is None:
        min_upright = brixia_orient.choose_min_upright(list(records))
    records = [{**r, "refused": r["p_upright"] < min_upright} for r in records]
    upright = [r for r in records if r["true_pose"] == brixia_orient.UPRIGHT]
    turned = [r for r in records if r["true_pose"] != brixia_orient.UPRIGHT]
    mirrored = [r for r in records if r["true_pose"] == 1]
    return {
        "n": len(records),
        "accuracy": float(np.mean([r["pred_pose"] == r["true_pose"] for r in records])),
        "min_upright": min_upright,
        "upright_passed": float(np.mean([not r["refused"] for r in upright])) if upright else None,
        "turned_refused": float(np.mean([r["refused"] for r in turned])) if turned else None,
        "mirrored_refused": float(np.mean([r["refused"] for r in mirrored])) if mirrored else None,
        "mirror_accuracy": float(np.mean([(r["pred_pose"] % 2) == (r["true_pose"] % 2) for r in records])),
        "per_pose": {name: float(np.mean([r["pred_pose"] == pose for r in records if r["true_pose"] == pose]))
                     for pose, name in enumerate(brixia_orient.POSES)
                     if any(r["true_pose"] == pose for r in records)},
    }


# ---------------------------------------------------------------- scores

class ScoreRecords:
    """Validation batch -> per image the probabilities, the predicted score of each region (by the
    card's ``decision``: the median of the predicted distribution, which minimises the expected
    absolute error, or its argmax) and the reference reader's scores, looked up by index (the
    training target may be another reader, or a mean). ``second_reader``: another radiologist's
    scores of the same films, kept beside as the human anchor."""

    def __init__(self, reference: Sequence[Sequence[int]], second_reader: Sequence[Sequence[int]] | None = None,
                 decision: str = "median"):
        self.reference, self.second_reader, self.decision = reference, second_reader, decision

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
        probabilities = torch.softmax(outputs.float(), dim=-1)
        predicted_all = brixia.decide_scores(probabilities, self.decision).numpy()
        argmax_all = probabilities.argmax(-1).numpy()
        records = []
        for index, probs, predicted, argmax in zip(indices.tolist(), probabilities.numpy(), predicted_all, argmax_all):
            true = np.asarray(self.reference[index])
            record: dict[str, Any] = {"index": int(index)}
            for r, region in enumerate(brixia.REGIONS):
                record[f"true_{region}"] = int(true[r])
                record[f"pred_{region}"] = int(predicted[r])
                record[f"argmax_{region}"] = int(argmax[r])
                record.update({f"p_{region}{level}": float(probs[r, level]) for level in range(brixia.SCORE_LEVELS)})
                if self.second_reader is not None:
                    record[f"reader2_{region}"] = int(self.second_reader[index][r])
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


def _scores(records: Sequence[dict[str, Any]], prefix: str) -> np.ndarray:
    return np.array([[r[f"{prefix}_{g}"] for g in brixia.REGIONS] for r in records]).reshape(-1, len(brixia.REGIONS))


def score_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Region and global metrics of the predictions against the reference reader; with the argmax
    decision beside, the expected global score's MAE, and the second reader's agreement with the
    reference on the same films (the human anchor) when the records carry it."""
    truth = _scores(records, "true")
    metrics = region_metrics(truth, _scores(records, "pred"))
    if records and "argmax_A" in records[0]:
        argmax = region_metrics(truth, _scores(records, "argmax"))
        metrics["argmax"] = {key: argmax[key] for key in ("accuracy", "mae", "global_mae", "global_spearman")}
    if records and "expected_global" in records[0]:
        expected = np.array([r["expected_global"] for r in records])
        metrics["expected_global_mae"] = float(np.mean(np.abs(expected - truth.sum(1))))
        metrics["expected_global_spearman"] = _correlations(truth.sum(1), expected)[1]
    if records and "reader2_A" in records[0]:
        human = region_metrics(truth, _scores(records, "reader2"))
        metrics["second_reader"] = {key: human[key] for key in ("accuracy", "mae", "global_mae", "global_pearson",
                                                                "global_spearman")}
    return metrics


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
    """``dice_per_structure.png``: pooled out-of-fold Dice of each channel, one bar group per source."""
    plt = _pyplot()
    per_source = metrics.get("dice_per_source") or {"all": metrics["dice_per_structure"]}
    labels = list(metrics["dice_per_structure"])
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(labels), 3.8))
    width = 0.8 / max(1, len(per_source))
    for k, (source, values) in enumerate(per_source.items()):
        xs = [i + (k - (len(per_source) - 1) / 2) * width for i in range(len(labels))]
        heights = [values.get(name) or 0.0 for name in labels]
        ax.bar(xs, heights, width=width, label=f"{source} (n={values.get('n', '?')})")
        for x, name, height in zip(xs, labels, heights):
            if values.get(name) is not None:
                ax.text(x, height + 0.01, f"{height:.3f}", ha="center", fontsize=7, rotation=90)
    ax.set(xticks=range(len(labels)), xticklabels=labels, ylim=(0, 1.15), ylabel="Dice",
           title=f"Out-of-fold segmentation Dice (anatomy mean {metrics['dice']:.3f})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(out) / "dice_per_structure.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def orient_card_output(records: Sequence[dict[str, Any]], pooled: dict[str, Any]) -> dict[str, Any]:
    """The orient card's rule: the P(upright) floor chosen on every out-of-fold record, and the figures of
    each fold judged at the floor chosen on the other folds only (the honest ones)."""
    records = list(records)
    floor = brixia_orient.choose_min_upright(records)
    folds = sorted({r["fold"] for r in records}) if all("fold" in r for r in records) else []
    cross = None
    if len(folds) > 1:
        judged = []
        for fold in folds:
            other = brixia_orient.choose_min_upright([r for r in records if r["fold"] != fold])
            judged += [{**r, "p_floor": other} for r in records if r["fold"] == fold]
        upright = [r for r in judged if r["true_pose"] == brixia_orient.UPRIGHT]
        mirrored = [r for r in judged if r["true_pose"] == 1]
        turned = [r for r in judged if r["true_pose"] != brixia_orient.UPRIGHT]
        cross = {"upright_passed": float(np.mean([r["p_upright"] >= r["p_floor"] for r in upright])),
                 "mirrored_refused": float(np.mean([r["p_upright"] < r["p_floor"] for r in mirrored])),
                 "turned_refused": float(np.mean([r["p_upright"] < r["p_floor"] for r in turned]))}
    return {"output": {"min_upright": floor, "target_upright_passed": 0.99,
                       "rule": "refuse when P(upright) is below min_upright: the highest floor at which >= 99 % of "
                               "the out-of-fold upright films pass",
                       "cross_fold": cross}}
