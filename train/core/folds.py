"""Fold splits: stratified (optionally patient-grouped) k-fold, written once to ``splits.json`` and reused.

As nnU-Net's ``splits_final.json``: a list with one ``{"train": [...], "val": [...]}`` per fold,
holding item names (paths relative to the data root), so a resumed or re-run training sees
exactly the same folds.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS_FILE = "splits.json"


def fold_splits(labels: Sequence[int], n_folds: int, seed: int,
                groups: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(train indices, val indices) per fold: StratifiedKFold, or StratifiedGroupKFold when ``groups`` are given.

    With groups, all items of one patient land in the same fold, so a patient is never both
    trained on and validated on.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    if n_folds < 2:
        raise ValueError(f"--folds must be at least 2 (got {n_folds})")
    units = len(set(groups)) if groups is not None else len(labels)
    if units < n_folds:
        what = "patients" if groups is not None else "images"
        raise ValueError(f"{n_folds} folds need at least {n_folds} {what}, the data has {units}; lower --folds")
    placeholder = np.zeros(len(labels))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(placeholder, labels, groups=np.asarray(groups))
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(placeholder, labels)
    return [(sorted(map(int, train)), sorted(map(int, val))) for train, val in parts]


def read_groups(path: str | Path, items: Sequence[str]) -> list[str]:
    """Patient id of every item from a CSV with columns ``image,patient``.

    ``image`` may be the item name (relative path, e.g. ``C1/x.png``) or the bare file name.
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "patient"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a groups CSV needs the columns 'image' and 'patient' "
                             f"(found {reader.fieldnames})")
        table = {row["image"].strip().replace("\\", "/"): row["patient"].strip() for row in reader}
    groups, missing = [], []
    for item in items:
        patient = table.get(item, table.get(Path(item).name))
        if patient is None:
            missing.append(item)
        groups.append(patient)
    if missing:
        raise ValueError(f"{path} has no patient for {len(missing)} image(s), e.g. {missing[:3]}")
    return groups


def load_or_write_splits(out_dir: str | Path, items: Sequence[str], labels: Sequence[int], n_folds: int,
                         seed: int, groups: Sequence[str] | None = None, *, reuse: bool = True,
                         write: bool = True) -> list[tuple[list[int], list[int]]]:
    """The folds of ``out_dir/splits.json`` when ``reuse`` and it exists, else freshly split (and written).

    A reused file must name exactly the current items and have ``n_folds`` folds; otherwise the
    error says so instead of silently training on different folds.
    """
    path = Path(out_dir) / SPLITS_FILE
    index = {name: i for i, name in enumerate(items)}
    if reuse and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        named = {name for fold in saved for name in fold["val"]}
        if len(saved) != n_folds or named != set(items):
            raise ValueError(f"{path} was written for other data or another fold count "
                             f"({len(saved)} folds, {len(named)} items vs {n_folds} folds, {len(items)} items); "
                             "delete it or train into a fresh --out")
        return [(sorted(index[n] for n in fold["train"]), sorted(index[n] for n in fold["val"])) for fold in saved]
    splits = fold_splits(labels, n_folds, seed, groups)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = [{"train": [items[i] for i in train], "val": [items[i] for i in val]} for train, val in splits]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    return splits
