"""The scar task through the daemon's pipes: photo, clinical or both in, severity and Grad-CAM files out."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PATIENT, Daemon, write_tiny_scar_card
from daemon.errors import MODEL_UNAVAILABLE, ServiceError
from daemon.handlers.base import Settings
from daemon.handlers.scar import ScarHandler

STAMPED = re.compile(r"^(?P<stem>.+)_(?P<kind>cam|overlay)_\d{14}(_\d+)?\.png$")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_scar_card(root / "scar")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    from train.phantoms.scar import scar_photo

    folder = tmp_path_factory.mktemp("photos")
    rgb = scar_photo(0.5, (90, 120), np.random.default_rng(0))
    paths = {"jpg": folder / "neck.jpg", "rgba": folder / "neck_alpha.png", "rotated": folder / "phone.jpg"}
    Image.fromarray(rgb).save(paths["jpg"], quality=90)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(paths["rgba"])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 120x90 photo is shown 90x120
    Image.fromarray(rgb).save(paths["rotated"], exif=exif.tobytes(), quality=90)
    paths["broken"] = folder / "broken.jpg"
    paths["broken"].write_bytes(paths["jpg"].read_bytes()[:300])
    return paths


@pytest.fixture(scope="module")
def daemon(weights):
    process = Daemon(str(weights), "--device", "cpu", "--default-task", "scar")
    yield process
    process.close()


def ask(daemon, **request):
    return daemon.ask({"task": "scar", **request})


def assert_probabilities(reply):
    assert reply["result"] == "ok", reply
    assert len(reply["probabilities"]) == 4 and sum(reply["probabilities"]) == pytest.approx(1.0, abs=1e-9)
    assert reply["severity"] == int(np.argmax(reply["probabilities"])) and 0 <= reply["severity"] <= 3
    assert reply["model"] == {"name": "scar-tiny-test", "version": "test", "demo": True}
    folds = reply["uncertainty"]["folds"]
    assert len(reply["uncertainty"]["fold_probabilities"]) == folds
    assert (reply["uncertainty"]["probability_std"] is None) == (folds == 1)
    assert set(reply["quality"]) == {"ok", "reasons"}


def test_the_ready_line_lists_scar(daemon):
    assert daemon.ready["tasks"]["scar"]["available"] is True


def test_a_photo_alone_is_answered_by_the_image_model_with_cam_and_overlay_at_the_photos_size(daemon, photos, tmp_path):
    reply = ask(daemon, img_path=str(photos["jpg"]), destination_path=str(tmp_path / "out"), id="p1")
    assert_probabilities(reply)
    assert reply["mode"] == "image" and reply["id"] == "p1"
    assert list(reply)[:3] == ["result", "task", "id"]
    for key, kind in (("cam_img_path", "cam"), ("overlay_img_path", "overlay")):
        path = Path(reply[key])
        match = STAMPED.match(path.name)
        assert path.is_absolute() and path.parent == (tmp_path / "out").resolve()
        assert match and match["stem"] == "neck" and match["kind"] == kind
        with Image.open(path) as image:
            assert image.size == (120, 90)


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(daemon, photos, tmp_path):
    reply = ask(daemon, img_path=str(photos["rotated"]), destination_path=str(tmp_path))
    assert reply["result"] == "ok"
    with Image.open(reply["overlay_img_path"]) as image:
        assert image.size == (90, 120)


def test_clinical_features_alone_are_answered_by_the_clinical_model_without_files(daemon, tmp_path):
    unused = tmp_path / "never-created"
    reply = ask(daemon, clinical=PATIENT, destination_path=str(unused))
    assert_probabilities(reply)
    assert reply["mode"] == "clinical" and "cam_img_path" not in reply and "overlay_img_path" not in reply
    assert not unused.exists()


def test_photo_and_clinical_together_are_answered_by_the_combined_model(daemon, photos, tmp_path):
    reply = ask(daemon, img_path=str(photos["rgba"]), clinical=PATIENT, destination_path=str(tmp_path))
    assert_probabilities(reply)
    assert reply["mode"] == "combined"
    with Image.open(reply["cam_img_path"]) as cam, Image.open(reply["overlay_img_path"]) as overlay:
        assert cam.size == overlay.size == (120, 90) and overlay.mode == "RGB"


def test_waiting_requests_of_mixed_modes_are_batched_and_answered_in_order_as_alone(daemon, photos, tmp_path):
    requests = [{"task": "scar", "id": i, **request} for i, request in enumerate([
        {"clinical": PATIENT},
        {"img_path": str(photos["jpg"]), "destination_path": str(tmp_path)},
        {"img_path": str(photos["jpg"]), "clinical": {**PATIENT, "age": 30}, "destination_path": str(tmp_path)},
        {"clinical": {**PATIENT, "BMI": 31.5}}])]
    alone = [daemon.ask(request) for request in requests]
    daemon.send_raw(b"".join(json.dumps(request).encode() + b"\n" for request in requests))
    together = [daemon.read_reply() for _ in requests]
    assert [reply["id"] for reply in together] == [0, 1, 2, 3]
    assert [reply["mode"] for reply in together] == ["clinical", "image", "combined", "clinical"]
    for one, batched in zip(alone, together):
        assert batched["probabilities"] == pytest.approx(one["probabilities"], abs=1e-5)


@pytest.mark.parametrize("clinical, named", [
    ({k: v for k, v in PATIENT.items() if k != "BMI"}, ["missing", "'BMI'"]),
    ({**PATIENT, "height": 170}, ["unknown", "'height'"]),
    ({**PATIENT, "smoking": True}, ["not finite numbers", "'smoking'"]),
    ({**PATIENT, "age": "52"}, ["not finite numbers", "'age'"]),
    ([52, 0, 23.1], ["must be an object"]),
])
def test_a_missing_unknown_or_non_numeric_feature_is_an_invalid_request_naming_it(daemon, clinical, named):
    reply = ask(daemon, clinical=clinical)
    assert reply["result"] == "fail" and reply["error"]["code"] == "invalid_request"
    for text in named:
        assert text in reply["error"]["message"]


def test_nan_and_infinity_are_refused_even_though_json_parsers_accept_them(daemon):
    line = json.dumps({"task": "scar", "clinical": {**PATIENT, "age": 1.0, "BMI": 2.0}})
    reply = daemon.ask(line.replace('"age": 1.0', '"age": NaN').replace('"BMI": 2.0', '"BMI": -Infinity'))
    assert reply["error"]["code"] == "invalid_request"
    assert "'age'" in reply["error"]["message"] and "'BMI'" in reply["error"]["message"]


@pytest.mark.parametrize("request_fields, code", [
    ({}, "invalid_request"),
    ({"destination_path": "/tmp"}, "invalid_request"),
    ({"img_path": "PHOTO"}, "invalid_request"),                       # a photo needs a destination
    ({"img_path": "/no/such/neck.jpg", "destination_path": "OUT"}, "file_not_found"),
    ({"img_path": "BROKEN", "destination_path": "OUT"}, "unreadable_image"),
    ({"clinical": PATIENT, "explain": "saliency"}, "invalid_request"),  # not a scar option
])
def test_bad_requests_get_stable_error_codes_and_the_daemon_keeps_serving(daemon, photos, tmp_path, request_fields, code):
    swap = {"PHOTO": str(photos["jpg"]), "BROKEN": str(photos["broken"]), "OUT": str(tmp_path)}
    request = {key: swap.get(value, value) if isinstance(value, str) else value for key, value in request_fields.items()}
    reply = ask(daemon, **request)
    assert reply["result"] == "fail" and reply["error"]["code"] == code, reply
    assert ask(daemon, clinical=PATIENT)["result"] == "ok"


def test_a_card_without_the_asked_model_answers_model_unavailable(tmp_path):
    folder = write_tiny_scar_card(tmp_path / "scar", models=("image",), folds=1)
    handler = ScarHandler.load(folder, Settings(device=torch.device("cpu")))
    with pytest.raises(ServiceError) as error:
        handler.validate({"task": "scar", "clinical": PATIENT})
    assert error.value.code == MODEL_UNAVAILABLE and "serves: image" in error.value.message
