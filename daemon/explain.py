"""Explanation maps, the daemon's one Grad-CAM path: pytorch-grad-cam, per-target Grad-CAM of a feature map, saliency.

Each returns one map per image (per target) in [0, 1] at the network's input size, averaged
over the fold models; ``daemon.rendering`` turns a map into pictures. Classifiers (osteo, scar)
explain the predicted class through pytorch-grad-cam; brixia's six region heads read one shared
feature map, so ``feature_grad_cam`` takes that map and the six scores from one forward
(pytorch-grad-cam would run a forward and a backward per region).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    total = np.zeros((batch.shape[0], batch.shape[2], batch.shape[3]), dtype=np.float32)
    for network in networks:
        total += _grad_cam_fold(network, target_layer_of, batch, [ClassifierOutputTarget(int(c)) for c in classes])[0]
    return _normalise(total / len(networks))


def _grad_cam_fold(network: torch.nn.Module, target_layer_of: Callable[[torch.nn.Module], torch.nn.Module],
                   batch: torch.Tensor, targets: list) -> tuple[np.ndarray, torch.Tensor]:
    """One network's Grad-CAM maps of ``targets`` (pytorch-grad-cam targets, one per image) and
    the logits of the forward pass that made them."""
    held = HeldGradCam(network, target_layer_of)
    try:
        return held.first(batch, targets)
    finally:
        held.release()


class HeldGradCam:
    """One network's pytorch-grad-cam ``GradCAM`` whose forward pass is kept until ``release``: the maps
    of other targets (``again``) then cost a backward pass through the layers after the target layer,
    not a forward pass through the whole network. ``first`` + ``again`` give the maps a new ``GradCAM``
    call per target gives (``BaseCAM.forward`` is a forward pass, then exactly these steps)."""

    def __init__(self, network: torch.nn.Module, target_layer_of: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        from pytorch_grad_cam import GradCAM

        # Under float16 autocast the hooked activations and gradients are float16: cast them
        # (pytorch-grad-cam's reshape_transform sees both) so the map is built in float32.
        # Not ``with GradCAM(...)``: its __exit__ prints and swallows an IndexError, which would
        # silently leave this fold's map out of the mean. ``release`` frees the hooks instead.
        self.cam = GradCAM(model=network, target_layers=[target_layer_of(network)], reshape_transform=_as_float32)
        self.batch: torch.Tensor | None = None

    def first(self, batch: torch.Tensor, targets: list) -> tuple[np.ndarray, torch.Tensor]:
        """The maps of ``targets`` (one per image) and the logits of the forward pass that made them."""
        with torch.enable_grad():
            maps = self.cam(input_tensor=batch, targets=targets)
        self.batch = batch
        return maps, self.cam.outputs.detach()

    def again(self, targets: list) -> np.ndarray:
        """The maps of other ``targets`` (one per image of the same batch) from the kept forward pass."""
        cam, grads = self.cam, self.cam.activations_and_grads
        with torch.enable_grad():
            grads.gradients = []
            cam.model.zero_grad()
            loss = sum(target(output) for target, output in zip(targets, cam.outputs))
            loss.backward(retain_graph=True)
            return cam.aggregate_multi_layers(cam.compute_cam_per_layer(self.batch, targets, False))

    def release(self) -> None:
        self.cam.activations_and_grads.release()
        self.cam.outputs = None  # frees the retained graph


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as it is (no copy: float32 results stay bit-identical), anything else cast."""
    return tensor.float()


def feature_grad_cam(feature: torch.Tensor, scores: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """Grad-CAM ``(B, T, H, W)`` on the CPU, not normalised, of each scalar in ``scores`` (T targets,
    each summed over the batch) with respect to ``feature`` ``(B, C, h, w)``, the leaf tensor the
    forward that made them started from: one backward per target and no forward again. The maps
    are those of ``GradCAM`` (channel weights = mean gradient, ReLU of the weighted sum), upsampled
    bilinearly to ``size``, in float32 whatever the forward's dtype."""
    maps = torch.zeros(feature.shape[0], len(scores), *size)
    activations = feature.detach().float()
    for t, score in enumerate(scores):
        (grad,) = torch.autograd.grad(score, feature, retain_graph=t < len(scores) - 1)
        weights = grad.float().mean((-2, -1), keepdim=True)
        cam = F.relu((weights * activations).sum(1, keepdim=True))
        maps[:, t] = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].cpu()
    return maps


def normalised(maps: np.ndarray) -> np.ndarray:
    """Min-max each ``(H, W)`` map of ``(..., H, W)`` to [0, 1]; a flat map becomes all zeros."""
    return _normalise(maps.reshape(-1, *maps.shape[-2:])).reshape(maps.shape)


def input_saliency(networks: Sequence[torch.nn.Module], batch: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """The osteo seed's map: max over channels of |d logit(class) / d input|, min-max, mean over networks."""
    index = torch.as_tensor(list(classes), device=batch.device)
    total = torch.zeros((batch.shape[0], batch.shape[2], batch.shape[3]), device=batch.device)
    for network in networks:
        total += torch.from_numpy(_saliency_fold(network, batch, lambda _logits: index)[0]).to(batch.device)
    return _normalise((total / len(networks)).cpu().numpy())


def _saliency_fold(network: torch.nn.Module, batch: torch.Tensor,
                   pick: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
    """One network's saliency maps (min-max per image) for the classes ``pick(logits)`` chooses,
    and those logits."""
    with torch.enable_grad():
        x = batch.detach().clone().requires_grad_(True)
        logits = network(x)  # float16 under autocast; the score is summed in float32
        index = pick(logits.detach())
        score = logits.float().gather(1, index[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return _normalise(grad.float().abs().amax(dim=1).cpu().numpy()), logits.detach()


class _EnsembleSoFar:
    """A pytorch-grad-cam target for one image: the logit of the class that the folds seen so far
    (``running``, their summed probabilities) and this one predict, chosen from this fold's own
    output, so that its forward pass serves the prediction and the explanation alike."""

    def __init__(self, running: torch.Tensor | None) -> None:
        self.running = running
        self.chosen = -1

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(output.detach().float(), dim=-1)
        if self.running is not None:
            probabilities = probabilities + self.running
        self.chosen = int(probabilities.argmax())
        return output[self.chosen]


def explained_prediction(networks: Sequence[torch.nn.Module], batch: torch.Tensor, method: str,
                         target_layer_of: Callable[[torch.nn.Module], torch.nn.Module]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (mean softmax over the networks), predicted classes, explanation maps of
    the predicted classes and each network's probabilities ``(networks, batch, classes)``, with one
    forward pass per network instead of one for the prediction and one more for the map.

    Each network's map is taken for the class the networks so far predict; where the whole
    ensemble ends up predicting another class (folds that disagree), that network's map is made
    again for it: for Grad-CAM by a backward pass from the kept forward pass (``HeldGradCam.again``),
    for the saliency, whose backward runs to the input anyway, by a pass again. Same probabilities and
    maps as ``grad_cam`` / ``input_saliency`` after a separate forward pass, at the cost of a forward
    pass less per network.
    """
    held: list[HeldGradCam] = []
    try:
        return _explained(networks, batch, method, target_layer_of, held)
    finally:
        for cam in held:
            cam.release()


def _explained(networks: Sequence[torch.nn.Module], batch: torch.Tensor, method: str,
               target_layer_of: Callable[[torch.nn.Module], torch.nn.Module], held: list["HeldGradCam"]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``explained_prediction``'s work; Grad-CAM keeps each fold's forward pass in ``held`` (released by
    the caller) so that a fold outvoted by the ensemble has its map made again by a backward pass only."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    running: torch.Tensor | None = None
    logits, maps, chosen = [], [], []
    for network in networks:
        if method == "gradcam":
            targets = [_EnsembleSoFar(None if running is None else running[i]) for i in range(batch.shape[0])]
            held.append(HeldGradCam(network, target_layer_of))
            fold_maps, out = held[-1].first(batch, targets)
            classes = np.array([target.chosen for target in targets])
        else:
            def pick(out: torch.Tensor) -> torch.Tensor:
                probabilities = torch.softmax(out.float(), dim=1)
                return (probabilities if running is None else probabilities + running).argmax(1)
            fold_maps, out = _saliency_fold(network, batch, pick)
            classes = pick(out).cpu().numpy()
        probabilities = torch.softmax(out.float(), dim=1)
        running = probabilities if running is None else running + probabilities
        logits.append(out)
        maps.append(fold_maps)
        chosen.append(classes)
    stacked = torch.stack([torch.softmax(out.float(), dim=1) for out in logits])
    mean, per_network = stacked.mean(0).cpu().numpy(), stacked.cpu().numpy()
    predicted = mean.argmax(axis=1)
    for k, (network, fold_maps, classes) in enumerate(zip(networks, maps, chosen)):
        redo = np.flatnonzero(classes != predicted)
        if not redo.size:
            continue
        if method == "gradcam":   # the whole batch's targets, the ensemble's classes; only the outvoted rows are kept
            fold_maps[redo] = held[k].again([ClassifierOutputTarget(int(c)) for c in predicted])[redo]
            continue
        subset = batch[torch.as_tensor(redo, device=batch.device)]   # saliency: a pass again, to the input
        index = torch.as_tensor(predicted[redo], device=batch.device)
        fold_maps[redo] = _saliency_fold(network, subset, lambda _logits: index)[0]
    if method == "gradcam":
        total = np.zeros(maps[0].shape, dtype=np.float32)
        for fold_maps in maps:
            total += fold_maps
        return mean, predicted, _normalise(total / len(networks)), per_network
    total_t = torch.zeros(maps[0].shape, device=batch.device)
    for fold_maps in maps:
        total_t += torch.from_numpy(fold_maps).to(batch.device)
    return mean, predicted, _normalise((total_t / len(networks)).cpu().numpy()), per_network
