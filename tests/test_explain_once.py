"""One forward pass per fold serves the osteo prediction and its map: the same probabilities and
maps, bit for bit, as a forward pass followed by Grad-CAM / saliency, also when the folds disagree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon import explain, rendering
from tasks import osteo


def tiny_fold(seed: int, bias: tuple[float, float]) -> torch.nn.Module:
    """A small EfficientNet whose two logits are led by ``bias`` (so the folds' votes are known)."""
    torch.manual_seed(seed)
    network = osteo.build_network(osteo.default_architecture("efficientnet-b0", width_coefficient=0.25,
                                                             depth_coefficient=0.2)).eval()
    with torch.no_grad():
        network._fc.weight.mul_(0.05)
        network._fc.bias.copy_(torch.tensor(bias))
    explain.freeze_for_cam(network, osteo.explain_target_layer(network))
    return network


def two_steps(networks, batch, method):
    """What the handler did before: an inference forward pass, then the map of the predicted class."""
    with torch.inference_mode():
        logits = [network(batch) for network in networks]
    probabilities = torch.stack([torch.softmax(out.float(), dim=1) for out in logits]).mean(0).numpy()
    predicted = probabilities.argmax(axis=1)
    if method == "gradcam":
        return probabilities, predicted, explain.grad_cam(networks, osteo.explain_target_layer, batch, predicted)
    return probabilities, predicted, explain.input_saliency(networks, batch, predicted)


@pytest.mark.parametrize("method", explain.EXPLAIN_METHODS)
@pytest.mark.parametrize("biases", [
    [(0.0, 2.0)],                 # one fold
    [(0.0, 2.0), (0.5, 2.5)],     # two folds that agree
    [(0.4, 0.0), (0.0, 3.0)],     # fold 0 votes C1, the ensemble C3: fold 0's map is made again
], ids=["one-fold", "agree", "disagree"])
def test_one_pass_gives_the_two_step_result(method, biases, monkeypatch):
    networks = [tiny_fold(seed, bias) for seed, bias in enumerate(biases)]
    batch = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    expected = two_steps(networks, batch, method)
    passes, backward_only = [], []
    if method == "gradcam":
        first, again = explain.HeldGradCam.first, explain.HeldGradCam.again
        monkeypatch.setattr(explain.HeldGradCam, "first", lambda self, b, t: passes.append(len(b)) or first(self, b, t))
        monkeypatch.setattr(explain.HeldGradCam, "again", lambda self, t: backward_only.append(len(t)) or again(self, t))
    else:
        fold_pass = explain._saliency_fold
        monkeypatch.setattr(explain, "_saliency_fold", lambda *args: passes.append(len(args[-2])) or fold_pass(*args))
    got = explain.explained_prediction(networks, batch, method, osteo.explain_target_layer)
    disagree = biases[0][0] > biases[0][1]
    if method == "gradcam":   # a forward pass per fold; fold 0's map made again from its kept forward pass
        assert passes == [2] * len(biases) and backward_only == ([2] if disagree else [])
    else:                     # a pass per fold, one more to redo fold 0
        assert passes == [2] * len(biases) + ([2] if disagree else [])
    if disagree:
        assert (got[0][:, 0] < got[0][:, 1]).all()  # the ensemble overrules fold 0's vote
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    assert got[2].shape == (2, 64, 128) and got[2].dtype == np.float32
    assert got[3].shape == (len(biases), 2, 2)
    np.testing.assert_allclose(got[3].mean(0), got[0], rtol=1e-6)  # the folds' own probabilities


@pytest.mark.parametrize("values", [np.linspace(-0.2, 1.2, 4097, dtype=np.float32),
                                    np.arange(257, dtype=np.float64) / 256])
def test_colour_tables_give_matplotlibs_colours(values):
    """heat_rgba / seed_overlay by table look-up equal matplotlib's colormap applied per pixel."""
    from matplotlib import colormaps

    values = np.append(values, np.nan).reshape(1, -1)
    np.testing.assert_array_equal(rendering.heat_rgba(values),
                                  (colormaps["hot"](np.clip(values, 0, 1)) * 255).round().astype(np.uint8))
    gray = (np.arange(values.size) % 256).astype(np.uint8).reshape(values.shape)
    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    red = colormaps["hot"](np.clip(values, 0, 1))[..., 0].astype(np.float32)
    base[..., 0] = np.clip(base[..., 0] + np.where(red < 0.3, 0.0, red) * 1.5, 0.0, 1.0)
    np.testing.assert_array_equal(rendering.seed_overlay(gray, values), (base * 255).round().astype(np.uint8))


def test_feature_grad_cam_is_pytorch_grad_cams_map_for_every_target_from_one_forward():
    """brixia's path (all region targets from one forward, differentiated w.r.t. the shared feature
    map) draws the maps pytorch-grad-cam draws target by target (float rounding aside)."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, stride=4, padding=1))
    network = torch.nn.Sequential(trunk, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    batch = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    feature = trunk(batch).detach().requires_grad_(True)
    logits = network[1:](feature)
    targets = [torch.tensor([0, 2]), torch.tensor([1, 1])]
    scores = [logits.gather(1, classes[:, None]).sum() for classes in targets]
    maps = explain.normalised(explain.feature_grad_cam(feature, scores, (48, 64)).numpy())
    assert maps.shape == (2, 2, 48, 64)
    for t, classes in enumerate(targets):
        library = explain.grad_cam([network], lambda net: net[0], batch, classes.tolist())
        np.testing.assert_allclose(maps[:, t], library, atol=1e-4)
