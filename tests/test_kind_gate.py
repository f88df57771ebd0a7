"""A misrouted image is refused before its task runs: the image-kind gate, its card, its trainer and its switches."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Daemon, panoramic_phantom, write_fixed_kind_card, write_tiny_osteo_card
from dicom_factory import dataset_from_pixels, save
from daemon.kind_gate import KindGate
from tasks import kind
from tasks.imaging import DecodedImage, decode_image
from train.kind import trainer as train_kind
from train.kind.metrics import THRESHOLD_GRID, choose_thresholds, cross_fold_gate, gate_rates

SEED_FAIL = {"diagnosis": "", "saliency_img_path": "", "overlay_img_path": ""}


def write_kinds_folder(root: Path, per_family: int = 3) -> Path:
    """A tiny folder in the kinds layout: two source families per kind, a manifest naming them."""
    rng = np.random.default_rng(0)
    rows = []
    for label in kind.KINDS:
        (root / label).mkdir(parents=True)
        for family in ("alpha", "beta"):
            for k in range(per_family):
                height, width = (40, 80) if label == "panoramic" else (48, 48)
                shape = (height, width, 3) if label in ("photo", "other") else (height, width)
                name = f"{label}/{family}_{k}.png"
                Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name)
                rows.append({"file": name, "kind": label, "source_repo": f"{family}-{label}/repo",
                             "license": f"{family} terms", "source_path": name, "commit": "0" * 40})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def trained_kind(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("kind")
    data = write_kinds_folder(base / "kinds")
    out = base / "weights" / "kind"
    assert train_kind.main([str(data), "--out", str(out), "--phantoms", "2", "--plain", "4",
                            "--phantom-dir", str(base / "extra"), "--size", "32", "--widths", "4", "8",
                            "--folds", "2", "--epochs", "1", "--batch-size", "8", "--seed", "0"]) == 0
    return out


def test_train_kind_writes_a_card_with_sources_licences_figures_and_a_threshold(trained_kind):
    card = json.loads((trained_kind / "card.json").read_text())
    assert card["task"] == "kind" and card["labels"] == kind.KINDS and len(card["folds"]) == 2
    assert "internal research use" in card["use"]
    sources = {row["source"]: row for row in card["data"]["sources"]}
    assert sources["alpha-chest/repo"]["licences"] == ["alpha terms"] and sources["alpha-chest/repo"]["n"] == 3
    assert {"phantom-osteo", "phantom-brixia", "phantom-handbone", "phantom-scar", "plain"} <= set(card["data"]["families"])
    pooled = card["metrics"]["pooled"]
    assert set(pooled["recall"]) == set(pooled["precision"]) == set(kind.KINDS)
    assert len(pooled["confusion_matrix"]) == len(kind.KINDS)
    assert set(pooled["gate"]["thresholds_per_fold"]) == {"0", "1"}
    assert set(card["gate"]["refuse_at"]) == {"panoramic", "chest", "hand", "photo"}
    assert set(card["gate"]["refuse_at"].values()) <= set(THRESHOLD_GRID) and card["gate"]["task_kinds"] == kind.TASK_KINDS
    assert (trained_kind / "confusion_matrix.png").is_file()
    # folds are grouped by source family: a family never lands in two folds
    splits = json.loads((trained_kind / "splits.json").read_text())
    val_sets = [{(n.split("/")[0], n.split("/")[-1].split("_")[0]) for n in fold["val"]} for fold in splits]
    assert not val_sets[0] & val_sets[1]


def test_the_trained_card_loads_as_the_gate_and_answers_a_probability_per_kind(trained_kind):
    gate = KindGate.load(trained_kind)
    probabilities = gate.probabilities(panoramic_phantom())
    assert probabilities.shape == (len(kind.KINDS),) and abs(probabilities.sum() - 1) < 1e-5


def test_the_trained_card_serves_in_the_daemon(trained_kind, tmp_path):
    write_tiny_osteo_card(trained_kind.parent / "osteo")
    daemon = Daemon(str(trained_kind.parent), "--device", "cpu")
    try:
        assert daemon.ready["kind_gate"]["on"] is True
        assert daemon.ready["kind_gate"]["model"]["name"] == "kind-cnn32"
        listed = {model["task"]: model for model in daemon.ask({"op": "models"})["models"]}
        assert listed["kind"]["gate"]["refuse_at"] == daemon.ready["kind_gate"]["refuse_at"]
        assert listed["kind"]["use"].startswith("internal research use")
    finally:
        daemon.close()


def test_the_fused_fold_ensemble_gives_each_folds_logits(trained_kind):
    gate = KindGate.load(trained_kind)
    x = kind.preprocess(panoramic_phantom(), gate.card["input"])[None].repeat(2, 1, 1, 1)
    with torch.inference_mode():
        separate = torch.stack([network(x) for network in gate.networks], dim=1)
        fused = kind.fold_ensemble(gate.networks)(x)
    assert torch.allclose(separate, fused, atol=1e-4)


# ---------------------------------------------------------------- the gate through the real daemon

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    pano = panoramic_phantom(150, 300)
    paths = {"pano": folder / "pano.png"}
    Image.fromarray(pano).save(paths["pano"])
    for name, attributes in {"ct": {"Modality": "CT"}, "chest_part": {"BodyPartExamined": "CHEST", "Modality": "DX"},
                             "px": {"Modality": "PX", "BodyPartExamined": "JAW"}, "plain": {}}.items():
        ds = dataset_from_pixels(pano)
        for key, value in attributes.items():
            setattr(ds, key, value)
        paths[name] = folder / f"{name}.dcm"
        save(ds, paths[name])
    return paths


def _weights(root: Path, looks_like: str) -> Path:
    write_tiny_osteo_card(root / "osteo")
    write_fixed_kind_card(root / "kind", looks_like)
    return root


@pytest.fixture(scope="module")
def chest_gate(tmp_path_factory):
    """Tiny osteo + a kind card that calls everything a chest film."""
    process = Daemon(str(_weights(tmp_path_factory.mktemp("w_chest"), "chest")), "--device", "cpu")
    yield process
    process.close()


@pytest.fixture(scope="module")
def panoramic_gate(tmp_path_factory):
    """Tiny osteo + a kind card that calls everything a panoramic."""
    process = Daemon(str(_weights(tmp_path_factory.mktemp("w_pano"), "panoramic")), "--device", "cpu")
    yield process
    process.close()


def test_the_ready_line_and_health_say_the_gate_is_on(chest_gate):
    assert chest_gate.ready["kind_gate"]["on"] is True
    assert chest_gate.ready["kind_gate"]["refuse_at"] == {"chest": 0.9, "hand": 0.9, "panoramic": 0.9, "photo": 0.9}
    assert chest_gate.ask({"op": "health"})["kind_gate"]["model"]["name"] == "kind-says-chest"


def test_a_chest_film_sent_to_osteo_is_refused_with_what_it_looks_like_and_the_seed_fields(chest_gate, inputs, tmp_path):
    reply = chest_gate.ask({"id": 7, "img_path": str(inputs["pano"]), "destination_path": str(tmp_path)})
    assert reply["result"] == "fail" and reply["error"]["code"] == "wrong_image_kind", reply
    assert list(reply)[:4] == ["result", *SEED_FAIL] and all(reply[k] == "" for k in SEED_FAIL)
    assert reply["id"] == 7 and reply["task"] == "osteo"
    message = reply["error"]["message"]
    assert "frontal chest X-ray (probability 1.00)" in message and "panoramic dental X-ray" in message
    assert "brixia" in message and '"check_kind": false' in message
    assert not list(tmp_path.iterdir())  # refused before anything was written
    assert chest_gate.ask({"op": "health"})["result"] == "ok"  # and the daemon keeps serving


def test_check_kind_false_skips_the_gate_for_one_request(chest_gate, inputs, tmp_path):
    reply = chest_gate.ask({"img_path": str(inputs["pano"]), "destination_path": str(tmp_path), "check_kind": False})
    assert reply["result"] == "ok", reply


@pytest.mark.parametrize("value", ["no", 0, None])
def test_check_kind_must_be_a_boolean(chest_gate, inputs, tmp_path, value):
    reply = chest_gate.ask({"img_path": str(inputs["pano"]), "destination_path": str(tmp_path), "check_kind": value})
    assert reply["error"]["code"] == "invalid_request" and "check_kind" in reply["error"]["message"]


def test_no_kind_check_turns_the_gate_off_and_the_ready_line_says_so(tmp_path, inputs):
    daemon = Daemon(str(_weights(tmp_path / "w", "chest")), "--device", "cpu", "--no-kind-check")
    try:
        assert daemon.ready["kind_gate"] == {"on": False, "reason": "turned off with --no-kind-check"}
        reply = daemon.ask({"img_path": str(inputs["pano"]), "destination_path": str(tmp_path / "out")})
        assert reply["result"] == "ok", reply
    finally:
        daemon.close()


def test_a_panoramic_passes_its_own_gate(panoramic_gate, inputs, tmp_path):
    for name in ("pano", "plain", "px"):
        reply = panoramic_gate.ask({"img_path": str(inputs[name]), "destination_path": str(tmp_path)})
        assert reply["result"] == "ok", (name, reply)


@pytest.mark.parametrize("name, attribute", [("ct", "Modality is 'CT'"), ("chest_part", "BodyPartExamined is 'CHEST'")])
def test_dicom_attributes_refuse_what_the_picture_would_let_through(panoramic_gate, inputs, tmp_path, name, attribute):
    reply = panoramic_gate.ask({"img_path": str(inputs[name]), "destination_path": str(tmp_path)})
    assert reply["error"]["code"] == "wrong_image_kind", reply
    assert attribute in reply["error"]["message"] and "probability" in reply["error"]["message"]
    assert panoramic_gate.ask({"op": "health"})["result"] == "ok"


# ---------------------------------------------------------------- the decision, without a daemon

def test_the_reader_returns_the_dicom_kind_attributes_from_the_same_decode(inputs):
    image = decode_image(inputs["ct"])
    assert image.attributes == {"Modality": "CT"} and image.pixels.shape == (150, 300)
    assert decode_image(inputs["pano"]).attributes == {}


@pytest.mark.parametrize("attributes, task_kind, ruled_out", [
    ({"Modality": "MR"}, "hand", ("Modality", "MR")),
    ({"Modality": "CT"}, "photo", ("Modality", "CT")),
    ({"ViewPosition": "LL", "Modality": "DX"}, "chest", ("ViewPosition", "LL")),
    ({"ViewPosition": "LL"}, "hand", None),
    ({"ViewPosition": "PA", "BodyPartExamined": "CHEST"}, "chest", None),
    ({"BodyPartExamined": "HAND"}, "chest", ("BodyPartExamined", "HAND")),
    ({"Modality": "PX"}, "chest", ("Modality", "PX")),
    ({"Modality": "OT", "BodyPartExamined": "SOMETHING"}, "photo", None),
])
def test_dicom_attributes_rule_kinds_out(attributes, task_kind, ruled_out):
    assert kind.dicom_contradiction(attributes, task_kind) == ruled_out


def test_a_header_naming_the_tasks_body_part_raises_the_bar_for_the_picture(tmp_path):
    gate = KindGate.load(write_fixed_kind_card(tmp_path / "kind", "other", refuse_at=0.5))
    gate.refuse_at_supported = {k: 1.0 for k in gate.refuse_at}  # p(not hand) ~ 1 - 6e-6: refused at 0.5, not at 1
    image = np.zeros((64, 64), np.uint8)
    assert gate.verdict("handbone", DecodedImage(image)).refused
    assert not gate.verdict("handbone", DecodedImage(image, {"BodyPartExamined": "HAND", "Modality": "CR"})).refused


def _records(rows):
    return [{"target": kind.KINDS.index(truth), "fold": fold, **{f"p_{k}": p for k, p in zip(kind.KINDS, probs)}}
            for truth, fold, probs in rows]


def test_gate_rates_count_passes_per_task_kind_and_refusals_per_true_kind():
    records = _records([("chest", 0, [0, 1, 0, 0, 0]), ("chest", 1, [0.3, 0.7, 0, 0, 0]),
                        ("other", 0, [0.5, 0, 0, 0, 0.5])])
    rates = gate_rates(records, 0.5)
    assert rates["pass"]["chest"] == 1.0 and rates["pass_pooled"] == 1.0
    # the 'other' image sent to osteo: P(not panoramic) = 0.5 reaches 0.5 (refused) but not 0.8 (let through)
    assert rates["refuse_by_task"]["panoramic"]["other"] == 1.0 and rates["refuse"]["other"] == 1.0
    assert gate_rates(records, 0.8)["refuse_by_task"]["panoramic"]["other"] == 0.0
    # thresholds per task kind: a lenient panoramic gate alone lets it through
    assert gate_rates(records, {"panoramic": 0.8, "chest": 0.5, "hand": 0.5, "photo": 0.5})["refuse"]["other"] == 0.75


def test_each_fold_is_judged_at_a_threshold_chosen_without_it():
    records = _records([("chest", 0, [0, 0.6, 0, 0, 0.4]), ("other", 0, [0, 0.3, 0, 0, 0.7]),
                        ("chest", 1, [0, 0.95, 0, 0, 0.05]), ("other", 1, [0, 0.05, 0, 0, 0.95])])
    figures = cross_fold_gate(records)
    assert figures["thresholds_per_fold"]["0"] == choose_thresholds([r for r in records if r["fold"] == 1])
    assert figures["thresholds_per_fold"]["1"] == choose_thresholds([r for r in records if r["fold"] == 0])


def test_the_preprocessing_keeps_aspect_and_colour_and_marks_the_inside():
    spec = kind.default_input_spec(112)
    photo = np.zeros((3024, 4032, 3), np.uint8)
    photo[..., 0] = 200  # a red phone photo, 4:3
    small = kind.shrunk(photo, spec)
    assert small.shape == (168, 224, 3) and np.allclose(small[..., 0], 200, atol=1)
    x = kind.preprocess(photo, spec)
    inside = x[3] > 0
    assert x.shape == (4, 112, 112) and inside[:, 0].sum() == 84  # 112 * 3/4 rows hold the image
    red = x[0][inside] * spec["std"][0] + spec["mean"][0]
    assert np.allclose(red.numpy(), 200 / 255, atol=0.01)
    pano = kind.preprocess(panoramic_phantom(150, 300), spec)
    assert (pano[3] > 0)[:, 56].sum() == 56  # a 2:1 panoramic fills half the frame's height
