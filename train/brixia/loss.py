"""The region scorer's training loss: cross-entropy per region on logits plus an optional ordinal term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.brixia import expected_scores


class RegionLoss(nn.Module):
    """Mean cross-entropy over the six regions, on logits (the seed applied softmax twice), plus
    ``ordinal_weight`` x mean |expected score - true score| (rewards near misses over far ones).

    Targets are scores (B, 6) or, for a reader's mean of two radiologists, score distributions
    (B, 6, 4) (e.g. half 1, half 2), whose expected value is the ordinal target."""

    def __init__(self, ordinal_weight: float = 0.0):
        super().__init__()
        self.ordinal_weight = float(ordinal_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        if targets.dim() == logits.dim():                       # distributions
            targets = targets.float()
            loss = F.cross_entropy(flat, targets.reshape(-1, targets.shape[-1]))
            true_scores = expected_scores(targets)
        else:
            loss = F.cross_entropy(flat, targets.long().reshape(-1))
            true_scores = targets.float()
        if self.ordinal_weight:
            expected = expected_scores(torch.softmax(logits, dim=-1))
            loss = loss + self.ordinal_weight * (expected - true_scores).abs().mean()
        return loss
