"""Explanation maps for classifiers: Grad-CAM (pytorch-grad-cam) and the osteo seed's input saliency.

Both return one map per image in [0, 1] at the network's input size, for the class the
ensemble predicted, averaged over the fold models. ``heat_rgba`` and ``seed_overlay`` turn a
map into the seed's two PNGs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

EXPLAIN_METHODS = ("gradcam", "saliency")


def freeze_for_cam(network: torch.nn.Module, target_layer: torch.nn.Module) -> None:
    """Only the target layer keeps ``requires_grad``: the backward then stops there (~3x faster
    Grad-CAM) while pytorch-grad-cam still sees a gradient to hook."""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    for parameter in target_layer.parameters():
        parameter.requires_grad_(True)


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Min-max each map to [0, 1]; a flat map becomes all zeros."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)[:, None, None]
    span = (flat.max(axis=1) - flat.min(axis=1))[:, None, None]
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0).astype(np.float32)


def grad_cam(networks: Sequence[torch.nn.Module], target_layer_of: Callable[[torch.nn.Module], torch.nn.Module],
             batch: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM of ``classes`` (one per image) at each network's target layer, mean over networks."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    total = np.zeros((batch.shape[0], batch.shape[2], batch.shape[3]), dtype=np.float32)
    with torch.enable_grad():
        for network in networks:
            # Under float16 autocast the hooked activations and gradients are float16: cast them
            # (pytorch-grad-cam's reshape_transform sees both) so the map is built in float32.
            # Not ``with GradCAM(...)``: its __exit__ prints and swallows an IndexError, which would
            # silently leave this fold's map out of the mean. Release the hooks ourselves instead.
            cam = GradCAM(model=network, target_layers=[target_layer_of(network)], reshape_transform=_as_float32)
            try:
                total += cam(input_tensor=batch, targets=targets)
            finally:
                cam.activations_and_grads.release()
    return _normalise(total / len(networks))


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as it is (no copy: float32 results stay bit-identical), anything else cast."""
    return tensor.float()


def input_saliency(networks: Sequence[torch.nn.Module], batch: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """The osteo seed's map: max over channels of |d logit(class) / d input|, min-max, mean over networks."""
    index = torch.as_tensor(list(classes), device=batch.device)
    total = torch.zeros((batch.shape[0], batch.shape[2], batch.shape[3]), device=batch.device)
    with torch.enable_grad():
        for network in networks:
            x = batch.detach().clone().requires_grad_(True)
            logits = network(x)  # float16 under autocast; the score is summed in float32
            score = logits.float().gather(1, index[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
            total += torch.from_numpy(_normalise(grad.float().abs().amax(dim=1).cpu().numpy())).to(batch.device)
    return _normalise((total / len(networks)).cpu().numpy())


def heat_rgba(saliency: np.ndarray) -> np.ndarray:
    """The seed's heat map image: matplotlib ``hot`` colormap of a [0, 1] map, RGBA uint8."""
    from matplotlib import colormaps

    return (colormaps["hot"](np.clip(saliency, 0, 1)) * 255).round().astype(np.uint8)


def seed_overlay(gray: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The seed's overlay: the input (gray as RGB) plus 1.5x the hot map's red channel where it is
    at least 0.3, clipped; only red is added, so anatomy stays readable under the highlight."""
    from matplotlib import colormaps

    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    red = colormaps["hot"](np.clip(saliency, 0, 1))[..., 0].astype(np.float32)
    red = np.where(red < 0.3, 0.0, red) * 1.5
    base[..., 0] = np.clip(base[..., 0] + red, 0.0, 1.0)
    return (base * 255).round().astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Grad-CAM over the image: the ``hot`` colour blended in with opacity ``strength * heat``, so
    cold regions keep the image as it is (Grad-CAM maps are broad; the seed's additive red would
    paint most of the picture). ``image`` is gray (H, W) or RGB (H, W, 3) uint8."""
    from matplotlib import colormaps

    base = image.astype(np.float32) / 255.0
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    heat = np.clip(heat, 0, 1).astype(np.float32)
    colour = colormaps["hot"](heat)[..., :3].astype(np.float32)
    alpha = (strength * heat)[..., None]
    return ((base * (1 - alpha) + colour * alpha) * 255).round().astype(np.uint8)
