"""Minimal lossless JPEG encoder (ITU-T T.81 process 14, SOF3) for tests: one component, 2-16 bit,
predictors 1-7, no point transform, one fixed Huffman table.

Nothing in pydicom/pylibjpeg encodes DICOM JPEG Lossless (1.2.840.10008.1.2.4.57 / .70), so the
tests make their own byte streams with this and check that the reader decodes them exactly.
"""

from __future__ import annotations

import struct

import numpy as np

# One DC/lossless Huffman table: the 17 difference categories (SSSS 0..16) all get a 5-bit code.
# Canonical codes (T.81 Annex C) are then simply 0..16, and the all-ones code 11111 stays unused.
_BITS = [0, 0, 0, 0, 17] + [0] * 11  # number of codes of length 1..16
_HUFFVAL = list(range(17))
_CODE = {ssss: (ssss, 5) for ssss in _HUFFVAL}  # ssss -> (code, length)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload


def predict(img: np.ndarray, precision: int, predictor: int) -> np.ndarray:
    """Prediction Px for every sample (T.81 H.1.2.1, with the first-row/first-column rules)."""
    x = img.astype(np.int64)
    ra = np.zeros_like(x)
    rb = np.zeros_like(x)
    rc = np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    px = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1),
          6: rb + ((ra - rc) >> 1), 7: (ra + rb) >> 1}[predictor].copy()
    px[0, 1:] = x[0, :-1]  # first line: always Ra
    px[1:, 0] = x[:-1, 0]  # first column: always Rb
    px[0, 0] = 1 << (precision - 1)  # first sample: 2^(P-1)
    return px


class _BitWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, length: int) -> None:
        self.acc = (self.acc << length) | (value & ((1 << length) - 1))
        self.n += length
        while self.n >= 8:
            self.n -= 8
            byte = (self.acc >> self.n) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0x00)  # byte stuffing
        self.acc &= (1 << self.n) - 1

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1-bits
        return bytes(self.out)


def _entropy_code(diffs: np.ndarray) -> bytes:
    bw = _BitWriter()
    for d in diffs.ravel().tolist():
        if d == 32768:  # SSSS 16: no additional bits
            bw.write(*_CODE[16])
            continue
        ssss = abs(d).bit_length()
        bw.write(*_CODE[ssss])
        if ssss:
            bw.write(d if d > 0 else d - 1, ssss)  # negative: low SSSS bits of d - 1
    return bw.flush()


def encode_lossless_jpeg(img: np.ndarray, precision: int = 8, predictor: int = 1) -> bytes:
    """Encode a 2-D unsigned array (values < 2**precision) as a lossless JPEG byte stream."""
    img = np.asarray(img)
    if img.ndim != 2 or not 2 <= precision <= 16 or predictor not in range(1, 8):
        raise ValueError("need a 2-D image, precision 2..16 and predictor 1..7")
    if img.min() < 0 or img.max() >= (1 << precision):
        raise ValueError(f"values do not fit in {precision} bits")
    rows, cols = img.shape
    diff = (img.astype(np.int64) - predict(img, precision, predictor)) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # signed, with +32768 kept as the SSSS-16 case
    dht = bytes([0x00]) + bytes(_BITS) + bytes(_HUFFVAL)  # class 0, table id 0
    sof3 = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    sos = bytes([1, 1, 0x00, predictor, 0, 0])  # Ns, Cs=1, Td=0, Ss=predictor, Se=0, Ah/Al=0
    return (b"\xff\xd8" + _segment(0xC4, dht) + _segment(0xC3, sof3) + _segment(0xDA, sos)
            + _entropy_code(diff) + b"\xff\xd9")
