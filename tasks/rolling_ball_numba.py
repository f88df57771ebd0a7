"""ImageJ's ``lineSlideParabola`` compiled with numba: the sliding paraboloid's fast path.

ImageJ searches, from each touching point, every later candidate for the least slope (~15
divisions per pixel on a panoramic); the same touching points are the vertices of a lower
convex hull, which one left-to-right pass finds with about two. Lines of one direction share no
pixel, so they run in threads (numba releases the GIL). The values between touching points use
the reference's formula and order of operations. ``tasks.rolling_ball`` calls this once the
kernel is loaded, and its vectorised numpy path otherwise.

Compiled code is cached (``cache=True``): in ``tasks/__pycache__`` when writable, else numba's
user-wide cache (``~/.cache/numba``) or ``NUMBA_CACHE_DIR``; with none writable it is compiled
in memory at every start. ``start_compiling`` does that in a background thread so that start-up
never waits for it; until it is done, callers get False from ``ready`` and use numpy.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache

import numpy as np

from tasks.thread_pool import LazyThreadPool, usable_cores

log = logging.getLogger("tasks.rolling_ball")

# ImageJ drops a point from the candidate touching points when its second difference is at
# least this fraction of 2*coeff2 (it can never touch the parabola).
CURVATURE_FRACTION = 1.999
# Lines of one pass are split over at most this many threads.
_MAX_THREADS = 8

_kernel = None            # the compiled line filter, once loaded
_subtract_kernel = None
_ready = threading.Event()
_started = threading.Lock()
_compiling: threading.Thread | None = None
_failure: str | None = None


def _slide_lines(flat, starts, inc, lengths, coeff2, lo, hi, corners):
    """Slide the parabola along lines ``lo..hi-1`` (``starts[k] + inc * i``, ``i < lengths[k]``)
    of the flat float64 image, in place; ``corners[k]`` gets ImageJ's (first, last) corner."""
    n_max = 0
    for k in range(lo, hi):
        n_max = max(n_max, lengths[k])
    n_max = max(n_max, 1)
    cache = np.empty(n_max, np.float64)
    candidates = np.empty(n_max, np.int64)   # positions that pass ImageJ's curvature pre-test
    hull = np.empty(n_max, np.int64)          # touching points so far (positions in the line)
    hull_slope = np.empty(n_max, np.float64)  # w-slope of the segment ending at each of them
    curvature_test = CURVATURE_FRACTION * coeff2
    for k in range(lo, hi):
        start, length = starts[k], lengths[k]
        p = start
        for i in range(length):
            cache[i] = flat[p]
            p += inc
        # ImageJ's pre-test keeps a point unless its second difference rules out any contact. The
        # list is built without a branch (noise makes that test unpredictable), ends always kept.
        n = 0
        for i in range(1, length - 1):
            candidates[n] = i
            n += cache[i] + cache[i] - cache[i - 1] - cache[i + 1] < curvature_test
        if length > 1:
            candidates[n] = length - 1
            n += 1
        # Lower convex hull of w = v + coeff2 * x**2 over the candidates, built left to right: a
        # point whose w-slope from its left neighbour exceeds the slope to the next one lies
        # strictly above their chord and is dropped. These are the points the parabola touches.
        top = 0
        hull[0] = 0
        for q in range(n):
            i = candidates[q]
            value = cache[i]
            while True:
                a = hull[top]
                slope = (value - cache[a]) / (i - a) + coeff2 * (i + a)
                if top == 0 or not hull_slope[top] > slope:
                    break
                top -= 1
            top += 1
            hull[top] = i
            hull_slope[top] = slope
        # Between two touching points the background is the parabola through both (ImageJ's formula).
        for t in range(top):
            i1, i2 = hull[t], hull[t + 1]
            v1 = cache[i1]
            span = i2 - i1
            min_slope = (cache[i2] - v1) / span + coeff2 * span
            p = start + (i1 + 1) * inc
            for j in range(i1 + 1, i2):
                flat[p] = v1 + (j - i1) * (min_slope - (j - i1) * coeff2)
                p += inc
        if top > 0:
            corners[k, 0] = hull[1]
            corners[k, 1] = hull[top - 1]
        else:
            corners[k, 0] = length - 1
            corners[k, 1] = 0


def _subtract(image, background, offset, out):
    """``out = clip(image - background + offset, 0, 255)`` truncated to 8 bits, as the reference."""
    for p in range(image.size):
        value = image[p] - background[p] + offset
        out[p] = min(max(value, 0.0), 255.0)


def _compile() -> None:
    global _kernel, _subtract_kernel, _failure
    began = time.perf_counter()
    try:
        import numba

        try:
            kernel = numba.njit(nogil=True, cache=True)(_slide_lines)
            subtract = numba.njit(nogil=True, cache=True)(_subtract)
        except RuntimeError as exc:  # no writable cache folder anywhere: compile in memory
            log.info("numba cache unavailable (%s): compiling the rolling ball in memory", exc)
            kernel, subtract = numba.njit(nogil=True)(_slide_lines), numba.njit(nogil=True)(_subtract)
        flat = np.arange(8, dtype=np.float64)
        starts, lengths = np.zeros(1, np.int64), np.full(1, 8, np.int64)
        kernel(flat, starts, 1, lengths, 0.5, 0, 1, np.zeros((1, 2), np.int64))
        starts.flags.writeable = lengths.flags.writeable = False  # the line passes' (shared) arrays
        kernel(flat, starts, 1, lengths, 0.5, 0, 1, np.zeros((1, 2), np.int64))
        subtract(np.zeros(8, np.uint8), flat, 0.5, np.zeros(8, np.uint8))
        _kernel, _subtract_kernel = kernel, subtract
        log.info("compiled rolling ball ready after %.1f s", time.perf_counter() - began)
    except Exception as exc:  # numba missing, or it cannot compile here: numpy serves
        _failure = f"{type(exc).__name__}: {exc}"
        log.info("compiled rolling ball unavailable (%s); using the vectorised numpy path", _failure)
    finally:
        _ready.set()


def start_compiling() -> None:
    """Load (or compile) the kernel in a background thread; returns at once. Idempotent."""
    global _compiling
    with _started:
        if _compiling is None:
            _compiling = threading.Thread(target=_compile, name="rolling-ball-compile", daemon=True)
            _compiling.start()


def ready() -> bool:
    """True once the compiled kernel can be called (never blocks)."""
    return _ready.is_set() and _kernel is not None


def wait(timeout: float | None = None) -> bool:
    """Start compiling if needed and wait for it; True when the compiled kernel is usable."""
    start_compiling()
    _ready.wait(timeout)
    return ready()


def failure() -> str | None:
    """Why the compiled kernel is unavailable (None while compiling or when it works)."""
    return _failure


def _threads() -> int:
    return max(1, min(usable_cores(), _MAX_THREADS))


_pool = LazyThreadPool(lambda: _threads() - 1, "rolling-ball")  # the calling thread takes a share too


@lru_cache(maxsize=32)  # panoramics from one device share their size (a size has ~12 line sets)
def _chunks(lengths_key: bytes, parts: int) -> tuple[tuple[int, int], ...]:
    """Split lines into ``parts`` consecutive runs holding about the same number of pixels."""
    lengths = np.frombuffer(lengths_key, np.int64)
    edges = np.searchsorted(np.cumsum(lengths), np.linspace(0, lengths.sum(), parts + 1)[1:-1])
    bounds = [0, *sorted(set(int(e) for e in edges)), lengths.size]
    return tuple((lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo)


def slide_lines(flat: np.ndarray, starts: np.ndarray, inc: int, lengths: np.ndarray, coeff2: float) -> np.ndarray:
    """Filter the given lines of a flat float64 image in place, lines in parallel threads.

    Lines must not share pixels. Returns ImageJ's (first corner, last corner) per line.
    """
    corners = np.empty((lengths.size, 2), np.int64)
    if not lengths.size:
        return corners
    parts = _threads() if flat.size >= 1 << 16 else 1
    chunks = _chunks(lengths.tobytes(), parts)
    futures = [_pool.get().submit(_kernel, flat, starts, inc, lengths, coeff2, lo, hi, corners)
               for lo, hi in chunks[1:]]
    _kernel(flat, starts, inc, lengths, coeff2, *chunks[0], corners)
    for future in futures:
        future.result()
    return corners


def subtract(image: np.ndarray, background: np.ndarray, offset: float) -> np.ndarray:
    """8-bit ``image - background + offset``, clipped to 0..255 and truncated (the reference's rounding)."""
    out = np.empty(image.shape, np.uint8)
    _subtract_kernel(image.reshape(-1), background.reshape(-1), offset, out.reshape(-1))
    return out
