"""The committed brixia card, trained on real chest films: it says where its data came from, and the daemon
serving it refuses films it must not score (mirrored, sideways, empty) with the reason, then serves on."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, Daemon
from tasks.cards import read_card

WEIGHTS = REPO / "weights"
EXAMPLE = REPO / "examples" / "brixia_chest_333323.png"


def test_the_card_names_every_source_and_licence_and_stays_a_demo():
    card = read_card(WEIGHTS / "brixia")
    assert card["demo"] is True and card["data"]["reference"].startswith("senior")
    text = str(card["data"]).lower()
    for needed in ("cohen", "cc by-nc-sa", "non-commercial", "jsrt", "covid-qu-ex"):
        assert needed in text, needed
    assert card["architecture"]["score"]["opacity"] is True and card["output"]["decision"] == "median"
    assert card["metrics"]["pooled"]["second_reader"]["mae"] > 0      # the junior reader, beside the model


@pytest.fixture(scope="module")
def daemon():
    process = Daemon(str(WEIGHTS), "--device", "cpu", "--tasks", "brixia")
    yield process
    process.close()


def test_op_models_counts_fold_networks_per_model_not_all_as_folds(daemon):
    card = read_card(WEIGHTS / "brixia")
    expected = {}
    for entry in card["folds"]:
        expected[entry["model"]] = expected.get(entry["model"], 0) + 1
    (listed,) = [model for model in daemon.ask({"op": "models"})["models"] if model["task"] == "brixia"]
    assert listed["folds_used"] == expected and "score" in expected and "seg" in expected


def test_a_frontal_film_is_scored_and_its_mirror_image_is_refused(daemon, tmp_path):
    reply = daemon.ask({"task": "brixia", "img_path": str(EXAMPLE), "destination_path": str(tmp_path), "cams": False})
    assert reply["result"] == "ok", reply
    assert set(reply["region_opacity"]) == set("ABCDEF")
    assert reply["uncertainty"]["folds"] == len([f for f in read_card(WEIGHTS / "brixia")["folds"] if f.get("model") == "score"])
    assert reply["uncertainty"]["max_expected_score_std"] >= 0 and reply["quality"]["ok"] in (True, False)
    mirrored = tmp_path / "mirrored.png"
    Image.fromarray(np.ascontiguousarray(np.asarray(Image.open(EXAMPLE).convert("L"))[:, ::-1])).save(mirrored)
    # check_kind false: the brixia film check itself is under test, not the image-kind gate before it
    reply = daemon.ask({"task": "brixia", "img_path": str(mirrored), "destination_path": str(tmp_path / "m"),
                        "check_kind": False})
    assert reply["result"] == "fail" and reply["error"]["code"] == "unreadable_image", reply
    assert "mirrored" in reply["error"]["message"]
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())   # a refused film writes nothing


@pytest.mark.parametrize("kind", ["blank", "sideways"])
def test_films_that_are_not_frontal_chests_are_refused_with_the_reason(daemon, tmp_path, kind):
    gray = np.asarray(Image.open(EXAMPLE).convert("L"))
    image = np.full((300, 300), 128, np.uint8) if kind == "blank" else np.ascontiguousarray(np.rot90(gray))
    path = tmp_path / f"{kind}.png"
    Image.fromarray(image).save(path)
    reply = daemon.ask({"task": "brixia", "img_path": str(path), "destination_path": str(tmp_path), "check_kind": False})
    assert reply["result"] == "fail" and reply["error"]["code"] == "unreadable_image", reply
    assert "frontal" in reply["error"]["message"] or "mirrored" in reply["error"]["message"]
    assert daemon.ask({"op": "health"})["result"] == "ok"
