"""Brixia's reading of a batch of films before scoring, written once for the daemon and the trainer.

segment (mean sigmoid of the segmenter folds) -> ``clean_masks`` -> the pose classifier (when the
card has one and a film is checked) -> the film check (``tasks.brixia_film.film_refusal``) ->
alignment (``align_batch``, per film's method) -> the packed scorer sample (``aligned_sample``).
The daemon passes its ``TaskHandler.forward`` (autocast + fp32 casts) as ``forward``; the
trainer calls the networks as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from tasks import brixia, brixia_orient
from tasks.brixia_film import film_refusal

Forward = Callable[[Callable[..., torch.Tensor], Sequence[nn.Module], torch.Tensor], torch.Tensor]


def plain_forward(step: Callable[..., torch.Tensor], networks: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """``step(networks, inputs)`` without gradients: the trainer's way of running a model."""
    with torch.no_grad():
        return step(networks, inputs)


@dataclass
class FilmReading:
    """One film read up to the scorer: ``refusal`` says why the film check refuses it (None: it passes,
    or it was not checked); ``theta``/``method``/``sample`` are None when it was not aligned."""
    probabilities: np.ndarray          # (3 or 4, S, S) segmenter probabilities
    masks: np.ndarray                  # (3, S, S) bool, cleaned
    refusal: str | None
    theta: np.ndarray | None = None    # (2, 3)
    method: str | None = None          # stn, masks or identity
    sample: np.ndarray | None = None   # packed scorer sample (7 or 8, S, S) uint8


@dataclass(frozen=True)
class ChainModels:
    """The networks of the chain and the card records it reads (``output`` of the card that bundles them)."""
    seg: Sequence[nn.Module]
    stn: Sequence[nn.Module] = ()
    orient: Sequence[nn.Module] = ()
    film_limits: dict[str, Any] | None = None
    min_upright: float | None = None
    limits: brixia.AlignmentLimits = brixia.DEFAULT_ALIGNMENT
    opacity: bool = False               # the scorer takes the segmenter's opacity channel


def read_films(models: ChainModels, inputs: torch.Tensor, frames: Sequence[np.ndarray], device: torch.device,
               alignments: Sequence[str] | None = None, check: Sequence[bool] | None = None,
               sample_refused: bool = False, align: bool = True, forward: Forward = plain_forward
               ) -> list[FilmReading]:
    """Read a batch: ``inputs`` (B, 1, S, S) on ``device``, ``frames`` their uint8 frames. ``alignments``:
    each film's method (``auto`` by default); ``check``: which films the film check looks at (all by
    default). A refused film is aligned and sampled only with ``sample_refused`` (the trainer records
    refusals but still learns from the film). ``align=False`` stops after the film check."""
    count = len(frames)
    alignments = list(alignments) if alignments is not None else ["auto"] * count
    check = list(check) if check is not None else [True] * count
    probabilities = forward(brixia.segment, models.seg, inputs).cpu().numpy()
    poses = forward(brixia_orient.pose_probabilities, models.orient, inputs).cpu().numpy() \
        if models.orient and any(check) else None
    readings = []
    for k in range(count):
        masks = brixia.clean_masks(probabilities[k])
        refusal = film_refusal(masks, models.film_limits, None if poses is None else poses[k],
                               models.min_upright) if check[k] else None
        readings.append(FilmReading(probabilities[k], masks, refusal))
    if not align:
        return readings
    wanted = [k for k, reading in enumerate(readings) if reading.refusal is None or sample_refused]
    for method in dict.fromkeys(alignments[k] for k in wanted):
        rows = [k for k in wanted if alignments[k] == method]
        for k, (theta, used) in zip(rows, brixia.align_batch([readings[k].masks for k in rows], models.stn,
                                                             device, method, models.limits)):
            reading = readings[k]
            opacity = brixia.opacity_map(reading.probabilities) if models.opacity else None
            reading.theta, reading.method = theta, used
            reading.sample = brixia.aligned_sample(frames[k], reading.masks, theta, opacity)
    return readings
