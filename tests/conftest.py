"""Shared fixtures: tiny model cards built in the test session, and a real daemon subprocess driver."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import cards, kind, osteo, scar  # noqa: E402
from tasks.weights import save_state_dict  # noqa: E402

TINY_OSTEO_SIZE = (96, 192)


def write_tiny_osteo_card(folder: Path, *, folds: int = 1, seed: int = 0, demo: bool = True,
                          size: tuple[int, int] = TINY_OSTEO_SIZE) -> Path:
    """A randomly initialised, very small EfficientNet osteo card (for protocol tests, not accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    architecture = osteo.default_architecture("efficientnet-b0", width_coefficient=0.25, depth_coefficient=0.2)
    entries = []
    for k in range(folds):
        torch.manual_seed(seed + k)
        network = osteo.build_network(architecture)
        path = folder / f"fold{k}.safetensors"
        save_state_dict(network.state_dict(), path)
        entries.append({"file": path.name, "sha256": cards.sha256_file(path), "fold": k})
    cards.write_card(folder, {
        "task": "osteo", "name": "osteo-tiny-test", "version": "test", "demo": demo,
        "architecture": architecture, "input": osteo.default_input_spec(size),
        "labels": osteo.LABELS_C1_C3, "folds": entries, "data": {"source": "random init for tests"},
    })
    return folder


def write_fixed_kind_card(folder: Path, looks_like: str, *, refuse_at: float = 0.9, folds: int = 2) -> Path:
    """A kind card whose networks call every image ``looks_like`` with probability ~1 (a zero last
    layer with a large bias), so gate tests know the verdict in advance."""
    folder.mkdir(parents=True, exist_ok=True)
    architecture = kind.default_architecture(widths=(4, 8))
    entries = []
    for k in range(folds):
        network = kind.build_network(architecture)
        linear = network.head[-1]
        torch.nn.init.zeros_(linear.weight)
        with torch.no_grad():
            linear.bias.copy_(torch.tensor([12.0 if name == looks_like else 0.0 for name in kind.KINDS]))
        path = folder / f"fold{k}.safetensors"
        save_state_dict(network.state_dict(), path)
        entries.append({"file": path.name, "sha256": cards.sha256_file(path), "fold": k})
    cards.write_card(folder, {
        "task": "kind", "name": f"kind-says-{looks_like}", "version": "test", "demo": True,
        "architecture": architecture, "input": kind.default_input_spec(32), "labels": list(kind.KINDS),
        "folds": entries, "data": {"source": "fixed verdict for tests"},
        "gate": {"refuse_at": refuse_at, "refuse_at_with_dicom_support": 0.99},
    })
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights folder holding a tiny osteo card."""
    root = tmp_path_factory.mktemp("weights")
    write_tiny_osteo_card(root / "osteo")
    return root


FEATURES = ["age", "sex", "BMI", "Delta_date", "smoking", "diabetes", "hypertension", "keloid_history",
            "wound_infection", "drain", "thyroiditis"]
PATIENT = {"age": 52, "sex": 0, "BMI": 23.1, "Delta_date": 120, "smoking": 0, "diabetes": 0, "hypertension": 1,
           "keloid_history": 0, "wound_infection": 0, "drain": 1, "thyroiditis": 0}


def write_tiny_scar_card(folder: Path, models=scar.MODES, folds: int = 2) -> Path:
    """Random-weight image/clinical/combined models at 64x64, two folds each, with per-fold scalers."""
    image = scar.image_architecture(width=4, layers=(1, 1, 1, 1))
    architectures = {"image": image, "clinical": scar.clinical_architecture(len(FEATURES))}
    architectures["combined"] = scar.combined_architecture(image, architectures["clinical"])
    entries = []
    for model in models:
        for k in range(folds):
            torch.manual_seed(10 * k + len(model))
            path = folder / f"{model}_fold{k}.safetensors"
            folder.mkdir(parents=True, exist_ok=True)
            save_state_dict(scar.build_network(model, architectures[model]).state_dict(), path, half=True)
            entry = {"file": path.name, "sha256": cards.sha256_file(path), "model": model, "fold": k}
            if model != "image":
                entry["scaler"] = {"mean": [50.0, 0.3, 24.0, 200.0] + [0.2] * 7, "scale": [15.0, 0.5, 3.5, 150.0] + [0.4] * 7}
            entries.append(entry)
    cards.write_card(folder, {
        "task": "scar", "name": "scar-tiny-test", "version": "test", "demo": True,
        "architecture": {m: architectures[m] for m in models}, "labels": scar.LABELS, "folds": entries,
        "input": {"photo": scar.default_input_spec((64, 64)), "clinical_features": FEATURES},
        "clinical_features": {"names": FEATURES}, "data": {"source": "random init for tests"}})
    return folder


def panoramic_phantom(height: int = 150, width: int = 300, seed: int = 0) -> np.ndarray:
    """A small panoramic-like 8-bit image: bright smooth background, a bright arch, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = 60 + 40 * np.sin(xx / width * np.pi) * (yy / height)
    arch = 90 * np.exp(-((yy - (0.3 * height + 0.4 * height * ((xx - width / 2) / (width / 2)) ** 2)) ** 2) / 40.0)
    image = background + arch + rng.normal(0, 6, size=(height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


class Daemon:
    """Drives ``python run_model.py`` through its pipes, the way a hospital system would."""

    STDERR_KEPT = 1 << 20   # the log's last MiB is kept for failure messages; the rest is read and dropped

    def __init__(self, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "run_model.py"), *args], cwd=cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._buffer = b""
        self._stderr = bytearray()
        # Drain stderr all the time: a chatty daemon would otherwise fill the pipe and block mid-reply.
        self._stderr_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_reader.start()
        try:
            self.ready = self.read_reply(timeout)
        except BaseException:
            self.kill()   # a daemon that never got ready must not outlive the test
            raise

    def _drain_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(1 << 16), b""):
            self._stderr += chunk
            if len(self._stderr) > 2 * self.STDERR_KEPT:
                del self._stderr[:-self.STDERR_KEPT]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_reply(self, timeout: float = 120) -> dict[str, Any]:
        """The next stdout line, parsed; fails the test if it is not a JSON object."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply within {timeout} s; stderr: {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError(f"daemon closed stdout; stderr: {self.stderr_tail()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line.decode("ascii"))
        assert isinstance(reply, dict), line
        return reply

    def ask(self, request: dict[str, Any] | bytes | str, timeout: float = 120) -> dict[str, Any]:
        if isinstance(request, dict):
            request = json.dumps(request)
        if isinstance(request, str):
            request = request.encode()
        self.send_raw(request.rstrip(b"\n") + b"\n")
        return self.read_reply(timeout)

    def close(self, timeout: float = 60) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def stderr_tail(self, chars: int = 3000) -> str:
        """The end of what the daemon logged so far (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self._stderr_reader.join(timeout=5)
        return bytes(self._stderr).decode(errors="replace")[-chars:]

    def stderr_text(self) -> str:
        """Everything the daemon logged (its last MiB for a long run), after it exited."""
        self.proc.wait()
        self._stderr_reader.join(timeout=5)
        return bytes(self._stderr).decode(errors="replace")

    def rest_of_stdout(self) -> bytes:
        """Everything left on stdout after the process exited (must be empty or protocol lines)."""
        return self._buffer + self.proc.stdout.read()


@pytest.fixture
def daemon_factory():
    """Start daemons inside a test; every one is closed at the end."""
    started: list[Daemon] = []

    def start(*args: str, **kwargs: Any) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
