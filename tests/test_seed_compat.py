"""The seed's own checkpoint works as it did: ``python run_model.py efficientnet-bN_..._C1_C3.pth``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Daemon, panoramic_phantom
from tasks import osteo


def seed_checkpoint(path: Path, seed: int = 0) -> torch.nn.Module:
    """A seed-style checkpoint: efficientnet-pytorch b0 with its 1000-way head, DataParallel prefixes.

    Logits 2..999 are pushed down as training on classes 0/1 only would have done.
    """
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(seed)
    network = EfficientNet.from_name("efficientnet-b0").eval()
    with torch.no_grad():
        network._fc.bias[2:] = -50.0
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, path)
    return network


@pytest.mark.parametrize("name, diagnoses", [
    ("efficientnet-b0_full_C1_C3.pth", {"C1": "Healthy Patient", "C3": "Patient with Osteoporosis"}),
    ("efficientnet-b0_full_C1_C2C3.pth", {"C1": "Healthy Bone", "C2C3": "Diseased Bone"}),
])
def test_seed_checkpoint_gives_the_seed_diagnosis(tmp_path, name, diagnoses):
    network = seed_checkpoint(tmp_path / name)
    image_path = tmp_path / "patient.png"
    gray = panoramic_phantom(200, 420, seed=3)
    Image.fromarray(gray).save(image_path)

    tensor, _ = osteo.preprocess(gray, osteo.default_input_spec())
    with torch.no_grad():
        seed_prediction = int(network(tensor[None]).argmax(1))  # the seed: argmax over all 1000 logits
    expected_label = list(diagnoses)[seed_prediction]

    process = Daemon(str(tmp_path / name), "--device", "cpu", "--explain", "saliency")
    assert process.ready["tasks"]["osteo"]["available"] is True
    reply = process.ask({"img_path": str(image_path), "destination_path": str(tmp_path / "out")})
    assert reply["result"] == "ok", reply
    assert reply["label"] == expected_label
    assert reply["diagnosis"] == diagnoses[expected_label]
    with Image.open(reply["saliency_img_path"]) as heat:
        assert heat.size == (954, 449)  # the seed's output size
    assert process.close() == 0


def test_seed_state_dict_keeps_the_two_trained_logits(tmp_path):
    network = seed_checkpoint(tmp_path / "efficientnet-b0_x_C1_C3.pth")
    checkpoint = torch.load(tmp_path / "efficientnet-b0_x_C1_C3.pth", weights_only=True)
    state, notes = osteo.seed_state_dict(checkpoint)
    assert notes["original_head_outputs"] == 1000
    ours = osteo.build_network(osteo.default_architecture("efficientnet-b0")).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), network(x)[:, :2].numpy(), rtol=1e-5, atol=1e-5)


def test_file_name_without_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="efficientnet-b0 .. efficientnet-b7"):
        osteo.seed_checkpoint_spec("model.pth")
