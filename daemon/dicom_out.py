"""DICOM results for the PACS, built with highdicom: a binary Segmentation of the masks, a TID 1500
measurement report (Enhanced SR) of the numbers and findings, and each overlay as a Secondary Capture.

Every object shares the patient and study of its source (``daemon.dicom_source``), sits in a new
series of its own, references the source instance, and says which model made it: Algorithm
Identification (name, version, ``demo``), Manufacturer Model Name, Software Versions and a Series
Description that starts with ``DEMO`` for demo weights, so a viewer shows it. Objects are built and
encoded in memory first and only then written through ``daemon.outputs`` (atomic, never
overwriting); if one write fails, those already written are removed, so a failed request leaves
no DICOM behind.
"""
from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from daemon import __version__
from daemon.dicom_content import MANUFACTURER, Content
from daemon.dicom_source import DicomRequest, Source, source_for
from daemon.outputs import write_bytes

log = logging.getLogger("daemon.dicom")
# Private coding scheme (PS3.16 8.2: designators starting "99") for the tasks' own concepts.
CODING_SCHEME = "99MEDIMG"
SERIES_NUMBERS = {"seg": 901, "sr": 902, "sc": 903}   # the converted input is 900 (dicom_source)
FILE_KINDS = {"source": "source", "seg": "seg", "sr": "sr", "sc": "overlay"}   # {stem}_{kind}_{stamp}.dcm
DEMO_WARNING = "DEMO weights: not for clinical use"


def write_for_request(folder: Path, stem: str, stamp: str, header: Dataset | None, image: np.ndarray | None,
                      options: DicomRequest, content: Content, model: dict[str, Any]) -> dict[str, Any]:
    """A request's objects, referencing its DICOM input (``header``) or, for other inputs and for
    DICOM that highdicom cannot derive from (a Frame of Reference without plane geometry, say), the
    analysed ``image`` stored as a Secondary Capture. The reply's ``dicom_paths`` and ``dicom_note``."""
    source = source_for(header, image, options)
    try:
        objects = build_objects(source, content, model)
    except Exception as exc:  # a header highdicom cannot derive from: any error of its, e.g. a missing attribute
        if source.converted is not None or header is None or image is None:
            raise
        log.warning("DICOM objects cannot reference the input itself (%s: %s); referencing a capture of it",
                    type(exc).__name__, exc, exc_info=True)
        reason = f"cannot be derived from ({type(exc).__name__}: {str(exc)[:200]})"
        source = source_for(header, image, options, unreferenceable=reason)
        objects = build_objects(source, content, model)
    paths = write_objects(folder, stem, stamp, objects)
    return {"dicom_paths": paths, **({"dicom_note": "; ".join(source.notes)} if source.notes else {})}


def write_objects(folder: Path, stem: str, stamp: str, objects: list[tuple[str, Dataset]]) -> dict[str, Any]:
    """Encode and write ``objects`` (from ``build_objects``); returns ``dicom_paths``
    (``{"source": p, "seg": p, "sr": p, "sc": [p, ...]}``, only the kinds written)."""
    encoded = [(kind, encode(dataset)) for kind, dataset in objects]
    paths: dict[str, Any] = {}
    written: list[Path] = []
    try:
        for kind, data in encoded:
            path = write_bytes(folder, f"{stem}_{FILE_KINDS[kind]}_{stamp}", ".dcm", data)
            written.append(path)
            if kind == "sc":
                paths.setdefault("sc", []).append(str(path))
            else:
                paths[kind] = str(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths


def build_objects(source: Source, content: Content, model: dict[str, Any]) -> list[tuple[str, Dataset]]:
    """(kind, data set) for every object ``content`` calls for, the converted input first."""
    objects: list[tuple[str, Dataset]] = []
    if source.converted is not None:
        objects.append(("source", source.converted))
    if content.segments:
        objects.append(("seg", segmentation(source, content, model)))
    if content.numbers or content.findings:
        objects.append(("sr", measurement_report(source, content, model)))
    if content.overlays:
        series = generate_uid()
        objects.extend(("sc", secondary_capture(source, overlay, model, series, number))
                       for number, overlay in enumerate(content.overlays, 1))
    return objects


def encode(dataset: Dataset) -> bytes:
    """A data set as DICOM file bytes (preamble, file meta, the data set's transfer syntax)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# --- the model's marks on every object ------------------------------------------------------
def series_description(kind: str, model: dict[str, Any]) -> str:
    return f"{'DEMO ' if model.get('demo') else ''}{kind} by {model['name']}"[:64]


def software_versions(model: dict[str, Any]) -> list[str]:
    return [f"{MANUFACTURER} {__version__}"[:64], f"{model['name']} {model['version']}"[:64]]


def model_statement(model: dict[str, Any]) -> str:
    """One sentence naming the model, for free-text attributes."""
    text = f"made by {MANUFACTURER} {__version__} with model {model['name']} version {model['version']}"
    return f"{text}; {DEMO_WARNING}" if model.get("demo") else text


def algorithm_parameters(model: dict[str, Any], content: Content) -> list[str]:
    return [f"demo={str(bool(model.get('demo'))).lower()}", *content.parameters]


def _mark(dataset: Dataset, kind: str, model: dict[str, Any]) -> Dataset:
    dataset.SeriesDescription = series_description(kind, model)
    dataset.ManufacturerModelName = str(model["name"])[:64]
    dataset.SoftwareVersions = software_versions(model)
    return dataset


def _private_scheme(dataset: Dataset) -> None:
    """Declare the private coding scheme the object's codes use (SOP Common module)."""
    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = f"{MANUFACTURER} task results"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [item]


def _private(code: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code, CODING_SCHEME, meaning[:64])


def _source_reference(source: Source) -> list[Dataset]:
    """A Source Image Sequence item pointing at the source instance (empty when there is none)."""
    if not source.referenced:
        return []
    item = Dataset()
    item.ReferencedSOPClassUID = source.reference.SOPClassUID
    item.ReferencedSOPInstanceUID = source.reference.SOPInstanceUID
    return [item]


# --- the three kinds of object -------------------------------------------------------------
def segmentation(source: Source, content: Content, model: dict[str, Any]) -> hd.seg.Segmentation:
    """A binary Segmentation of ``content.segments`` at the source image's geometry (one frame per
    non-empty segment)."""
    reference = source.reference
    rows, columns = int(reference.Rows), int(reference.Columns)
    masks = np.stack([np.asarray(segment.mask, dtype=bool) for segment in content.segments])
    if masks.shape[1:] != (rows, columns):
        raise ValueError(f"masks are {masks.shape[2]}x{masks.shape[1]}, the source image is {columns}x{rows}")
    # (1, rows, columns, segments) as a view: each segment's frame stays one contiguous block
    # (a copy into that layout took most of the time for 29 full-size hand-bone masks).
    pixels = np.moveaxis(masks, 0, -1)[None]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(model["name"])[:64], family=codes.cid7162.ArtificialIntelligence, version=str(model["version"])[:64],
        source=MANUFACTURER,
        parameters=dict(parameter.split("=", 1) for parameter in algorithm_parameters(model, content)))
    descriptions = []
    for number, segment in enumerate(content.segments, 1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.label[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=segment.structure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        if segment.laterality is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(segment.laterality)]
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=[reference], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=str(model["name"])[:64], software_versions=software_versions(model),
        device_serial_number=str(model["version"])[:64], content_label="SEGMENTATION",
        content_description=model_statement(model)[:64] if not model.get("demo") else DEMO_WARNING[:64],
        omit_empty_frames=bool(masks.any()))   # an all-empty result still needs one frame
    seg.PatientOrientation = reference.get("PatientOrientation", "")   # Type 2C: the source's, else unknown
    return _mark(seg, "SEG", model)


def measurement_report(source: Source, content: Content, model: dict[str, Any]) -> hd.sr.EnhancedSR:
    """A TID 1500 Imaging Measurement Report with one measurement group: the numbers (TID 300) and
    findings (qualitative evaluations), the model as Algorithm Identification and as the observing
    device, and the source image as the group's source and the report's evidence."""
    algorithm = hd.sr.AlgorithmIdentification(name=str(model["name"])[:64], version=str(model["version"])[:64],
                                              parameters=algorithm_parameters(model, content))
    measurements = [
        hd.sr.Measurement(
            name=_private(number.code, number.meaning), value=float(number.value), unit=number.unit,
            finding_sites=None if number.site is None else [
                hd.sr.FindingSite(number.site, laterality=number.laterality)])
        for number in content.numbers]
    # "Impression" (DCM 121073), not "Finding": TID 1501 keeps that name for the group's finding type.
    findings = [hd.sr.QualitativeEvaluation(codes.DCM.Impression, _private(finding.code, finding.meaning))
                for finding in content.findings]
    reference = source.reference
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{model['name']} result"[:64]),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=findings or None,
        source_images=([hd.sr.SourceImageForMeasurementGroup.from_source_image(reference)]
                       if source.referenced else None))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, str(model["name"]), str(model["version"])]),
        name=str(model["name"])[:64], manufacturer_name=MANUFACTURER, model_name=str(model["version"])[:64])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device)),
        # No image library: its projection-radiography entries need Patient Orientation and Imager Pixel
        # Spacing, which many films lack; the group's source image and the evidence reference the input.
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=[group])
    evidence = reference if source.referenced else _placeholder_instance(reference)
    sr = hd.sr.EnhancedSR(
        evidence=[evidence], content=report, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False)
    if not source.referenced:  # highdicom lists its evidence; this report was derived from no instance
        del sr.CurrentRequestedProcedureEvidenceSequence
    _private_scheme(sr)
    return _mark(sr, "SR", model)


def _placeholder_instance(study: Dataset) -> Dataset:
    """Patient and study attributes with made-up instance UIDs: highdicom takes a report's patient and
    study from an evidence instance, which a report derived from no image does not have."""
    placeholder = copy.deepcopy(study)
    placeholder.SOPClassUID = SecondaryCaptureImageStorage
    placeholder.SOPInstanceUID, placeholder.SeriesInstanceUID = generate_uid(), generate_uid()
    return placeholder


def secondary_capture(source: Source, overlay: np.ndarray, model: dict[str, Any], series_uid: str,
                      number: int) -> hd.sc.SCImage:
    """An RGB overlay as a Secondary Capture derived from the source image."""
    reference = source.reference
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=np.ascontiguousarray(overlay, dtype=np.uint8),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced below by the source's own (an overlay keeps its orientation)
        series_instance_uid=series_uid, series_number=SERIES_NUMBERS["sc"], sop_instance_uid=generate_uid(),
        instance_number=number, manufacturer=MANUFACTURER)
    sc.PatientOrientation = reference.get("PatientOrientation", "")
    sc.Laterality = reference.get("Laterality", "")   # Type 2C: the source's, else unknown
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = f"overlay of the model's result on the source image, {model_statement(model)}"[:1024]
    sc.ImageComments = model_statement(model)
    references = _source_reference(source)
    if references:
        sc.SourceImageSequence = references
    return _mark(sc, "overlay", model)
