"""Test helpers that write small DICOM files (uncompressed, compressed, odd layouts) built from arrays.

Importable by any test: `from tests.dicom_factory import phantom, write_dicom` (or `from dicom_factory ...`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         SecondaryCaptureImageStorage, UID, generate_uid)


def phantom(height: int = 64, width: int = 96, *, bits: int = 12, rgb: bool = False) -> np.ndarray:
    """A horizontal gradient with a bright disc: uint16 for bits > 8 else uint8; (H, W, 3) when rgb."""
    top = (1 << bits) - 1
    yy, xx = np.mgrid[0:height, 0:width]
    img = xx / max(width - 1, 1) * (0.6 * top)
    disc = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 <= (min(height, width) / 4) ** 2
    img[disc] = top
    img = np.rint(img).astype(np.uint16 if bits > 8 else np.uint8)
    if rgb:
        ramp = np.rint(yy / max(height - 1, 1) * top).astype(img.dtype)
        img = np.stack([img, ramp, img[:, ::-1]], axis=-1)
    return np.ascontiguousarray(img)


def base_dataset(rows: int, cols: int, *, samples: int = 1, bits_allocated: int = 16,
                 bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                 signed: bool = False, frames: int = 1) -> Dataset:
    """A Secondary Capture data set with the Image Pixel module filled in and no Pixel Data."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    return ds


def dataset_from_pixels(pixels: np.ndarray, *, photometric: str | None = None,
                        bits_stored: int | None = None, window: tuple[float, float] | None = None,
                        rescale: tuple[float, float] | None = None) -> Dataset:
    """Uncompressed data set holding `pixels` ((H, W), (H, W, 3) or (frames, H, W)); window=(center,
    width), rescale=(slope, intercept)."""
    pixels = np.ascontiguousarray(pixels)
    color = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not color else 1
    rows, cols = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    bits_allocated = pixels.dtype.itemsize * 8
    ds = base_dataset(rows, cols, samples=3 if color else 1, bits_allocated=bits_allocated,
                      bits_stored=bits_stored, photometric=photometric or ("RGB" if color else "MONOCHROME2"),
                      signed=pixels.dtype.kind == "i", frames=frames)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def save(ds: Dataset, path: str | os.PathLike, *, transfer_syntax: str = ExplicitVRLittleEndian,
         preamble: bool = True, file_meta: bool = True) -> str:
    """Write `ds`. Uncompressed data are compressed first when `transfer_syntax` asks for it.
    preamble=False drops the 128-byte preamble + 'DICM'; file_meta=False drops group 0002 and
    writes implicit VR little endian (old ACR-NEMA style files)."""
    ts = UID(transfer_syntax)
    if ts.is_compressed and "PixelData" in ds and not _is_encapsulated(ds):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(ts, generate_instance_uid=False)
    if file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
    else:
        ds.file_meta = FileMetaDataset()
        ts = ImplicitVRLittleEndian
    ds.preamble = b"\0" * 128 if preamble else None
    ds.save_as(path, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
               enforce_file_format=False)
    return os.fspath(path)


def _is_encapsulated(ds: Dataset) -> bool:
    return bytes(ds.PixelData[:4]) == b"\xfe\xff\x00\xe0"  # (FFFE,E000) item tag: basic offset table


def write_dicom(path: str | os.PathLike, pixels: np.ndarray, *, photometric: str | None = None,
                bits_stored: int | None = None, window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None,
                transfer_syntax: str = ExplicitVRLittleEndian, preamble: bool = True,
                file_meta: bool = True) -> str:
    """Write `pixels` (uint8/uint16/int16) as a DICOM file; compressed when `transfer_syntax` is
    RLE / JPEG-LS / JPEG 2000 (lossless, needs pydicom's encoders: built-in RLE, pyjpegls,
    pylibjpeg-openjpeg)."""
    ds = dataset_from_pixels(pixels, photometric=photometric, bits_stored=bits_stored,
                             window=window, rescale=rescale)
    return save(ds, path, transfer_syntax=transfer_syntax, preamble=preamble, file_meta=file_meta)


def write_encapsulated(path: str | os.PathLike, frames: Sequence[bytes], *, rows: int, cols: int,
                       transfer_syntax: str, samples: int = 1, bits_allocated: int = 8,
                       bits_stored: int | None = None, photometric: str = "MONOCHROME2") -> str:
    """Write already-compressed frame byte streams (e.g. a JPEG made by Pillow) as a DICOM file."""
    ds = base_dataset(rows, cols, samples=samples, bits_allocated=bits_allocated,
                      bits_stored=bits_stored, photometric=photometric, frames=len(frames))
    ds.PixelData = encapsulate(list(frames))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return save(ds, path, transfer_syntax=transfer_syntax)


def write_dicom_header_only(path: str | os.PathLike, rows: int, cols: int, *, frames: int = 1,
                            bits_allocated: int = 16) -> str:
    """A DICOM file announcing rows x cols x frames but holding no Pixel Data (size-cap tests)."""
    ds = base_dataset(rows, cols, bits_allocated=bits_allocated, frames=frames)
    return save(ds, path)
