"""Mixed precision: float16 autocast on CUDA with --precision fp16, never on CPU or with --precision fp32.

No GPU is needed: a Settings on torch.device("cuda") only decides which context is returned (no
forward runs on it). The maps' float32 cast is exercised on CPU with bfloat16 autocast, whose
activations numpy cannot even hold.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon import explain
from daemon.handlers.base import Settings, TaskHandler, autocast_for, uses_amp
from daemon.server import Server
from daemon.registry import Registry
from tasks.bundle import Bundle

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def handler_on(device: torch.device, precision: str = "fp16") -> TaskHandler:
    card = {"name": "t", "version": "0", "task": "osteo"}
    return TaskHandler(card, Bundle(card), Settings(device=device, precision=precision), source="test")


def cuda_autocast(context) -> torch.autocast:
    with warnings.catch_warnings():  # without CUDA torch warns that it disables the context; the choice is what counts
        warnings.simplefilter("ignore")
        return context()


def test_cpu_gets_a_null_context_whatever_the_precision():
    for precision in ("fp16", "fp32"):
        assert not uses_amp(CPU, precision)
        assert isinstance(autocast_for(CPU, precision), contextlib.nullcontext)
        handler = handler_on(CPU, precision)
        assert handler.amp is False
        assert isinstance(handler.autocast(), contextlib.nullcontext)


def test_cuda_gets_float16_autocast_unless_fp32():
    handler = handler_on(torch.device("cuda:1"))
    assert handler.amp is True
    context = cuda_autocast(handler.autocast)
    assert isinstance(context, torch.autocast)
    assert context.device == "cuda" and context.fast_dtype == torch.float16
    fp32 = handler_on(CUDA, "fp32")
    assert fp32.amp is False
    assert isinstance(fp32.autocast(), contextlib.nullcontext)


def test_precision_flag_reaches_settings(tmp_path: Path):
    from daemon.cli import parse_args

    assert parse_args([str(tmp_path)]).precision == "fp32"
    assert parse_args([str(tmp_path), "--precision", "fp16"]).precision == "fp16"
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--precision", "auto"])


def test_ready_line_says_which_tasks_run_under_amp():
    registry = Registry(handlers={"osteo": handler_on(CUDA), "scar": handler_on(CPU)})
    server = Server(Settings(device=CUDA, precision="fp16"), "osteo", out=None, registry=registry)  # type: ignore[arg-type]
    try:
        ready = server.ready_line()
    finally:
        server.pool.shutdown()
    assert ready["precision"] == "fp16"
    assert ready["amp"] == ["osteo"]


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_explanations_are_built_in_float32_under_low_precision_autocast():
    network = TinyNet().eval()
    explain.freeze_for_cam(network, network.features[2])
    batch = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    classes = [0, 2]
    target = lambda net: net.features[2]  # noqa: E731
    reference = explain.grad_cam([network], target, batch, classes)
    saliency_reference = explain.input_saliency([network], batch, classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert network(batch).dtype == torch.bfloat16  # the forward really runs in low precision
        cam = explain.grad_cam([network], target, batch, classes)
        saliency = explain.input_saliency([network], batch, classes)
    for low, full in ((cam, reference), (saliency, saliency_reference)):
        assert low.dtype == np.float32 and low.shape == (2, 24, 32)
        assert np.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
        assert np.corrcoef(low.ravel(), full.ravel())[0, 1] > 0.9


def test_osteo_handler_runs_its_forward_and_both_explanations_under_autocast(tiny_weights, monkeypatch):
    """The handler's sequence (one forward pass with gradients per fold serving the probabilities and
    the Grad-CAM / saliency map) under a low-precision autocast: CPU bfloat16 stands in for CUDA
    float16, which this machine lacks."""
    from daemon.handlers.osteo import Prepared
    from daemon.registry import load_registry

    handler = load_registry(tiny_weights, Settings(device=CPU)).handlers["osteo"]
    height, width = handler.card["input"]["size"]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = [Prepared(rng.integers(0, 256, (height, width), dtype=np.uint8), method)
             for method in ("gradcam", "saliency")]
    reference = handler.infer(batch)
    monkeypatch.setattr(TaskHandler, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    low = handler.infer(batch)
    for full, half in zip(reference, low):
        assert half.probabilities.dtype == np.float32 and half.heat.dtype == np.float32
        assert np.abs(half.probabilities - full.probabilities).max() < 0.05
        assert np.isfinite(half.heat).all() and 0 <= half.heat.min() and half.heat.max() <= 1


def test_a_grad_cam_error_is_raised_not_swallowed():
    """pytorch-grad-cam's context manager swallows IndexError; a bad class index must fail loudly
    (the server turns it into a fail reply) instead of dropping a fold from the mean."""
    from daemon import explain
    from tasks import osteo

    network = osteo.build_network(osteo.default_architecture("efficientnet-b0", width_coefficient=0.25,
                                                             depth_coefficient=0.2)).eval()
    batch = torch.zeros(1, 3, 64, 128)
    with pytest.raises(IndexError):
        explain.grad_cam([network], osteo.explain_target_layer, batch, classes=[7])   # two logits only
    hooks = [m for m in network.modules() if m._forward_hooks]
    assert not hooks   # the hooks were released all the same
