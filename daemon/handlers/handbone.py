"""Hand-bone handler: hand X-ray -> 29 bone masks at the input's size, colour overlay, RLE CSV, polygons JSON, areas.

Request: ``img_path``, ``destination_path``, optional ``threshold`` (0..1, default the card's
``output.threshold``, else 0.5) and ``tta`` (bool: also average a horizontally flipped pass).
Any size and aspect ratio is served:
``tasks.handbone.preprocess`` fits the image into the card's model frame (letterbox or resize,
as the card's input record says) and every output is mapped back through the same geometry.

Reply fields (DESIGN.md): ``masks_path`` (one ``.npz`` with a boolean ``(H, W)`` array per
class name), ``overlay_img_path`` (each bone in its own colour, outlined, with a legend),
``rle_csv_path`` (``image_name,class,rle``, one row per class), ``polygons_json_path`` (the
training JSON's ``{"annotations": [{"label", "points", ...}]}``), ``areas_px`` (pixels per class).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.sr.codedict import codes

from daemon import dicom_content as dicom
from daemon import rendering
from daemon.errors import INVALID_REQUEST, ServiceError
from daemon.handlers.base import Job, TaskHandler
from daemon.outputs import output_stem, timestamp, write_bytes, write_png
from tasks import handbone, quality, uncertainty
from tasks.bundle import Bundle


@dataclass
class Prepared:
    tensor: torch.Tensor          # (3, S, S) normalised network input
    geometry: handbone.Geometry   # how the input sits in the model frame
    gray: np.ndarray              # the input as read, what the overlay is drawn on
    threshold: float
    tta: bool


@dataclass
class Inferred:
    probabilities: np.ndarray     # (C, S, S) mean over folds, model frame
    fold_masks: np.ndarray        # (folds, C, h, w) bool: each fold's masks inside the letterbox


class HandboneHandler(TaskHandler):
    task = "handbone"
    fields = frozenset({"img_path", "destination_path", "threshold", "tta"})

    builders = staticmethod(handbone.build_network)
    memory_format = torch.channels_last

    @classmethod
    def check_bundle(cls, bundle: Bundle) -> None:
        handbone.card_threshold(bundle.card)   # a malformed threshold fails the card at load

    @property
    def default_threshold(self) -> float:
        """The threshold of a request that names none: the card's ``output.threshold`` (what its trainer
        validated with), else 0.5."""
        return handbone.card_threshold(self.card)

    def dummy_inputs(self) -> list[Prepared]:
        size = int(self.card["input"]["size"][0])
        blank = np.zeros((size, size), np.uint8)
        tensor, geometry = handbone.preprocess(blank, self.card["input"])
        return [Prepared(tensor, geometry, blank, self.default_threshold, False)]

    def validate_options(self, request: dict[str, Any], job: Job) -> None:
        threshold = request.get("threshold", self.default_threshold)
        if not handbone.is_fraction(threshold):
            raise ServiceError(INVALID_REQUEST, f"'threshold' must be a number from 0 to 1 (got {threshold!r})")
        tta = request.get("tta", False)
        if not isinstance(tta, bool):
            raise ServiceError(INVALID_REQUEST, f"'tta' must be true or false (got {tta!r})")
        job.options.update(threshold=float(threshold), tta=tta)

    def preprocess(self, job: Job) -> Prepared:
        gray = self.read_request_image(job, color="gray")
        tensor, geometry = handbone.preprocess(gray, self.card["input"])
        return Prepared(tensor, geometry, gray, job.options["threshold"], job.options["tta"])

    def infer(self, batch: list[Prepared]) -> list[Inferred]:
        inputs = torch.stack([item.tensor for item in batch]).to(self.settings.device, memory_format=self.memory_format)
        thresholds = torch.tensor([item.threshold for item in batch], device=inputs.device).view(-1, 1, 1, 1)

        def fold_sum() -> tuple[torch.Tensor, list[np.ndarray]]:
            total, fold_masks = None, []
            for probabilities in handbone.fold_probabilities(self.networks, inputs, [item.tta for item in batch]):
                total = probabilities if total is None else total + probabilities
                fold_masks.append((probabilities > thresholds).cpu().numpy())
            return total, fold_masks

        total, fold_masks = self.forward(fold_sum)
        mean = (total / len(self.networks)).cpu().numpy()
        return [Inferred(mean[i], np.stack([inner_box(masks[i], item.geometry) for masks in fold_masks]))
                for i, item in enumerate(batch)]

    def postprocess(self, job: Job, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        classes = self.card["labels"]
        masks = handbone.masks_at_input(inferred.probabilities, prepared.geometry, prepared.threshold)
        folder, stamp = job.options["folder"], timestamp()
        stem = output_stem(job.options["img_path"])
        image_name = Path(job.options["img_path"]).name
        masks_path = write_bytes(folder, f"{stem}_masks_{stamp}", ".npz", masks_npz(masks, classes))
        overlay_path = write_png(folder, f"{stem}_overlay_{stamp}", rendering.label_overlay(prepared.gray, masks, classes))
        csv_path = write_bytes(folder, f"{stem}_rle_{stamp}", ".csv", rle_csv(image_name, masks, classes))
        polygons = {"image_name": image_name, "height": int(masks.shape[1]), "width": int(masks.shape[2]),
                    "annotations": handbone.polygon_annotations(masks, classes)}
        polygons_path = write_bytes(folder, f"{stem}_polygons_{stamp}", ".json",
                                    json.dumps(polygons, separators=(",", ":")).encode("utf-8"))
        job.artifacts.update(masks=masks, stamp=stamp)
        return {
            "masks_path": str(masks_path),
            "overlay_img_path": str(overlay_path),
            "rle_csv_path": str(csv_path),
            "polygons_json_path": str(polygons_path),
            "areas_px": {name: int(np.count_nonzero(mask)) for name, mask in zip(classes, masks)},
            "image_size": [int(masks.shape[1]), int(masks.shape[2])],
            "threshold": prepared.threshold,
            "tta": prepared.tta,
            "uncertainty": uncertainty.segmentation_uncertainty(inferred.fold_masks, classes),
            "quality": self.quality(inferred.probabilities > prepared.threshold, prepared.geometry),
        }

    def dicom_content(self, job: Job, fields: dict[str, Any]) -> dicom.Content:
        """One binary Segmentation: a segment per bone, named as the card's classes."""
        return dicom.Content(
            segments=[dicom.Segment(name, mask, BONE_CODES.get(name, codes.SCT.Bone))
                      for name, mask in zip(self.card["labels"], job.artifacts["masks"])],
            parameters=[f"threshold={fields['threshold']}", f"tta={str(fields['tta']).lower()}"])

    def quality(self, frame_masks: np.ndarray, geometry: handbone.Geometry) -> dict[str, Any]:
        """Bones found, pieces and areas of the model-frame masks against the card's training ranges."""
        record = self.card.get("quality")
        if not record:
            return quality.assess({}, record)
        classes = self.card["labels"]
        measures = handbone.quality_measures(frame_masks, geometry, classes,
                                             float(record["parameters"]["min_piece_fraction"]))
        return quality.assess(measures, record, handbone.quality_labels(classes))


# SNOMED CT codes pydicom knows for a class; every other bone (fingers, carpals) is coded as "Bone".
BONE_CODES = {"Radius": codes.SCT.Radius, "Ulna": codes.SCT.Ulna, "Scaphoid": codes.SCT.Scaphoid}


def inner_box(masks: np.ndarray, geometry: handbone.Geometry) -> np.ndarray:
    """``(C, S, S)`` model-frame masks -> the part inside the letterbox (the image itself)."""
    return masks[:, geometry.top:geometry.top + geometry.inner_height, geometry.left:geometry.left + geometry.inner_width]


def masks_npz(masks: np.ndarray, classes: list[str]) -> bytes:
    """A compressed ``.npz`` holding one boolean ``(H, W)`` array per class name."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: mask for name, mask in zip(classes, masks)})
    return buffer.getvalue()


def rle_csv(image_name: str, masks: np.ndarray, classes: list[str]) -> bytes:
    """The seed's submission CSV of one image: header ``image_name,class,rle``, one row per class."""
    return handbone.seed_csv(handbone.rle_rows(image_name, masks, classes)).encode("utf-8")
