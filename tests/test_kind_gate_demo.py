"""The committed kind card guards the committed demo models: each example goes through its own task and is
refused by the others; a DICOM header can refuse a film the picture alone would let through."""
from __future__ import annotations

import pydicom
import pytest

from conftest import REPO, Daemon

EXAMPLES = {"osteo": "osteo_c1.png", "brixia": "brixia_chest_333323.png", "handbone": "handbone_hand.png",
            "scar": "scar_neck.jpg"}


@pytest.fixture(scope="module")
def daemon():
    process = Daemon(str(REPO / "weights"), "--device", "cpu")
    yield process
    process.close()


def test_the_committed_weights_serve_with_the_gate_on(daemon):
    gate = daemon.ready["kind_gate"]
    assert gate["on"] is True and set(gate["refuse_at"]) == {"panoramic", "chest", "hand", "photo"}


@pytest.mark.parametrize("task, image_task", [(t, i) for t in sorted(EXAMPLES) for i in sorted(EXAMPLES) if t != i])
def test_an_example_sent_to_another_task_is_refused(daemon, tmp_path, task, image_task):
    reply = daemon.ask({"task": task, "img_path": str(REPO / "examples" / EXAMPLES[image_task]),
                        "destination_path": str(tmp_path)})
    assert reply["result"] == "fail" and reply["error"]["code"] == "wrong_image_kind", reply
    assert f"send it to {image_task}" in reply["error"]["message"]


def test_a_lateral_or_ct_header_refuses_a_chest_film_the_picture_would_let_through(daemon, tmp_path):
    frontal = pydicom.dcmread(REPO / "examples" / "brixia_chest_000001.dcm")
    paths = {}
    for name, attribute, value in (("lateral", "ViewPosition", "LL"), ("ct", "Modality", "CT"),
                                   ("pa", "ViewPosition", "PA")):
        ds = pydicom.dcmread(REPO / "examples" / "brixia_chest_000001.dcm")
        setattr(ds, attribute, value)
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name])
    assert "ViewPosition" not in frontal or frontal.ViewPosition not in ("LL", "RL")
    for name, code in (("lateral", "wrong_image_kind"), ("ct", "wrong_image_kind"), ("pa", None)):
        reply = daemon.ask({"task": "brixia", "img_path": str(paths[name]), "destination_path": str(tmp_path)})
        if code is None:
            assert reply["result"] == "ok", reply
        else:
            assert reply["error"]["code"] == code and ("ViewPosition" in reply["error"]["message"]
                                                       or "Modality" in reply["error"]["message"]), reply
    assert daemon.ask({"op": "health"})["result"] == "ok"
