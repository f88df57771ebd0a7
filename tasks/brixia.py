"""Brixia chest X-ray severity (seed 002): metadata, segmentation, alignment, regions A-F and the region scorer.

The pipeline the paper describes and its released code left out, here in one place so the
trainer and the daemon run exactly the same steps:

1. ``preprocess``: gray 8-bit X-ray -> the card's square frame (``tasks.frames``, resize or
   letterbox; the ``Geometry`` maps every output back to the input's own size) -> tensor.
2. Segmentation (an smp network, 3 sigmoid channels ``STRUCTURES``: right lung, left lung,
   heart) -> ``clean_masks`` (threshold, largest component per lung).
3. Alignment: ``mask_theta`` computes, from the lung masks alone, the affine that brings the
   lungs upright and onto the canonical box ``CANONICAL_BOX`` (rotation from the line through the
   two lung centroids, scale and shift from their joint extent). It is the fallback and the
   training target of ``LungSTN``, a spatial transformer on the two lung masks whose last layer
   starts at the identity. ``warp`` applies a ``theta`` to image and masks alike.
4. ``region_masks``: A/B/C = upper/middle/lower third (by height) of the patient's right lung,
   which is the image's left on a frontal view; D/E/F of the left lung; on the aligned masks.
5. ``RegionScorer``: a timm ResNet trunk, its features averaged inside each region mask (and over
   the whole image, for context), one 4-way head per region. Scores 0-3, global = sum 0-18.

Conventions: ``theta`` is a (2, 3) affine in ``torch.nn.functional.affine_grid``'s normalised
coordinates (-1..1, ``align_corners=False``) mapping an ALIGNED-frame point to the point of the
unaligned model frame it is sampled from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.cards import CardError
from tasks.frames import FITS, Geometry, fit_to_model  # noqa: F401  (FITS: the choices a trainer offers)
from tasks.intensity import apply_intensity, default_intensity
from tasks.nets.smp_models import create_smp

TASK = "brixia"
REGIONS = "ABCDEF"
STRUCTURES = ("right_lung", "left_lung", "heart")
# An optional fourth segmenter channel: lung opacity (learnt from COVID-QU-Ex infection masks).
# It is a probability map, not an anatomical structure: no largest-component cleaning, no mask output.
OPACITY = "opacity"
SCORE_LEVELS = 4                      # each region 0..3
MAX_GLOBAL = 3 * len(REGIONS)
# Where the two lungs' joint bounding box lands in the aligned frame (x0, y0, x1, y1), normalised.
CANONICAL_BOX = (-0.8, -0.8, 0.8, 0.8)
MIN_LUNG_FRACTION = 0.002             # a lung mask smaller than this share of the frame is "not found"
MAX_TILT_DEG = 35.0                   # a mask-derived rotation beyond this is distrusted
STN_AGREEMENT = 0.8                   # box IoU an STN theta needs with the mask-derived one to be used


@dataclass(frozen=True)
class AlignmentLimits:
    """Where the alignment puts the lungs and what it trusts: the card's ``output.canonical_box`` and
    ``output.alignment_limits`` (``min_lung_fraction``, ``max_tilt_deg``, ``stn_agreement``) when it
    records them, these defaults otherwise (cards from before they were recorded)."""
    canonical_box: tuple[float, float, float, float] = CANONICAL_BOX
    min_lung_fraction: float = MIN_LUNG_FRACTION
    max_tilt_deg: float = MAX_TILT_DEG
    stn_agreement: float = STN_AGREEMENT

    def record(self) -> dict[str, Any]:
        """The card ``output`` fields that hold these limits (what ``alignment_limits`` reads back)."""
        return {"canonical_box": list(self.canonical_box),
                "alignment_limits": {"min_lung_fraction": self.min_lung_fraction, "max_tilt_deg": self.max_tilt_deg,
                                     "stn_agreement": self.stn_agreement}}


DEFAULT_ALIGNMENT = AlignmentLimits()


def alignment_limits(output: dict[str, Any] | None) -> AlignmentLimits:
    """The alignment limits a card's ``output`` record holds (defaults for what it lacks); CardError
    naming the field when one is malformed."""
    output = output or {}
    box = output.get("canonical_box", CANONICAL_BOX)
    if (not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box)
            or not (box[0] < box[2] and box[1] < box[3])):
        raise CardError(f"output.canonical_box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1 (got {box!r})")
    record = output.get("alignment_limits") or {}
    if not isinstance(record, dict):
        raise CardError(f"output.alignment_limits must be an object (got {record!r})")
    unknown = set(record) - {"min_lung_fraction", "max_tilt_deg", "stn_agreement"}
    if unknown:
        raise CardError(f"output.alignment_limits has unknown fields {sorted(unknown)}")
    ranges = {"min_lung_fraction": (0.0, 1.0), "max_tilt_deg": (0.0, 90.0), "stn_agreement": (0.0, 1.0)}
    for name, value in record.items():
        low, high = ranges[name]
        if not _is_number(value) or not low <= value <= high:
            raise CardError(f"output.alignment_limits.{name} must be a number from {low} to {high} (got {value!r})")
    return AlignmentLimits(tuple(float(v) for v in box), **{name: float(value) for name, value in record.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- card records

def default_input_spec(size: int = 512, fit: str = "resize",
                       intensity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's ``input`` record: square frame for every stage, fit, intensity policy
    (``tasks.intensity``; default: the centre-percentile window), single-channel normalisation."""
    if fit not in FITS:
        raise ValueError(f"input fit must be one of {', '.join(FITS)}, not {fit!r}")
    return {"size": [int(size), int(size)], "fit": fit, "channels": 1, "color": "gray",
            "intensity": intensity if intensity is not None else default_intensity(),
            "mean": [0.5], "std": [0.25], "pad_value": 0}


def default_segmenter(arch: str = "Unet", encoder: str = "resnet34", opacity: bool = False,
                      **options: Any) -> dict[str, Any]:
    """Architecture record of the segmenter (smp): sigmoid channels right lung, left lung, heart and,
    with ``opacity``, a fourth for lung opacity."""
    labels = list(STRUCTURES) + ([OPACITY] if opacity else [])
    return {"name": "smp", "arch": arch, "encoder": encoder, "in_channels": 1, "classes": len(labels),
            "labels": labels, "options": {k: v for k, v in options.items() if v is not None}}


def segmenter_labels(architecture: dict[str, Any]) -> list[str]:
    """The segmenter's channel names (cards from before the opacity channel have the three structures)."""
    return list(architecture.get("labels") or STRUCTURES[:int(architecture.get("classes", len(STRUCTURES)))])


def default_stn(size: int = 128, channels: Sequence[int] = (16, 32, 64, 64)) -> dict[str, Any]:
    """Architecture record of the lung-mask spatial transformer."""
    return {"name": "lung-stn", "size": int(size), "channels": [int(c) for c in channels]}


def default_scorer(backbone: str = "resnet34", stage: int = 4, dropout: float = 0.2) -> dict[str, Any]:
    """Architecture record of the region scorer: timm trunk up to ``stage`` (4 = the whole ResNet)."""
    return {"name": "region-scorer", "backbone": backbone, "stage": int(stage), "in_chans": 1,
            "dropout": float(dropout), "regions": len(REGIONS), "levels": SCORE_LEVELS}


# ---------------------------------------------------------------- preprocessing

def to_tensor(frame: np.ndarray, input_spec: dict[str, Any]) -> torch.Tensor:
    """uint8 (S, S) -> normalised float tensor (1, S, S): the only normalisation there is."""
    x = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32) / 255.0)[None]
    return (x - float(input_spec["mean"][0])) / float(input_spec["std"][0])


def prepare_frame(gray: np.ndarray, input_spec: dict[str, Any]) -> tuple[np.ndarray, Geometry]:
    """8-bit gray X-ray -> (uint8 model frame under the card's intensity policy, Geometry back to the input).
    The trainer's samples and the daemon's requests both come through here."""
    frame, geometry = fit_to_model(gray, input_spec)
    return apply_intensity(frame, input_spec.get("intensity")), geometry


def preprocess(gray: np.ndarray, input_spec: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, Geometry]:
    """8-bit gray X-ray -> (network input (1, S, S), the uint8 frame, Geometry back to the input)."""
    frame, geometry = prepare_frame(gray, input_spec)
    return to_tensor(frame, input_spec), frame, geometry


# ---------------------------------------------------------------- segmentation

def build_segmenter(architecture: dict[str, Any], encoder_weights: str | None = None) -> nn.Module:
    """The smp lung/heart segmenter of a card record (``encoder_weights`` for training only)."""
    return create_smp(architecture, encoder_weights)


def segment(networks: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid over the segmenters: (B, 1, S, S) -> (B, C, S, S), C = 3 structures (+ opacity).
    No flip averaging: a flip would swap the right and left lung."""
    total = None
    for network in networks:
        probabilities = torch.sigmoid(network(inputs).float())
        total = probabilities if total is None else total + probabilities
    return total / len(networks)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of a bool mask (specks and stray blobs removed)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask.astype(bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def clean_masks(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(C, S, S) probabilities -> (3, S, S) bool masks of the structures; each lung and the heart keep
    their largest piece (an opacity channel, when present, is not a structure and is left out)."""
    return np.stack([largest_component(channel > threshold) for channel in probabilities[:len(STRUCTURES)]])


def opacity_map(probabilities: np.ndarray) -> np.ndarray | None:
    """The opacity channel (S, S) of a segmenter output, or None for a three-channel segmenter."""
    return probabilities[len(STRUCTURES)] if len(probabilities) > len(STRUCTURES) else None


def label_map(masks: np.ndarray) -> np.ndarray:
    """(3, H, W) bool -> uint8 label image: 0 background, 1 right lung, 2 left lung, 3 heart (on top)."""
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for value, mask in enumerate(masks, start=1):
        labels[mask] = value
    return labels


# ---------------------------------------------------------------- alignment

def _normalised_points(mask: np.ndarray) -> np.ndarray:
    """(N, 2) pixel centres of a mask as normalised (x, y) in -1..1 (align_corners=False)."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    return np.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], axis=1).astype(np.float64)


def mask_theta(right_lung: np.ndarray, left_lung: np.ndarray,
               limits: AlignmentLimits = DEFAULT_ALIGNMENT) -> np.ndarray | None:
    """The deterministic alignment from two lung masks, or None when they cannot be trusted.

    Rotation: the line through the two lung centroids becomes horizontal. Scale and shift: the
    lungs' joint extent in that rotated frame (0.5th-99.5th percentile, so a stray pixel does
    not stretch it) is mapped onto the canonical box. ``limits``: that box, the least lung area and the
    largest tilt trusted (the card's, ``alignment_limits``). Returns ``theta`` (2, 3) float32.
    """
    area = right_lung.size
    if right_lung.sum() < limits.min_lung_fraction * area or left_lung.sum() < limits.min_lung_fraction * area:
        return None
    right, left = _normalised_points(right_lung), _normalised_points(left_lung)
    dx, dy = left.mean(axis=0) - right.mean(axis=0)
    if dx <= 0:
        return None                                  # the "right" lung is not on the image's left
    angle = math.atan2(dy, dx)
    if abs(math.degrees(angle)) > limits.max_tilt_deg:
        return None
    cos, sin = math.cos(angle), math.sin(angle)
    rotate_back = np.array([[cos, sin], [-sin, cos]])        # R(-angle): image -> upright
    upright = np.concatenate([right, left]) @ rotate_back.T
    (x0, y0), (x1, y1) = np.percentile(upright, 0.5, axis=0), np.percentile(upright, 99.5, axis=0)
    if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
        return None
    bx0, by0, bx1, by1 = limits.canonical_box
    sx, sy = (x1 - x0) / (bx1 - bx0), (y1 - y0) / (by1 - by0)
    scale_shift = np.array([[sx, 0.0, x0 - bx0 * sx], [0.0, sy, y0 - by0 * sy]])
    rotate = np.array([[cos, -sin], [sin, cos]])              # R(angle): upright -> image
    return (rotate @ scale_shift).astype(np.float32)


def identity_theta() -> np.ndarray:
    return np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


def invert_theta(theta: np.ndarray) -> np.ndarray:
    """The affine that undoes ``theta`` (maps unaligned-frame points to aligned ones)."""
    full = np.vstack([np.asarray(theta, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2].astype(np.float32)


def warp(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample (B, C, S, S) ``images`` on the aligned grid of ``theta`` (B, 2, 3); outside is 0."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_array(array: np.ndarray, theta: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """``warp`` for one (C, S, S) or (S, S) numpy array (bool in, bool out with ``nearest``)."""
    squeeze = array.ndim == 2
    tensor = torch.from_numpy(np.ascontiguousarray(array[None] if squeeze else array, dtype=np.float32))[None]
    out = warp(tensor, torch.from_numpy(np.asarray(theta, dtype=np.float32))[None], mode=mode)[0].numpy()
    out = out[0] if squeeze else out
    return out > 0.5 if array.dtype == bool else out


class LungSTN(nn.Module):
    """Spatial transformer localisation net: two lung masks (B, 2, s, s) -> theta (B, 2, 3).

    Conv-ReLU-pool blocks, global average pooling and a linear layer whose weights start at zero
    and bias at the identity, so an untrained STN leaves the image as it is (the seed's STN had
    the same start but no activations and a 312,500-wide linear layer).
    """

    def __init__(self, size: int = 128, channels: Sequence[int] = (16, 32, 64, 64)):
        super().__init__()
        self.size = int(size)
        layers, previous = [], 2
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.regress = nn.Sequential(nn.Flatten(), nn.Linear(previous * 16, 64), nn.ReLU(inplace=True),
                                     nn.Linear(64, 6))
        self.pool = nn.AdaptiveAvgPool2d(4)
        nn.init.zeros_(self.regress[-1].weight)
        with torch.no_grad():
            self.regress[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, lungs: torch.Tensor) -> torch.Tensor:
        if lungs.shape[-1] != self.size or lungs.shape[-2] != self.size:
            lungs = F.interpolate(lungs, size=(self.size, self.size), mode="area")
        return self.regress(self.pool(self.features(lungs))).view(-1, 2, 3)


def build_stn(architecture: dict[str, Any]) -> LungSTN:
    return LungSTN(size=architecture.get("size", 128), channels=architecture.get("channels", (16, 32, 64, 64)))


def stn_input(masks: np.ndarray, size: int) -> torch.Tensor:
    """(3, S, S) bool masks -> the STN's input (2, s, s): the two lung masks, area-resized."""
    lungs = torch.from_numpy(np.ascontiguousarray(masks[:2], dtype=np.float32))[None]
    return F.interpolate(lungs, size=(size, size), mode="area")[0]


def box_corners(theta: np.ndarray, box: Sequence[float] = CANONICAL_BOX) -> np.ndarray:
    """Where the corners of the canonical ``box`` land in the unaligned frame under ``theta`` (4, 2)."""
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], dtype=np.float64)
    return corners @ np.asarray(theta, dtype=np.float64).T


def box_iou(theta_a: np.ndarray, theta_b: np.ndarray, box: Sequence[float] = CANONICAL_BOX) -> float:
    """IoU of the canonical ``box`` as two thetas place it (1 = the same alignment)."""
    a, b = box_corners(theta_a, box).astype(np.float32), box_corners(theta_b, box).astype(np.float32)
    inter, _ = cv2.intersectConvexConvex(a, b)
    union = cv2.contourArea(a) + cv2.contourArea(b) - inter
    return float(inter / union) if union > 0 else 0.0


def plausible_theta(theta: np.ndarray) -> bool:
    """An STN output is used only if it is a sane, invertible, non-mirroring affine."""
    linear = np.asarray(theta, dtype=np.float64)[:, :2]
    det = float(np.linalg.det(linear))
    return bool(np.isfinite(theta).all() and 0.05 < det < 4.0 and np.abs(theta[:, 2]).max() < 1.0)


# ---------------------------------------------------------------- regions

def lung_thirds(lung: np.ndarray) -> np.ndarray:
    """(3, H, W) bool: the upper, middle and lower third (by height) of one aligned lung mask."""
    thirds = np.zeros((3,) + lung.shape, dtype=bool)
    rows = np.flatnonzero(lung.any(axis=1))
    if len(rows) == 0:
        return thirds
    top, bottom = rows[0], rows[-1] + 1
    cuts = [top + round(k * (bottom - top) / 3) for k in range(4)]
    for k in range(3):
        thirds[k, cuts[k]:cuts[k + 1]] = lung[cuts[k]:cuts[k + 1]]
    return thirds


def region_masks(masks: np.ndarray) -> np.ndarray:
    """Aligned (3, S, S) structure masks -> (6, S, S) bool regions A-F.

    A/B/C: upper/middle/lower third of the right lung (image left); D/E/F: of the left lung.
    """
    return np.concatenate([lung_thirds(masks[0]), lung_thirds(masks[1])])


# ---------------------------------------------------------------- scorer

class RegionScorer(nn.Module):
    """Aligned X-ray + six region masks (+ an opacity map) -> (B, 6, 4) score logits.

    A timm trunk (``features_only``, up to ``stage``) gives a feature map; each region's features
    are averaged inside its mask and joined with the whole-image average. With ``opacity`` each
    region also gets two numbers from the segmenter's opacity map: its mean opacity probability
    and the share of it above 0.5 (the extent of disease, which the Brixia score grades).
    ``shared_head``: one linear head for all six regions, told which region by a one-hot code
    (six times the samples per weight: the seed's PAFE head was shared too); else one per region.
    """

    OPACITY_STATS = 2

    def __init__(self, backbone: str = "resnet34", stage: int = 4, in_chans: int = 1, dropout: float = 0.2,
                 regions: int = len(REGIONS), levels: int = SCORE_LEVELS, pretrained: bool = False,
                 opacity: bool = False, shared_head: bool = False):
        super().__init__()
        import timm

        self.trunk = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                       out_indices=(int(stage),), in_chans=int(in_chans))
        channels = self.trunk.feature_info.channels()[-1]
        self.in_chans, self.regions, self.opacity, self.shared_head = int(in_chans), int(regions), bool(opacity), \
            bool(shared_head)
        self.dropout = nn.Dropout(float(dropout))
        width = 2 * channels + (self.OPACITY_STATS if self.opacity else 0)
        if self.shared_head:
            self.heads = nn.ModuleList([nn.Linear(width + self.regions, levels)])
        else:
            self.heads = nn.ModuleList([nn.Linear(width, levels) for _ in range(self.regions)])

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map (B, C, h, w) of the normalised aligned image (B, in_chans, S, S)."""
        return self.trunk(image)[-1]

    def head_logits(self, features: torch.Tensor, regions: torch.Tensor,
                    opacity: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) features, (B, 6, S, S) region masks, (B, 1, S, S) opacity -> (B, 6, 4) logits."""
        weights = F.adaptive_avg_pool2d(regions.to(features.dtype), features.shape[-2:])   # share of each cell
        pooled = torch.einsum("brhw,bchw->brc", weights, features) / weights.sum((-2, -1))[..., None].clamp_min(1e-6)
        parts = [pooled, features.mean((-2, -1))[:, None].expand(-1, self.regions, -1)]
        if self.opacity:
            if opacity is None:
                raise ValueError("this scorer was trained with the opacity map; give it one")
            parts.append(region_opacity(regions, opacity).to(features.dtype))
        joined = self.dropout(torch.cat(parts, dim=-1))                                  # (B, 6, width)
        if self.shared_head:
            code = torch.eye(self.regions, dtype=joined.dtype, device=joined.device).expand(len(joined), -1, -1)
            return self.heads[0](torch.cat([joined, code], dim=-1))
        return torch.stack([head(joined[:, r]) for r, head in enumerate(self.heads)], dim=1)

    def forward(self, image: torch.Tensor, regions: torch.Tensor, opacity: torch.Tensor | None = None) -> torch.Tensor:
        return self.head_logits(self.features(image), regions, opacity)


def region_opacity(regions: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """(B, 6, S, S) region masks, (B, 1, S, S) opacity probabilities -> (B, 6, 2): per region the mean
    opacity probability and the share of its pixels above 0.5 (0 for an empty region)."""
    regions = regions.float()
    area = regions.sum((-2, -1)).clamp_min(1.0)
    mean = (regions * opacity.float()).sum((-2, -1)) / area
    extent = (regions * (opacity.float() > 0.5)).sum((-2, -1)) / area
    return torch.stack([mean, extent], dim=-1)


def build_scorer(architecture: dict[str, Any], pretrained: bool = False) -> RegionScorer:
    """The region scorer of a card record (``pretrained`` downloads timm weights: training only)."""
    return RegionScorer(backbone=architecture.get("backbone", "resnet34"), stage=architecture.get("stage", 4),
                        in_chans=architecture.get("in_chans", 1), dropout=architecture.get("dropout", 0.2),
                        regions=architecture.get("regions", len(REGIONS)),
                        levels=architecture.get("levels", SCORE_LEVELS), pretrained=pretrained,
                        opacity=architecture.get("opacity", False), shared_head=architecture.get("shared_head", False))


def pack_scorer_sample(aligned_frame: np.ndarray, regions: np.ndarray, opacity: np.ndarray | None = None) -> np.ndarray:
    """Aligned uint8 frame (S, S) + (6, S, S) regions (+ opacity probabilities (S, S)) -> one compact
    uint8 (7 or 8, S, S) array, the form samples are cached and queued in."""
    parts = [aligned_frame[None], regions.astype(np.uint8)]
    if opacity is not None:
        parts.append(np.clip(np.rint(opacity * 255), 0, 255).astype(np.uint8)[None])
    return np.concatenate(parts)


def scorer_inputs(packed: np.ndarray, input_spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A packed uint8 sample -> the scorer's keyword inputs: ``image`` (1, S, S) normalised, ``regions``
    (6, S, S) 0/1 and, when the sample carries one, ``opacity`` (1, S, S) in 0..1."""
    inputs = {"image": to_tensor(packed[0], input_spec),
              "regions": torch.from_numpy(np.ascontiguousarray(packed[1:1 + len(REGIONS)], dtype=np.float32))}
    if len(packed) > 1 + len(REGIONS):
        inputs["opacity"] = torch.from_numpy(np.ascontiguousarray(packed[1 + len(REGIONS):], dtype=np.float32) / 255.0)
    return inputs


DECISIONS = ("median", "argmax")


def decide_scores(probabilities: torch.Tensor, decision: str = "median") -> torch.Tensor:
    """(..., 4) probabilities -> the score per region: ``median`` of the predicted distribution (the
    score with the smallest expected absolute error: the Brixia score is read as a number) or
    ``argmax`` (the most probable score)."""
    if decision == "argmax":
        return probabilities.argmax(-1)
    if decision != "median":
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    cumulative = probabilities.float().cumsum(-1)
    return (cumulative < 0.5).sum(-1).clamp_max(probabilities.shape[-1] - 1)


def expected_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """(..., 4) probabilities -> expected score per region (0..3)."""
    return (probabilities * torch.arange(probabilities.shape[-1], device=probabilities.device,
                                         dtype=probabilities.dtype)).sum(-1)


# ---------------------------------------------------------------- the whole pipeline on a batch

def align_batch(masks: Iterable[np.ndarray], stn: Sequence[nn.Module] | None, device: torch.device,
                method: str = "auto", limits: AlignmentLimits = DEFAULT_ALIGNMENT) -> list[tuple[np.ndarray, str]]:
    """A theta and the method that gave it for each (3, S, S) mask set.

    ``auto``: the STN (mean theta over the card's STNs) when the card has one, its theta is
    plausible and it agrees with the mask-derived affine (box IoU >= ``limits.stn_agreement``: an STN
    that has not learnt a film's pose must not misalign it), else the mask-derived affine, else
    the identity (lungs not found). ``masks``: the mask-derived affine. ``none``: identity.
    """
    masks = list(masks)
    results: list[tuple[np.ndarray, str] | None] = [None] * len(masks)
    stn_thetas = None
    if method == "none":
        return [(identity_theta(), "identity") for _ in masks]
    if method == "auto" and stn:
        size = stn[0].size
        inputs = torch.stack([stn_input(m, size) for m in masks]).to(device)
        with torch.no_grad():
            thetas = torch.stack([network(inputs).float() for network in stn]).mean(0).cpu().numpy()
        stn_thetas = list(thetas)
    for k, mask in enumerate(masks):
        from_masks = mask_theta(mask[0], mask[1], limits)
        if from_masks is None:
            results[k] = (identity_theta(), "identity")
        elif stn_thetas is not None and plausible_theta(stn_thetas[k]) \
                and box_iou(stn_thetas[k], from_masks, limits.canonical_box) >= limits.stn_agreement:
            results[k] = (stn_thetas[k].astype(np.float32), "stn")
        else:
            results[k] = (from_masks, "masks")
    return results  # type: ignore[return-value]


def aligned_sample(frame: np.ndarray, masks: np.ndarray, theta: np.ndarray,
                   opacity: np.ndarray | None = None) -> np.ndarray:
    """Warp the uint8 frame (S, S), (3, S, S) masks and the optional opacity map with ``theta`` -> the
    packed scorer sample (7 or 8, S, S) uint8: aligned frame + regions cut on the aligned lungs
    (+ aligned opacity). Outside the original frame is black, as an X-ray's border."""
    aligned_frame = np.clip(np.rint(warp_array(frame.astype(np.float32), theta)), 0, 255).astype(np.uint8)
    aligned_opacity = None if opacity is None else warp_array(np.asarray(opacity, dtype=np.float32), theta)
    return pack_scorer_sample(aligned_frame, region_masks(warp_array(masks, theta, mode="nearest")), aligned_opacity)
