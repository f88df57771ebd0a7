"""tasks.rolling_ball: matches opencv-rolling-ball (the osteo seed's preprocessing) and behaves well."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import rolling_ball, rolling_ball_numba  # noqa: E402
from tasks.rolling_ball import estimate_background, subtract_background  # noqa: E402

# The reference divides by zero on short lines (as ImageJ would); its warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:cv2_rolling_ball.*")


@pytest.fixture(params=["compiled", "numpy"], autouse=True)
def path(request, monkeypatch):
    """Every test runs on both paths: the numba kernel, and the numpy fallback that serves while
    it loads or where numba is missing."""
    if request.param == "compiled":
        pytest.importorskip("numba")
        assert rolling_ball_numba.wait(120), rolling_ball_numba.failure()
    else:
        monkeypatch.setattr(rolling_ball_numba, "ready", lambda: False)
    return request.param


def xray_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth exposure gradient + bright arch and blobs + noise: a small panoramic-like image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = 40 + 60 * xx / width + 25 * np.sin(3 * yy / height) + 15 * np.cos(5 * xx / width)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sy, sx = rng.uniform(height / 30, height / 6), rng.uniform(width / 30, width / 6)
        image += rng.uniform(40, 120) * np.exp(-((yy - cy) / sy) ** 2 - ((xx - cx) / sx) ** 2)
    arch = 0.6 * height + 0.25 * height * ((xx - width / 2) / (width / 2)) ** 2
    image += 70 * (np.abs(yy - arch) < height / 20)
    image = cv2.GaussianBlur(image, (0, 0), 2) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def reference(image: np.ndarray, radius: float, **kwargs) -> np.ndarray:
    ref = pytest.importorskip("cv2_rolling_ball")
    options = {"light_background": False, "use_paraboloid": True, "do_presmooth": True, **kwargs}
    result, _ = ref.subtract_background_rolling_ball(image.copy(), radius, **options)  # mutates its input
    return result


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    # Observed: identical (max 0). Float background differences are ~1e-14, so a rounding flip
    # at an exact .5 is possible in principle: allow 1 grey level on a few pixels.
    assert diff.max() <= 1
    assert diff.mean() < 1e-3


# ----------------------------------------------------------------------------- vs the reference

@pytest.mark.parametrize("light", [False, True])
def test_matches_reference_small_radius(light):
    image = xray_like(120, 250)
    if light:
        image = 255 - image
    assert_close(subtract_background(image, 20, light_background=light), reference(image, 20, light_background=light))


def test_matches_reference_seed_radius_180():
    image = xray_like(240, 480, seed=1)  # the reference takes a few seconds here
    assert_close(subtract_background(image, 180), reference(image, 180))


def test_matches_reference_without_presmoothing_and_odd_shapes():
    rng = np.random.default_rng(3)
    for height, width, radius in [(70, 40, 8), (3, 50, 5), (50, 3, 2.5), (2, 40, 6), (31, 31, 50)]:
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        for presmooth in (True, False):
            ours = subtract_background(image, radius, do_presmooth=presmooth)
            assert_close(ours, reference(image, radius, do_presmooth=presmooth))


def test_background_is_the_references_float_background():
    ref = pytest.importorskip("cv2_rolling_ball")
    image = xray_like(60, 90, seed=2)
    smoothed = cv2.filter2D(image, -1, np.full((3, 3), 1 / 9))
    subtracter = ref.background_subtractor.BackgroundSubtract()
    subtracter.height, subtracter.width = image.shape
    theirs = subtracter._sliding_paraboloid_float_background(smoothed.reshape(-1).astype(np.float64), 15, False)
    np.testing.assert_allclose(estimate_background(image, 15), theirs.reshape(image.shape), atol=1e-9)


# ----------------------------------------------------------------------------- behaviour

def test_input_untouched_dtype_and_shape_kept():
    image = xray_like(50, 80)
    before = image.copy()
    out = subtract_background(image, 10)
    np.testing.assert_array_equal(image, before)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert estimate_background(image, 10).shape == image.shape
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("light", [False, True])
def test_constant_image_gives_zero_or_white(light):
    out = subtract_background(np.full((40, 60), 117, np.uint8), 25, light_background=light)
    assert (out == (255 if light else 0)).all()


def test_light_background_mirrors_dark_background():
    image = xray_like(80, 120, seed=4)
    dark = subtract_background(image, 30)
    light = subtract_background(255 - image, 30, light_background=True)
    diff = np.abs((255 - light).astype(int) - dark.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # only exact .5 ties round differently


def test_background_lies_under_the_image_without_presmoothing():
    image = xray_like(60, 100, seed=5)
    background = estimate_background(image, 20, do_presmooth=False)
    assert (background <= image + 1e-9).all()
    structure = subtract_background(image, 20, do_presmooth=False)
    assert structure.max() > 50 and np.median(structure) < 30  # structures kept, gradient gone


def test_rejects_what_it_does_not_implement():
    image = np.zeros((10, 10), np.uint8)
    with pytest.raises(NotImplementedError):
        subtract_background(image, 5, use_paraboloid=False)
    with pytest.raises(ValueError):
        subtract_background(image.astype(np.float32), 5)
    with pytest.raises(ValueError):
        subtract_background(np.zeros((10, 10, 3), np.uint8), 5)
    with pytest.raises(ValueError):
        subtract_background(image, 0)
