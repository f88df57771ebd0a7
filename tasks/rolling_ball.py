"""ImageJ "sliding paraboloid" background subtraction, as opencv-rolling-ball 1.0.1 computes it.

Reproduces the osteo seed's preprocessing without modifying the input, in about a tenth of a
second instead of about a minute: each line's touching points are the vertices of a lower
convex hull, found by a compiled kernel (``tasks.rolling_ball_numba``, lines in threads) or,
where numba is missing or has not compiled yet, by the vectorised numpy rounds below. Both
equal the reference on every 8-bit pixel.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from tasks import rolling_ball_numba

__all__ = ["subtract_background", "estimate_background"]

_CURVATURE_FRACTION = rolling_ball_numba.CURVATURE_FRACTION
# Switch from whole-array rounds to re-testing neighbours once a round removes fewer than
# 1/_PHASE2_RATIO of the points.
_PHASE2_RATIO = 16


def _hull_vertices(x: np.ndarray, vals: np.ndarray, movable: np.ndarray, coeff2: float) -> np.ndarray:
    """Positions (float ``x``, in line order) of the points touched by the sliding parabola.

    Writing ``w = v + coeff2 * x**2``, these are the vertices of the lower convex hull of ``w``
    in each line. A point whose ``w`` slope from its left neighbour exceeds the slope to its
    right neighbour lies strictly above their chord and is never a vertex, so all such points
    are removed at once, in rounds. Points not ``movable`` (line ends) always stay.
    """
    # Phase 1: whole-array rounds with compaction, while they remove a good share of the points.
    while True:
        if vals.size <= 2:
            return x
        dx = x[1:] - x[:-1]
        w_slope = vals[1:] - vals[:-1]
        w_slope /= dx
        w_slope += coeff2 * (x[1:] + x[:-1])
        gone = w_slope[:-1] > w_slope[1:]
        gone &= movable[1:-1]
        n_gone = int(np.count_nonzero(gone))
        if not n_gone:
            return x
        keep = np.ones(vals.size, bool)
        np.logical_not(gone, out=keep[1:-1])
        if n_gone * _PHASE2_RATIO < vals.size:
            dirty = np.zeros(vals.size, bool)  # neighbours of the points removed now
            dirty[:-2] = gone
            dirty[2:] |= gone
            x, vals, movable, dirty = x[keep], vals[keep], movable[keep], dirty[keep]
            break
        x, vals, movable = x[keep], vals[keep], movable[keep]
    # Phase 2: a linked list where only the neighbours of removed points are re-tested, so that
    # long cascades (a deep minimum next to a convex run) cost little per round.
    m = vals.size
    prv = np.arange(-1, m - 1)
    nxt = np.arange(1, m + 1)
    removed = np.zeros(m, bool)
    cand = np.flatnonzero(dirty & movable)
    while cand.size:
        a, d = prv[cand], nxt[cand]
        xa, xb, xd = x[a], x[cand], x[d]
        vb = vals[cand]
        slope_ab = (vb - vals[a]) / (xb - xa) + coeff2 * (xb + xa)
        slope_bd = (vals[d] - vb) / (xd - xb) + coeff2 * (xd + xb)
        gone = slope_ab > slope_bd
        if not gone.any():
            break
        removed[cand[gone]] = True
        # Runs of removed points are consecutive in list order: relink around each run.
        a, d = a[gone], d[gone]
        left = a[~removed[a]]
        right = d[~removed[d]]
        nxt[left] = right
        prv[right] = left
        cand = np.empty(2 * left.size, np.intp)  # left0 < right0 <= left1 < right1 ...
        cand[0::2] = left
        cand[1::2] = right
        first = np.ones(cand.size, bool)
        np.not_equal(cand[1:], cand[:-1], out=first[1:])
        cand = cand[first & movable[cand]]
    return x[~removed]


def _parabola_lines(v: np.ndarray, lengths: np.ndarray, coeff2: float) -> tuple[np.ndarray, np.ndarray]:
    """Slide a parabola ``-coeff2 * x**2`` along many lines at once, from below (ImageJ's
    ``lineSlideParabola``).

    ``v`` holds the lines one after another (``lengths`` gives their lengths). Within a line the
    result is the upper envelope of all parabolas with that curvature lying below the points that
    pass ImageJ's curvature pre-test: the hull vertices keep their values and the points between
    two vertices get the parabola through both. Returns the filtered lines and the sorted
    positions (in ``v``) of the vertices (each line's ends are always vertices).
    """
    n = v.size
    if not n:
        return v.copy(), np.zeros(0, np.intp)
    ends = np.cumsum(lengths)
    movable = np.ones(n, bool)
    movable[ends - lengths] = False
    movable[ends - 1] = False
    candidate = ~movable
    if n > 2:
        mid = v[1:-1]
        candidate[1:-1] |= (mid + mid) - v[:-2] - v[2:] < _CURVATURE_FRACTION * coeff2
    pos = np.flatnonzero(candidate)
    verts = _hull_vertices(pos.astype(np.float64), v[pos], movable[pos], coeff2).astype(np.intp)

    # Parabola through each pair of consecutive vertices, evaluated at every point (the pair
    # that straddles a line boundary is only used by the vertex itself, at distance 0).
    v1 = v[verts]
    span = np.empty(verts.size, np.intp)
    span[:-1] = np.diff(verts)
    span[-1] = 1
    slope = np.empty(verts.size)
    slope[:-1] = v1[1:] - v1[:-1]
    slope[-1] = 0.0
    slope /= span
    slope += coeff2 * span
    dist = np.arange(n, dtype=np.float64)
    dist -= np.repeat(verts.astype(np.float64), span)
    out = np.repeat(slope, span)
    out -= coeff2 * dist
    out *= dist
    out += np.repeat(v1, span)
    return out, verts


def _numpy_line(v: np.ndarray, coeff2: float) -> tuple[np.ndarray, int, int]:
    """One line filtered by the vectorised path, with ImageJ's first and last corner (the
    touching points next to each end)."""
    n = v.size
    out, verts = _parabola_lines(v, np.array([n]), coeff2)
    if verts.size > 1:
        return out, int(verts[1]), int(verts[-2])
    return out, n - 1, 0


def _compiled_line(v: np.ndarray, coeff2: float) -> tuple[np.ndarray, int, int]:
    """One line filtered by the compiled kernel, with ImageJ's first and last corner."""
    out = v.copy()
    corners = rolling_ball_numba.slide_lines(out, np.zeros(1, np.int64), 1, np.full(1, v.size, np.int64), coeff2)
    return out, int(corners[0, 0]), int(corners[0, 1])


def _corner_estimates(v: np.ndarray, first_corner: int, last_corner: int, coeff2: float) -> tuple[float, float]:
    """ImageJ's ``correctedEdges``: the background extrapolated to both ends of the unfiltered line ``v``."""
    n = v.size
    if 4 * first_corner >= n:
        first_corner = 0
    if 4 * (n - 1 - last_corner) >= n:
        last_corner = n - 1
    v1, v2 = v[first_corner], v[last_corner]
    span = last_corner - first_corner
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (v2 - v1) / span
        value0 = v1 - slope * first_corner
        # ImageJ adds coeff6 * (dx**6 - 1), fitted under the middle third; that term is 0 at both
        # corners unless coeff6 is infinite, which happens on very short lines (then the
        # estimates are NaN and the corner is left alone). Only then is the fit run, as ImageJ.
        mid = 0.5 * (last_corner + first_corner)
        dx = (np.arange(int((n + 2) / 3), int(2 * n / 3) + 1) - mid) * 2 / span
        poly6 = dx * dx * dx * dx * dx * dx - 1
        coeff6 = 0.0
        if not (poly6 < 0).all():
            for i, p in zip(range(int((n + 2) / 3), n), poly6):
                if v[i] < value0 + slope * i + coeff6 * p:
                    coeff6 = -(value0 + slope * i - v[i]) / p
        dx = (first_corner - mid) * 2.0 / span
        start = value0 + coeff6 * (dx * dx * dx * dx * dx * dx - 1.0) + coeff2 * first_corner * first_corner
        dx = (last_corner - mid) * 2.0 / span
        end = (value0 + (n - 1) * slope + coeff6 * (dx * dx * dx * dx * dx * dx - 1.0)
               + coeff2 * (n - 1 - last_corner) * (n - 1 - last_corner))
    return start, end


def _correct_corners(img: np.ndarray, coeff2: float, slide=_numpy_line) -> None:
    """ImageJ's ``correctCorners``, in place: filter the four edges and the four corner diagonals
    (one after the other, as each sees the previous ones' output) with ``slide``, then lower each
    corner to the mean of its three extrapolated estimates if that is lower."""
    h, w = img.shape
    flat = img.reshape(-1)
    n_diag = min(h, w)
    corners = np.zeros(4)
    # (start, step, length, curvature, corner indices for the start/end estimates)
    lines = [(0, 1, w, coeff2, (0, 1)), ((h - 1) * w, 1, w, coeff2, (2, 3)),
             (0, w, h, coeff2, (0, 2)), (w - 1, w, h, coeff2, (1, 3)),
             (0, w + 1, n_diag, 2 * coeff2, (0, None)), (w - 1, w - 1, n_diag, 2 * coeff2, (1, None)),
             ((h - 1) * w, 1 - w, n_diag, 2 * coeff2, (2, None)),
             (h * w - 1, -1 - w, n_diag, 2 * coeff2, (3, None))]
    for start, step, length, c, (i_start, i_end) in lines:
        idx = start + step * np.arange(length)
        line = flat[idx]
        flat[idx], first_corner, last_corner = slide(line, c)
        est_start, est_end = _corner_estimates(line, first_corner, last_corner, c)
        corners[i_start] += est_start
        if i_end is not None:
            corners[i_end] += est_end
    for i, p in enumerate((0, w - 1, (h - 1) * w, h * w - 1)):
        flat[p] = min(flat[p], corners[i] / 3)


@lru_cache(maxsize=2)  # both directions of the last size: panoramics from one device share it
def _diagonal_lines(h: int, w: int, down_right: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of all diagonals of length >= 3 (top to bottom, concatenated) and their lengths."""
    keys = np.arange(-(h - 1), w) if down_right else np.arange(0, h + w - 1)
    if down_right:  # key = col - row
        row0 = np.maximum(0, -keys)
        col0 = row0 + keys
        lengths = np.minimum(h - row0, w - col0)
        step = w + 1
    else:  # key = col + row
        row0 = np.maximum(0, keys - (w - 1))
        col0 = keys - row0
        lengths = np.minimum(h - row0, col0 + 1)
        step = w - 1
    keep = lengths >= 3
    row0, col0, lengths = row0[keep], col0[keep], lengths[keep]
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = np.repeat(row0 * w + col0, lengths) + step * offsets
    idx.flags.writeable = lengths.flags.writeable = False  # shared through the cache
    return idx, lengths


def _sliding_paraboloid_numpy(img: np.ndarray, radius: float) -> np.ndarray:
    """Background of a float64 image (dark background) by ImageJ's sliding paraboloid, vectorised."""
    h, w = img.shape
    coeff2 = 0.5 / radius
    coeff2_diag = 1.0 / radius
    bg = img.copy()
    if h < 2 or w < 2:  # the reference divides by zero there
        raise ValueError(f"image too small for the sliding paraboloid: {img.shape}")
    _correct_corners(bg, coeff2)

    def along_x(a: np.ndarray) -> np.ndarray:
        out, _ = _parabola_lines(a.reshape(-1), np.full(a.shape[0], a.shape[1]), coeff2)
        return out.reshape(a.shape)

    def along_diagonals(a: np.ndarray, idx: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        flat = a.reshape(-1)
        flat[idx], _ = _parabola_lines(flat[idx], lengths, coeff2_diag)
        return a

    d1 = _diagonal_lines(h, w, down_right=True)
    d2 = _diagonal_lines(h, w, down_right=False)
    bg = along_x(bg)
    bg = np.ascontiguousarray(along_x(np.ascontiguousarray(bg.T)).T)
    bg = along_x(bg)
    bg = along_diagonals(bg, *d1)
    bg = along_diagonals(bg, *d2)
    bg = along_diagonals(bg, *d1)
    return bg


@lru_cache(maxsize=2)
def _line_passes(h: int, w: int) -> tuple[tuple[np.ndarray, int, np.ndarray, bool], ...]:
    """The reference's nine passes (ImageJ's ``filter1D`` directions) as (first pixels, step,
    lengths, diagonal) each: x, y, x, then the diagonals 1a, 1b, 2a, 2b, 1a, 1b."""
    def lines(starts, step, lengths, diagonal):
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        starts.flags.writeable = lengths.flags.writeable = False  # shared through the cache
        return starts, step, lengths, diagonal

    x = lines(np.arange(h) * w, 1, np.full(h, w), False)
    y = lines(np.arange(w), w, np.full(w, h), False)
    i = np.arange(0, max(w - 2, 0))
    d1a = lines(i, w + 1, np.minimum(h, w - i), True)
    i = np.arange(1, max(h - 2, 1))
    d1b = lines(i * w, w + 1, np.minimum(w, h - i), True)
    i = np.arange(2, max(w, 2))
    d2a = lines(i, w - 1, np.minimum(h, i + 1), True)
    # From row 0, as the reference: the diagonal from the top-right corner is filtered again.
    i = np.arange(0, max(h - 2, 0))
    d2b = lines(i * w + w - 1, w - 1, np.minimum(w, h - i), True)
    return x, y, x, d1a, d1b, d2a, d2b, d1a, d1b


def _sliding_paraboloid_compiled(img: np.ndarray, radius: float) -> np.ndarray:
    """Background of a C-contiguous float64 image (dark background) by ImageJ's sliding
    paraboloid with the compiled line kernel, computed in place in ``img`` (which is returned)."""
    h, w = img.shape
    coeff2 = 0.5 / radius
    coeff2_diag = 1.0 / radius
    if h < 2 or w < 2:  # the reference divides by zero there
        raise ValueError(f"image too small for the sliding paraboloid: {img.shape}")
    _correct_corners(img, coeff2, _compiled_line)
    flat = img.reshape(-1)
    for starts, step, lengths, diagonal in _line_passes(h, w):
        rolling_ball_numba.slide_lines(flat, starts, step, lengths, coeff2_diag if diagonal else coeff2)
    return img


def _sliding_paraboloid(img: np.ndarray, radius: float) -> np.ndarray:
    """Background of a float64 image (dark background), which it may overwrite: the compiled
    kernel once it is loaded (loading starts on first use, in the background), numpy until then."""
    if rolling_ball_numba.ready():
        return _sliding_paraboloid_compiled(np.ascontiguousarray(img), radius)
    rolling_ball_numba.start_compiling()
    return _sliding_paraboloid_numpy(img, radius)


def _check_input(image: np.ndarray, radius: float, use_paraboloid: bool) -> None:
    if not use_paraboloid:
        raise NotImplementedError("only the sliding paraboloid (use_paraboloid=True) is implemented; "
                                  "ImageJ's shrinking rolling ball is not")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} with shape {image.shape}")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")


def _smoothed(image: np.ndarray, do_presmooth: bool) -> np.ndarray:
    if not do_presmooth:
        return image
    # 3x3 mean on the 8-bit image, rounded back to 8 bits, exactly as the reference does it.
    return cv2.filter2D(image, -1, np.full((3, 3), 1.0 / 9.0))


def estimate_background(image: np.ndarray, radius: float, *, light_background: bool = False,
                        use_paraboloid: bool = True, do_presmooth: bool = True) -> np.ndarray:
    """Float64 background of an 8-bit 2-D image (ImageJ's sliding paraboloid, as opencv-rolling-ball).

    ``radius`` is the radius of curvature of the paraboloid; ``light_background`` rolls it from
    above instead of below; ``do_presmooth`` first applies a 3x3 mean (rounded to 8 bits).
    ``use_paraboloid=False`` (ImageJ's shrinking rolling ball) raises NotImplementedError.
    """
    _check_input(image, radius, use_paraboloid)
    src = _smoothed(image, do_presmooth).astype(np.float64)
    if light_background:
        return 255.0 - _sliding_paraboloid(255.0 - src, radius)
    return _sliding_paraboloid(src, radius)


def subtract_background(image: np.ndarray, radius: float, *, light_background: bool = False,
                        use_paraboloid: bool = True, do_presmooth: bool = True) -> np.ndarray:
    """Background-subtracted copy of an 8-bit 2-D image; the input is left untouched.

    Matches the first value returned by opencv-rolling-ball's
    ``subtract_background_rolling_ball(image, radius, light_background, use_paraboloid,
    do_presmooth)``, including its quirk of subtracting the background from the *presmoothed*
    image (ImageJ subtracts it from the original). Results are rounded to the nearest grey level
    and clipped to 0..255, with an offset of 255 for light backgrounds.
    ``use_paraboloid=False`` (ImageJ's shrinking rolling ball) raises NotImplementedError.
    """
    _check_input(image, radius, use_paraboloid)
    src = _smoothed(image, do_presmooth)
    background = estimate_background(src, radius, light_background=light_background, do_presmooth=False)
    offset = 255.5 if light_background else 0.5
    if rolling_ball_numba.ready():
        return rolling_ball_numba.subtract(src, background, offset)
    out = np.clip(src - background + offset, 0.0, 255.0)
    return out.astype(np.uint8)  # truncation after +0.5: rounding, as the reference
