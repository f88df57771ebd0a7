"""A hospital system asks the daemon for hand-bone masks: non-square PNG and DICOM in, every file at the input's size out."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Daemon
from daemon.handlers.base import Settings
from daemon.handlers.handbone import HandboneHandler
from dicom_factory import write_dicom
from tasks import cards, handbone
from tasks.weights import save_state_dict
from train.phantoms.handbone import handbone_phantom

HEIGHT, WIDTH = 90, 150  # not square, not the model size
TINY_ARCHITECTURE = handbone.default_architecture("unet", "tu-mobilenetv3_small_050", encoder_depth=3,
                                                  decoder_channels=[16, 16, 8])


def write_tiny_handbone_card(folder: Path, folds: int = 2, size: int = 64, output: dict | None = None) -> Path:
    """A randomly initialised tiny Unet handbone card (protocol tests, not accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(folds):
        torch.manual_seed(k)
        path = folder / f"fold{k}.safetensors"
        save_state_dict(handbone.build_network(TINY_ARCHITECTURE).state_dict(), path, half=True)
        entries.append({"file": path.name, "sha256": cards.sha256_file(path), "fold": k})
    cards.write_card(folder, {
        "task": "handbone", "name": "handbone-tiny-test", "version": "test", "demo": True,
        "architecture": TINY_ARCHITECTURE, "input": handbone.default_input_spec(size, "letterbox"),
        "labels": handbone.CLASSES, "folds": entries, "data": {"source": "random init for tests"},
        **({"output": output} if output is not None else {}),
    })
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hands")
    image, _ = handbone_phantom((HEIGHT, WIDTH), np.random.default_rng(0))
    paths = {"png": folder / "hand_left.png", "dicom": folder / "hand_left.dcm"}
    Image.fromarray(image).save(paths["png"])
    write_dicom(paths["dicom"], image)
    return paths


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights")
    write_tiny_handbone_card(weights / "handbone")
    process = Daemon(str(weights), "--device", "cpu")
    yield process
    process.close()


def ask(daemon: Daemon, img: Path, out: Path, **extra) -> dict:
    return daemon.ask({"task": "handbone", "id": "h1", "img_path": str(img), "destination_path": str(out), **extra})


def test_the_ready_line_lists_handbone(daemon):
    assert daemon.ready["tasks"]["handbone"]["available"] is True
    models = daemon.ask({"op": "models"})["models"]
    assert models[0]["labels"] == handbone.CLASSES and models[0]["folds_used"] == 2


def check_reply_files(reply: dict, out: Path, stem: str, image_name: str) -> np.ndarray:
    """Every reply field and file of a handbone reply; returns the masks."""
    assert reply["result"] == "ok", reply
    assert reply["task"] == "handbone" and reply["id"] == "h1"
    assert reply["model"] == {"name": "handbone-tiny-test", "version": "test", "demo": True}
    spread = reply["uncertainty"]  # two folds: each class's disagreement between their masks
    assert spread["folds"] == 2 and set(spread["class_disagreement"]) == set(handbone.CLASSES)
    assert 0 <= spread["mean_disagreement"] <= 1
    assert spread["mean_disagreement"] == pytest.approx(np.mean(list(spread["class_disagreement"].values())), abs=1e-5)
    assert reply["quality"]["ok"] is None and reply["quality"]["reasons"]  # a test card records no ranges
    kinds = {"masks_path": ("masks", ".npz"), "overlay_img_path": ("overlay", ".png"),
             "rle_csv_path": ("rle", ".csv"), "polygons_json_path": ("polygons", ".json")}
    for key, (kind, ext) in kinds.items():
        path = Path(reply[key])
        assert path.is_absolute() and path.parent == out.resolve() and path.suffix == ext
        assert re.fullmatch(rf"{stem}_{kind}_\d{{14}}(_\d+)?", path.stem), path.name
    with np.load(reply["masks_path"]) as npz:
        assert list(npz.files) == handbone.CLASSES
        masks = np.stack([npz[name] for name in handbone.CLASSES])
    assert masks.dtype == bool and masks.shape == (29, HEIGHT, WIDTH)
    with Image.open(reply["overlay_img_path"]) as overlay:
        assert overlay.size == (WIDTH, HEIGHT) and overlay.mode == "RGB"
    rows = list(csv.reader(io.StringIO(Path(reply["rle_csv_path"]).read_text())))
    assert rows[0] == ["image_name", "class", "rle"] and len(rows) == 30
    for (name, label, rle), mask in zip(rows[1:], masks):
        assert name == image_name
        assert np.array_equal(handbone.rle_decode(rle, HEIGHT, WIDTH), mask)
    assert [row[1] for row in rows[1:]] == handbone.CLASSES
    polygons = json.loads(Path(reply["polygons_json_path"]).read_text())
    assert (polygons["height"], polygons["width"]) == (HEIGHT, WIDTH)
    for annotation in polygons["annotations"]:
        assert annotation["label"] in handbone.CLASSES and annotation["type"] == "poly_seg"
        points = np.asarray(annotation["points"])
        assert points.shape[1] == 2 and points[:, 0].max() < WIDTH and points[:, 1].max() < HEIGHT
    assert reply["areas_px"] == {name: int(mask.sum()) for name, mask in zip(handbone.CLASSES, masks)}
    assert reply["image_size"] == [HEIGHT, WIDTH]
    return masks


def test_a_non_square_png_gets_every_output_at_its_own_size(daemon, inputs, tmp_path):
    reply = ask(daemon, inputs["png"], tmp_path / "out")
    check_reply_files(reply, tmp_path / "out", "hand_left", "hand_left.png")
    assert reply["threshold"] == 0.5 and reply["tta"] is False


def test_a_dicom_of_the_same_pixels_gives_the_same_masks(daemon, inputs, tmp_path):
    png = check_reply_files(ask(daemon, inputs["png"], tmp_path), tmp_path, "hand_left", "hand_left.png")
    dicom = check_reply_files(ask(daemon, inputs["dicom"], tmp_path), tmp_path, "hand_left", "hand_left.dcm")
    assert np.array_equal(png, dicom)  # and the second request never overwrote the first one's files
    assert len(list(tmp_path.glob("hand_left_masks_*.npz"))) == 2


def test_threshold_and_tta_change_the_answer_the_documented_way(daemon, inputs, tmp_path):
    low = ask(daemon, inputs["png"], tmp_path, threshold=0.0)
    high = ask(daemon, inputs["png"], tmp_path, threshold=1)
    assert all(area == HEIGHT * WIDTH for area in low["areas_px"].values())
    assert all(area == 0 for area in high["areas_px"].values())
    flipped = ask(daemon, inputs["png"], tmp_path, tta=True)
    assert flipped["result"] == "ok" and flipped["tta"] is True


@pytest.mark.parametrize("extra", [{"threshold": 1.5}, {"threshold": -0.1}, {"threshold": "0.5"},
                                   {"threshold": True}, {"tta": "yes"}, {"thresold": 0.5}])
def test_bad_options_are_refused_with_invalid_request(daemon, inputs, tmp_path, extra):
    reply = ask(daemon, inputs["png"], tmp_path, **extra)
    assert reply["result"] == "fail" and reply["error"]["code"] == "invalid_request"
    assert reply["task"] == "handbone" and reply["id"] == "h1"


def test_a_missing_image_is_file_not_found_and_the_daemon_keeps_serving(daemon, inputs, tmp_path):
    reply = ask(daemon, tmp_path / "nope.png", tmp_path)
    assert reply["error"]["code"] == "file_not_found"
    assert ask(daemon, inputs["png"], tmp_path)["result"] == "ok"


def test_a_request_without_threshold_uses_the_cards_threshold(tmp_path, inputs):
    """The card's output.threshold is what its trainer validated with: it, not 0.5, is the default."""
    folder = write_tiny_handbone_card(tmp_path / "handbone", folds=1,
                                      output={"activation": "sigmoid", "multilabel": True, "threshold": 0.3})
    handler = HandboneHandler.load(folder, Settings(device=torch.device("cpu")))

    def served(**extra):
        job = handler.validate({"task": "handbone", "img_path": str(inputs["png"]),
                                "destination_path": str(tmp_path / "out"), **extra})
        prepared = handler.preprocess(job)
        return handler.finish(job, prepared, handler.infer([prepared])[0])

    default, explicit, half = served(), served(threshold=0.3), served(threshold=0.5)
    assert default["threshold"] == 0.3 and default["areas_px"] == explicit["areas_px"]
    assert default["areas_px"] != half["areas_px"]   # the threshold chosen is the one used
    write_tiny_handbone_card(tmp_path / "broken", folds=1, output={"threshold": 3})
    with pytest.raises(cards.CardError, match="output.threshold"):
        HandboneHandler.load(tmp_path / "broken", Settings(device=torch.device("cpu")))
