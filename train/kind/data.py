"""Image-kind training data: the kinds layout (``<kind>/<file>`` + ``manifest.csv``), task phantoms, plain
images, and the training augmentations.

Every image belongs to a source family (the manifest's repository owner: one clinic, one
scanner, crops of one photo stay together; ``phantom-<task>`` for each task's phantoms;
``plain`` for the generated blank/noise images), and folds are grouped by it, so the out-of-fold
figures say how the model does on a source it has never seen. Images are read once through
``tasks.imaging`` and shrunk (``tasks.kind.shrunk``, the serving step); augmentations work on
that, then ``tasks.kind`` letterboxes and normalises exactly as the daemon does.
"""
from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import cv2
import numpy as np
import torch

from tasks import kind
from tasks.imaging import ImageReadError, decode_image, is_image_file
from train.core.samples import FoldSamples

MANIFEST = "manifest.csv"
# Where each task's phantom generator (train.synthetic) puts its images (masks live elsewhere).
PHANTOM_IMAGES = {"osteo": ("C1", "C3"), "brixia": ("images",), "handbone": ("DCM",), "scar": ("images",)}
PLAIN_FAMILY = "plain"


@dataclass
class KindItem:
    """One training image: its name (unique, relative), file, kind, source family and licence."""
    item: str
    path: Path
    kind: str
    family: str
    source: str
    licence: str
    real: bool
    extra: bool = False  # from an --extra folder, not the manifest


def family_of(repository: str) -> str:
    """The source family of a manifest row: the repository owner (``uwm-bigdata/wound-segmentation`` and
    ``uwm-bigdata/wound-classification...`` are one clinic's photos)."""
    return repository.strip().split("/")[0] or repository


def read_kinds(root: str | Path) -> list[KindItem]:
    """Every file listed in ``root/manifest.csv`` (columns ``file, kind, source_repo, license``)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{root} needs {MANIFEST} (file, kind, source_repo, license) beside the <kind>/ folders")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        need = {"file", "kind", "source_repo", "license"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise SystemExit(f"{path} needs the columns {', '.join(sorted(need))} (found {reader.fieldnames})")
        rows = list(reader)
    items, problems = [], []
    for row in rows:
        name, label = row["file"].strip(), row["kind"].strip()
        if label not in kind.KINDS:
            problems.append(f"{name}: unknown kind {label!r}")
        elif not (root / name).is_file():
            problems.append(f"{name}: file missing")
        else:
            items.append(KindItem(name, root / name, label, family_of(row["source_repo"]), row["source_repo"].strip(),
                                  row["license"].strip(), True))
    if problems:
        raise SystemExit(f"{path}: {len(problems)} bad row(s), e.g. {problems[:3]}")
    if not items:
        raise SystemExit(f"{path} lists no images")
    return items


@dataclass(frozen=True)
class ExtraFolder:
    """An ``--extra KIND=PATH[:FAMILY[:LICENCE]]`` folder: images of one kind from one source family."""
    kind: str
    pattern: str
    family: str
    licence: str


def parse_extra(spec: str) -> ExtraFolder:
    """``KIND=PATH[:FAMILY[:LICENCE]]`` -> ExtraFolder. PATH may hold glob patterns (``Train/*/images``); FAMILY
    defaults to the last plain folder name of PATH; LICENCE (may hold colons) to ``unstated``."""
    label, sep, rest = spec.partition("=")
    if not sep or label not in kind.KINDS or not rest:
        raise SystemExit(f"--extra {spec!r}: expected KIND=PATH[:FAMILY[:LICENCE]] with KIND one of {kind.KINDS}")
    pattern, _, tail = rest.partition(":")
    family, _, licence = tail.partition(":")
    if not family:
        plain = [part for part in Path(pattern).parts if not glob.has_magic(part)]
        family = plain[-1] if plain else pattern
    return ExtraFolder(label, pattern, family.strip(), licence.strip() or "unstated")


def _thumbnail(path: Path) -> np.ndarray:
    """A 24x24 gray thumbnail of the image's centre square, zero mean, unit norm: near-duplicates (the same
    film resized, recompressed or re-windowed by another collection) correlate above ``DUPLICATE_AT``."""
    pixels = decode_image(path).pixels
    gray = cv2.cvtColor(pixels[:, :, :3], cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels
    height, width = gray.shape
    side = min(height, width)
    square = gray[(height - side) // 2:(height - side) // 2 + side, (width - side) // 2:(width - side) // 2 + side]
    small = cv2.resize(np.ascontiguousarray(square), (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    small -= small.mean()
    return small / (np.linalg.norm(small) + 1e-6)


DUPLICATE_AT = 0.95  # two distinct JSRT films rarely reach it; the same film in two collections is above 0.98


def extra_items(folders: list[ExtraFolder], taken: list[KindItem], limit: int, seed: int) -> tuple[list[KindItem],
                                                                                                   list[dict[str, Any]]]:
    """At most ``limit`` images of each extra folder, drawn at random (``seed``), skipping any that nearly
    duplicates an image already taken (the manifest's, earlier draws'): a film two collections share
    must not sit in two folds. Returns the items and, per folder, what was found, skipped and taken."""
    rng = np.random.default_rng(seed)
    thumbs = [_thumbnail(item.path) for item in taken if item.real]
    bank = np.stack(thumbs) if thumbs else np.zeros((0, 576), np.float32)
    items, report = [], []
    for folder in folders:
        folders_found = [Path(p) for p in glob.glob(folder.pattern, recursive=True) if Path(p).is_dir()]
        paths = sorted({f for d in folders_found for f in d.rglob("*") if f.is_file() and is_image_file(f)})
        if not paths:
            raise SystemExit(f"--extra {folder.kind}={folder.pattern}: no image files found")
        chosen, duplicates = [], 0
        for position in rng.permutation(len(paths)):
            if len(chosen) >= limit:
                break
            path = paths[int(position)]
            thumb = _thumbnail(path)
            if len(bank) and float((bank @ thumb).max()) >= DUPLICATE_AT:
                duplicates += 1
                continue
            bank = np.concatenate([bank, thumb[None]])
            chosen.append(path)
        for path in sorted(chosen):
            name = f"extra/{folder.family}/{folder.kind}/{_relative(path, folder.pattern)}"
            items.append(KindItem(name, path, folder.kind, folder.family, folder.pattern, folder.licence, True, True))
        report.append({"kind": folder.kind, "path": folder.pattern, "family": folder.family,
                       "licence": folder.licence, "found": len(paths), "near_duplicates_skipped": duplicates,
                       "taken": len(chosen), "limit": limit})
    return items, report


def _relative(path: Path, pattern: str) -> str:
    """``path`` relative to the part of ``pattern`` before its first glob (its own name when outside it)."""
    parts = Path(pattern).parts
    head = Path(*parts[:next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))] or ["."])
    try:
        return path.relative_to(head).as_posix()
    except ValueError:
        return path.name


def write_phantoms(folder: Path, n: int, seed: int) -> dict[str, Path]:
    """``n`` phantoms of every task (``train.synthetic``) under ``folder/<task>/``; reused when already there."""
    from train.synthetic import generate

    written = {}
    for task in PHANTOM_IMAGES:
        out = folder / task
        note = out / "synthetic.json"
        wanted = {"n": n, "seed": seed}
        if not (note.is_file() and json.loads(note.read_text(encoding="utf-8")).get("kind_request") == wanted):
            generate(task, out, n, seed=seed)
            record = json.loads(note.read_text(encoding="utf-8"))
            note.write_text(json.dumps({**record, "kind_request": wanted}), encoding="utf-8")
        written[task] = out
    return written


def phantom_items(folders: Mapping[str, Path], root: Path) -> list[KindItem]:
    """The phantom images of each task, labelled with the kind that task takes."""
    items = []
    for task, folder in folders.items():
        for sub in PHANTOM_IMAGES[task]:
            for path in sorted(p for p in (folder / sub).rglob("*") if is_image_file(p)):
                items.append(KindItem(path.relative_to(root).as_posix(), path, kind.TASK_KINDS[task], f"phantom-{task}",
                                      f"train.synthetic {task}", "synthetic (this project)", False))
    return items


def _plain_picture(k: int, rng: np.random.Generator) -> np.ndarray:
    """Picture ``k`` of the plain set: flat, gradient, noise, stripes, or (every other one) bright smooth
    blobs with a texture on a dark ground, the look of a slice or a scan that is no radiograph we serve."""
    height, width = (int(v) for v in rng.integers(64, 400, size=2))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    style = k % 8
    if style == 0:
        image = np.full((height, width), rng.integers(0, 256), np.float32)
    elif style == 2:
        angle = rng.uniform(0, np.pi)
        image = (np.cos(angle) * xx / width + np.sin(angle) * yy / height) * rng.uniform(80, 255)
    elif style == 4:
        image = rng.normal(rng.uniform(40, 210), rng.uniform(5, 80), size=(height, width))
    elif style == 6:
        period = rng.uniform(4, 40)
        image = 127 + 120 * np.sign(np.sin(2 * np.pi * (xx if k % 16 < 8 else yy) / period))
    else:
        image = np.zeros((height, width), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
            ry, rx = rng.uniform(0.1, 0.45) * height, rng.uniform(0.1, 0.45) * width
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0),
                                       float(rng.uniform(1, 6)))
            texture /= texture.std() + 1e-6
            ring = rng.uniform(0, 1) < 0.4  # a bright rim, as a skull or a body outline in a slice
            level = rng.uniform(80, 230) + 40 * texture
            shape = (inside < 1) & ((inside > 0.8) if ring else True)
            image = np.where(shape, np.maximum(image, level), image)
        image = cv2.GaussianBlur(image, (0, 0), 1.0) + rng.normal(0, 4, (height, width))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if style not in (1, 3, 5, 7) and rng.random() < 0.5:
        image = np.clip(image[:, :, None] * rng.uniform(0.3, 1.2, size=3), 0, 255).astype(np.uint8)
    return image


def write_plain_images(folder: Path, n: int, seed: int) -> list[KindItem]:
    """``n`` images that are no served kind at all, kind ``other``: flat, gradients, noise, stripes (gray and
    colour), and textured blobs on dark grounds, so a blank file or another modality passes as nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        image = _plain_picture(k, rng)
        path = folder / f"plain_{k:03d}.png"
        cv2.imwrite(str(path), image if image.ndim == 2 else image[:, :, ::-1])
        items.append(KindItem(path.relative_to(folder.parent).as_posix(), path, "other", PLAIN_FAMILY,
                              "generated (train.kind.data.write_plain_images)", "synthetic (this project)", False))
    return items


def shrunk_image(path: Path, input_spec: Mapping[str, Any]) -> np.ndarray:
    """A training image as the daemon decodes it, after the serving shrink step (what the cache keeps)."""
    try:
        pixels = decode_image(path).pixels
    except ImageReadError as exc:
        raise SystemExit(f"cannot read training image {path}: {exc}") from exc
    return np.ascontiguousarray(kind.shrunk(pixels, input_spec))


# ---------------------------------------------------------------- augmentation

class _Draws:
    """Uniform [0, 1) numbers from a torch generator, drawn in blocks as an augmentation needs them."""

    def __init__(self, generator: torch.Generator | None):
        self.generator, self.block = generator, []

    def __call__(self) -> float:
        if not self.block:
            self.block = torch.rand(64, generator=self.generator).tolist()
        return self.block.pop()


def _rotated(image: np.ndarray, angle: float) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _text(image: np.ndarray, rand: Callable[[], float]) -> None:
    height, width = image.shape[:2]
    letters = "ABCDEFGHIJKLMNOPRSTUVWXYZ0123456789 :/-"
    label = "".join(letters[int(rand() * len(letters))] for _ in range(3 + int(rand() * 10)))
    scale = max(0.25, min(height, width) / 300 * (0.5 + rand()))
    shade = 255 if rand() < 0.7 else 0
    colour = (shade,) * (3 if image.ndim == 3 else 1)
    cv2.putText(image, label, (int(rand() * width * 0.6), int(height * (0.1 + 0.85 * rand()))),
                cv2.FONT_HERSHEY_SIMPLEX, scale, colour, max(1, int(scale * 2)), cv2.LINE_AA)


def _jigsaw(image: np.ndarray, rand: Callable[[], float]) -> np.ndarray:
    """The image cut into a 3x3 or 4x4 grid and its tiles shuffled: the texture and grey levels of a
    radiograph without its anatomy."""
    tiles = 3 + int(rand() * 2)
    height, width = image.shape[0] // tiles * tiles, image.shape[1] // tiles * tiles
    image = image[:height, :width]
    th, tw = height // tiles, width // tiles
    pieces = [image[r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(tiles) for c in range(tiles)]
    order = sorted(range(len(pieces)), key=lambda _: rand())
    rows = [np.concatenate([pieces[order[r * tiles + c]] for c in range(tiles)], axis=1) for r in range(tiles)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def _on_ground(image: np.ndarray, rand: Callable[[], float]) -> np.ndarray:
    """A photo shrunk onto a plain, gradient or speckled coloured ground (a sheet, a wall, a floor), as
    clinical photos show the body part with what lies around it."""
    height, width = image.shape[:2]
    colour = np.array([40 + 200 * rand() for _ in range(3)], np.float32)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    ground = colour * (0.7 + 0.5 * yy * rand()) + np.float32(25 * rand())
    ground = np.clip(ground + np.zeros((height, width, 3), np.float32), 0, 255).astype(np.uint8)
    scale = 0.45 + 0.4 * rand()
    h, w = max(8, int(height * scale)), max(8, int(width * scale))
    small = cv2.resize(image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2), (w, h),
                       interpolation=cv2.INTER_AREA)
    top, left = int((height - h) * rand()), int((width - w) * rand())
    ground[top:top + h, left:left + w] = small
    return ground


def _in_scene(image: np.ndarray, scene: np.ndarray, rand: Callable[[], float]) -> np.ndarray:
    """A photo laid into another picture of the training fold's ``other`` images (a room, a street, a
    desk) through a soft oval or as a rectangle: a foot or leg photographed with the room around it
    is still a skin photo, and the skin, not the whole frame, has to say so."""
    scene = np.array(scene if scene.ndim == 3 else np.repeat(scene[:, :, None], 3, axis=2), dtype=np.float32)
    height, width = scene.shape[:2]
    h = max(8, min(height, int(height * (0.35 + 0.5 * rand()))))
    w = max(8, min(width, int(width * (0.3 + 0.6 * rand()))))
    photo = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    small = cv2.resize(np.ascontiguousarray(photo), (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    if rand() < 0.7:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        alpha = ((((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2) < 1).astype(np.float32)
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, 0.06 * min(h, w)))[:, :, None]
    else:
        alpha = np.ones((h, w, 1), np.float32)
    top, left = int((height - h) * rand()), int((width - w) * rand())
    window = scene[top:top + h, left:left + w]
    scene[top:top + h, left:left + w] = alpha * small + (1 - alpha) * window
    return np.clip(scene, 0, 255).astype(np.uint8)


def _black_bars(image: np.ndarray, rand: Callable[[], float]) -> np.ndarray:
    """Black bars on two opposite sides, as files that were letterboxed before they reached us."""
    height, width = image.shape[:2]
    if rand() < 0.5:
        pad = int(width * 0.25 * rand())
        widths = ((0, 0), (pad, pad))
    else:
        pad = int(height * 0.25 * rand())
        widths = ((pad, pad), (0, 0))
    return np.pad(image, widths + (((0, 0),) if image.ndim == 3 else ()))


def augmented(image: np.ndarray, label: str, generator: torch.Generator | None, scene: np.ndarray | None = None,
              scene_p: float = 0.0) -> tuple[np.ndarray, str]:
    """One random training view of a shrunk image and its kind: the kind must survive every step,
    except the one that is meant to destroy it.

    Radiographs of a served kind become ``other`` with p 0.08 by a tile shuffle (``_jigsaw``): the
    model must know a hand by its fingers, not by bright bone on a dark ground. Photos are put on
    a coloured ground with p 0.3 (``_on_ground``), else, when a ``scene`` (an ``other`` image of the
    fold) is given, laid into it with p ``scene_p`` (``_in_scene``); colour ``other`` images turn gray
    with p 0.3 (gray is not enough to be a radiograph); any image gets black bars with p 0.15.

    Geometry: flips; rotation +-15 degrees (p 0.5); hands, photos and others also any quarter
    turn (films and photos of them are taken in every orientation); a crop keeping 80-100 % of
    each side. Look: brightness, contrast and gamma; colour jitter of photos, a faint tint of
    gray films (scanned films are never perfectly gray); blur, noise, JPEG compression; burned-in
    text and anonymisation boxes, as real files carry.
    """
    rand = _Draws(generator)
    image = np.ascontiguousarray(image)
    if label in ("panoramic", "chest", "hand") and rand() < 0.08:
        image, label = _jigsaw(image, rand), "other"
    elif label == "photo" and rand() < 0.3:
        image = _on_ground(image, rand)
    elif label == "photo" and scene is not None and rand() < scene_p:
        image = _in_scene(image, scene, rand)
    elif label == "other" and image.ndim == 3 and rand() < 0.3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # a gray scene or scan is still no radiograph we serve
    if rand() < 0.15:
        image = _black_bars(image, rand)
    if rand() < 0.5:
        image = image[:, ::-1]
    if label in ("hand", "photo", "other"):
        if rand() < 0.5:
            image = np.rot90(image, k=1 + int(rand() * 3))
        if rand() < 0.3:
            image = image[::-1]
    image = np.ascontiguousarray(image)
    if rand() < 0.5:
        image = _rotated(image, (rand() * 2 - 1) * 15)
    height, width = image.shape[:2]
    crop_h, crop_w = int(height * (0.8 + 0.2 * rand())), int(width * (0.8 + 0.2 * rand()))
    top, left = int((height - crop_h) * rand()), int((width - crop_w) * rand())
    image = np.ascontiguousarray(image[top:top + crop_h, left:left + crop_w])
    values = image.astype(np.float32) / 255.0
    if rand() < 0.8:
        values = (values - 0.5) * (0.7 + 0.6 * rand()) + 0.5 + (rand() * 2 - 1) * 0.12
        values = np.clip(values, 0, 1) ** (0.7 + 0.7 * rand())
    if values.ndim == 3 and rand() < 0.4:
        gray = values.mean(axis=2, keepdims=True)
        values = gray + (values - gray) * (0.6 + 0.8 * rand()) * np.array([0.9 + 0.2 * rand() for _ in range(3)])
    elif values.ndim == 2 and rand() < 0.15:
        values = values[:, :, None] * np.array([0.92 + 0.08 * rand() for _ in range(3)], np.float32)
    if rand() < 0.2:
        values = cv2.GaussianBlur(values, (0, 0), 0.4 + 1.2 * rand())
    if rand() < 0.3:
        noise = torch.randn(values.shape, generator=generator).numpy() * (0.01 + 0.03 * rand())
        values = values + noise
    image = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    for _ in range(2):
        if rand() < 0.2:
            h, w = image.shape[:2]
            bh, bw = max(2, int(h * (0.04 + 0.12 * rand()))), max(2, int(w * (0.06 + 0.2 * rand())))
            y, x = int((h - bh) * rand()), int((w - bw) * rand())
            image[y:y + bh, x:x + bw] = 0 if rand() < 0.6 else 255
        if rand() < 0.25:
            _text(image, rand)
    if rand() < 0.2:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(30 + 60 * rand())])
        if ok:
            image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(image), label


class KindImages(FoldSamples):
    """Items -> (kind network input (4, S, S), kind index, item index)."""

    def __init__(self, pixels: Callable[[int], np.ndarray], labels: list[str], indices: list[int],
                 input_spec: Mapping[str, Any], train: bool, seed: int | None = None, scene_p: float = 0.0,
                 scenes: list[int] | None = None):
        super().__init__(indices, train, seed)
        self.pixels, self.labels, self.input_spec = pixels, labels, input_spec
        # Photos are laid into the fold's own colour "other" pictures (``scenes``: the indices that may serve).
        allowed = set(self.indices) if scenes is None else set(scenes) & set(self.indices)
        self.scene_p, self.scenes = scene_p, sorted(i for i in allowed if labels[i] == "other")

    def __getitem__(self, position: int):
        index = self.indices[position]
        image, label = self.pixels(index), self.labels[index]
        if self.train:
            generator = self.rng()
            scene = None
            if label == "photo" and self.scene_p > 0 and self.scenes:
                scene = self.pixels(self.scenes[int(torch.randint(len(self.scenes), (1,), generator=generator))])
                scene = scene if scene.ndim == 3 else None  # a gray slice or film is no room to photograph in
            image, label = augmented(image, label, generator, scene, self.scene_p)
        frame, inside = kind.letterboxed(image, self.input_spec)
        return kind.to_tensor(frame, inside, self.input_spec), kind.KINDS.index(label), index
