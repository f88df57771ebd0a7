"""Scar handler: a neck photo and/or the clinical features -> severity 0-3, with Grad-CAM and overlay PNGs.

Which model answers follows from the request: photo and clinical -> ``combined``, photo only ->
``image``, clinical only -> ``clinical`` (the reply's ``mode``). Probabilities are the mean over
the card's folds of that model; each clinical/combined fold standardises the features with its
own training fold's scaler. With a photo, the Grad-CAM of the image branch (in combined mode:
of the combined decision, through the image branch) is written at the photo's own size as a heat
map (``cam``) and an overlay on the photo. ``destination_path`` is required with a photo and
ignored without one: a clinical-only request writes no files (and creates no folder), unless it
asks for DICOM (its report needs a destination).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from daemon import dicom_content as dicom
from daemon import explain, rendering
from daemon.errors import INVALID_REQUEST, MODEL_UNAVAILABLE, ServiceError
from daemon.handlers.base import Job, TaskHandler
from daemon.outputs import output_stem, timestamp, write_pngs
from tasks import quality, scar, uncertainty
from tasks.bundle import Bundle
from tasks.cards import CardError
from tasks.nets.late_fusion import ClinicalHeld

OVERLAY_ALPHA = 0.55  # heat map opacity where the CAM is 1; unexplained skin stays as photographed


@dataclass
class FoldModel:
    network: torch.nn.Module
    scaler: dict[str, list[float]] | None   # the fold's clinical scaler (clinical and combined models)


@dataclass
class Prepared:
    mode: str
    image: torch.Tensor | None       # (3, h, w) network input
    photo: np.ndarray | None         # (H, W, 3) the photo as read (EXIF-oriented), what overlays are drawn on
    clinical: np.ndarray | None      # (F,) raw feature values in card order
    measures: dict[str, float] | None = None  # tasks.scar quality measures of the photo and clinical values


@dataclass
class Inferred:
    probabilities: np.ndarray        # (4,)
    severity: int
    cam: np.ndarray | None           # (h, w) in [0, 1] at network input size
    fold_probabilities: np.ndarray | None = None  # (folds, 4) of the answering model


class ScarHandler(TaskHandler):
    task = "scar"
    fields = frozenset({"img_path", "clinical", "destination_path"})

    builders = {model: functools.partial(scar.build_network, model) for model in scar.MODES}

    @classmethod
    def prepare_network(cls, model: str, network: torch.nn.Module) -> None:
        if model != "clinical":
            explain.freeze_for_cam(network, scar.explain_target_layer(network))

    @classmethod
    def check_bundle(cls, bundle: Bundle) -> None:
        names = bundle.card.get("input", {}).get("clinical_features") or []
        for model in ("clinical", "combined"):
            for entry in bundle.entries.get(model, []):
                scaler = entry.get("scaler")
                if scaler is None or len(scaler["mean"]) != len(names) or not names:
                    raise CardError(f"scar {model} entry {entry['file']} needs a scaler over the card's "
                                    f"{len(names)} clinical_features")

    # --- card helpers ----------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return list(self.card["input"].get("clinical_features") or [])

    def folds_of(self, mode: str) -> list[FoldModel]:
        return [FoldModel(network, entry.get("scaler"))
                for network, entry in zip(self.bundle[mode], self.bundle.entries.get(mode, []))]

    def dummy_inputs(self) -> list[Prepared]:
        spec = self.card["input"].get("photo")
        return [Prepared(mode, torch.zeros(3, *spec["size"]) if mode != "clinical" else None, None,
                         np.zeros(len(self.feature_names)) if mode != "image" else None)
                for mode in self.bundle.models]

    def warm_up(self) -> None:
        super().warm_up()
        rendering.colormap_tables("hot"), rendering.colormap_tables("jet")  # matplotlib's import, paid now

    # --- the four steps --------------------------------------------------------------------
    image_optional = True

    def validate_options(self, request: dict[str, Any], job: Job) -> None:
        img_path = job.options["img_path"]
        has_clinical = request.get("clinical") is not None
        if img_path is None and not has_clinical:
            raise ServiceError(INVALID_REQUEST, "a scar request needs 'img_path' (a photo of the scar), 'clinical' "
                                                f"(an object of the {len(self.feature_names) or 11} clinical features) "
                                                "or both")
        mode = "combined" if img_path and has_clinical else "image" if img_path else "clinical"
        if not self.folds_of(mode):
            served = sorted(self.bundle.models, key=scar.MODES.index)
            raise ServiceError(MODEL_UNAVAILABLE, f"the scar card has no {mode} model (it serves: {', '.join(served)})")
        job.options["mode"] = mode
        if has_clinical:
            try:
                job.options["clinical"] = scar.clinical_vector(request["clinical"], self.feature_names)
            except scar.ClinicalFeatureError as exc:
                raise ServiceError(INVALID_REQUEST, str(exc)) from None

    def preprocess(self, job: Job) -> Prepared:
        photo = image = None
        measures = scar.clinical_quality_measures(job.options.get("clinical"), self.feature_names)
        if job.options["img_path"] is not None:
            photo = self.read_request_image(job, color="rgb")
            image = scar.preprocess_photo(photo, self.card["input"]["photo"])
            measures.update(scar.quality_measures(photo))
        return Prepared(job.options["mode"], image, photo, job.options.get("clinical"), measures)

    def infer(self, batch: list[Prepared]) -> list[Inferred]:
        results: list[Inferred | None] = [None] * len(batch)
        for mode in {item.mode for item in batch}:
            rows = [i for i, item in enumerate(batch) if item.mode == mode]
            for i, inferred in zip(rows, self._infer_mode(mode, [batch[i] for i in rows])):
                results[i] = inferred
        return results  # type: ignore[return-value]

    def _infer_mode(self, mode: str, items: list[Prepared]) -> list[Inferred]:
        device = self.settings.device
        folds = self.folds_of(mode)
        images = torch.stack([item.image for item in items]).to(device) if mode != "clinical" else None
        raw = np.stack([item.clinical for item in items]) if mode != "image" else None
        clinical = [torch.from_numpy(scar.standardise(raw, fold.scaler)).to(device) if raw is not None else None
                    for fold in folds]
        outputs = [self.forward(fold.network, *[x for x in (images, rows) if x is not None])
                   for fold, rows in zip(folds, clinical)]
        fold_probabilities = torch.stack([torch.softmax(out, dim=1) for out in outputs])
        probabilities = fold_probabilities.mean(0).cpu().numpy().astype(np.float64)
        fold_probabilities = fold_probabilities.cpu().numpy().astype(np.float64)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        severity = probabilities.argmax(axis=1)
        cams: list[np.ndarray | None] = [None] * len(items)
        if images is not None:
            networks = [fold.network if mode == "image" else ClinicalHeld(fold.network, rows)
                        for fold, rows in zip(folds, clinical)]
            cams = list(self.forward(explain.grad_cam, networks, scar.explain_target_layer, images, severity, grad=True))
        return [Inferred(probabilities[i], int(severity[i]), cams[i], fold_probabilities[:, i]) for i in range(len(items))]

    def postprocess(self, job: Job, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        fields: dict[str, Any] = {"severity": inferred.severity,
                                  "probabilities": [float(p) for p in inferred.probabilities],
                                  "mode": prepared.mode,
                                  "uncertainty": uncertainty.classification_uncertainty(inferred.fold_probabilities,
                                                                                        self.card["labels"])}
        if prepared.photo is not None:
            height, width = prepared.photo.shape[:2]
            cam = cv2.resize(inferred.cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            folder, stem, stamp = job.options["folder"], output_stem(job.options["img_path"]), timestamp()
            overlay = rendering.photo_overlay(prepared.photo, cam, OVERLAY_ALPHA)
            cam_path, overlay_path = write_pngs(folder, {f"{stem}_cam_{stamp}": rendering.heat_rgba(cam),
                                                         f"{stem}_overlay_{stamp}": overlay}).values()
            fields["cam_img_path"], fields["overlay_img_path"] = str(cam_path), str(overlay_path)
            job.artifacts.update(overlay=overlay, stamp=stamp)
        fields["quality"] = quality.assess(prepared.measures, self.card.get("quality"))
        return fields

    def dicom_content(self, job: Job, fields: dict[str, Any]) -> dicom.Content:
        """Severity and the four probabilities as a report; with a photo, its overlay as a Secondary Capture."""
        numbers = [dicom.Number("SCAR-GRADE", "Scar severity grade (0-3)", fields["severity"], dicom.GRADE)]
        numbers += [dicom.Number(f"SCAR-P{grade}", f"Probability of scar severity grade {grade}", p, dicom.PROBABILITY)
                    for grade, p in enumerate(fields["probabilities"])]
        overlay = job.artifacts.get("overlay")
        return dicom.Content(numbers=numbers, overlays=[] if overlay is None else [overlay],
                             parameters=[f"mode={fields['mode']}"])
