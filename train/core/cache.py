"""Preprocessing cache: expensive per-image work (osteo's rolling ball) done once for all folds and epochs.

Arrays are kept in memory and, when a folder is given, as ``.npy`` files keyed by the source
file's path, mtime and size plus the preprocessing parameters, so a changed image or a changed
input size is recomputed and a resumed run starts warm. Under DDP every rank fills its share and
then reads the others' from disk.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from train.core.distributed import DistributedContext


class PreprocessCache:
    """``get(path)`` returns ``compute(path)``, computed at most once per file version and parameters."""

    def __init__(self, compute: Callable[[Path], np.ndarray], params: dict[str, Any],
                 folder: str | Path | None = None):
        self.compute = compute
        self.params = json.dumps(params, sort_keys=True)
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, np.ndarray] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            ignore = self.folder / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n", encoding="utf-8")  # a cache inside weights/<task> is never committed

    def key(self, path: str | Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        text = f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{self.params}"
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def get(self, path: str | Path) -> np.ndarray:
        key = self.key(path)
        if key in self.memory:
            return self.memory[key]
        array = None
        if self.folder is not None:
            stored = self.folder / f"{key}.npy"
            if stored.is_file():
                try:
                    array = np.load(stored, allow_pickle=False)
                except (OSError, ValueError):
                    array = None  # a torn write from a killed run: recompute
        if array is None:
            array = np.ascontiguousarray(self.compute(Path(path)))
            if self.folder is not None:
                tmp = self.folder / f".{key}.{os.getpid()}.npy"
                np.save(tmp, array, allow_pickle=False)
                os.replace(tmp, self.folder / f"{key}.npy")
        self.memory[key] = array
        return array

    def fill(self, paths: Sequence[str | Path], context: DistributedContext, desc: str = "preprocess") -> None:
        """Compute every file once, split across ranks, before training starts (and DataLoader workers fork)."""
        mine = list(paths)[context.rank::context.world_size] if self.folder is not None else list(paths)
        for path in tqdm(mine, desc=desc, disable=not context.is_main, leave=False):
            self.get(path)
        context.barrier()
        for path in paths:
            self.get(path)
