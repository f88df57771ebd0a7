"""A card becomes its networks one way (tasks.bundle): sha256 checked, --fold applied with shared models kept,
and fold networks counted per model, so a segmenter is never counted as a scoring fold."""
from __future__ import annotations

import pytest
import torch

from tasks import cards
from tasks.bundle import load_bundle
from tasks.weights import save_state_dict

BUILDERS = {"seg": lambda record: torch.nn.Conv2d(1, record["out"], 1), "score": lambda record: torch.nn.Linear(4, 2)}


def write_two_model_card(folder, seg_folds=2, score_folds=3):
    """A brixia-shaped card: segmenter folds shared by every fold, one scorer per fold."""
    folder.mkdir(parents=True)
    entries = []
    for model, count in (("seg", seg_folds), ("score", score_folds)):
        for fold in range(count):
            torch.manual_seed(len(entries))
            network = BUILDERS[model]({"out": 3})
            name = f"{model}{fold}.safetensors"
            save_state_dict(network.state_dict(), folder / name)
            entries.append({"file": name, "sha256": cards.sha256_file(folder / name), "model": model, "fold": fold,
                            **({"shared": True} if model == "seg" else {})})
    cards.write_card(folder, {"task": "brixia", "name": "t", "version": "0", "architecture": {"seg": {"out": 3},
                              "score": {"in": 4}}, "input": {}, "labels": [], "folds": entries})
    return folder


def test_every_model_is_counted_on_its_own(tmp_path):
    bundle = load_bundle(write_two_model_card(tmp_path / "card"), BUILDERS, "cpu")
    assert bundle.folds_used() == {"seg": 2, "score": 3}
    assert all(not network.training for network in bundle.all_networks())


def test_one_fold_keeps_the_shared_segmenter_and_loads_that_folds_weights(tmp_path):
    folder = write_two_model_card(tmp_path / "card")
    bundle = load_bundle(folder, BUILDERS, "cpu", fold=1)
    assert bundle.folds_used() == {"seg": 2, "score": 1}
    assert [entry["file"] for entry in bundle.entries["score"]] == ["score1.safetensors"]
    every = load_bundle(folder, BUILDERS, "cpu")
    assert torch.equal(bundle["score"][0].weight, every["score"][1].weight)
    with pytest.raises(cards.CardError, match=r"--fold 7 asked for, but the card has folds \[0, 1, 2\]"):
        load_bundle(folder, BUILDERS, "cpu", fold=7)


def test_a_changed_weight_file_or_a_missing_model_is_refused(tmp_path):
    folder = write_two_model_card(tmp_path / "card")
    with pytest.raises(cards.CardError, match="the brixia card has no orient model"):
        load_bundle(folder, BUILDERS, "cpu", required=("seg", "orient"))
    with pytest.raises(cards.CardError, match="not a 'handbone' card"):
        load_bundle(folder, BUILDERS, "cpu", task="handbone")
    with open(folder / "score0.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    with pytest.raises(cards.CardError, match="changed or corrupted"):
        load_bundle(folder, BUILDERS, "cpu")


def test_a_one_model_card_counts_a_number(tmp_path):
    folder = tmp_path / "osteo"
    folder.mkdir()
    save_state_dict(torch.nn.Linear(4, 2).state_dict(), folder / "fold0.safetensors")
    cards.write_card(folder, {"task": "osteo", "name": "t", "version": "0", "architecture": {}, "input": {},
                              "labels": [], "folds": [{"file": "fold0.safetensors",
                                                       "sha256": cards.sha256_file(folder / "fold0.safetensors")}]})
    bundle = load_bundle(folder, lambda record: torch.nn.Linear(4, 2), "cpu")
    assert bundle.folds_used() == 1 and len(bundle.only()) == 1 and bundle.models == ["osteo"]
