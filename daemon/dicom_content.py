"""What a task hands over to be written as DICOM: masks, numbers, coded findings and overlays.

Kept apart from ``daemon.dicom_out`` so a handler can describe its results without importing
highdicom (half a second of start-up), which is loaded only when a request asks for DICOM.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import numpy as np
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

MANUFACTURER = "medimg-daemon"   # Manufacturer of every object written
# UCUM units of the tasks' numbers ("{...}" is UCUM's annotation of a dimensionless count).
SCORE = Code("{score}", "UCUM", "score")
GRADE = Code("{grade}", "UCUM", "grade")
PROBABILITY = codes.UCUM.NoUnits


@dataclass
class Segment:
    """One segment of a Segmentation: a named mask at the source image's size."""
    label: str
    mask: np.ndarray                 # (rows, columns) bool
    structure: Code                  # segmented property type, a SNOMED CT code (pydicom ``codes.SCT``)
    laterality: Code | None = None   # codes.SCT.Right / Left


@dataclass
class Number:
    """One numeric result of a report (TID 300 measurement), named in the private coding scheme."""
    code: str                        # short code value, at most 16 characters
    meaning: str
    value: float
    unit: Code                       # UCUM: SCORE, GRADE, PROBABILITY
    site: Code | None = None         # finding site (SNOMED CT) and its laterality
    laterality: Code | None = None


@dataclass
class Finding:
    """A coded conclusion of a report (``Impression`` = this value), e.g. the osteo diagnosis."""
    code: str
    meaning: str


@dataclass
class Content:
    """What a task hands over: masks for a Segmentation, numbers and findings for a report, overlays
    (RGB uint8) for Secondary Captures, and the request's options worth recording with the model."""
    segments: Sequence[Segment] = ()
    numbers: Sequence[Number] = ()
    findings: Sequence[Finding] = ()
    overlays: Sequence[np.ndarray] = ()
    parameters: Sequence[str] = ()
