"""The scar seed's clinical MLP and its late fusion of an image classifier with it.

``ClinicalMLP``: features -> 32 -> 64 -> 32 -> classes, each hidden layer Linear + BatchNorm + ReLU,
dropout 0.5 after the second and third (where the seed put it). ``LateFusion``: ReLU of each
branch's class logits, weighted 0.6 (image) and 0.4 (clinical), concatenated, one Linear(2C, C),
trained end to end. Parameter names follow the seed (``fc1``, ``bn1``, ``cnn.``, ``mlp.``, ``fc``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ClinicalMLP(nn.Module):
    """Classifier over standardised numeric clinical features."""

    def __init__(self, n_features: int = 11, num_classes: int = 4, hidden: Sequence[int] = (32, 64, 32),
                 dropout: float = 0.5) -> None:
        super().__init__()
        if len(hidden) != 3:
            raise ValueError(f"the clinical MLP has three hidden layers, got {list(hidden)}")
        sizes = [n_features, *hidden]
        for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            setattr(self, f"fc{index}", nn.Linear(n_in, n_out))
            setattr(self, f"bn{index}", nn.BatchNorm1d(n_out))
        self.fc4 = nn.Linear(hidden[-1], num_classes)
        self.dropout = nn.Dropout(dropout)
        for index in range(1, 5):
            nn.init.kaiming_normal_(getattr(self, f"fc{index}").weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = self.dropout(F.relu(self.bn2(self.fc2(x))))
        x = self.dropout(F.relu(self.bn3(self.fc3(x))))
        return self.fc4(x)


class LateFusion(nn.Module):
    """``fc(cat(w_img * relu(cnn(image)), w_clin * relu(mlp(clinical))))``: the seed's TwoInputNet."""

    def __init__(self, cnn: nn.Module, mlp: nn.Module, num_classes: int = 4, image_weight: float = 0.6,
                 clinical_weight: float = 0.4) -> None:
        super().__init__()
        self.cnn = cnn
        self.mlp = mlp
        self.fc = nn.Linear(2 * num_classes, num_classes)
        self.image_weight = image_weight
        self.clinical_weight = clinical_weight

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([self.image_weight * F.relu(self.cnn(image)),
                           self.clinical_weight * F.relu(self.mlp(clinical))], dim=1)
        return self.fc(fused)


class ClinicalHeld(nn.Module):
    """A fusion model seen as an image classifier: the clinical rows are fixed, one per image.

    Grad-CAM tools call ``model(images)``; this lets them explain the combined model's decision
    through its image branch.
    """

    def __init__(self, fusion: LateFusion, clinical: torch.Tensor) -> None:
        super().__init__()
        self.fusion = fusion
        self.register_buffer("clinical", clinical, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fusion(image, self.clinical[: image.shape[0]])
