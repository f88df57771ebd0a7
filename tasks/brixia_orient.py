"""Which way round is the film? A small classifier of the eight poses of a chest X-ray (rotations x mirror).

The segmenter is trained on films the right way round and learns that the heart sits on the
image's right; on a mirrored film it half-corrects the heart back, so the masks alone catch
about 70 % of mirrored films (tasks.brixia_film). A pose is free to learn, though: any frontal
film turned and flipped is a labelled sample. ``OrientNet`` is trained that way by
``train.brixia orient`` on the segmentation films, and its card rides in the brixia card: a film
whose most probable pose is not upright is refused, with the pose in the message.

Poses (index: what was done to an upright film): 0 upright, 1 mirrored (left-right), then
2/3 rotated 90 degrees clockwise (plain/mirrored), 4/5 rotated 180, 6/7 rotated 90
counter-clockwise.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POSES = ("upright", "mirrored", "rotated 90 clockwise", "rotated 90 clockwise and mirrored", "upside down",
         "upside down and mirrored", "rotated 90 counter-clockwise", "rotated 90 counter-clockwise and mirrored")
UPRIGHT = 0


def apply_pose(frame: np.ndarray, pose: int) -> np.ndarray:
    """An upright (S, S) frame as pose ``pose`` shows it (a square frame keeps its shape)."""
    turns = {0: 0, 1: 0, 2: 3, 3: 3, 4: 2, 5: 2, 6: 1, 7: 1}[int(pose)]   # np.rot90 turns counter-clockwise
    out = np.rot90(frame, turns, axes=(-2, -1))
    if pose % 2:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


class OrientNet(nn.Module):
    """Conv-BN-ReLU-pool blocks, global average and max pooling, one linear layer: (B, 1, s, s) -> (B, 8)."""

    def __init__(self, size: int = 128, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.size = int(size)
        layers, previous = [], 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.classify = nn.Linear(2 * previous, len(POSES))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        features = self.features(frames)
        return self.classify(torch.cat([features.mean((-2, -1)), features.amax((-2, -1))], dim=1))


def default_orient(size: int = 128, channels: Sequence[int] = (16, 32, 64, 128)) -> dict[str, Any]:
    """Architecture record of the pose classifier."""
    return {"name": "orient-net", "size": int(size), "channels": [int(c) for c in channels], "poses": list(POSES)}


def build_orient(architecture: dict[str, Any]) -> OrientNet:
    return OrientNet(size=architecture.get("size", 128), channels=architecture.get("channels", (16, 32, 64, 128)))


def orient_input(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """The normalised model frame(s) (..., 1, S, S) area-resized to the classifier's side."""
    squeeze = tensor.dim() == 3
    batch = tensor[None] if squeeze else tensor
    if batch.shape[-1] != size:
        batch = F.interpolate(batch.float(), size=(size, size), mode="area")
    return batch[0] if squeeze else batch


def pose_probabilities(networks: Sequence[nn.Module], frames: torch.Tensor) -> torch.Tensor:
    """Mean softmax over the classifiers of normalised model frames (B, 1, S, S) -> (B, 8)."""
    inputs = orient_input(frames, networks[0].size)
    return torch.stack([torch.softmax(network(inputs).float(), dim=-1) for network in networks]).mean(0)


DEFAULT_MIN_UPRIGHT = 0.5  # for cards that do not record their own (the trainer chooses it out of fold)


def pose_problem(probabilities: np.ndarray, min_upright: float = DEFAULT_MIN_UPRIGHT) -> str | None:
    """Why the film is refused (the probability that it is upright is below ``min_upright``), or None."""
    upright = float(probabilities[UPRIGHT])
    if upright >= min_upright:
        return None
    others = np.array(probabilities, dtype=np.float64)
    others[UPRIGHT] = -1.0
    pose = int(np.argmax(others))
    return (f"the film looks {POSES[pose]} (probability {probabilities[pose]:.2f}; upright {upright:.2f}, "
            f"below {min_upright:.2f}): brixia scores frontal chest X-rays as radiologists read them, "
            "the patient's right lung on the image's left, apex up")


def choose_min_upright(records: list[dict], target_pass: float = 0.99,
                       grid: tuple[float, ...] = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)) -> float:
    """The highest P(upright) floor at which at least ``target_pass`` of the upright films pass
    (``records``: out-of-fold ``true_pose`` and ``p_upright``): refusing a good film costs a reading,
    so the floor is set for the upright films and the refusals of turned ones are reported as they come."""
    upright = np.array([r["p_upright"] for r in records if r["true_pose"] == UPRIGHT], dtype=np.float64)
    if not upright.size:
        return DEFAULT_MIN_UPRIGHT
    for floor in grid:
        if np.mean(upright >= floor) >= target_pass:
            return floor
    return grid[-1]
