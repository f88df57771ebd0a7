"""Hand-bone loss, validation Dice at the original resolution, and the per-class Dice plot.

Loss: ``train.core.losses.SegmentationLoss``, weighted BCE + soft Dice + soft IoU on the model-frame
masks, with the seed's ``--loss`` weights (default 1 1 1).

Validation Dice (the selection score) is computed as the competition scores it, and unlike the
seed's validation, at the image's own resolution: the sigmoid maps are mapped back through the
preprocessing geometry (un-pad, bilinear resize), thresholded at 0.5 and compared with the
polygons filled at full size; Dice per image and class, then the mean over images per class,
then the mean over classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tasks import handbone
from train.handbone.data import Case, geometry_of, original_masks


class DiceRecords:
    """Validation batch -> one record per image with its Dice per class at the original resolution."""

    def __init__(self, cases: list[Case], input_spec: dict[str, Any], classes: list[str],
                 threshold: float = handbone.DEFAULT_THRESHOLD):
        self.cases, self.input_spec, self.classes, self.threshold = cases, input_spec, classes, threshold

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
        probabilities = torch.sigmoid(outputs.float()).numpy()
        records = []
        for index, probs in zip(indices.tolist(), probabilities):
            case = self.cases[index]
            predicted = handbone.masks_at_input(probs, geometry_of(case, self.input_spec), self.threshold)
            dice = handbone.dice_per_class(predicted, original_masks(case, self.classes))
            records.append({"index": int(index), "dice": float(dice.mean()),
                            **{f"dice_{name}": float(d) for name, d in zip(self.classes, dice)}})
        return records


def dice_metrics(records: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Mean Dice per class over images, and their mean over classes (``dice``, the selection score)."""
    if not records:
        return {"n": 0, "dice": float("nan"), "dice_per_class": {name: float("nan") for name in classes}}
    per_class = {name: float(np.mean([record[f"dice_{name}"] for record in records])) for name in classes}
    values = list(per_class.values())
    return {"n": len(records), "dice": float(np.mean(values)), "dice_min_class": float(np.min(values)),
            "dice_per_class": per_class}


def plot_dice_per_class(records: Sequence[dict[str, Any]], metrics: dict[str, Any], out: str | Path,
                        classes: Sequence[str]) -> list[Path]:
    """``OUT/dice_per_class.png``: pooled out-of-fold Dice per class as bars, the mean as a line."""
    from train.core.metrics import _pyplot

    plt = _pyplot()
    values = [metrics["dice_per_class"].get(name, float("nan")) for name in classes]
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(range(len(classes)), values, color="tab:blue")
    ax.axhline(metrics["dice"], color="tab:red", lw=1, label=f"mean {metrics['dice']:.4f}")
    ax.set(xticks=range(len(classes)), ylim=(0, 1.02), ylabel="Dice", title="Out-of-fold Dice per class")
    ax.set_xticklabels(classes, rotation=70, fontsize=8)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(out) / "dice_per_class.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
