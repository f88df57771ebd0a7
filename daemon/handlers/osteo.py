"""Osteoporosis handler: panoramic X-ray -> C1/C3 diagnosis, heat map and overlay PNGs.

Replies start with the seed's keys in the seed's order (result, diagnosis, saliency_img_path,
overlay_img_path) and files are named as the seed named them, so the seed's clients work as
they are. ``saliency_img_path`` holds the heat map of the chosen method (Grad-CAM by default,
or the seed's input saliency).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from daemon import dicom_content as dicom
from daemon import explain, rendering
from daemon.errors import INVALID_REQUEST, ServiceError
from daemon.handlers.base import Job, TaskHandler
from daemon.outputs import output_stem, timestamp, write_pngs
from tasks import osteo, quality, rolling_ball_numba, uncertainty
from tasks.nets.efficientnet import fold_batch_norms


@dataclass
class Prepared:
    # Background-subtracted gray at model size: what overlays are drawn on, and (normalised to
    # three float channels only at inference) the network input, so a waiting request holds
    # 0.4 MB instead of 5.5 MB.
    shown: np.ndarray
    method: str
    measures: dict[str, float] | None = None  # tasks.osteo.quality_measures of the input


@dataclass
class Inferred:
    probabilities: np.ndarray  # (num_classes,)
    predicted: int
    heat: np.ndarray           # (H, W) in [0, 1]
    fold_probabilities: np.ndarray | None = None  # (folds, num_classes)


class OsteoHandler(TaskHandler):
    task = "osteo"
    fields = frozenset({"img_path", "destination_path", "explain"})
    leading_fields = ("diagnosis", "saliency_img_path", "overlay_img_path")

    builders = staticmethod(osteo.build_network)
    memory_format = torch.channels_last

    @classmethod
    def prepare_network(cls, model: str, network: torch.nn.Module) -> None:
        fold_batch_norms(network)   # with channels-last, about half the cost of a forward + backward on CPU
        explain.freeze_for_cam(network, osteo.explain_target_layer(network))

    def dummy_inputs(self) -> list[Prepared]:
        height, width = self.card["input"]["size"]
        return [Prepared(shown=np.zeros((height, width), np.uint8), method=self.settings.explain)]

    def warm_up(self) -> None:
        rolling_ball_numba.start_compiling()  # in the background: numpy serves until it is loaded
        super().warm_up()
        blank = np.zeros((2, 2), np.uint8)
        rendering.heat_rgba(blank.astype(np.float32)), rendering.seed_overlay(blank, blank.astype(np.float32))

    def validate_options(self, request: dict[str, Any], job: Job) -> None:
        method = request.get("explain", self.settings.explain)
        if method not in explain.EXPLAIN_METHODS:
            raise ServiceError(INVALID_REQUEST, f"'explain' must be one of {', '.join(explain.EXPLAIN_METHODS)}")
        job.options["explain"] = method

    def preprocess(self, job: Job) -> Prepared:
        gray = self.read_request_image(job, color="gray")
        shown = osteo.preprocessed_gray(gray, self.card["input"])
        return Prepared(shown=shown, method=job.options["explain"], measures=osteo.quality_measures(gray))

    def infer(self, batch: list[Prepared]) -> list[Inferred]:
        # One forward pass per fold serves both the probabilities and the map (explain.explained_prediction).
        inputs = torch.stack([osteo.to_tensor(item.shown, self.card["input"]) for item in batch])
        inputs = inputs.to(self.settings.device, memory_format=self.memory_format)
        results: list[Inferred | None] = [None] * len(batch)
        for method in dict.fromkeys(item.method for item in batch):
            rows = [i for i, item in enumerate(batch) if item.method == method]
            subset = inputs if len(rows) == len(batch) else inputs[rows]
            probabilities, predicted, heat, per_fold = self.forward(
                explain.explained_prediction, self.networks, subset, method, osteo.explain_target_layer, grad=True)
            for k, i in enumerate(rows):
                results[i] = Inferred(probabilities[k], int(predicted[k]), heat[k], per_fold[:, k])
        return results

    def postprocess(self, job: Job, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        labels = self.card["labels"]
        label = labels[inferred.predicted]
        folder = job.options["folder"]
        stem = output_stem(job.options["img_path"])
        stamp = timestamp()
        # The seed's additive red overlay suits its sparse saliency; Grad-CAM is blended instead.
        overlay = (rendering.seed_overlay(prepared.shown, inferred.heat) if prepared.method == "saliency"
                   else rendering.heat_overlay(prepared.shown, inferred.heat))
        heat_path, overlay_path = write_pngs(folder, {f"{stem}_saliency_{stamp}": rendering.heat_rgba(inferred.heat),
                                                      f"{stem}_overlay_{stamp}": overlay}).values()
        job.artifacts.update(overlay=overlay, stamp=stamp)
        return {
            "diagnosis": osteo.diagnosis_for(labels, label),
            "saliency_img_path": str(heat_path),
            "overlay_img_path": str(overlay_path),
            "label": label,
            "probability": round(float(inferred.probabilities[1]), 6),
            "explain": prepared.method,
            "uncertainty": uncertainty.classification_uncertainty(inferred.fold_probabilities, labels),
            "quality": quality.assess(prepared.measures, self.card.get("quality")),
        }

    def dicom_content(self, job: Job, fields: dict[str, Any]) -> dicom.Content:
        """The diagnosis and its probability as a report, the heat-map overlay as a Secondary Capture."""
        positive = self.card["labels"][1]
        meaning = f"Probability of {positive} ({osteo.diagnosis_for(self.card['labels'], positive)})"
        return dicom.Content(
            findings=[dicom.Finding(fields["label"], fields["diagnosis"])],
            numbers=[dicom.Number("OSTEO-P", meaning, fields["probability"], dicom.PROBABILITY)],
            overlays=[job.artifacts["overlay"]], parameters=[f"explain={fields['explain']}"])
