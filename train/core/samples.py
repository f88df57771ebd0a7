"""What every trainer's dataset shares: the fold's item indices, whether to augment, and where its random draws
come from."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset


def augmentation_generator(seed: int | None = None) -> torch.Generator:
    """The torch RNG a training dataset draws its augmentation from: seeded from the global RNG,
    which run_kfold seeds per fold (reproducible, different per fold), unless ``seed`` is given."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,))) if seed is None else seed
    return torch.Generator().manual_seed(seed)


class FoldSamples(Dataset):
    """Base of the trainers' datasets: ``indices`` (positions in the task's items), ``train`` (augment),
    ``len`` and the augmentation RNG; subclasses write ``__getitem__``."""

    def __init__(self, indices: Sequence[int], train: bool, seed: int | None = None) -> None:
        self.indices, self.train = list(indices), bool(train)
        self.generator = augmentation_generator(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def rng(self) -> torch.Generator | None:
        """The generator to draw augmentations from: the dataset's own in the main process; in a DataLoader
        worker None, i.e. torch's RNG, which workers reseed per worker and epoch (a copied generator, like
        numpy's RNG, would repeat the same draws in every worker)."""
        return self.generator if torch.utils.data.get_worker_info() is None else None
