"""Hand-bone segmentation (seed 003): the 29 classes, polygon/RLE/mask conversions, the one preprocessing, the smp network.

Everything the trainer and the daemon must agree on lives here, so that a model is fed the
same way when it learns, when it is validated and when it serves:

- ``CLASSES``: the seed's 29 labels in the seed's order (channel k of a model is CLASSES[k]).
- Masks are multilabel ``(29, H, W)`` booleans: bones overlap (the pisiform lies on the
  triquetrum), so every class has its own channel and a sigmoid, never a softmax.
- ``fit_to_model`` brings an image of any size and aspect ratio to the card's square model size
  (``resize``: stretch, or ``letterbox``: keep the aspect ratio and pad) and returns the
  ``Geometry`` that ``masks_at_input`` uses to map every output back to the input's own size.
- ``to_tensor`` is the normalisation (gray -> 3 channels, mean/std from the card). The seed
  normalised in training but not at inference; here there is only this one function.
- RLE as the competition: 1-based ``start length`` pairs over the row-major flattened mask.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import torch

from tasks import frames
from tasks.cards import CardError
from tasks.nets.smp_models import create_smp

# The model-frame geometry is shared with brixia (tasks/frames.py); handbone keeps its names.
DEFAULT_THRESHOLD, FITS, Geometry = frames.DEFAULT_THRESHOLD, frames.FITS, frames.Geometry
fit_to_model, fit_masks_to_model, model_geometry = frames.fit_to_model, frames.fit_masks_to_model, frames.model_geometry
masks_at_input, probabilities_at_input = frames.masks_at_input, frames.probabilities_at_input
dice_per_class = frames.dice_per_class

TASK = "handbone"
CLASSES = [
    "finger-1", "finger-2", "finger-3", "finger-4", "finger-5", "finger-6", "finger-7", "finger-8",
    "finger-9", "finger-10", "finger-11", "finger-12", "finger-13", "finger-14", "finger-15",
    "finger-16", "finger-17", "finger-18", "finger-19", "Trapezium", "Trapezoid", "Capitate",
    "Hamate", "Scaphoid", "Lunate", "Triquetrum", "Pisiform", "Radius", "Ulna",
]
# smp's names for the architectures the seed used; the key is what --arch accepts.
ARCHITECTURES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "fpn": "FPN",
                 "deeplabv3plus": "DeepLabV3Plus", "manet": "MAnet", "pan": "PAN"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- card records

def default_input_spec(size: int = 1024, fit: str = "letterbox") -> dict[str, Any]:
    """The card's ``input`` record: square model size, how inputs are fitted to it, normalisation."""
    if fit not in FITS:
        raise ValueError(f"input fit must be one of {', '.join(FITS)}, not {fit!r}")
    return {"size": [int(size), int(size)], "fit": fit, "channels": 3, "color": "gray->rgb",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pad_value": 0}


def default_architecture(arch: str = "unet", encoder: str = "resnet34", classes: int = len(CLASSES),
                         **options: Any) -> dict[str, Any]:
    """The card's ``architecture`` record: an smp architecture, its encoder and extra smp arguments.

    ``options`` go to ``smp.create_model`` as they are (e.g. ``encoder_depth``,
    ``decoder_channels`` for Unet). Encoder weights are never part of it: they come from the
    fold files.
    """
    key = arch.lower().replace("-", "").replace("_", "")
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    options = {k: v for k, v in options.items() if v is not None}
    if is_hrnet(encoder) and ARCHITECTURES[key] == "PAN":
        options.setdefault("encoder_output_stride", 32)  # smp's PAN default (16) dilates, HRNet cannot
    architecture = {"name": "smp", "arch": ARCHITECTURES[key], "encoder": encoder, "in_channels": 3,
                    "classes": int(classes), "options": options}
    check_encoder(architecture)
    return architecture


def is_hrnet(encoder: str) -> bool:
    """timm's HRNet encoders (``tu-hrnet_w18``, ``tu-hrnet_w18_small``, ``tu-hrnet_w48`` ...)."""
    return encoder.lower().removeprefix("tu-").startswith("hrnet")


def check_encoder(architecture: dict[str, Any]) -> None:
    """Refuse, saying why, what smp would only fail on with a bare ``AssertionError`` deep in timm.

    timm's HRNet has output stride 32 only (no dilation), while smp's DeepLabV3Plus needs an
    encoder output stride of 8 or 16 and PAN defaults to 16 (``default_architecture`` asks PAN
    for 32 with an HRNet). Unet, UnetPlusPlus, FPN and MAnet take HRNet as it is.
    """
    if not is_hrnet(architecture.get("encoder", "")):
        return
    arch, options = architecture.get("arch"), architecture.get("options") or {}
    if arch == "DeepLabV3Plus" or (arch == "PAN" and options.get("encoder_output_stride", 16) != 32):
        raise ValueError(f"{arch} needs a dilated encoder (output stride 8 or 16), which timm's HRNet "
                         f"({architecture['encoder']}) cannot be; use unet, unetplusplus, fpn, manet"
                         f"{'' if arch == 'DeepLabV3Plus' else ' or pan with encoder_output_stride 32'}")


def build_network(architecture: dict[str, Any], encoder_weights: str | None = None) -> torch.nn.Module:
    """An smp network as the card describes it (weights are loaded by the caller).

    ``encoder_weights="imagenet"`` is for training only; it downloads and fails offline, with a
    message that says what to do.
    """
    if architecture.get("name") != "smp":
        raise ValueError(f"handbone expects an smp architecture, got {architecture.get('name')!r}")
    check_encoder(architecture)
    return create_smp(architecture, encoder_weights)


def size_multiple(architecture: dict[str, Any]) -> int:
    """The input side must be a multiple of this (the encoder's total stride)."""
    return 2 ** int((architecture.get("options") or {}).get("encoder_depth", 5))


def check_model_size(size: int, architecture: dict[str, Any]) -> None:
    """Fail early, saying which sizes would work (smp only fails deep inside the forward)."""
    multiple = size_multiple(architecture)
    if size % multiple:
        lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
        raise ValueError(f"model size {size} is not a multiple of {multiple} (the encoder's stride); "
                         f"use {lower or upper} or {upper}")


# ---------------------------------------------------------------- annotations, masks, RLE, polygons

def annotation_masks(annotations: Iterable[dict[str, Any]], height: int, width: int,
                     classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Fill the polygons of a training JSON's ``annotations`` into a ``(len(classes), H, W)`` bool mask.

    A class may have several polygons (all are filled); labels outside ``classes`` are an error,
    so a typo in the data is loud rather than a silently empty channel.
    """
    index = {name: k for k, name in enumerate(classes)}
    masks = np.zeros((len(classes), height, width), dtype=np.uint8)
    for annotation in annotations:
        label = annotation.get("label")
        if label not in index:
            raise ValueError(f"unknown hand-bone label {label!r}; expected one of the 29 seed classes")
        points = np.rint(np.asarray(annotation["points"], dtype=np.float64)).astype(np.int32).reshape(-1, 2)
        if len(points):
            cv2.fillPoly(masks[index[label]], [points], 1)
    return masks.astype(bool)


def rle_encode(mask: np.ndarray) -> str:
    """Competition RLE of a 2-D mask: ``start length`` pairs, 1-based starts, row-major order."""
    pixels = np.concatenate([[0], np.asarray(mask, dtype=bool).ravel().view(np.uint8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The ``(H, W)`` bool mask of a competition RLE string (empty string: empty mask)."""
    numbers = np.asarray(rle.split(), dtype=np.int64)
    if len(numbers) % 2:
        raise ValueError("an RLE string holds start/length pairs; this one has an odd count")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if len(starts) and (starts.min() < 0 or (starts + lengths).max() > height * width):
        raise ValueError(f"RLE runs fall outside a {height}x{width} mask")
    edges = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    return (np.cumsum(edges[:-1]) > 0).reshape(height, width)


def rle_rows(image_name: str, masks: np.ndarray, classes: Sequence[str] = CLASSES) -> list[tuple[str, str, str]]:
    """The seed's CSV rows ``(image_name, class, rle)`` of one image: one per class, in class order."""
    return [(image_name, name, rle_encode(mask)) for name, mask in zip(classes, masks)]


SEED_CSV_HEADER = ("image_name", "class", "rle")


def seed_csv(rows: Iterable[tuple[str, str, str]]) -> str:
    """The seed's submission CSV text: header ``image_name,class,rle`` then ``rows`` (``rle_rows``); names
    with commas or quotes are quoted by the csv module, never split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SEED_CSV_HEADER)
    writer.writerows(rows)
    return buffer.getvalue()


def mask_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer contours of a 2-D mask as ``[[x, y], ...]`` polygons (pixel centres; 3 points or more).

    Filling them back with ``cv2.fillPoly`` gives the mask again (bones have no holes; specks
    smaller than a triangle are dropped).
    """
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [contour.reshape(-1, 2).tolist() for contour in contours if len(contour) >= 3]


def polygon_annotations(masks: np.ndarray, classes: Sequence[str] = CLASSES) -> list[dict[str, Any]]:
    """Masks -> the training JSON's ``annotations`` list (one entry per connected piece of a bone)."""
    annotations = []
    for name, mask in zip(classes, masks):
        for points in mask_polygons(mask):
            annotations.append({"id": f"{name}-{len(annotations)}", "type": "poly_seg", "attributes": {},
                                "points": points, "label": name})
    return annotations


# ---------------------------------------------------------------- the one preprocessing

def to_tensor(gray_model: np.ndarray, input_spec: dict[str, Any]) -> torch.Tensor:
    """uint8 (S, S) at model size -> normalised float tensor (3, S, S): the only normalisation there is."""
    x = torch.from_numpy(np.ascontiguousarray(gray_model, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0).expand(int(input_spec.get("channels", 3)), -1, -1)
    channels = x.shape[0]
    mean = torch.tensor(input_spec["mean"][:channels], dtype=torch.float32).view(channels, 1, 1)
    std = torch.tensor(input_spec["std"][:channels], dtype=torch.float32).view(channels, 1, 1)
    return ((x - mean) / std).contiguous()


def is_fraction(value: Any) -> bool:
    """A number from 0 to 1 (JSON's true/false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def card_threshold(card: dict[str, Any]) -> float:
    """The probability above which a pixel is bone, as a card records it (``output.threshold``, what its
    trainer validated with; 0.5 for cards without one); CardError when it is not a number in [0, 1]."""
    threshold = (card.get("output") or {}).get("threshold", DEFAULT_THRESHOLD)
    if not is_fraction(threshold):
        raise CardError(f"output.threshold must be a number from 0 to 1 (got {threshold!r})")
    return float(threshold)


def preprocess(gray: np.ndarray, input_spec: dict[str, Any]) -> tuple[torch.Tensor, Geometry]:
    """8-bit gray image -> (network input (3, S, S), Geometry back to the input)."""
    frame, geometry = fit_to_model(gray, input_spec)
    return to_tensor(frame, input_spec), geometry


def fold_probabilities(networks: Sequence[torch.nn.Module], inputs: torch.Tensor,
                       flip: bool | Sequence[bool] = False) -> Iterable[torch.Tensor]:
    """Each network's sigmoid probability ``(B, C, S, S)`` in turn, averaged with a horizontally flipped
    pass for the batch rows where ``flip`` is true (test-time augmentation; flipped back)."""
    rows = [bool(flip)] * len(inputs) if isinstance(flip, bool) else [bool(f) for f in flip]
    for network in networks:
        probabilities = torch.sigmoid(network(inputs).float())
        if any(rows):
            chosen = torch.tensor(rows, device=inputs.device)
            flipped = torch.sigmoid(network(inputs[chosen].flip(-1)).float()).flip(-1)
            probabilities[chosen] = (probabilities[chosen] + flipped) / 2
        yield probabilities


@torch.inference_mode()
def ensemble_probabilities(networks: Sequence[torch.nn.Module], inputs: torch.Tensor,
                           flip: bool | Sequence[bool] = False) -> torch.Tensor:
    """Mean sigmoid probability ``(B, C, S, S)`` over ``networks`` (``fold_probabilities``, optional flip TTA)."""
    total = None
    for probabilities in fold_probabilities(networks, inputs, flip):
        total = probabilities if total is None else total + probabilities
    return total / len(networks)


# ---------------------------------------------------------------- quality measures

def quality_measures(masks: np.ndarray, geometry: Geometry, classes: Sequence[str],
                     min_piece_fraction: float) -> dict[str, float]:
    """What the hand-bone quality check (``tasks.quality``) measures of ``(C, S, S)`` bool masks in the
    model frame: how many bones were found, and per bone the pieces its mask falls into (8-connected,
    ignoring specks under ``min_piece_fraction`` of the image) and its area as a fraction of the image
    (the letterbox's inside, so any input size compares with training)."""
    inner = masks[:, geometry.top:geometry.top + geometry.inner_height,
                  geometry.left:geometry.left + geometry.inner_width]
    image_area = float(geometry.inner_height * geometry.inner_width)
    smallest = min_piece_fraction * image_area
    measures: dict[str, float] = {}
    found = 0
    for name, mask in zip(classes, inner):
        area = int(np.count_nonzero(mask))
        pieces = 0
        if area:
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            pieces = int(np.count_nonzero(stats[1:count, cv2.CC_STAT_AREA] >= smallest))
        found += pieces > 0
        measures[f"pieces.{name}"] = float(pieces)
        measures[f"area.{name}"] = area / image_area
    measures["bones_found"] = float(found)
    return measures


def quality_labels(classes: Sequence[str]) -> dict[str, str]:
    """How a quality reason names each measure."""
    labels = {"bones_found": "bones found"}
    for name in classes:
        labels[f"pieces.{name}"] = f"{name}: pieces"
        labels[f"area.{name}"] = f"{name}: area (fraction of the image)"
    return labels
