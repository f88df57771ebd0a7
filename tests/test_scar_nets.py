"""Scar networks as the seed built them: CBAM-ResNet shapes and attention, the MLP, the late fusion, and
importing the seed's DataParallel checkpoints."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tasks import scar
from tasks.cards import read_card, verify_folds
from tasks.nets.cbam import CBAM, Bottleneck, ChannelGate, SpatialGate
from tasks.nets.late_fusion import ClinicalMLP, LateFusion
from tasks.weights import load_state_dict
from train.scar.trainer import main as train_scar_main
from train.scar.seed_import import import_seed_checkpoint

TINY = scar.image_architecture(width=4, layers=(1, 1, 1, 1))


def test_the_full_size_image_model_is_resnet50_with_cbam_and_the_seeds_head():
    network = scar.build_network("image", scar.image_architecture()).eval()
    assert [len(getattr(network, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert all(isinstance(block, Bottleneck) and isinstance(block.cbam, CBAM)
               for i in range(1, 5) for block in getattr(network, f"layer{i}"))
    assert [(fc.in_features, fc.out_features) for fc in (network.fc1, network.fc2, network.fc3)] == \
        [(2048, 512), (512, 64), (64, 4)]
    assert network.drop.p == 0.5
    with torch.no_grad():
        assert network.features(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
        assert network(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_depth_and_width_come_from_the_record_so_a_tiny_variant_serves_as_demo():
    network = scar.build_network("image", TINY).eval()
    assert network.fc1.in_features == 4 * 4 * 8 and [len(getattr(network, f"layer{i}")) for i in range(1, 5)] == [1] * 4
    with torch.no_grad():
        assert network(torch.randn(3, 3, 64, 80)).shape == (3, 4)


def test_channel_and_spatial_attention_are_weights_in_zero_one_of_the_right_shape():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 11) * 5
    channel, spatial = ChannelGate(32, 16), SpatialGate()
    torch.nn.init.normal_(spatial.bn.weight, 0, 3)
    with torch.no_grad():
        a_channel, a_spatial = channel.attention(x), spatial.attention(x)
    assert a_channel.shape == (2, 32, 1, 1) and a_spatial.shape == (2, 1, 9, 11)
    for weights in (a_channel, a_spatial):
        assert float(weights.min()) >= 0.0 and float(weights.max()) <= 1.0
    assert CBAM(32)(x).shape == x.shape


def test_cbam_sits_on_the_residual_branch_before_the_shortcut_add():
    block = Bottleneck(16, 4).eval()  # 16 -> 4*4 channels: identity shortcut
    torch.nn.init.constant_(block.cbam.channel.mlp[2].bias, -1e4)  # channel attention ~0: the branch vanishes
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(x), atol=1e-6)


def test_the_clinical_mlp_is_11_32_64_32_4_with_batch_norm_and_dropout_in_training_only():
    mlp = ClinicalMLP(11)
    assert [(getattr(mlp, f"fc{i}").in_features, getattr(mlp, f"fc{i}").out_features) for i in range(1, 5)] == \
        [(11, 32), (32, 64), (64, 32), (32, 4)]
    x = torch.randn(8, 11)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))  # dropout draws differ
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


def test_late_fusion_is_the_seeds_weighted_relu_concatenation_into_linear_8_4():
    fusion = scar.build_network("combined", scar.combined_architecture(TINY, scar.clinical_architecture(11))).eval()
    assert isinstance(fusion, LateFusion) and (fusion.fc.in_features, fusion.fc.out_features) == (8, 4)
    image, clinical = torch.randn(2, 3, 64, 64), torch.randn(2, 11)
    with torch.no_grad():
        expected = fusion.fc(torch.cat([0.6 * torch.relu(fusion.cnn(image)), 0.4 * torch.relu(fusion.mlp(clinical))], 1))
        assert torch.allclose(fusion(image, clinical), expected)


def _as_seed_checkpoint(network: torch.nn.Module) -> dict:
    """Our weights renamed and wrapped as the seed's training scripts saved them under DataParallel."""
    renames = ((".cbam.channel.mlp.0.", ".cbam.ChannelGate.mlp.1."), (".cbam.channel.mlp.2.", ".cbam.ChannelGate.mlp.3."),
               (".cbam.spatial.", ".cbam.SpatialGate.spatial."))
    state = {}
    for key, value in network.state_dict().items():
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        state[f"module.{key}"] = value
    return {"epoch": 37, "state_dict": state, "best_prec1": torch.tensor(71.5),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.1, "params": [0, 1]}]}}


def test_a_seed_combined_checkpoint_imports_with_the_seeds_column_order_and_scaler(tmp_path):
    torch.manual_seed(1)
    seed_model = scar.build_network("combined", scar.combined_architecture(TINY, scar.clinical_architecture(11))).eval()
    path = tmp_path / "0.010_0.1_0.00001_combined_best.pth.tar"
    torch.save(_as_seed_checkpoint(seed_model), path)
    table = tmp_path / "example.csv"
    columns = [f"feature{i}" for i in range(1, 9)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"img_name": [f"{i}.jpg" for i in range(6)], "age": rng.uniform(20, 70, 6),
                          **{c: rng.integers(0, 2, 6) for c in columns}, "BMI": rng.normal(24, 3, 6),
                          "Delta_date": rng.uniform(30, 300, 6), "Cls": [0, 1, 2, 3, 0, 1]})
    frame.to_csv(table, index=False)

    card = import_seed_checkpoint(path, tmp_path / "scar", table=table, input_size=(64, 64))
    verify_folds(tmp_path / "scar", read_card(tmp_path / "scar"))
    assert card["clinical_features"]["names"] == columns + ["age", "BMI", "Delta_date"]  # the seed appended them
    entry = card["folds"][0]
    assert entry["model"] == "combined" and entry["fold"] == 0 and card["demo"] is False
    assert entry["scaler"]["mean"][:8] == [0.0] * 8 and entry["scaler"]["scale"][:8] == [1.0] * 8
    assert entry["scaler"]["mean"][8] == pytest.approx(frame["age"].mean())
    assert card["models"]["combined"]["source"]["epoch"] == 37
    assert card["models"]["combined"]["source"]["best_prec1"] == pytest.approx(71.5)
    imported = scar.build_network("combined", card["architecture"]["combined"]).eval()
    imported.load_state_dict(load_state_dict(tmp_path / "scar" / entry["file"]), strict=True)
    image, clinical = torch.randn(2, 3, 64, 64), torch.randn(2, 11)
    with torch.no_grad():
        assert torch.equal(imported(image, clinical), seed_model(image, clinical))


def test_a_seed_image_checkpoint_joins_the_card_and_a_foreign_file_is_refused(tmp_path, capsys):
    seed_model = scar.build_network("image", TINY).eval()
    path = tmp_path / "image_best.pth.tar"
    torch.save(_as_seed_checkpoint(seed_model), path)
    assert train_scar_main(["import", str(path), "--out", str(tmp_path / "scar"), "--fold", "2",
                            "--input-size", "64", "64"]) == 0
    card = read_card(tmp_path / "scar")
    assert card["architecture"]["image"] == TINY and card["folds"][0]["fold"] == 2
    assert card["input"]["photo"]["size"] == [64, 64]
    not_a_checkpoint = tmp_path / "notes.pth.tar"
    not_a_checkpoint.write_text("hello")
    assert train_scar_main(["import", str(not_a_checkpoint), "--out", str(tmp_path / "scar")]) == 2
    assert "weights_only" in capsys.readouterr().err
