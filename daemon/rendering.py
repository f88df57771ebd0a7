"""Every picture the daemon draws: heat-map colours, heat blends, label painting, palette PNGs and legends.

One module so that each colour rule is written once and every task's outputs look alike. All
functions take and return uint8 images (gray ``(H, W)``, RGB ``(H, W, 3)``, RGBA ``(H, W, 4)``)
except where a float map in [0, 1] is the input; colour maps are matplotlib's, looked up in
256-row tables (the same colours bit for bit, without a float64 RGBA image per pixel).
"""
from __future__ import annotations

import colorsys
import io
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

Colour = tuple[int, int, int]


# --- heat maps --------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def colormap_tables(name: str) -> tuple[np.ndarray, np.ndarray]:
    """matplotlib colormap ``name`` as tables indexed like ``colormap_index``: RGBA floats, and those
    as uint8 (``round(255 * value)``); the last row is the colour of NaN ("bad")."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    rgba = np.concatenate([cmap(np.arange(cmap.N)), cmap(np.array([np.nan]))])
    return rgba, (rgba * 255).round().astype(np.uint8)


def colormap_index(values: np.ndarray, name: str = "hot") -> np.ndarray:
    """The table row of each value of a [0, 1] map, computed as matplotlib's Colormap does (scale by
    N in the map's own dtype, N itself maps to N - 1, truncate, NaN to the "bad" row)."""
    n = len(colormap_tables(name)[0]) - 1
    scaled = np.clip(values, 0, 1)
    scaled *= n
    scaled[scaled == n] = n - 1
    bad = np.isnan(scaled)
    with np.errstate(invalid="ignore"):
        index = scaled.astype(np.intp)
    index[bad] = n
    return index


def heat_rgba(heat: np.ndarray, name: str = "hot") -> np.ndarray:
    """A [0, 1] map in colormap ``name`` (the seed's ``hot`` by default), RGBA uint8."""
    index = colormap_index(heat, name)
    pixels = colormap_tables(name)[1].view(np.uint32)[:, 0][index]  # one 4-byte gather per pixel
    return pixels.view(np.uint8).reshape(index.shape + (4,))


# --- heat blends ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _seed_overlay_tables() -> tuple[np.ndarray, np.ndarray]:
    """The seed overlay's 8-bit output per (gray level, ``hot`` row) for red and per gray level
    for green and blue, computed with the float32 steps of the seed's formula."""
    gray = np.arange(256, dtype=np.float32)[:, None] / 255.0
    red = colormap_tables("hot")[0][:, 0].astype(np.float32)[None, :]
    red = np.where(red < 0.3, 0.0, red) * 1.5
    red_out = (np.clip(gray + red, 0.0, 1.0) * 255).round().astype(np.uint8)
    return red_out, (gray[:, 0] * 255).round().astype(np.uint8)


def seed_overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The osteo seed's overlay: the input (gray as RGB) plus 1.5x the hot map's red channel where it
    is at least 0.3, clipped; only red is added, so anatomy stays readable under a sparse saliency.
    Each output pixel depends only on its gray level and ``hot`` row: two table look-ups."""
    red, plain = _seed_overlay_tables()
    out = np.empty(gray.shape + (3,), np.uint8)
    out[..., 0] = red[gray, colormap_index(heat)]
    out[..., 1] = out[..., 2] = plain[gray]
    return out


def heat_overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """A Grad-CAM map over an X-ray: the ``hot`` colour blended in with opacity ``strength * heat``, so
    cold regions keep the image as it is (Grad-CAM maps are broad; the seed's additive red would
    paint most of the picture). ``image`` is gray (H, W) or RGB (H, W, 3) uint8."""
    base = image.astype(np.float32) / 255.0
    if base.ndim == 2:
        base = base[..., None]  # broadcast over the colours: the same values as three copies
    heat = np.clip(heat, 0, 1).astype(np.float32)
    colour = colormap_tables("hot")[0][:, :3].astype(np.float32)[colormap_index(heat)]
    alpha = (strength * heat)[..., None]
    return ((base * (1 - alpha) + colour * alpha) * 255).round().astype(np.uint8)


def photo_overlay(photo: np.ndarray, heat: np.ndarray, strength: float, name: str = "jet") -> np.ndarray:
    """A map over a colour photo: colormap ``name``'s 8-bit colours blended in with opacity
    ``strength * heat``, rounded half up. Kept apart from ``heat_overlay`` (which blends the float
    colours in [0, 1]) because the scar card's published outputs were made this way."""
    colours = colormap_tables(name)[1][colormap_index(heat, name), :3].astype(np.float32)
    alpha = (strength * np.clip(heat, 0, 1))[..., None].astype(np.float32)
    return np.clip(photo.astype(np.float32) * (1 - alpha) + colours * alpha + 0.5, 0, 255).astype(np.uint8)


# --- label painting ---------------------------------------------------------------------------
def distinct_colours(count: int) -> list[Colour]:
    """``count`` well-separated RGB colours (golden-ratio hue steps, alternating lightness)."""
    colours = []
    for k in range(count):
        r, g, b = colorsys.hls_to_rgb((k * 0.618034) % 1.0, 0.5 if k % 2 else 0.62, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def tinted(gray: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[Colour], alpha: float) -> np.ndarray:
    """Gray as RGB with each mask's pixels moved ``alpha`` of the way to its colour, in turn (a later
    mask tints over an earlier one), rounded to uint8."""
    image = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    for mask, colour in zip(masks, colours):
        if not mask.any():
            continue
        x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))  # only the mask's box is touched
        window, inside = image[y:y + h, x:x + w], mask[y:y + h, x:x + w]
        window[inside] = window[inside] * (1 - alpha) + np.array(colour, np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, colour: Colour, thickness: int) -> None:
    """Draw the outer contour of each piece of ``mask`` on ``image`` (anti-aliased), in place."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, thickness, lineType=cv2.LINE_AA)


def caption(image: np.ndarray, mask: np.ndarray, text: str, colour: Colour, scale: float, thickness: int) -> None:
    """Write ``text`` centred on ``mask``'s centroid, in ``colour`` over a black rim, in place."""
    rows, cols = np.nonzero(mask)
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = int(cols.mean()) - w // 2, int(rows.mean()) + h // 2
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def label_overlay(gray: np.ndarray, masks: np.ndarray, names: list[str], alpha: float = 0.45) -> np.ndarray:
    """RGB image at the input's size: every label tinted and outlined in its ``distinct_colours``
    colour, a legend of the names at the top right."""
    colours = distinct_colours(len(names))
    overlay = tinted(gray, masks, colours, alpha)
    line = max(1, round(min(gray.shape) / 400))
    for mask, colour in zip(masks, colours):
        if mask.any():
            outline(overlay, mask, colour, line)
    draw_legend(overlay, names, colours)
    return overlay


def draw_legend(image: np.ndarray, names: list[str], colours: Sequence[Colour]) -> None:
    """Draw a swatch + name per label in a dark box at the top right, scaled to the image's height."""
    height, width = image.shape[:2]
    row = max(4, min(36, height // (len(names) + 2)))
    scale = row / 32
    thickness = max(1, round(row / 18))
    text_width = max(cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for name in names)
    box_w = min(width, row + text_width + row // 2 + 6)
    box_h = min(height, row * len(names) + row // 2)
    x0 = width - box_w
    region = image[:box_h, x0:]
    region[:] = (region.astype(np.float32) * 0.35).astype(np.uint8)
    for k, (name, colour) in enumerate(zip(names, colours)):
        top = row // 4 + k * row
        cv2.rectangle(image, (x0 + 3, top + 1), (x0 + 3 + row - 3, top + row - 2), colour, -1)
        cv2.putText(image, name, (x0 + row + 4, top + row - max(1, row // 5)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)


def palette_png(labels: np.ndarray, colours: Sequence[Colour]) -> bytes:
    """uint8 labels as palette PNG bytes: the pixel values are the labels (0 is black, label k is
    ``colours[k - 1]``), viewers show colours."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L")
    palette = [0, 0, 0, *(value for colour in colours for value in colour)]
    image.putpalette(palette + [0] * (768 - len(palette)))   # L -> P, pixel values kept
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
