"""Real chest X-ray data in its published layouts, for the brixia trainer's seg and score stages.

Segmentation sources (``SegCase``: one film, a mask per segmenter channel or "not labelled"):

- ``jsrt_cases``: JSRT / SCR-style label maps, ``ROOT/images/<name>.png`` + ``ROOT/masks/<name>.png``
  whose pixel values name the structure (default 150 right lung, 200 left lung, 250 heart). No
  opacity labels.
- ``covid_qu_ex_cases``: COVID-QU-Ex "Infection Segmentation Data": every folder under ROOT that
  holds ``images/``, ``lung masks/`` and ``infection masks/`` (0/255 PNGs of the same names). Both
  lungs are in one mask and are split into right and left (``split_lungs``). No heart labels.
  Infection masks are opacity labels where the folder has any non-empty one (COVID-19) or its
  class is normal (no infection by definition); a folder whose masks are all empty although its
  films show pneumonia (Non-COVID) is published with placeholders and is treated as not labelled.
- ``folder_cases``: one folder of images and one folder of masks per structure (``find_mask_cases``'s
  layout), heart required there; an ``opacity`` or ``infection`` mask folder is used when present.

A channel a source does not label contributes no loss and no Dice (never "background").

Score source: ``read_cohen_annotations`` reads the BrixIA Cohen-subset ``public-annotations.csv``
(``filename, S-A..S-F, S-Global, J-A..J-F, J-Global``: senior and junior radiologist) with a choice
of reader to train on; the senior reader is the reference every metric is computed against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from tasks import brixia
from tasks.imaging import ImageReadError, image_stem, is_image_file, read_image

JSRT_VALUES = (150, 200, 250)          # right lung, left lung, heart in the SCR-style label maps
READERS = ("senior", "junior", "mean")
UNLABELLED = 255                       # a cached mask channel filled with this value was not labelled
# What a card says of each named layout's data (the licence as its publishers state it).
SOURCE_NOTES = {
    "jsrt": "JSRT database (Shiraishi et al., AJR 2000) with SCR-style lung/heart label maps: "
            "non-commercial research use under the JSRT/SCR terms",
    "covid-qu-ex": "COVID-QU-Ex Infection Segmentation Data (Tahir et al., Qatar University), as published on "
                   "Kaggle: research use; infection masks used as opacity labels",
    "folders": "per-structure mask folders given on the command line",
    "cohen": "Cohen covid-chestxray-dataset subset scored by the BrixIA radiologists (Signoroni et al., Medical "
             "Image Analysis 2021, public-annotations.csv): scores CC BY-NC-SA 4.0, so non-commercial use only "
             "and share-alike; images under the per-image licences of the Cohen dataset (Apache-2.0, CC BY, "
             "CC BY-NC-SA)",
    "brixia": "BrixIA hospital-format metadata (metadata_global_v2.csv); licence as the data set's owner states",
}


@dataclass(frozen=True)
class SegCase:
    """One training film and how to read a mask for each of the segmenter's channels.

    ``masks[c]`` is a file for channel ``c`` of ``brixia.STRUCTURES + (OPACITY,)`` or None (not
    labelled); ``layout`` says how to read it: ``label-map`` (pixel value ``values[c]``),
    ``lungs-in-one`` (channels 0/1 are the two halves of one lung mask) or ``binary``."""
    key: str
    source: str
    image: Path
    layout: str
    masks: tuple[Path | None, ...]
    values: tuple[int, ...] = ()


def name_stem(path: Path) -> str:
    """``tasks.imaging.image_stem`` (UID-named files keep their whole name) without a ``_mask`` suffix,
    so masks and images pair up."""
    stem = image_stem(path)
    return stem[:-5] if stem.lower().endswith("_mask") else stem


def files_by_stem(folder: Path) -> dict[str, Path]:
    """The images of a folder by ``name_stem``; two images of one stem (``a.png`` and ``a.dcm``) are an
    error naming both, as either could be the one its mask was drawn on."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_image_file(path):
            stem = name_stem(path)
            if stem in files:
                raise SystemExit(f"{files[stem]} and {path} have the same name stem {stem!r}: keep one of them")
            files[stem] = path
    return files


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SystemExit(f"{what} {path} does not exist")
    return path


def jsrt_cases(root: str | Path, values: Sequence[int] = JSRT_VALUES) -> list[SegCase]:
    """Cases of a JSRT-style label-map set (``images/`` and ``masks/`` of the same names)."""
    root = Path(root)
    if len(values) != 3:
        raise SystemExit(f"--jsrt-values takes three pixel values (right lung, left lung, heart), not {list(values)}")
    images, masks = files_by_stem(_need_dir(root / "images", "JSRT image folder")), files_by_stem(_need_dir(root / "masks", "JSRT mask folder"))
    stems = sorted(set(images) & set(masks))
    if not stems:
        raise SystemExit(f"no JSRT image under {root / 'images'} has a label map of the same name in {root / 'masks'}")
    return [SegCase(f"jsrt/{stem}", "jsrt", images[stem], "label-map",
                    (masks[stem], masks[stem], masks[stem], None), tuple(int(v) for v in values)) for stem in stems]


def _infection_labelled(folder: Path, class_name: str) -> bool:
    if "normal" in class_name.lower():
        return True
    return any(read_image(path, color="gray").any() for path in files_by_stem(folder).values())


def covid_qu_ex_cases(root: str | Path) -> list[SegCase]:
    """Cases of every COVID-QU-Ex class folder under ``root`` (see the module docstring)."""
    root = _need_dir(Path(root), "COVID-QU-Ex folder")
    class_folders = sorted({path.parent for path in root.rglob("images") if path.is_dir()
                            and (path.parent / "lung masks").is_dir()})
    if not class_folders:
        raise SystemExit(f"no COVID-QU-Ex class folder (images/ + 'lung masks/') under {root}")
    cases = []
    for folder in class_folders:
        images, lungs = files_by_stem(folder / "images"), files_by_stem(folder / "lung masks")
        infection_dir = folder / "infection masks"
        infections = files_by_stem(infection_dir) if infection_dir.is_dir() else {}
        labelled = bool(infections) and _infection_labelled(infection_dir, folder.name)
        name = folder.relative_to(root).as_posix() if folder != root else folder.name
        for stem in sorted(set(images) & set(lungs)):
            opacity = infections.get(stem) if labelled else None
            cases.append(SegCase(f"covid-qu-ex/{name}/{stem}", f"covid-qu-ex/{folder.name}", images[stem],
                                 "lungs-in-one", (lungs[stem], lungs[stem], None, opacity)))
    return cases


def folder_cases(images_root: str | Path, masks_root: str | Path) -> list[SegCase]:
    """Cases of the per-structure layout (``MASKS/right_lung`` ...; see ``train.brixia.data``)."""
    masks_root = Path(masks_root)
    opacity_dir = next((masks_root / name for name in ("opacity", "infection", "infection masks")
                        if (masks_root / name).is_dir()), None)
    opacities = files_by_stem(opacity_dir) if opacity_dir is not None else {}
    source = f"folders/{Path(images_root).name}"
    return [SegCase(f"{source}/{case.stem}", source, case.image, "binary", (*case.masks, opacities.get(case.stem)))
            for case in find_mask_cases(masks_root, images_root)]


def split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One bool mask holding both lungs -> (right lung, left lung): right = the image's left side.

    Each connected piece goes to the side of its centre relative to the middle of the joint
    extent; if one side ends up empty (the lungs touch), the piece is cut at its narrowest column
    in the middle third."""
    mask = np.asarray(mask, dtype=bool)
    right, left = np.zeros_like(mask), np.zeros_like(mask)
    if not mask.any():
        return right, left
    cols = np.flatnonzero(mask.any(axis=0))
    middle = (cols[0] + cols[-1]) / 2
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    for label in range(1, count):
        (right if centroids[label][0] < middle else left)[labels == label] = True
    if right.any() and left.any():
        return right, left
    width = cols[-1] - cols[0] + 1
    lo, hi = cols[0] + width // 3, cols[0] + max(width // 3 + 1, 2 * width // 3)
    cut = lo + int(np.argmin(mask[:, lo:hi].sum(axis=0)))
    right, left = mask.copy(), mask.copy()
    right[:, cut:] = False
    left[:, :cut] = False
    return right, left


def _read_mask(path: Path) -> np.ndarray:
    try:
        return read_image(path, color="gray")
    except ImageReadError as exc:
        raise SystemExit(f"cannot read mask {path}: {exc}") from exc


def case_targets(case: SegCase, channels: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(channels, H, W) bool masks at the image's ``shape`` and (channels,) bool "labelled" flags."""
    masks = np.zeros((channels, *shape), dtype=bool)
    labelled = np.zeros(channels, dtype=bool)
    cache: dict[Path, np.ndarray] = {}

    def load(path: Path) -> np.ndarray:
        if path not in cache:
            array = _read_mask(path)
            if array.shape != shape:
                array = cv2.resize(array, shape[::-1], interpolation=cv2.INTER_NEAREST)
            cache[path] = array
        return cache[path]

    split = None
    for c, path in enumerate(case.masks[:channels]):
        if path is None:
            continue
        labelled[c] = True
        if case.layout == "label-map" and c < len(case.values):
            masks[c] = load(path) == case.values[c]
        elif case.layout == "lungs-in-one" and c < 2:
            split = split if split is not None else split_lungs(load(path) > 0)
            masks[c] = split[c]
        else:
            masks[c] = load(path) > 0
    return masks, labelled


# ---------------------------------------------------------------- the Cohen subset's annotations

_GROUP_RULES = (
    (re.compile(r"\.annot\.original$"), ""),
    (re.compile(r"_jumbo$"), ""),
    (re.compile(r"^(.*?\.pdf)\b.*$"), r"\1"),                          # figure crops of one paper
    (re.compile(r"^(\d+)_\d+_\d+$"), r"\1"),                           # patient_study_image
    (re.compile(r"^(\d+)-\d+-\d+$"), r"\1"),
    (re.compile(r"^((?:1-s2\.0-)?s\d{10,}[0-9x]*).*$"), r"\1"),         # Elsevier article figures
    (re.compile(r"^((?:sars-)?10\.\d+[a-z]*\.\d+).*$"), r"\1"),         # RSNA article figures
    (re.compile(r"^((?:ncov-)?(?:radiol|ryct)\.\d+).*$"), r"\1"),
    (re.compile(r"^(nejm[a-z]*\d+).*$"), r"\1"),
    (re.compile(r"^((?:jkms|kjr)-\d+-e\d+).*$"), r"\1"),
    (re.compile(r"^([0-9a-f]{32})-.*$"), r"\1"),
    (re.compile(r"[-_ ](day|d)[-_ ]?\d+$"), ""),                           # follow-up films of one patient
    (re.compile(r"[-_ ](pa|ap|aps|supine|erect|l|lat|lateral|prior|later|on|admission|\d+-(hours|days))$"), ""),
    (re.compile(r"^(.*-\d+)-\d$"), r"\1"),                               # case-35-1, case-35-2
    (re.compile(r"[-_][a-h]\d?$"), ""),                                    # panels -a, -b, -a1 of one figure
)


def cohen_group(filename: str) -> str:
    """The patient (or source figure) a Cohen-subset file name points to: follow-up days, views and
    panels of one case share a group, so one patient is never in two folds. Where a name does not
    show it, the file is its own group; figures of one article are grouped (over-grouping only
    makes the folds stricter)."""
    name = Path(filename).stem.lower()
    for _ in range(6):
        previous = name
        for pattern, replacement in _GROUP_RULES:
            name = pattern.sub(replacement, name)
        if name == previous:
            break
    return name or Path(filename).stem.lower()


def _region_scores(row: dict[str, str], prefix: str, path: Path, line: int) -> list[int]:
    try:
        scores = [int(float(row[f"{prefix}-{region}"])) for region in brixia.REGIONS]
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"{path} line {line}: {prefix}-A..{prefix}-F must be scores 0-3 ({exc})") from None
    if min(scores) < 0 or max(scores) >= brixia.SCORE_LEVELS:
        raise SystemExit(f"{path} line {line}: {prefix} scores {scores} are not all 0-3")
    stated = str(row.get(f"{prefix}-Global", "")).strip()
    if stated and int(float(stated)) != sum(scores):
        raise SystemExit(f"{path} line {line}: {prefix}-Global {stated} is not the sum of {prefix}-A..F ({sum(scores)})")
    return scores


def is_cohen_annotations(path: str | Path) -> bool:
    """Whether a CSV is the Cohen subset's ``public-annotations.csv`` (comma-separated, S-/J- columns)."""
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline().strip().split(",")
    return "filename" in header and "S-A" in header


def read_cohen_annotations(path: str | Path, reader: str = "senior") -> list[dict[str, Any]]:
    """Rows of ``public-annotations.csv``: ``Filename``, ``senior`` and ``junior`` scores (six ints),
    ``target`` (what ``reader`` says: the senior's or junior's scores, or for ``mean`` the (6, 4)
    distribution half on each reader's score), ``scores`` = ``reference`` = the senior's (what
    metrics compare against), ``global``, ``Subject`` (``cohen_group``) and ``consensus`` False."""
    import pandas as pd

    if reader not in READERS:
        raise SystemExit(f"--reader must be one of {', '.join(READERS)}, not {reader!r}")
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    needed = {"filename"} | {f"S-{r}" for r in brixia.REGIONS} | {f"J-{r}" for r in brixia.REGIONS}
    missing = needed - set(table.columns)
    if missing:
        raise SystemExit(f"{path}: not the Cohen-subset public-annotations.csv; missing {', '.join(sorted(missing))}")
    rows = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        senior, junior = _region_scores(row, "S", path, line), _region_scores(row, "J", path, line)
        if reader == "mean":
            target = np.zeros((len(brixia.REGIONS), brixia.SCORE_LEVELS), dtype=np.float32)
            target[np.arange(len(senior)), senior] += 0.5
            target[np.arange(len(junior)), junior] += 0.5
            target = target.tolist()
        else:
            target = senior if reader == "senior" else junior
        rows.append({"Filename": row["filename"], "senior": senior, "junior": junior, "target": target,
                     "scores": senior, "reference": senior, "global": sum(senior),
                     "Subject": cohen_group(row["filename"]), "consensus": False})
    return rows


STRUCTURE_FOLDERS = {
    "right_lung": ("right_lung", "rightlung", "right", "rightmask", "right_mask", "right lung", "rl"),
    "left_lung": ("left_lung", "leftlung", "left", "leftmask", "left_mask", "left lung", "ll"),
    "heart": ("heart", "heartmask", "heart_mask", "h"),
}


@dataclass(frozen=True)
class MaskCase:
    """One image with its three structure masks."""
    stem: str
    image: Path | None
    masks: tuple[Path, Path, Path]


def structure_folders(masks_root: str | Path) -> dict[str, Path]:
    """The mask folder of each structure under ``masks_root`` (names matched case-insensitively)."""
    root = Path(masks_root)
    if not root.is_dir():
        raise SystemExit(f"mask folder {root} does not exist")
    children = {child.name.lower(): child for child in root.iterdir() if child.is_dir()}
    found, missing = {}, []
    for structure, names in STRUCTURE_FOLDERS.items():
        match = next((children[name] for name in names if name in children), None)
        if match is None:
            missing.append(f"{structure} (one of: {', '.join(names)})")
        else:
            found[structure] = match
    if missing:
        raise SystemExit(f"{root} needs one mask folder per structure; missing {'; '.join(missing)}. "
                         f"Found folders: {', '.join(sorted(children)) or 'none'}")
    return found


def find_mask_cases(masks_root: str | Path, images_root: str | Path | None = None) -> list[MaskCase]:
    """Stems that have all three masks (and an image, when ``images_root`` is given), sorted."""
    folders = structure_folders(masks_root)
    per_structure = [files_by_stem(folders[s]) for s in brixia.STRUCTURES]
    stems = set(per_structure[0]).intersection(*per_structure[1:])
    images = files_by_stem(Path(images_root)) if images_root is not None else None
    if images is not None:
        if not Path(images_root).is_dir():
            raise SystemExit(f"image folder {images_root} does not exist")
        stems &= set(images)
    if not stems:
        where = f" matching images in {images_root}" if images_root is not None else ""
        raise SystemExit(f"no image has all three masks (right_lung, left_lung, heart) under {masks_root}{where}")
    return [MaskCase(stem, images[stem] if images is not None else None,
                     tuple(files[stem] for files in per_structure)) for stem in sorted(stems)]
