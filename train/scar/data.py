"""Scar training data: the seed's table (xlsx/CSV with img_name, Cls and clinical columns) or class folders,
read once and served per fold as photos, standardised clinical rows, or both.

Table layout (all three models): one ``.xlsx``/``.xls``/``.csv`` with ``img_name`` (photo file
name, relative to the image folder), ``Cls`` (severity 0-3), optionally a patient column
(``patient`` by default; grouped folds) and the clinical features: every other column, all
numeric, in the table's order. Class-folder layout (image model only): ``DATA/<class>/*.jpg``
or the seed's ``DATA/{train,val}/<class>/`` (pooled for k-fold; ``test/`` is left out), classes
in sorted order as torchvision's ImageFolder numbers them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from tasks import scar
from tasks.imaging import ImageReadError, is_image_file, read_image
from train.core.samples import FoldSamples

TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")
ID_COLUMN, LABEL_COLUMN = "img_name", "Cls"


@dataclass
class ScarData:
    """What the trainer needs from the data, whatever its layout."""
    items: list[str]                    # unique item names (img_name, or a path under DATA)
    targets: list[int]                  # severity 0-3
    image_paths: list[Path] | None      # photos, when the layout has them
    features: np.ndarray | None         # (N, F) raw clinical values, float64
    feature_names: list[str]
    groups: list[str] | None            # patient per item, for grouped folds
    source: str


def find_table(data: Path) -> Path | None:
    """DATA itself when it is a table file, else the one table directly inside DATA (None when there is none)."""
    if data.is_file():
        if data.suffix.lower() not in TABLE_SUFFIXES:
            raise SystemExit(f"{data} is not a table: use an .xlsx, .xls or .csv file")
        return data
    if not data.is_dir():
        raise SystemExit(f"{data} does not exist")
    tables = sorted(p for p in data.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                    and not p.name.startswith((".", "~$")))
    if len(tables) > 1:
        raise SystemExit(f"{data} holds several tables ({', '.join(p.name for p in tables)}): pass the one to use as DATA")
    return tables[0] if tables else None


def _read_frame(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path, header=0)


def read_table(table: Path, images: Path | None, *, need_images: bool, patient_column: str | None,
               drop_incomplete: bool = False) -> ScarData:
    """Read and check the seed's table; every problem is reported with the rows or columns to fix."""
    import pandas as pd

    frame = _read_frame(table)
    frame.columns = [str(c).strip() for c in frame.columns]
    if LABEL_COLUMN not in frame.columns:
        raise SystemExit(f"{table}: no '{LABEL_COLUMN}' column (severity 0-3); columns are {list(frame.columns)}")
    if need_images and ID_COLUMN not in frame.columns:
        raise SystemExit(f"{table}: no '{ID_COLUMN}' column naming each row's photo")
    if patient_column is None and "patient" in frame.columns:
        patient_column = "patient"
    if patient_column is not None and patient_column not in frame.columns:
        raise SystemExit(f"{table}: no patient column {patient_column!r}")
    names = [c for c in frame.columns if c not in (ID_COLUMN, LABEL_COLUMN, patient_column)]
    if not names:
        raise SystemExit(f"{table}: no clinical feature columns besides {ID_COLUMN}, {LABEL_COLUMN}")
    not_numeric = [c for c in names if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])]
    if not_numeric:
        raise SystemExit(f"{table}: clinical columns must be numeric; not numeric: {', '.join(not_numeric)} "
                         "(encode categories as numbers, or drop the columns)")
    incomplete = frame[names + [LABEL_COLUMN]].isna().any(axis=1) | ~np.isfinite(frame[names].to_numpy(float)).all(axis=1)
    if incomplete.any():
        rows = [int(i) + 2 for i in np.flatnonzero(incomplete.to_numpy())]  # spreadsheet row numbers
        if not drop_incomplete:
            raise SystemExit(f"{table}: {len(rows)} row(s) with missing or infinite values (spreadsheet rows "
                             f"{rows[:10]}{'...' if len(rows) > 10 else ''}); fill them, or pass --drop-incomplete")
        frame = frame[~incomplete].reset_index(drop=True)
    labels = frame[LABEL_COLUMN].to_numpy()
    if not np.all(np.isin(labels, [0, 1, 2, 3])):
        raise SystemExit(f"{table}: '{LABEL_COLUMN}' must hold severities 0, 1, 2 or 3; found {sorted(set(labels.tolist()))}")
    items = ([str(v) for v in frame[ID_COLUMN]] if ID_COLUMN in frame.columns
             else [f"row{i + 2}" for i in range(len(frame))])
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise SystemExit(f"{table}: '{ID_COLUMN}' values must be unique; repeated: {duplicates[:5]}")
    image_paths = None
    if need_images:
        folder = images or (table.parent / "images" if (table.parent / "images").is_dir() else table.parent)
        image_paths = [folder / item for item in items]
        missing = [item for item, path in zip(items, image_paths) if not path.is_file()]
        if missing:
            raise SystemExit(f"{len(missing)} photo(s) named in {table.name} are not in {folder}: {missing[:5]} "
                             "(point --images at the photo folder)")
    groups = [str(v) for v in frame[patient_column]] if patient_column else None
    return ScarData(items=items, targets=[int(v) for v in labels], image_paths=image_paths,
                    features=frame[names].to_numpy(dtype=np.float64), feature_names=names, groups=groups,
                    source=f"table {table.name}" + (f" with photos in {image_paths[0].parent}" if image_paths else ""))


def read_class_folders(data: Path) -> ScarData:
    """The seed's ImageFolder layout: DATA/<class>/ or DATA/{train,val}/<class>/ (pooled), four classes."""
    roots = [data / part for part in ("train", "val") if (data / part).is_dir()] or [data]
    classes = sorted({p.name for root in roots for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    if len(classes) != len(scar.LABELS):
        raise SystemExit(f"{data}: expected a table (xlsx/csv) or {len(scar.LABELS)} class folders "
                         f"(ImageFolder layout), found folders {classes}")
    items, targets = [], []
    for root in roots:
        for target, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*") if is_image_file(p))
            items += [p.relative_to(data).as_posix() for p in files]
            targets += [target] * len(files)
    if not items:
        raise SystemExit(f"{data}: the class folders hold no images")
    return ScarData(items=items, targets=targets, image_paths=[data / item for item in items], features=None,
                    feature_names=[], groups=None,
                    source=f"class folders {classes} (as severity 0-3) under {data}")


def load_data(data: Path, mode: str, images: Path | None = None, patient_column: str | None = None,
              drop_incomplete: bool = False) -> ScarData:
    """The training data of ``mode`` from DATA, in whichever layout DATA has."""
    table = find_table(Path(data))
    if table is None:
        if mode != "image":
            raise SystemExit(f"{data}: the {mode} model needs a table (xlsx/csv) with the clinical columns")
        return read_class_folders(Path(data))
    return read_table(table, images, need_images=mode != "clinical", patient_column=patient_column,
                      drop_incomplete=drop_incomplete)


# ----------------------------------------------------------------------------- per-fold datasets
class PhotoStore:
    """Photos decoded and resized to model size once (uint8), shared by every fold and epoch."""

    def __init__(self, paths: Sequence[Path], input_spec: dict[str, Any]) -> None:
        self.paths, self.input_spec = list(paths), input_spec
        self.cache: dict[int, np.ndarray] = {}

    def get(self, index: int) -> np.ndarray:
        if index not in self.cache:
            try:
                rgb = read_image(self.paths[index], color="rgb")
            except ImageReadError as exc:
                raise SystemExit(f"cannot read training photo {self.paths[index]}: {exc}") from exc
            self.cache[index] = scar.resized_photo(rgb, self.input_spec["size"])
        return self.cache[index]


def augmented(photo: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
    """Horizontal flip (p=0.5), rotation by up to +-10 degrees (p=0.5, filled with the photo's mean colour),
    brightness and contrast x[0.9, 1.1]. Hue is left alone: redness is part of the severity signal."""
    draws = torch.rand(5, generator=generator).tolist()
    if draws[0] < 0.5:
        photo = np.ascontiguousarray(photo[:, ::-1])
    if draws[1] < 0.5:
        fill = tuple(int(v) for v in photo.reshape(-1, 3).mean(axis=0))
        photo = np.asarray(Image.fromarray(photo).rotate(20 * draws[2] - 10, resample=Image.BILINEAR, fillcolor=fill))
    brightness, contrast = 0.9 + 0.2 * draws[3], 0.9 + 0.2 * draws[4]
    values = photo.astype(np.float32)
    values = (values - values.mean()) * contrast + values.mean() * brightness
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class ScarFold(FoldSamples):
    """One fold's items -> (input, severity, index); input is a photo tensor, a clinical row, or both
    as ``{"image", "clinical"}`` (LateFusion's arguments). The clinical rows are standardised by the
    caller with the scaler of the fold's training rows, whichever rows this dataset holds.
    """

    def __init__(self, indices: Sequence[int], targets: Sequence[int], *, photos: PhotoStore | None = None,
                 clinical: np.ndarray | None = None, augment: bool = False) -> None:
        super().__init__(indices, augment)
        self.targets, self.photos, self.clinical = list(targets), photos, clinical

    def __getitem__(self, position: int):
        index = self.indices[position]
        inputs = {}
        if self.photos is not None:
            photo = self.photos.get(index)
            if self.train:
                photo = augmented(photo, self.rng())
            inputs["image"] = scar.photo_tensor(photo, self.photos.input_spec)
        if self.clinical is not None:
            inputs["clinical"] = torch.from_numpy(self.clinical[index])
        return (inputs if len(inputs) == 2 else next(iter(inputs.values()))), self.targets[index], index


def fold_scaler(features: np.ndarray, train_indices: Sequence[int]) -> dict[str, list[float]]:
    """The scaler of a fold: fitted on that fold's training rows only (the seed refit it on validation rows)."""
    return scar.fit_scaler(features[list(train_indices)])
