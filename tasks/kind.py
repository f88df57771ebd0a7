"""What kind of image this is: panoramic dental X-ray, frontal chest X-ray, hand X-ray, skin or wound photo, other.

The image-kind model guards every task: it is fed the image as stored (gray or RGB, any size)
and answers one of ``KINDS``. Everything the trainer (``train/kind/trainer.py``) and the daemon's gate
must agree on is here: the labels, which kind each task takes, the network and the one
preprocessing:

- ``shrunk``: INTER_AREA down to at most twice the model side (the trainer caches this step and
  augments after it, the daemon runs it on the decoded image);
- ``letterboxed``: the aspect ratio is kept (a panoramic is ~2:1, a chest film ~1:1, a hand
  ~3:4) by fitting the image into the square frame and padding; a fourth channel marks the
  inside, so black padding cannot be mistaken for black image;
- ``to_tensor``: RGB (gray repeated) + inside mask, normalised. Colour is kept: it is what tells
  a photo from a radiograph.

``dicom_contradiction`` reads the DICOM attributes (Modality, BodyPartExamined, ViewPosition) a
file carries: a lateral chest film is not a frontal one, an MR or CT slice is none of the kinds.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from tasks import frames

TASK = "kind"
KINDS = ["panoramic", "chest", "hand", "photo", "other"]
DESCRIPTIONS = {
    "panoramic": "a panoramic dental X-ray",
    "chest": "a frontal chest X-ray",
    "hand": "a hand X-ray",
    "photo": "a skin or wound photo",
    "other": "none of the served kinds",
}
# The kind of image each task was made for.
TASK_KINDS = {"osteo": "panoramic", "brixia": "chest", "handbone": "hand", "scar": "photo"}
INPUT_SIZE = 112
WIDTHS = (8, 16, 32, 64, 128)

# DICOM Modality (PS3.3 C.7.3.1.1.1) -> the kinds an image of that equipment can be. Radiography
# can be any X-ray kind; PX is the panoramic modality; XC/VL are visible-light photography.
# Values not listed (OT, SC, vendor strings ...) say nothing.
_XRAY = frozenset({"panoramic", "chest", "hand"})
_NONE = frozenset({"other"})
MODALITY_KINDS = {
    "CR": _XRAY, "DX": _XRAY, "DR": _XRAY, "RG": _XRAY, "PX": frozenset({"panoramic"}),
    "XC": frozenset({"photo"}), "VL": frozenset({"photo"}), "GM": frozenset({"photo"}),
    **{modality: _NONE for modality in ("CT", "MR", "US", "NM", "PT", "MG", "XA", "RF", "IO", "OP", "OPT", "OCT",
                                        "ES", "SM", "BMD", "IVUS", "ECG", "EPS", "HD", "RTIMAGE", "PET", "MRI")},
}
# BodyPartExamined (PS3.16 CID 4031 code meanings and their common short forms) -> kinds.
# Head, skull and unknown values say nothing: panoramic studies are filed under either.
BODY_PART_KINDS = {
    **{part: frozenset({"chest"}) for part in ("CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG")},
    **{part: frozenset({"hand"}) for part in ("HAND", "HANDS", "FINGER", "FINGERS", "WRIST_HAND", "HAND_WRIST")},
    **{part: frozenset({"panoramic"}) for part in ("JAW", "MANDIBLE", "MAXILLA", "TEETH", "TOOTH", "DENTAL",
                                                   "MOUTH", "JAW_REGION", "DENTITION")},
    "SKIN": frozenset({"photo"}),
    **{part: _NONE for part in ("KNEE", "PELVIS", "HIP", "SPINE", "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "BRAIN",
                                "BREAST", "FOOT", "ANKLE", "SHOULDER", "ELBOW", "LEG", "ARM", "FEMUR", "TIBIA",
                                "HUMERUS", "FOREARM", "HEART", "EYE", "PROSTATE", "LIVER", "KIDNEY")},
}
# ViewPosition (PS3.3 C.8.11.5.1.1): lateral projections; a frontal chest is PA or AP.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL", "LLO", "RLO"})


def default_input_spec(size: int = INPUT_SIZE) -> dict[str, Any]:
    """The card's ``input`` record: square side, letterbox fit, RGB + inside channel, normalisation."""
    return {"size": [int(size), int(size)], "fit": "letterbox", "channels": 4, "color": "rgb+inside",
            "shrink": "INTER_AREA to at most twice the side first (from over 4x: bilinear to 4x, then area)",
            "pad_value": 0,
            "mean": [0.5, 0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25, 0.5]}


def default_architecture(widths: Sequence[int] = WIDTHS, dropout: float = 0.2) -> dict[str, Any]:
    """The card's ``architecture`` record of the small kind CNN."""
    return {"name": "kind-cnn", "in_channels": 4, "widths": [int(w) for w in widths], "dropout": float(dropout),
            "num_classes": len(KINDS)}


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class KindNet(nn.Module):
    """Plain strided 3x3 convolutions (a stride-2 stage then a stride-1 conv per width), average
    and max pooling side by side (a small bright object matters as much as the overall look), one
    linear layer."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = _conv(in_channels, widths[0], 2)
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += _conv(cin, cout, 2) + _conv(cout, cout, 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * widths[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


class FoldEnsemble(nn.Module):
    """Several trained ``KindNet`` folds as one network of grouped convolutions, BatchNorm folded into
    them: the same logits ``(B, folds, classes)`` as running each fold, in a fifth of the operator
    calls (a network this small at batch 1 costs its calls, not its arithmetic)."""

    def __init__(self, networks: Sequence[KindNet]):
        super().__init__()
        self.folds = len(networks)
        convs = [[m for m in net.features if isinstance(m, nn.Conv2d)] for net in networks]
        norms = [[m for m in net.features if isinstance(m, nn.BatchNorm2d)] for net in networks]
        layers: list[nn.Module] = []
        for depth, first in enumerate(convs[0]):
            groups = 1 if depth == 0 else self.folds
            conv = nn.Conv2d(first.in_channels * (groups if depth else 1), first.out_channels * self.folds, 3,
                             stride=first.stride, padding=1, groups=groups, bias=True)
            weights, biases = [], []
            for fold in range(self.folds):
                norm = norms[fold][depth]
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                weights.append(convs[fold][depth].weight * scale.view(-1, 1, 1, 1))
                biases.append(norm.bias - norm.running_mean * scale)
            conv.weight.data.copy_(torch.cat(weights))
            conv.bias.data.copy_(torch.cat(biases))
            layers += [conv, nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        heads = [net.head[-1] for net in networks]
        self.head = nn.Conv2d(heads[0].in_features * self.folds, heads[0].out_features * self.folds, 1,
                              groups=self.folds)
        self.head.weight.data.copy_(torch.cat([h.weight for h in heads]).view(*self.head.weight.shape))
        self.head.bias.data.copy_(torch.cat([h.bias for h in heads]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        batch = x.shape[0]
        mean = x.mean(dim=(2, 3)).view(batch, self.folds, -1)
        peak = x.amax(dim=(2, 3)).view(batch, self.folds, -1)
        pooled = torch.cat([mean, peak], dim=2).reshape(batch, -1, 1, 1)
        return self.head(pooled).view(batch, self.folds, -1)


@torch.no_grad()
def fold_ensemble(networks: Sequence[nn.Module]) -> FoldEnsemble:
    """The eval-mode ``FoldEnsemble`` of trained fold networks (for serving; not trainable)."""
    return FoldEnsemble([network.eval() for network in networks]).eval()


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """An untrained kind network as the card describes it."""
    if architecture.get("name") != "kind-cnn":
        raise ValueError(f"the kind model expects a kind-cnn architecture, got {architecture.get('name')!r}")
    return KindNet(int(architecture["in_channels"]), list(architecture["widths"]), int(architecture["num_classes"]),
                   float(architecture.get("dropout", 0.0)))


# ---------------------------------------------------------------- the one preprocessing

def shrunk(pixels: np.ndarray, input_spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 gray or RGB image -> the same, area-averaged so its longest side is at most twice the model
    side (an image already that small is returned as it is). An image over four times that is first
    brought to four times by bilinear sampling: the area average that follows removes what the
    sampling folds down at this scale, and a 12-megapixel photo costs ~2 ms instead of ~8."""
    limit = 2 * int(input_spec["size"][0])
    height, width = pixels.shape[:2]
    if max(height, width) <= limit:
        return pixels
    pixels = np.ascontiguousarray(pixels)
    if max(height, width) > 4 * limit:
        scale = 2 * limit / max(height, width)
        height, width = max(1, round(height * scale)) * 2, max(1, round(width * scale)) * 2
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    scale = limit / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def letterboxed(pixels: np.ndarray, input_spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 gray or RGB image -> (RGB frame (S, S, 3) uint8, inside mask (S, S) bool), aspect kept."""
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
    geometry = frames.model_geometry(*rgb.shape[:2], dict(input_spec, fit="letterbox"))
    frame = np.full((geometry.size, geometry.size, 3), int(input_spec.get("pad_value", 0)), dtype=np.uint8)
    inside = np.zeros((geometry.size, geometry.size), dtype=bool)
    rows = slice(geometry.top, geometry.top + geometry.inner_height)
    cols = slice(geometry.left, geometry.left + geometry.inner_width)
    shrinking = geometry.inner_width * geometry.inner_height < rgb.shape[0] * rgb.shape[1]
    frame[rows, cols] = cv2.resize(np.ascontiguousarray(rgb), (geometry.inner_width, geometry.inner_height),
                                   interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    inside[rows, cols] = True
    return frame, inside


def to_tensor(frame: np.ndarray, inside: np.ndarray, input_spec: Mapping[str, Any]) -> torch.Tensor:
    """(S, S, 3) uint8 frame + (S, S) inside mask -> normalised float tensor (4, S, S)."""
    x = np.concatenate([frame.astype(np.float32) / 255.0, inside[:, :, None].astype(np.float32)], axis=2)
    mean = np.asarray(input_spec["mean"], dtype=np.float32)
    std = np.asarray(input_spec["std"], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1)))


def preprocess(pixels: np.ndarray, input_spec: Mapping[str, Any]) -> torch.Tensor:
    """An image as decoded (``tasks.imaging.decode_image(...).pixels``) -> the kind network's input (4, S, S)."""
    return to_tensor(*letterboxed(shrunk(pixels, input_spec), input_spec), input_spec)


# ---------------------------------------------------------------- DICOM attributes

def dicom_kinds(attributes: Mapping[str, str]) -> list[tuple[str, str, frozenset[str]]]:
    """``(attribute, value, kinds it allows)`` for every DICOM kind attribute that says something."""
    said = []
    modality = attributes.get("Modality")
    if modality in MODALITY_KINDS:
        said.append(("Modality", modality, MODALITY_KINDS[modality]))
    part = (attributes.get("BodyPartExamined") or "").replace(" ", "_")
    if part in BODY_PART_KINDS:
        said.append(("BodyPartExamined", attributes["BodyPartExamined"], BODY_PART_KINDS[part]))
    view = attributes.get("ViewPosition")
    if view in LATERAL_VIEWS:
        said.append(("ViewPosition", view, frozenset(KINDS) - {"chest"}))
    return said


def dicom_contradiction(attributes: Mapping[str, str], kind: str) -> tuple[str, str] | None:
    """The first ``(attribute, value)`` that rules ``kind`` out, or None when the header allows it."""
    for attribute, value, allowed in dicom_kinds(attributes):
        if kind not in allowed:
            return attribute, value
    return None


def dicom_supports(attributes: Mapping[str, str], kind: str) -> bool:
    """Whether the header names ``kind`` itself (a body part of that kind, nothing against it)."""
    said = dicom_kinds(attributes)
    return (dicom_contradiction(attributes, kind) is None
            and any(attribute == "BodyPartExamined" and allowed == {kind} for attribute, _, allowed in said))
