"""Segmentation losses shared by the trainers (handbone, brixia's segmenter)."""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -1.0   # a target channel filled with this value is not labelled for that image


class SegmentationLoss(torch.nn.Module):
    """``w_bce * BCE + w_dice * (1 - soft Dice) + w_iou * (1 - soft IoU)`` over logits (B, C, H, W).

    A target channel filled with ``IGNORE`` (a source that does not label that structure, e.g. the
    heart in COVID-QU-Ex) contributes nothing: the terms are then averaged over the labelled
    (image, channel) pairs only, instead of teaching that the structure is background."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0), eps: float = 1.0):
        super().__init__()
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"--loss takes three non-negative weights (BCE Dice IoU), not {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        labelled = (targets.flatten(2) != IGNORE).all(-1)                       # (B, C)
        if bool(labelled.all()):
            return self._loss(logits, targets)
        if not bool(labelled.any()):
            return logits.sum() * 0.0                                            # keeps the graph, adds nothing
        return self._loss(logits, targets.clamp_min(0), labelled)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
        w_bce, w_dice, w_iou = self.weights

        def mean(values: torch.Tensor) -> torch.Tensor:          # over (B, C), labelled pairs only
            return values.mean() if labelled is None else values[labelled].mean()

        loss = logits.new_zeros(())
        if w_bce:
            if labelled is None:
                loss = loss + w_bce * torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
            else:
                per_pair = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, targets, reduction="none").flatten(2).mean(-1)
                loss = loss + w_bce * mean(per_pair)
        if w_dice or w_iou:
            probabilities = torch.sigmoid(logits).flatten(2)
            flat = targets.flatten(2)
            inter = (probabilities * flat).sum(-1)
            total = probabilities.sum(-1) + flat.sum(-1)
            if w_dice:
                loss = loss + w_dice * (1 - mean((2 * inter + self.eps) / (total + self.eps)))
            if w_iou:
                loss = loss + w_iou * (1 - mean((inter + self.eps) / (total - inter + self.eps)))
        return loss
