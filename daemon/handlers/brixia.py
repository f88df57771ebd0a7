"""Brixia handler: frontal chest X-ray -> six region scores A-F (0-3), global score, masks, overlay, per-region Grad-CAM.

The steps are ``tasks.brixia``'s, as the trainer ran them: fit to the card's frame, segment
lungs and heart (mean sigmoid of the card's segmenter folds), keep the largest piece of each,
align (the card's STN, else the mask-derived affine; request ``alignment``: ``auto`` | ``masks``
| ``none``), cut regions A-F on the aligned lungs, score with every scorer fold (mean
probability). Grad-CAM per region: the gradient of that region head's predicted score with
respect to the trunk's last feature map; since the heads only pool that map, one forward per
fold gives all six maps (``explain.feature_grad_cam``; pytorch-grad-cam would run six forward +
backward passes).

Outputs, all at the input's own size: ``mask_img_path`` (palette PNG: 0 background, 1 right
lung, 2 left lung, 3 heart), ``overlay_img_path`` (structure outlines, regions and their scores
on the X-ray), ``cam_img_paths`` (one heat overlay per region; request ``cams: false`` skips
them). A film on which no two lungs are found is a fail reply (``unreadable_image``): scoring
it would be a number without meaning.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from pydicom.sr.codedict import codes

from daemon import dicom_content as dicom
from daemon import explain, rendering
from daemon.errors import INVALID_REQUEST, UNREADABLE_IMAGE, ServiceError
from daemon.handlers.base import Job, TaskHandler
from daemon.outputs import output_stem, timestamp, write_bytes, write_pngs
from tasks import brixia, brixia_chain, brixia_orient, quality, uncertainty
from tasks.bundle import Bundle
from tasks.brixia_film import QUALITY_LABELS, quality_measures
from tasks.frames import Geometry, masks_at_input, probabilities_at_input

ALIGNMENTS = ("auto", "masks", "none")
STRUCTURE_COLOURS = {"right_lung": (40, 140, 255), "left_lung": (60, 220, 90), "heart": (255, 60, 60)}
SCORE_COLOURS = [(120, 200, 120), (255, 220, 0), (255, 140, 0), (230, 30, 30)]   # 0..3
REGION_NAMES = {"A": "upper right", "B": "middle right", "C": "lower right",
                "D": "upper left", "E": "middle left", "F": "lower left"}


@dataclass
class Prepared:
    tensor: torch.Tensor             # (1, S, S) normalised frame
    frame: np.ndarray                # (S, S) uint8 frame
    geometry: Geometry
    gray: np.ndarray                 # the input as read
    alignment: str
    cams: bool
    check_film: bool = True          # false for warm-up's blank frame only: the pose and film checks refuse it


@dataclass
class Inferred:
    masks: np.ndarray                # (3, S, S) bool, unaligned frame
    theta: np.ndarray                # (2, 3)
    method: str                      # stn, masks or identity
    probabilities: np.ndarray        # (6, 4) mean over the scorer folds
    fold_probabilities: np.ndarray   # (folds, 6, 4)
    cams: np.ndarray | None          # (6, S, S) in [0, 1], unaligned frame
    regions: np.ndarray              # (6, S, S) bool, aligned frame
    opacity: np.ndarray | None       # (6, 2) per region: mean opacity probability, share above 0.5


class BrixiaHandler(TaskHandler):
    task = "brixia"
    fields = frozenset({"img_path", "destination_path", "alignment", "cams"})

    builders = {"seg": brixia.build_segmenter, "stn": brixia.build_stn, "orient": brixia_orient.build_orient,
                "score": brixia.build_scorer}
    required_models = ("seg", "score")
    memory_format = torch.channels_last

    @classmethod
    def prepare_network(cls, model: str, network: torch.nn.Module) -> None:
        for parameter in network.parameters():
            parameter.requires_grad_(False)   # Grad-CAM differentiates w.r.t. features only

    @classmethod
    def check_bundle(cls, bundle: Bundle) -> None:
        brixia.alignment_limits(bundle.card.get("output"))   # a malformed record fails the card at load

    @functools.cached_property
    def alignment_limits(self) -> brixia.AlignmentLimits:
        """The card's canonical box and what the mask-derived alignment trusts (defaults for older cards)."""
        return brixia.alignment_limits(self.card.get("output"))

    def dummy_inputs(self) -> list[Prepared]:
        size = int(self.card["input"]["size"][0])
        frame = np.zeros((size, size), np.uint8)
        cv2.ellipse(frame, (size * 3 // 10, size // 2), (size // 8, size // 4), 0, 0, 360, 255, -1)
        tensor, frame, geometry = brixia.preprocess(frame, self.card["input"])
        return [Prepared(tensor, frame, geometry, frame, "masks", True, check_film=False)]

    def warm_up(self) -> None:
        super().warm_up()
        rendering.heat_rgba(np.zeros((2, 2), np.float32))   # matplotlib's import, paid now

    # --- the four steps --------------------------------------------------------------------
    def validate_options(self, request: dict[str, Any], job: Job) -> None:
        alignment = request.get("alignment", "auto")
        if alignment not in ALIGNMENTS:
            raise ServiceError(INVALID_REQUEST, f"'alignment' must be one of {', '.join(ALIGNMENTS)} (got {alignment!r})")
        cams = request.get("cams", True)
        if not isinstance(cams, bool):
            raise ServiceError(INVALID_REQUEST, f"'cams' must be true or false (got {cams!r})")
        job.options.update(alignment=alignment, cams=cams)

    def preprocess(self, job: Job) -> Prepared:
        gray = self.read_request_image(job, color="gray")
        tensor, frame, geometry = brixia.preprocess(gray, self.card["input"])
        return Prepared(tensor, frame, geometry, gray, job.options["alignment"], job.options["cams"])

    @property
    def uses_opacity(self) -> bool:
        return bool((self.card.get("architecture") or {}).get("score", {}).get("opacity", False))

    @functools.cached_property
    def chain_models(self) -> brixia_chain.ChainModels:
        """The card's networks and records for the shared segment -> film check -> align chain."""
        output = self.card.get("output") or {}
        return brixia_chain.ChainModels(self.bundle["seg"], self.bundle["stn"], self.bundle["orient"],
                                        output.get("film_limits"), output.get("orient_min_upright"),
                                        self.alignment_limits, self.uses_opacity)

    def infer(self, batch: list[Prepared]) -> list[Inferred | BaseException]:
        device = self.settings.device
        inputs = torch.stack([item.tensor for item in batch]).to(device, memory_format=self.memory_format)
        # A film that is not upright-frontal, or whose lungs and heart are not where a frontal film has them,
        # is refused (unreadable_image): its score would be a number without meaning, or swap A-C and D-F.
        readings = brixia_chain.read_films(self.chain_models, inputs, [item.frame for item in batch], device,
                                           [item.alignment for item in batch], [item.check_film for item in batch],
                                           forward=self.forward)
        results: list[Inferred | BaseException | None] = [
            ServiceError(UNREADABLE_IMAGE, reading.refusal) if reading.refusal is not None else None
            for reading in readings]
        keep = [k for k, reading in enumerate(readings) if reading.refusal is None]
        if keep:
            packed = [brixia.scorer_inputs(readings[k].sample, self.card["input"]) for k in keep]
            stacked = {key: torch.stack([p[key] for p in packed]).to(device) for key in packed[0]}
            stacked["image"] = stacked["image"].contiguous(memory_format=self.memory_format)
            scores, fold_scores, cams = self._score(stacked, [batch[k].cams for k in keep])
            region_opacity = (brixia.region_opacity(stacked["regions"], stacked["opacity"]).cpu().numpy()
                              if "opacity" in stacked else None)
            for row, k in enumerate(keep):
                reading = readings[k]
                cam = None
                if cams is not None and batch[k].cams:
                    cam = brixia.warp_array(cams[row], brixia.invert_theta(reading.theta))   # back to the unaligned frame
                results[k] = Inferred(reading.masks, reading.theta, reading.method, scores[row], fold_scores[:, row],
                                      cam, reading.sample[1:7].astype(bool),
                                      None if region_opacity is None else region_opacity[row])
        return results  # type: ignore[return-value]

    def _score(self, inputs: dict[str, torch.Tensor], want_cams: list[bool]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Mean probabilities (B, 6, 4) over the scorer folds, each fold's (folds, B, 6, 4) and, when
        asked, Grad-CAM (B, 6, S, S)."""
        features, logits = [], []

        def scored(network: torch.nn.Module) -> torch.Tensor:
            # Only the heads are differentiated (Grad-CAM w.r.t. the trunk's features), in the trunk's dtype.
            with torch.inference_mode():
                trunk = network.features(inputs["image"])
            feature = trunk.clone().requires_grad_(any(want_cams))
            features.append(feature)
            return network.head_logits(feature, inputs["regions"], inputs.get("opacity"))

        for network in self.bundle["score"]:
            logits.append(self.forward(scored, network, grad=True))
        per_fold = torch.stack([torch.softmax(out, dim=-1) for out in logits]).detach()
        probabilities = per_fold.mean(0)
        if not any(want_cams):
            return probabilities.cpu().numpy(), per_fold.cpu().numpy(), None
        predicted = self.decide(probabilities)                                 # (B, 6)
        cams = torch.zeros(inputs["image"].shape[0], len(brixia.REGIONS), *inputs["image"].shape[-2:])
        for feature, out in zip(features, logits):
            region_scores = [out[:, r].gather(1, predicted[:, r:r + 1]).sum() for r in range(len(brixia.REGIONS))]
            cams += explain.feature_grad_cam(feature, region_scores, inputs["image"].shape[-2:])
        return probabilities.cpu().numpy(), per_fold.cpu().numpy(), explain.normalised(cams.numpy())

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Region scores from probabilities by the card's rule (median; argmax for cards from before it)."""
        return brixia.decide_scores(torch.as_tensor(probabilities), (self.card.get("output") or {}).get("decision", "argmax"))

    def postprocess(self, job: Job, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        scores = self.decide(inferred.probabilities).numpy()
        region_scores = {region: int(s) for region, s in zip(brixia.REGIONS, scores)}
        geometry, folder, stamp = prepared.geometry, job.options["folder"], timestamp()
        stem = output_stem(job.options["img_path"])
        masks = masks_at_input(inferred.masks.astype(np.float32), geometry)
        mask_png = rendering.palette_png(brixia.label_map(masks), [STRUCTURE_COLOURS[name] for name in brixia.STRUCTURES])
        mask_path = write_bytes(folder, f"{stem}_mask_{stamp}", ".png", mask_png)
        regions = self.regions_at_input(inferred, geometry)
        overlay = region_overlay(prepared.gray, masks, regions, scores)
        pngs = {f"{stem}_overlay_{stamp}": overlay}
        if inferred.cams is not None:
            cams = probabilities_at_input(inferred.cams, geometry)
            # Rendered by the encoders one by one: six full-size RGB overlays are never held at once.
            pngs.update({f"{stem}_cam{region}_{stamp}": functools.partial(rendering.heat_overlay, prepared.gray, cams[r])
                         for r, region in enumerate(brixia.REGIONS)})
        written = list(write_pngs(folder, pngs).values())
        overlay_path = written[0]
        cam_paths = None if inferred.cams is None else {region: str(path)
                                                         for region, path in zip(brixia.REGIONS, written[1:])}
        job.artifacts.update(masks=masks, overlay=overlay, stamp=stamp)
        return {
            "region_scores": region_scores,
            "global_score": int(scores.sum()),
            "probabilities": {region: [round(float(p), 6) for p in inferred.probabilities[r]]
                              for r, region in enumerate(brixia.REGIONS)},
            "expected_global_score": round(float((inferred.probabilities * np.arange(4)).sum()), 3),
            "mask_img_path": str(mask_path),
            "overlay_img_path": str(overlay_path),
            "cam_img_paths": cam_paths,
            "alignment": inferred.method,
            "image_size": [int(prepared.gray.shape[0]), int(prepared.gray.shape[1])],
            "uncertainty": score_uncertainty(inferred.fold_probabilities),
            "quality": quality.assess(quality_measures(inferred.masks), self.card.get("quality"), QUALITY_LABELS),
            **({} if inferred.opacity is None else {"region_opacity": {
                region: {"mean": round(float(inferred.opacity[r, 0]), 4), "extent": round(float(inferred.opacity[r, 1]), 4)}
                for r, region in enumerate(brixia.REGIONS)}}),
        }

    def dicom_content(self, job: Job, fields: dict[str, Any]) -> dicom.Content:
        """Lungs and heart as a Segmentation, the six region scores and the global score as a
        report (each region on its lung), the overlay as a Secondary Capture."""
        masks = job.artifacts["masks"]
        right, left = codes.SCT.Right, codes.SCT.Left
        segments = [dicom.Segment("right lung", masks[0], codes.SCT.Lung, right),
                    dicom.Segment("left lung", masks[1], codes.SCT.Lung, left),
                    dicom.Segment("heart", masks[2], codes.SCT.Heart)]
        numbers = [dicom.Number(f"BRIXIA-{region}", f"Brixia score, region {region} ({REGION_NAMES[region]})",
                                score, dicom.SCORE, codes.SCT.Lung, right if region in "ABC" else left)
                   for region, score in fields["region_scores"].items()]
        numbers.append(dicom.Number("BRIXIA-GLOBAL", "Brixia global score", fields["global_score"], dicom.SCORE))
        return dicom.Content(segments=segments, numbers=numbers, overlays=[job.artifacts["overlay"]],
                             parameters=[f"alignment={fields['alignment']}"])

    @staticmethod
    def regions_at_input(inferred: Inferred, geometry: Geometry) -> np.ndarray:
        """Aligned-frame regions -> (6, H, W) bool at the input's size, through the inverse alignment."""
        back = brixia.warp_array(inferred.regions.astype(np.float32), brixia.invert_theta(inferred.theta))
        return masks_at_input(back, geometry)


def score_uncertainty(fold_probabilities: np.ndarray) -> dict[str, Any]:
    """How much the scorer folds disagree: the std over folds of each region's expected score (0-3)
    and of the expected global score (0-18)."""
    levels = np.arange(fold_probabilities.shape[-1])
    expected = (fold_probabilities * levels).sum(-1)                         # (folds, 6)
    record = uncertainty.single_fold_note(len(expected))
    spread = uncertainty.score_spread(expected, brixia.REGIONS)
    global_std = uncertainty.spread(expected.sum(-1))
    record.update({"expected_score_std": spread,
                   "max_expected_score_std": None if spread is None else max(spread.values()),
                   "expected_global_score_std": None if global_std is None else round(float(global_std), 6)})
    return record


def region_overlay(gray: np.ndarray, masks: np.ndarray, regions: np.ndarray, scores: np.ndarray,
                   alpha: float = 0.25) -> np.ndarray:
    """RGB X-ray with each region tinted by its score's colour and labelled ``A:2``, lungs and heart outlined."""
    overlay = rendering.tinted(gray, regions, [SCORE_COLOURS[int(score)] for score in scores], alpha)
    line = max(1, round(min(gray.shape) / 300))
    for mask, name in zip(masks, brixia.STRUCTURES):
        rendering.outline(overlay, mask, STRUCTURE_COLOURS[name], line)
    scale = max(0.4, min(gray.shape) / 700)
    thickness = max(1, round(scale * 2))
    for region, letter, score in zip(regions, brixia.REGIONS, scores):
        rendering.outline(overlay, region, (255, 255, 255), max(1, line // 2))
        if region.any():
            rendering.caption(overlay, region, f"{letter}:{int(score)}", SCORE_COLOURS[int(score)], scale, thickness)
    return overlay
