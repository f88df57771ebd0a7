"""Importing the seed's osteo model.pth: a 1000-way efficientnet-pytorch checkpoint becomes a 2-way card."""
from __future__ import annotations

import pytest
import torch
from efficientnet_pytorch import EfficientNet

from tasks import osteo
from tasks.cards import read_card, sha256_file, verify_folds
from tasks.weights import load_state_dict
from train.import_checkpoint import import_osteo_checkpoint, main


@pytest.fixture(scope="module")
def seed_model():
    torch.manual_seed(0)
    return EfficientNet.from_name("efficientnet-b0").eval()  # the seed kept the 1000-way ImageNet head


@pytest.fixture(scope="module")
def seed_checkpoint(seed_model, tmp_path_factory):
    # As the DataParallel-era scripts saved it: {'state_dict': {'module.<name>': tensor}}.
    path = tmp_path_factory.mktemp("seed") / "efficientnet-b0_full_C1_C3.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in seed_model.state_dict().items()}}, path)
    return path


def test_the_imported_model_gives_the_seeds_first_two_logits_exactly(seed_model, seed_checkpoint, tmp_path):
    out = import_osteo_checkpoint(seed_checkpoint, tmp_path / "card")
    card = read_card(out)
    verify_folds(out, card)
    network = osteo.build_network(card["architecture"]).eval()
    network.load_state_dict(load_state_dict(out / "fold0.safetensors"), strict=True)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        assert torch.equal(network(x), seed_model(x)[:, :2])
    assert card["architecture"]["variant"] == "efficientnet-b0" and card["labels"] == ["C1", "C3"]
    assert card["demo"] is False and card["input"] == osteo.default_input_spec()
    assert card["source"]["file"] == seed_checkpoint.name
    assert card["source"]["sha256"] == sha256_file(seed_checkpoint)
    assert card["source"]["original_head_outputs"] == 1000 and "kept logits 0..1" in card["source"]["head"]


def test_a_c2c3_file_name_selects_the_diseased_bone_labels(seed_model, tmp_path):
    path = tmp_path / "efficientnet-b0_full_C1_C2C3.pth"
    torch.save(seed_model.state_dict(), path)  # a bare state dict, without prefixes, also imports
    assert read_card(import_osteo_checkpoint(path, tmp_path / "out"))["labels"] == ["C1", "C2C3"]


def test_the_command_line_takes_arch_and_labels_when_the_file_name_says_nothing(seed_checkpoint, tmp_path):
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(seed_checkpoint.read_bytes())
    with pytest.raises(ValueError, match="cannot tell the EfficientNet variant"):
        import_osteo_checkpoint(renamed, tmp_path / "x")
    assert main(["osteo", str(renamed), "--arch", "efficientnet-b0", "--labels", "C1,C3", "--out",
                 str(tmp_path / "cli")]) == 0
    assert read_card(tmp_path / "cli")["source"]["file"] == "model.pth"


def test_a_checkpoint_of_another_variant_is_refused_with_a_hint(seed_checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="does not fit efficientnet-b1 .*--arch"):
        import_osteo_checkpoint(seed_checkpoint, tmp_path / "x", arch="efficientnet-b1")
    not_a_checkpoint = tmp_path / "efficientnet-b0_notes.pth"
    not_a_checkpoint.write_text("hello")
    assert main(["osteo", str(not_a_checkpoint), "--out", str(tmp_path / "y")]) == 2
    assert "weights_only" in capsys.readouterr().err
