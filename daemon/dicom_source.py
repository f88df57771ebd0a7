"""Whose results these are: the patient, study and instance that a request's DICOM objects refer to.

A DICOM input is its own reference: its header (read with its pixels by ``tasks.imaging``) gives
the patient, the study and the instance every object points back to. Any other input (PNG, JPEG,
TIFF) becomes a Secondary Capture itself, written beside the results so that a viewer can show a
segmentation over it and a report's references resolve; its patient and study come from the
request's ``dicom_context``, or, without one, a new Study Instance UID and an empty patient,
which the reply's ``dicom_note`` says.
"""
from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from daemon.dicom_content import MANUFACTURER
from daemon.errors import INVALID_REQUEST, ServiceError

# Request key -> (DICOM keyword, VR, what a valid value looks like).
CONTEXT_FIELDS: dict[str, tuple[str, str, str]] = {
    "patient_id": ("PatientID", "LO", "at most 64 characters"),
    "patient_name": ("PatientName", "PN", "a DICOM person name such as 'Family^Given', at most 64 characters a group"),
    "patient_birth_date": ("PatientBirthDate", "DA", "a date YYYYMMDD"),
    "patient_sex": ("PatientSex", "CS", "M, F or O"),
    "study_instance_uid": ("StudyInstanceUID", "UI", "a DICOM UID: digits and dots, at most 64 characters"),
    "study_id": ("StudyID", "SH", "at most 16 characters"),
    "accession_number": ("AccessionNumber", "SH", "at most 16 characters"),
    "study_date": ("StudyDate", "DA", "a date YYYYMMDD"),
    "study_time": ("StudyTime", "TM", "a time HHMMSS (HH, HHMM and .ffffff also accepted)"),
    "study_description": ("StudyDescription", "LO", "at most 64 characters"),
    "referring_physician_name": ("ReferringPhysicianName", "PN", "a DICOM person name, at most 64 characters a group"),
}
# Type 2 attributes of the Patient and General Study modules: present in every object, empty when unknown.
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID")
# Without these a DICOM input cannot be referenced: its results then go into a study of their own.
_REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
SOURCE_SERIES_NUMBER = 900


@dataclass
class DicomRequest:
    """A request's ``"dicom": true``, with its checked ``dicom_context`` (DICOM keyword -> value)."""
    context: dict[str, str] = field(default_factory=dict)


@dataclass
class Source:
    """The instance every object references, and the input as a Secondary Capture when it was not DICOM."""
    reference: Dataset               # patient, study, series and SOP identity; Type 2 attributes present
    converted: Dataset | None        # the input as a Secondary Capture, to be written too; None for a DICOM input
    notes: list[str]
    referenced: bool = True          # False: ``reference`` names a patient and study only, no instance


def dicom_options(request: dict[str, Any], default: bool) -> DicomRequest | None:
    """The request's ``dicom`` / ``dicom_context`` fields, checked; None when no DICOM is asked for."""
    wanted = request.get("dicom", default)
    if not isinstance(wanted, bool):
        raise ServiceError(INVALID_REQUEST, f"'dicom' must be true or false (got {wanted!r})")
    raw = request.get("dicom_context")
    if raw is None:
        return DicomRequest() if wanted else None
    if not wanted:
        raise ServiceError(INVALID_REQUEST, "'dicom_context' is given but no DICOM is written: add \"dicom\": true")
    if not isinstance(raw, dict):
        raise ServiceError(INVALID_REQUEST,
                           f"'dicom_context' must be an object with any of: {', '.join(CONTEXT_FIELDS)}")
    unknown = sorted(set(raw) - set(CONTEXT_FIELDS))
    if unknown:
        raise ServiceError(INVALID_REQUEST, f"unknown field(s) {', '.join(f'dicom_context.{k}' for k in unknown)}; "
                                            f"allowed: {', '.join(CONTEXT_FIELDS)}")
    return DicomRequest({CONTEXT_FIELDS[key][0]: _checked(key, value) for key, value in raw.items()})


def _checked(key: str, value: Any) -> str:
    keyword, vr, expected = CONTEXT_FIELDS[key]
    name = f"'dicom_context.{key}'"
    if not isinstance(value, str):
        raise ServiceError(INVALID_REQUEST, f"{name} must be a string: {expected}")
    text = value.strip()
    if any(ord(c) < 32 or c == "\\" for c in text):
        raise ServiceError(INVALID_REQUEST, f"{name} must not hold control characters or backslashes "
                                            f"(got {value[:80]!r})")
    valid = {"CS": lambda: text in ("M", "F", "O"), "UI": lambda: bool(text),
             "PN": lambda: text.count("=") <= 2 and all(group.count("^") <= 4 for group in text.split("="))}
    try:
        if not valid.get(vr, lambda: True)():
            raise ValueError(text)
        validate_value(vr, text, config.RAISE)
        if vr == "DA" and text:
            datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise ServiceError(INVALID_REQUEST, f"{name} must be {expected} (got {value[:80]!r})") from None
    return text


def source_for(header: Dataset | None, image: np.ndarray | None, options: DicomRequest,
               unreferenceable: str | None = None) -> Source:
    """The reference of a request's objects: the DICOM input itself, or the input converted to a
    Secondary Capture, in the DICOM input's study or one from ``dicom_context`` (new UIDs for what
    it does not give). ``unreferenceable``: why a DICOM input cannot be referenced after all."""
    notes: list[str] = []
    if header is not None:
        missing = [keyword for keyword in _REFERENCE_UIDS if not str(header.get(keyword) or "").strip()]
        why = unreferenceable or (f"has no {', '.join(missing)}" if missing else None)
        if why is None:
            if options.context:
                notes.append("dicom_context was not used: the objects take patient and study from the DICOM input")
            return Source(_with_type2(header), None, notes)
        notes.append(f"the DICOM input {why}: the image analysed is stored as a Secondary Capture "
                     "(dicom_paths.source) in the input's study and the objects reference that")
        identity = {**options.context, **{keyword: header.get(keyword) for keyword in (
            *_PATIENT_STUDY_TYPE2, "StudyInstanceUID", "StudyDescription", "SpecificCharacterSet")
            if header.get(keyword) not in (None, "")}}
    else:
        identity = dict(options.context)
        if not options.context:
            notes.append("the input is not DICOM and the request has no dicom_context: the patient is left empty "
                         "and the objects go into a new study (new Study Instance UID)")
        elif "StudyInstanceUID" not in identity:
            notes.append("dicom_context has no study_instance_uid: the objects go into a new study")
        if image is not None:
            notes.append("the input is stored as a Secondary Capture (dicom_paths.source) that the objects reference")
    if image is None:  # nothing to convert (scar's clinical features alone): the objects reference no image
        return Source(study_only(identity), None, notes, referenced=False)
    converted = converted_input(image, identity)
    return Source(converted, converted, notes)


def _with_type2(header: Dataset) -> Dataset:
    """A copy of the input's header whose Patient and Study modules carry every Type 2 attribute
    (empty when the input has none), as the derived objects must."""
    reference = copy.deepcopy(header)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in reference:
            setattr(reference, keyword, "")
    return reference


def study_only(identity: dict[str, Any]) -> Dataset:
    """Patient and study attributes alone, for objects derived from no image."""
    reference = Dataset()
    for keyword, value in _new_study(identity).items():
        setattr(reference, keyword, value)
    character_set = _character_set(identity)
    if character_set and "SpecificCharacterSet" not in reference:
        reference.SpecificCharacterSet = character_set
    return _with_type2(reference)


def converted_input(image: np.ndarray, identity: dict[str, Any]) -> Dataset:
    """The input image as a Secondary Capture (8-bit gray or RGB) in the study ``identity`` names."""
    import highdicom as hd

    identity = _new_study(identity)
    photometric = "RGB" if image.ndim == 3 else "MONOCHROME2"
    converted = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(image), photometric_interpretation=photometric, bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"),  # replaced below: the input does not say
        study_instance_uid=identity["StudyInstanceUID"], series_instance_uid=generate_uid(),
        series_number=SOURCE_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        patient_id=identity.get("PatientID"), patient_name=identity.get("PatientName"),
        patient_birth_date=identity.get("PatientBirthDate"), patient_sex=identity.get("PatientSex"),
        accession_number=identity.get("AccessionNumber"), study_id=identity.get("StudyID"),
        study_date=identity.get("StudyDate"), study_time=identity.get("StudyTime"),
        referring_physician_name=identity.get("ReferringPhysicianName"),
        specific_character_set=identity.get("SpecificCharacterSet") or _character_set(identity))
    converted.PatientOrientation = ""   # Type 2C attributes the input cannot tell: present and empty
    converted.Laterality = ""
    converted.ConversionType = "WSD"
    if identity.get("StudyDescription"):
        converted.StudyDescription = identity["StudyDescription"]
    converted.SeriesDescription = "input image (converted to DICOM)"
    return converted


def _new_study(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with a Study Instance UID: its own, or a new study's, dated now unless it says otherwise."""
    if identity.get("StudyInstanceUID"):
        return identity
    now = datetime.datetime.now()
    return {"StudyDate": now.strftime("%Y%m%d"), "StudyTime": now.strftime("%H%M%S"), **identity,
            "StudyInstanceUID": generate_uid()}


def _character_set(identity: dict[str, Any]) -> str | None:
    """UTF-8 (ISO_IR 192) when a value is not plain ASCII; the default repertoire otherwise."""
    return "ISO_IR 192" if any(not str(value).isascii() for value in identity.values()) else None
