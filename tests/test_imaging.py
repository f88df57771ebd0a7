"""tasks.imaging: every supported format decodes to the expected uint8 image; bad files fail cleanly."""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_factory import (base_dataset, dataset_from_pixels, phantom, save, write_dicom,  # noqa: E402
                           write_dicom_header_only, write_encapsulated)
from ljpeg_encoder import encode_lossless_jpeg  # noqa: E402

from tasks import imaging  # noqa: E402
from tasks.imaging import (DEFAULT_MAX_PIXELS, ImageReadError, ImageTooLarge,  # noqa: E402
                           image_dimensions, read_image, window_to_uint8)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

H, W = 64, 96


def minmax(values: np.ndarray) -> np.ndarray:
    return window_to_uint8(values, float(values.min()), float(values.max()))


def check(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    assert arr.dtype == np.uint8 and arr.flags.c_contiguous and arr.shape == shape
    return arr


def save_pil(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


# ----------------------------------------------------------------------------- window_to_uint8

def test_window_to_uint8_maps_linearly_with_rounding_and_clipping():
    out = window_to_uint8(np.array([-5, 0, 5, 400, 1020, 2000]), 0, 1020)
    assert out.tolist() == [0, 0, 1, 100, 255, 255]
    assert window_to_uint8(np.full((2, 2), 7), 7, 7).tolist() == [[0, 0], [0, 0]]  # flat image


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF

def test_png_gray_rgb_and_gray_from_rgb_matches_pil_luma(tmp_path):
    g, rgb = phantom(bits=8), phantom(bits=8, rgb=True)
    gp = save_pil(tmp_path / "g.png", Image.fromarray(g), "PNG")
    cp = save_pil(tmp_path / "c.png", Image.fromarray(rgb), "PNG")
    assert np.array_equal(check(read_image(gp), (H, W)), g)
    assert np.array_equal(check(read_image(gp, color="rgb"), (H, W, 3)), np.dstack([g, g, g]))
    assert np.array_equal(check(read_image(cp, color="rgb"), (H, W, 3)), rgb)
    assert np.array_equal(read_image(cp), np.asarray(Image.fromarray(rgb).convert("L")))
    assert image_dimensions(cp) == (H, W)


def test_png_rgba_drops_alpha_and_palette_becomes_rgb(tmp_path):
    rgb = phantom(bits=8, rgb=True)
    rgba = np.dstack([rgb, np.linspace(0, 255, W, dtype=np.uint8)[None, :].repeat(H, 0)])
    p = save_pil(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"), "PNG")
    assert np.array_equal(read_image(p, color="rgb"), rgb)
    pal_img = Image.fromarray(rgb).quantize(16)
    p = save_pil(tmp_path / "p.png", pal_img, "PNG")
    assert Image.open(p).mode == "P"
    assert np.array_equal(read_image(p, color="rgb"), np.asarray(pal_img.convert("RGB")))


def test_png_16bit_gray_is_minmax_windowed(tmp_path):
    ph = phantom(bits=12)
    p = save_pil(tmp_path / "g16.png", Image.fromarray(ph), "PNG")
    assert np.array_equal(check(read_image(p), (H, W)), minmax(ph))


def test_one_pixel_image_is_readable(tmp_path):
    p = save_pil(tmp_path / "1.png", Image.new("L", (1, 1), 9), "PNG")
    assert read_image(p).tolist() == [[9]]


def test_jpeg_exif_orientation_is_applied(tmp_path):
    g = phantom(bits=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    p = save_pil(tmp_path / "o.jpg", Image.fromarray(g), "JPEG", exif=exif, quality=95)
    out = check(read_image(p), (W, H))
    assert image_dimensions(p) == (W, H)
    assert np.array_equal(out, np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("L")))
    assert np.abs(out.astype(int) - np.rot90(g, -1)).mean() < 2


def test_jpeg_cmyk_becomes_rgb(tmp_path):
    rgb = phantom(bits=8, rgb=True)
    p = save_pil(tmp_path / "k.jpg", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    out = check(read_image(p, color="rgb"), (H, W, 3))
    assert np.abs(out.astype(int) - rgb).mean() < 6


def test_tiff_16bit_lzw_and_rgb(tmp_path):
    ph = phantom(bits=12)
    p = save_pil(tmp_path / "g16.tif", Image.fromarray(ph), "TIFF", compression="tiff_lzw")
    assert np.array_equal(read_image(p), minmax(ph))
    rgb = phantom(bits=8, rgb=True)
    p = save_pil(tmp_path / "c.tif", Image.fromarray(rgb), "TIFF", compression="tiff_lzw")
    assert np.array_equal(read_image(p, color="rgb"), rgb)


def test_format_is_detected_by_content_not_extension(tmp_path):
    g = phantom(bits=8)
    p = save_pil(tmp_path / "really_a_png.dcm", Image.fromarray(g), "PNG")
    assert np.array_equal(read_image(p), g)
    d = write_dicom(tmp_path / "really_dicom.png", g)
    assert np.array_equal(read_image(d), g)


# ----------------------------------------------------------------------------- DICOM

def test_dicom_uncompressed_16bit_windows_like_png_and_tiff(tmp_path):
    ph = phantom(bits=12)
    out = check(read_image(write_dicom(tmp_path / "u.dcm", ph, bits_stored=12)), (H, W))
    assert np.array_equal(out, minmax(ph))
    assert np.array_equal(read_image(write_dicom(tmp_path / "u.dcm", ph), color="rgb"),
                          np.dstack([out] * 3))
    assert image_dimensions(tmp_path / "u.dcm") == (H, W)


def test_dicom_8bit_is_taken_as_stored(tmp_path):
    g = phantom(bits=8)
    assert np.array_equal(read_image(write_dicom(tmp_path / "u8.dcm", g, bits_stored=8)), g)


def test_monochrome1_reads_the_same_as_its_monochrome2_twin(tmp_path):
    ph = phantom(bits=12)
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", ph, bits_stored=12))
    # MONOCHROME1 stores the inverted values: low = white. Displayed, it must look like the twin.
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", 4095 - ph, bits_stored=12,
                                photometric="MONOCHROME1"))
    assert np.array_equal(m1, m2)
    same_values = read_image(write_dicom(tmp_path / "m1b.dcm", ph, photometric="MONOCHROME1"))
    assert np.array_equal(same_values, 255 - m2)


def test_rescale_and_window_are_applied(tmp_path):
    ph = phantom(bits=12)
    slope, intercept, center, width = 2.0, -1000.0, 1500.0, 3000.0
    p = write_dicom(tmp_path / "w.dcm", ph, bits_stored=12, rescale=(slope, intercept),
                    window=(center, width))
    hu = ph * slope + intercept
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = np.clip(np.rint((hu - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    out = read_image(p)
    assert np.array_equal(out, expected)
    assert (out == 255).sum() > 0 and not np.array_equal(out, minmax(ph))  # window clips the disc


def test_voi_lut_sequence_is_applied(tmp_path):
    ph = phantom(bits=12)
    ds = dataset_from_pixels(ph, bits_stored=12)
    lut = (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # a gamma-like VOI LUT
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    out = read_image(save(ds, tmp_path / "lut.dcm"))
    assert np.array_equal(out, window_to_uint8(lut[ph], float(lut.min()), float(lut.max())))


def test_a_sigmoid_voi_lut_function_is_the_dicom_sigmoid_not_a_linear_ramp(tmp_path):
    ph = phantom(bits=12)
    center, width = 2000.0, 1500.0
    ds = dataset_from_pixels(ph, bits_stored=12, window=(center, width))
    ds.VOILUTFunction = "SIGMOID"
    out = read_image(save(ds, tmp_path / "sigmoid.dcm"))
    expected = np.rint(255 / (1 + np.exp(-4 * (ph - center) / width))).astype(np.uint8)  # PS3.3 C.11.2.1.3.1
    assert np.abs(out.astype(int) - expected).max() <= 1  # float noise at .5 ties only
    linear = read_image(write_dicom(tmp_path / "linear.dcm", ph, bits_stored=12, window=(center, width)))
    at_top = ph >= center + width / 2  # a linear window is white there; the sigmoid is not yet
    assert at_top.any() and (linear[at_top] == 255).all() and (out[at_top] < 255).any()


def test_padding_pixels_neither_set_the_window_nor_show_as_anything_but_black(tmp_path):
    body = np.minimum(phantom(bits=12), 3000)  # the disc would otherwise touch the padding value
    padded = body.copy()
    padded[:, :10] = 4095  # the detector's unexposed border, stored as white
    ds = dataset_from_pixels(padded, bits_stored=12)
    ds.PixelPaddingValue = 4095
    out = read_image(save(ds, tmp_path / "pad.dcm"))
    assert (out[:, :10] == 0).all()
    assert np.array_equal(out[:, 10:], minmax(body[:, 10:]))  # the window is the body's alone
    # MONOCHROME1, a padding range: still black after the inversion.
    inverted = 4095 - body
    inverted[:5] = padding = np.arange(5 * W).reshape(5, W) % 3  # padding 0..2
    ds = dataset_from_pixels(inverted.astype(np.uint16), bits_stored=12, photometric="MONOCHROME1")
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 0, 2
    out = read_image(save(ds, tmp_path / "pad1.dcm"))
    assert padding.max() == 2 and inverted[5:].min() > 2 and (out[:5] == 0).all()
    assert np.array_equal(out[5:], 255 - minmax(inverted[5:]))


def test_presentation_lut_shape_inverse_inverts_monochrome2_once_and_restates_monochrome1(tmp_path):
    ph = phantom(bits=12)
    plain = read_image(write_dicom(tmp_path / "plain.dcm", ph, bits_stored=12))
    ds = dataset_from_pixels(ph, bits_stored=12)
    ds.PresentationLUTShape = "INVERSE"
    assert np.array_equal(read_image(save(ds, tmp_path / "inverse2.dcm")), 255 - plain)
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", ph, bits_stored=12, photometric="MONOCHROME1"))
    ds = dataset_from_pixels(ph, bits_stored=12, photometric="MONOCHROME1")
    ds.PresentationLUTShape = "INVERSE"  # what DX requires of every MONOCHROME1 image: no second inversion
    assert np.array_equal(read_image(save(ds, tmp_path / "inverse1.dcm")), m1)
    assert np.array_equal(m1, 255 - plain)


def test_presentation_lut_sequence_maps_the_windowed_image(tmp_path):
    from pydicom.sequence import Sequence

    ph = phantom(bits=12)
    plain = read_image(write_dicom(tmp_path / "plain.dcm", ph, bits_stored=12))

    def with_lut(name, table, bits):
        ds = dataset_from_pixels(ph, bits_stored=12)
        item = Dataset()
        item.add_new(0x00283002, "US", [len(table), 0, bits])          # LUT Descriptor
        item.add_new(0x00283006, "US", [int(v) for v in table])        # LUT Data
        ds.PresentationLUTSequence = Sequence([item])
        return read_image(save(ds, tmp_path / name))

    # a falling 256-entry 8-bit ramp is an inversion; a 4096-entry 12-bit square law darkens the mid-tones
    assert np.array_equal(with_lut("falling.dcm", np.arange(255, -1, -1), 8), 255 - plain)
    square = np.rint((np.arange(4096) / 4095) ** 2 * 4095)
    darker = with_lut("square.dcm", square, 12)
    expected = np.rint(square[np.rint(np.arange(256) / 255 * 4095).astype(int)] * 255 / 4095).astype(np.uint8)[plain]
    assert np.abs(darker.astype(int) - expected.astype(int)).max() <= 1
    assert darker.mean() < plain.mean() - 10


def test_dicom_without_preamble_and_file_meta_is_readable(tmp_path):
    ph = phantom(bits=12)
    ref = read_image(write_dicom(tmp_path / "ref.dcm", ph))
    bare = write_dicom(tmp_path / "bare", ph, preamble=False, file_meta=False)
    assert Path(bare).read_bytes()[:2] == b"\x08\x00"  # starts with a group 0008 tag
    assert np.array_equal(read_image(bare), ref)
    assert image_dimensions(bare) == (H, W)
    no_preamble = write_dicom(tmp_path / "nopre", ph, preamble=False)
    assert np.array_equal(read_image(no_preamble), ref)


def test_multiframe_dicom_is_refused_and_color_dicom_is_read(tmp_path):
    ph = phantom(bits=12)
    frames = np.stack([ph, ph[::-1], ph[:, ::-1]])
    with pytest.raises(ImageReadError, match="holds 3 frames"):   # not silently frame 1
        read_image(write_dicom(tmp_path / "mf.dcm", frames))
    one = write_dicom(tmp_path / "one.dcm", ph)
    expected = read_image(one)
    ds = pydicom.dcmread(one)
    ds.NumberOfFrames = 1                                          # a one-frame object is one image
    ds.save_as(one)
    assert np.array_equal(read_image(one), expected)
    rgb = phantom(bits=8, rgb=True)
    p = write_dicom(tmp_path / "rgb.dcm", rgb)
    assert np.array_equal(read_image(p, color="rgb"), rgb)
    assert np.array_equal(read_image(p), np.asarray(Image.fromarray(rgb).convert("L")))


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless],
                         ids=["rle", "jpegls", "j2k"])
@pytest.mark.parametrize("bits", [8, 12])
def test_lossless_compressed_dicom_decodes_exactly(tmp_path, ts, bits):
    ph = phantom(bits=bits)
    ref = read_image(write_dicom(tmp_path / "ref.dcm", ph, bits_stored=bits))
    out = read_image(write_dicom(tmp_path / "c.dcm", ph, bits_stored=bits, transfer_syntax=ts))
    assert np.array_equal(out, ref)


def test_rle_color_dicom(tmp_path):
    rgb = phantom(bits=8, rgb=True)
    p = write_dicom(tmp_path / "c.dcm", rgb, transfer_syntax=RLELossless)
    assert np.array_equal(read_image(p, color="rgb"), rgb)


@pytest.mark.parametrize("bits,predictor,ts", [(8, 1, JPEGLosslessSV1), (12, 1, JPEGLosslessSV1),
                                               (16, 1, JPEGLosslessSV1), (12, 6, JPEGLossless)])
def test_jpeg_lossless_process14_decodes_exactly(tmp_path, bits, predictor, ts):
    ph = phantom(bits=bits)
    if bits == 16:
        ph[0, 0], ph[1, 1] = 0, 65535  # exercises the SSSS=16 difference category
    stream = encode_lossless_jpeg(ph, precision=bits, predictor=predictor)
    p = write_encapsulated(tmp_path / "lj.dcm", [stream], rows=H, cols=W, transfer_syntax=ts,
                           bits_allocated=8 if bits == 8 else 16, bits_stored=bits)
    ref = read_image(write_dicom(tmp_path / "ref.dcm", ph, bits_stored=bits))
    assert np.array_equal(read_image(p), ref)


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "ybr_full_422"])
def test_jpeg_baseline_dicom(tmp_path, rgb):
    src = phantom(bits=8, rgb=rgb)
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, "JPEG", quality=95)
    p = write_encapsulated(tmp_path / "jb.dcm", [buf.getvalue()], rows=H, cols=W,
                           transfer_syntax=JPEGBaseline8Bit, samples=3 if rgb else 1,
                           photometric="YBR_FULL_422" if rgb else "MONOCHROME2")
    out = read_image(p, color="rgb" if rgb else "gray")
    pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB" if rgb else "L"))
    assert out.shape == src.shape
    diff = np.abs(out.astype(int) - pil)  # same stream; decoders differ in chroma upsampling
    assert diff.mean() < 1 and diff.max() <= 16
    assert np.abs(out.astype(int) - src).mean() < 4


def test_missing_plugin_names_transfer_syntax_and_package(tmp_path, monkeypatch):
    p = write_dicom(tmp_path / "j2k.dcm", phantom(bits=12), transfer_syntax=JPEG2000Lossless)

    class Unavailable:
        is_available = False

    monkeypatch.setattr(imaging, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(ImageReadError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.90.*openjpeg"):
        read_image(p)


# ----------------------------------------------------------------------------- errors

def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):
        image_dimensions(tmp_path / "nope.png")


def test_folder_fifo_and_device_are_rejected_without_opening(tmp_path):
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(ImageReadError, match="not a regular file"):
            read_image(tmp_path / "fifo")  # would block forever if opened
    if os.path.exists("/dev/zero"):
        with pytest.raises(ImageReadError, match="not a regular file"):
            image_dimensions("/dev/zero")


def test_empty_garbage_and_truncated_files_are_unreadable(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    png = save_pil(tmp_path / "full.png", Image.fromarray(phantom(bits=8, rgb=True)), "PNG",
                   compress_level=0)
    (tmp_path / "half.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    dcm = Path(write_dicom(tmp_path / "full.dcm", phantom(bits=12)))
    (tmp_path / "half.dcm").write_bytes(dcm.read_bytes()[: dcm.stat().st_size // 2])
    (tmp_path / "head.dcm").write_bytes(dcm.read_bytes()[:200])
    for name in ["empty.png", "garbage.jpg", "half.png", "half.dcm", "head.dcm"]:
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert type(info.value) is ImageReadError and info.value.code == "unreadable_image", name


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) \
        + chunk(b"IEND", b"")


def test_huge_headers_are_refused_before_decoding(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLarge) as info:
        read_image(tmp_path / "huge.png")
    assert info.value.code == "image_too_large"
    (tmp_path / "big.png").write_bytes(_png_header_only(10_000, 8_001))  # over our cap, under PIL's
    with pytest.raises(ImageTooLarge, match="80,000,000"):
        read_image(tmp_path / "big.png")
    big = write_dicom_header_only(tmp_path / "huge.dcm", 60_000, 60_000, frames=3)
    with pytest.raises(ImageTooLarge, match="frames"):
        read_image(big)
    assert image_dimensions(big) == (60_000, 60_000)
    p = write_dicom(tmp_path / "small.dcm", phantom())
    with pytest.raises(ImageTooLarge):
        read_image(p, max_pixels=H * W - 1)
    assert read_image(p, max_pixels=H * W).shape == (H, W)
    assert DEFAULT_MAX_PIXELS == 80_000_000


def test_folder_walks_take_a_pacs_exports_extensionless_dicoms_by_content(tmp_path):
    pixels = phantom(bits=12)
    with_preamble = write_dicom(tmp_path / "1.2.840.99.1", pixels)  # a UID name: its "suffix" is ".1"
    bare = write_dicom(tmp_path / "IM000002", pixels, preamble=False, file_meta=False)
    Image.fromarray(phantom(bits=8)).save(tmp_path / "scan", format="PNG")
    (tmp_path / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # named as one: read, and reported
    (tmp_path / "DICOMDIR.txt").write_text("index of the export\n")
    (tmp_path / "notes").write_bytes(b"\x08\x00 not a dicom, not an image")
    directory = base_dataset(H, W)
    del directory.Rows, directory.Columns
    save(directory, tmp_path / "DICOMDIR")  # DICOM, but no image
    (tmp_path / "folder.dcm").mkdir()
    found = sorted(p.name for p in tmp_path.iterdir() if imaging.is_image_file(p))
    assert found == ["1.2.840.99.1", "IM000002", "damaged.png", "scan"]
    assert np.array_equal(read_image(with_preamble), read_image(bare))
