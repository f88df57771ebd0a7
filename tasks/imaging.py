"""The one image reader for the daemon and the trainers: PNG/JPEG/TIFF (Pillow) and DICOM (pydicom),
detected by content, size-capped from the header, always returned as C-contiguous uint8 gray or RGB.

``decode_image`` also hands back the image in its own colour (gray stays gray, a photo stays RGB)
and the DICOM attributes that say what the image is (``KIND_ATTRIBUTES``), from the same decode,
so the image-kind gate needs no second read."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.multival import MultiValue
from pydicom.pixels import (apply_color_lut, apply_modality_lut, apply_presentation_lut, apply_voi_lut, apply_windowing,
                            get_decoder)
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID

DEFAULT_MAX_PIXELS: int = 80_000_000
# Names taken for images without opening them; any other file is an image when its content is.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})

# packages that provide pydicom's decoders, by transfer syntax (used in error messages only)
_PLUGIN_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg and pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg and pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle",
}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_DICOM_FIRST_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that transpose height and width
# What a DICOM header says about the kind of image: the equipment, the body part, the projection.
KIND_ATTRIBUTES = ("Modality", "BodyPartExamined", "ViewPosition")


class ImageReadError(Exception):
    """The file exists but cannot be read as an image."""

    code = "unreadable_image"


class ImageTooLarge(ImageReadError):
    """The image header announces more pixels than the cap allows."""

    code = "image_too_large"


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (rounded, clipped); used for every >8-bit source."""
    v = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.ascontiguousarray(np.where(v > low, 255, 0).astype(np.uint8))
    scaled = np.rint((v - low) * (255.0 / (high - low)))
    return np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8))


def image_dimensions(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image as read_image would return it, from the header only."""
    with _open_regular(path) as f:
        if _is_dicom(f):
            rows, cols, _ = _dicom_size(_dicom_header(f))
            return rows, cols
        with _pil_open(f) as img:
            w, h = img.size
            if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
            return h, w


@dataclass
class DecodedImage:
    """An image as stored: uint8 (H, W) gray or (H, W, 3) RGB, and the DICOM ``KIND_ATTRIBUTES`` it
    carries (upper-case strings; empty for other formats and for attributes a file lacks)."""
    pixels: np.ndarray
    attributes: dict[str, str] = field(default_factory=dict)
    header: pydicom.Dataset | None = None  # a DICOM file's data set without Pixel Data

    def as_color(self, color: str) -> np.ndarray:
        """The pixels as uint8 (H, W) for color="gray" or (H, W, 3) for color="rgb"."""
        return as_color(self.pixels, color)


def decode_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode `path` once: its pixels in their own colour and its DICOM kind attributes."""
    with _open_regular(path) as f:
        if _is_dicom(f):
            pixels, header = _read_dicom(f, max_pixels)
            return DecodedImage(pixels, kind_attributes(header), header)
        return DecodedImage(_read_pil(f, max_pixels))


def read_image(path: str | os.PathLike, *, color: str = "gray",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `path` to uint8 (H, W) for color="gray" or (H, W, 3) for color="rgb"."""
    _check_color(color)
    return decode_image(path, max_pixels=max_pixels).as_color(color)


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its format suffix: ``a.png`` -> ``a``, while a UID-named export such as
    ``1.2.840.113619.2.55.3`` keeps its whole name (its last number is no extension)."""
    name = os.path.basename(os.fspath(path))
    root, suffix = os.path.splitext(name)
    return root if suffix.lower() in IMAGE_SUFFIXES else name


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a folder walk should take ``path`` as an image: a regular file named as one, or whose
    first bytes open as a DICOM image or a format Pillow knows (a PACS export's DICOMs often have no
    suffix; its DICOMDIR and reports are DICOM without an image, and are not taken)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True  # even when damaged: it is reported as unreadable rather than silently skipped
    try:
        with _open_regular(path) as f:
            if _is_dicom(f):
                _dicom_size(_dicom_header(f))  # raises without Rows and Columns
                return True
            Image.open(f).close()
            return True
    except Image.DecompressionBombError:
        return True  # an image, reported as too large when read
    except Exception:
        return False


# ---------------------------------------------------------------- file access and detection

def _open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading; never opens folders, devices or fifos."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot access {os.fspath(path)}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{os.fspath(path)} is not a regular file (a folder or device?)")
    if st.st_size == 0:
        raise ImageReadError(f"{os.fspath(path)} is empty (0 bytes)")
    try:  # O_NONBLOCK: a fifo swapped in after the stat cannot block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageReadError(f"cannot open {os.fspath(path)}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageReadError(f"{os.fspath(path)} is not a regular file")
    return os.fdopen(fd, "rb")


def _is_dicom(f: BinaryIO) -> bool:
    """DICOM by content: 'DICM' at byte 128, or (no preamble) a PIL-unknown file opening with a DICOM tag."""
    head = f.read(132)
    f.seek(0)
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in _DICOM_FIRST_GROUPS:
        return False
    try:
        Image.open(f).close()  # a file PIL recognises is never taken for DICOM
        return False
    except Exception:
        return True
    finally:
        f.seek(0)


def _check_cap(height: int, width: int, frames: int, max_pixels: int) -> None:
    total = height * width * frames
    if total > max_pixels:
        what = f"{width} x {height} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(f"image is too large: {what} = {total:,} pixels, "
                            f"the limit is {max_pixels:,} pixels")


# ---------------------------------------------------------------- PNG / JPEG / TIFF

def _pil_open(f: BinaryIO) -> Image.Image:
    try:
        return Image.open(f)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large to open safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError("not a recognised image format (expected PNG, JPEG, TIFF or DICOM)") from exc
    except Exception as exc:
        raise ImageReadError(f"image file is damaged or incomplete: {exc}") from exc


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _read_pil(f: BinaryIO, max_pixels: int) -> np.ndarray:
    with _pil_open(f) as img:
        w, h = img.size
        _check_cap(h, w, 1, max_pixels)
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy of the pixels unless EXIF turns them
            return _pil_to_array(img)
        except ImageReadError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is too large to decode safely: {exc}") from exc
        except Exception as exc:
            raise ImageReadError(f"image file is damaged or incomplete ({img.format}): {exc}") from exc


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3); 16/32-bit gray is min-max windowed."""
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        values = np.asarray(img).astype(np.float64)
        return window_to_uint8(values, float(values.min()), float(values.max()))
    if mode == "L":
        return np.asarray(img)
    if mode in ("1", "LA", "La"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # RGB, RGBA (alpha dropped), P/PA, CMYK, YCbCr, LAB...


# ---------------------------------------------------------------- DICOM

def _dicom_header(f: BinaryIO) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
    except Exception as exc:
        raise ImageReadError(f"DICOM file is damaged or incomplete: {exc}") from exc
    finally:
        f.seek(0)
    return ds


def _dicom_size(ds: pydicom.Dataset) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as exc:
        raise ImageReadError(f"DICOM image size fields are unreadable: {exc}") from exc
    if rows <= 0 or cols <= 0:
        raise ImageReadError("DICOM file has no image dimensions (Rows/Columns missing): "
                             "it is not an image or it is incomplete")
    return rows, cols, max(frames, 1)


def _set_transfer_syntax(ds: pydicom.Dataset) -> UID:
    """Files without file meta: derive the transfer syntax from how the data set was encoded."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return UID(ts)
    implicit, little = ds.original_encoding
    ts = (ExplicitVRBigEndian if little is False else
          ExplicitVRLittleEndian if implicit is False else ImplicitVRLittleEndian)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def kind_attributes(ds: pydicom.Dataset) -> dict[str, str]:
    """The data set's ``KIND_ATTRIBUTES`` that hold a value, stripped and upper-cased."""
    found = {}
    for name in KIND_ATTRIBUTES:
        try:
            value = ds.get(name)
        except Exception:  # a malformed element must not make the image unreadable
            continue
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
        text = str(value).strip().upper() if value is not None else ""
        if text:
            found[name] = text
    return found


def _read_dicom(f: BinaryIO, max_pixels: int) -> tuple[np.ndarray, pydicom.Dataset]:
    """The image as uint8 and the data set without its Pixel Data; a multi-frame object is refused."""
    rows, cols, frames = _dicom_size(_dicom_header(f))
    _check_cap(rows, cols, frames, max_pixels)
    if frames > 1:
        # A cine, tomosynthesis or enhanced multi-frame object is not the single radiograph these models
        # read, and which frame was meant cannot be guessed: reading frame 1 silently could score the wrong one.
        raise ImageReadError(f"DICOM file holds {frames} frames (a multi-frame object): these models read one "
                             "radiograph per file; send the frame to analyse as a single-frame DICOM")
    try:
        ds = pydicom.dcmread(f, force=True)
    except Exception as exc:
        raise ImageReadError(f"DICOM file is damaged or incomplete: {exc}") from exc
    if "PixelData" not in ds:
        raise ImageReadError("DICOM file contains no pixel data")
    ts = _set_transfer_syntax(ds)
    _check_decoder(ts)
    try:
        ds.pixel_array_options(index=0)  # the one frame; YBR is converted to RGB
        arr = _dicom_to_uint8(ds.pixel_array, ds)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"cannot decode DICOM pixel data ({ts.name}): {exc}") from exc
    del ds.PixelData
    return arr, ds


def _check_decoder(ts: UID) -> None:
    try:
        decoder = get_decoder(ts)
    except Exception as exc:
        raise ImageReadError(f"DICOM transfer syntax {ts.name} ({ts}) is not supported") from exc
    if not decoder.is_available:
        need = _PLUGIN_PACKAGES.get(str(ts), "a pydicom pixel-data plugin")
        raise ImageReadError(f"cannot decode DICOM compressed as {ts.name} ({ts}): "
                             f"install {need} on this machine")


def _dicom_to_uint8(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # RGB (YBR already converted by pydicom)
        if arr.dtype == np.uint8:
            return arr
        return window_to_uint8(arr, float(arr.min()), float(arr.max()))
    padding = _padding_mask(arr, ds)
    values, low, high = _gray_window(arr, ds, padding)
    out = window_to_uint8(values, low, high)
    # PS3.3 C.11.6.1: a MONOCHROME2 image may still ask to be shown inverted; in a MONOCHROME1
    # image INVERSE restates the same inversion (DX requires it there), so it is applied once.
    if photometric == "MONOCHROME1" or _text(ds, "PresentationLUTShape") == "INVERSE":
        out = 255 - out
    if "PresentationLUTSequence" in ds:
        out = _presentation_lut(out, ds)
    if padding is not None:
        out[padding] = 0  # padding is the background, not anatomy: black
    return out


def _presentation_lut(out: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The file's Presentation LUT Sequence (PS3.3 C.11.4) applied to the windowed 8-bit image: pydicom's
    ``apply_presentation_lut`` on the 0-255 ramp (so the mapping does not depend on this image's range),
    its P-values scaled back to 8 bits by the LUT's bit depth."""
    bits = int(ds.PresentationLUTSequence[0].LUTDescriptor[2])
    ramp = apply_presentation_lut(np.arange(256, dtype=np.uint16), ds).astype(np.float64)
    return np.clip(np.rint(ramp * 255.0 / (2 ** bits - 1)), 0, 255).astype(np.uint8)[out]


def _padding_mask(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Where the stored values are Pixel Padding Value (up to Pixel Padding Range Limit), PS3.3 C.7.5.1.1.2."""
    value = _first_float(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first_float(ds.get("PixelPaddingRangeLimit"))
    low, high = sorted((value, value if limit is None else limit))
    mask = (arr >= low) & (arr <= high)
    return mask if mask.any() else None


def _gray_window(arr: np.ndarray, ds: pydicom.Dataset,
                 padding: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    """Modality LUT / rescale, then the VOI LUT or first window (pydicom's, SIGMOID included) and the
    range it maps onto, else min-max over the non-padding pixels (8-bit data: as stored)."""
    has_modality = "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds
    values = apply_modality_lut(arr, ds) if has_modality else arr
    if "VOILUTSequence" in ds:
        n_entries, first_mapped = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        table = apply_voi_lut(np.arange(first_mapped, first_mapped + (n_entries or 65536)), ds, index=0)
        return apply_voi_lut(values, ds, index=0), float(table.min()), float(table.max())
    if _first_float(ds.get("WindowCenter")) is not None and _first_float(ds.get("WindowWidth")) is not None:
        try:
            windowed = apply_windowing(values, ds, index=0)
            with np.errstate(over="ignore"):  # SIGMOID's tails, probed at +-1e300
                low, high = (float(v) for v in apply_windowing(np.array([-1e300, 1e300]), ds, index=0))
        except (ValueError, AttributeError, TypeError):  # a width its function cannot use, an unknown function
            pass
        else:
            # pydicom maps the window onto the stored (or rescaled) value range, reversed when the slope is negative
            return (windowed, low, high) if high > low else (-windowed, -low, -high)
    if not has_modality and int(ds.get("BitsStored", 8)) <= 8 and arr.dtype.itemsize == 1:
        low = -128.0 if arr.dtype.kind == "i" else 0.0
        return values, low, low + 255
    shown = values[~padding] if padding is not None and not padding.all() else values
    return values, float(np.min(shown)), float(np.max(shown))


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _first_float(value: object) -> float | None:
    """First value of a possibly multi-valued DS element; None when absent or unparsable."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- colour

def _check_color(color: str) -> None:
    if color not in ("gray", "rgb"):
        raise ValueError(f"color must be 'gray' or 'rgb', not {color!r}")


def as_color(arr: np.ndarray, color: str) -> np.ndarray:
    """uint8 gray or RGB pixels -> (H, W) for color="gray" (Pillow's luma) or (H, W, 3) for color="rgb"."""
    _check_color(color)
    if color == "gray" and arr.ndim == 3:
        arr = _luma(arr)
    elif color == "rgb" and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma with Pillow's fixed-point weights (identical to Image.convert("L"))."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
