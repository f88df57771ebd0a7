"""The compiled rolling ball (tasks.rolling_ball_numba): same pixels as the numpy fallback, which
serves when numba is missing, and a cache that goes where numba is told."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_rolling_ball import xray_like
from tasks import rolling_ball_numba
from tasks.rolling_ball import estimate_background, subtract_background

pytest.importorskip("numba")
REPO = str(Path(__file__).resolve().parents[1])


def test_compiled_and_numpy_paths_agree(monkeypatch):
    assert rolling_ball_numba.wait(120)
    cases = [(xray_like(300, 700, seed=7), 180), (255 - xray_like(90, 130, seed=8), 12),
             (np.random.default_rng(9).integers(0, 256, (64, 97), dtype=np.uint8), 30)]
    compiled = [(subtract_background(image, radius), estimate_background(image, radius)) for image, radius in cases]
    monkeypatch.setattr(rolling_ball_numba, "ready", lambda: False)
    for (image, radius), (structure, background) in zip(cases, compiled):
        np.testing.assert_array_equal(subtract_background(image, radius), structure)
        np.testing.assert_allclose(estimate_background(image, radius), background, atol=1e-9)


def test_without_numba_the_numpy_path_serves_the_same_result(tmp_path):
    """numba missing (or failing to compile): the fallback answers, with the compiled path's pixels."""
    image = xray_like(120, 250, seed=11)
    np.save(tmp_path / "image.npy", image)
    script = (f"import sys; sys.path.insert(0, {REPO!r}); sys.modules['numba'] = None\n"
              "import numpy as np\nfrom tasks import rolling_ball, rolling_ball_numba\n"
              "assert not rolling_ball_numba.wait(60) and 'numba' in rolling_ball_numba.failure()\n"
              f"np.save({str(tmp_path / 'out.npy')!r}, rolling_ball.subtract_background(np.load({str(tmp_path / 'image.npy')!r}), 20))")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert rolling_ball_numba.wait(120)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), subtract_background(image, 20))


def test_the_compiled_kernel_is_cached_where_numba_is_told(tmp_path):
    """Where the package folder is read-only, numba's cache goes to NUMBA_CACHE_DIR (or the user's cache)."""
    script = ("import sys; sys.path.insert(0, {!r})\nfrom tasks import rolling_ball_numba\n"
              "assert rolling_ball_numba.wait(120), rolling_ball_numba.failure()").format(REPO)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=180, env=env)
    assert list((tmp_path / "cache").rglob("*.nbi")), "no numba cache index written"


def test_a_forked_child_uses_the_kernel_too(monkeypatch):
    """A DataLoader-style fork after the parent used its thread pools (the rolling ball's lines, the PNG
    encoders) still gets its lines filtered and its PNGs encoded; a child stuck on its parent's pool is
    killed by an alarm, so the test fails instead of hanging."""
    from daemon import outputs

    assert rolling_ball_numba.wait(120)
    monkeypatch.setattr(rolling_ball_numba, "_threads", lambda: 2)  # lines go to the pool even on one core
    image = xray_like(300, 400, seed=12)
    expected = subtract_background(image, 50)  # starts the parent's pools
    pngs = outputs.encode_pngs([image, image[::-1]])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        try:
            signal.alarm(60)
            same = (np.array_equal(subtract_background(image, 50), expected)
                    and outputs.encode_pngs([image, image[::-1]]) == pngs)
            os.write(write_end, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1" and status == 0
    os.close(read_end)
