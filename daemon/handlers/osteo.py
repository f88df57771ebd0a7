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

from daemon import explain
from daemon.errors import INVALID_REQUEST, ServiceError
from daemon.handlers.base import Job, TaskHandler
from daemon.outputs import output_stem, timestamp, write_png
from tasks import osteo, quality, uncertainty


@dataclass
class Prepared:
    tensor: torch.Tensor  # (3, H, W) normalised network input
    shown: np.ndarray     # background-subtracted gray at model size, what overlays are drawn on
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

    build_network = staticmethod(osteo.build_network)

    @classmethod
    def prepare_network(cls, network: torch.nn.Module) -> None:
        explain.freeze_for_cam(network, osteo.explain_target_layer(network))

    def warm_up(self) -> None:
        height, width = self.card["input"]["size"]
        blank = Prepared(tensor=torch.zeros(3, height, width), shown=np.zeros((height, width), np.uint8),
                         method=self.settings.explain)
        inferred = self.infer([blank])[0]
        explain.heat_rgba(inferred.heat), explain.seed_overlay(blank.shown, inferred.heat)

    def validate(self, request: dict[str, Any]) -> Job:
        job = self.image_job(request)
        method = request.get("explain", self.settings.explain)
        if method not in explain.EXPLAIN_METHODS:
            raise ServiceError(INVALID_REQUEST, f"'explain' must be one of {', '.join(explain.EXPLAIN_METHODS)}")
        job.options["explain"] = method
        return job

    def preprocess(self, job: Job) -> Prepared:
        gray = self.read_request_image(job, color="gray")
        tensor, shown = osteo.preprocess(gray, self.card["input"])
        return Prepared(tensor=tensor, shown=shown, method=job.options["explain"], measures=osteo.quality_measures(gray))

    def infer(self, batch: list[Prepared]) -> list[Inferred]:
        device = self.settings.device
        inputs = torch.stack([item.tensor for item in batch]).to(device)
        with torch.inference_mode(), self.autocast():
            logits = [net(inputs) for net in self.networks]
        fold_probabilities = torch.stack([torch.softmax(out.float(), dim=1) for out in logits])
        probabilities = fold_probabilities.mean(0).cpu().numpy()
        fold_probabilities = fold_probabilities.cpu().numpy()
        predicted = probabilities.argmax(axis=1)
        heat = np.zeros((len(batch), inputs.shape[2], inputs.shape[3]), dtype=np.float32)
        for method in {item.method for item in batch}:
            rows = [i for i, item in enumerate(batch) if item.method == method]
            subset, classes = inputs[rows], predicted[rows]
            with self.autocast():
                if method == "gradcam":
                    heat[rows] = explain.grad_cam(self.networks, osteo.explain_target_layer, subset, classes)
                else:
                    heat[rows] = explain.input_saliency(self.networks, subset, classes)
        return [Inferred(probabilities[i], int(predicted[i]), heat[i], fold_probabilities[:, i]) for i in range(len(batch))]

    def postprocess(self, job: Job, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        labels = self.card["labels"]
        label = labels[inferred.predicted]
        folder = job.options["folder"]
        stem = output_stem(job.options["img_path"])
        stamp = timestamp()
        heat_path = write_png(folder, f"{stem}_saliency_{stamp}", explain.heat_rgba(inferred.heat))
        # The seed's additive red overlay suits its sparse saliency; Grad-CAM is blended instead.
        overlay = (explain.seed_overlay(prepared.shown, inferred.heat) if prepared.method == "saliency"
                   else explain.heat_overlay(prepared.shown, inferred.heat))
        overlay_path = write_png(folder, f"{stem}_overlay_{stamp}", overlay)
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
