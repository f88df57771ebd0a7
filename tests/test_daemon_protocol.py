"""The daemon as a hospital system sees it: requests on stdin, one JSON reply per line on stdout."""
from __future__ import annotations

import json
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_OSTEO_SIZE, Daemon, panoramic_phantom, write_tiny_osteo_card

SEED_KEYS = ["result", "diagnosis", "saliency_img_path", "overlay_img_path"]
DIAGNOSES = {"Healthy Patient", "Patient with Osteoporosis"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {}
    paths["pano"] = folder / "pano.png"
    Image.fromarray(panoramic_phantom()).save(paths["pano"])
    paths["tiny"] = folder / "tiny.png"
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(paths["tiny"])
    paths["truncated"] = folder / "truncated.png"
    paths["truncated"].write_bytes(paths["pano"].read_bytes()[:200])
    paths["garbage"] = folder / "garbage.jpg"
    paths["garbage"].write_bytes(os.urandom(4000))
    paths["huge"] = folder / "huge.png"
    paths["huge"].write_bytes(png_header_only(30000, 30000))
    from dicom_factory import write_dicom
    pano = panoramic_phantom()
    paths["multiframe"] = write_dicom(folder / "cine.dcm", np.stack([pano, pano[::-1]]))   # no extension needed
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb probe)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def daemon(tiny_weights):
    process = Daemon(str(tiny_weights), "--device", "cpu")
    yield process
    process.close()


def request(inputs, out: Path, **extra):
    return {"img_path": str(inputs["pano"]), "destination_path": str(out), **extra}


def test_ready_line_says_loaded_pretrained_weights(daemon):
    assert daemon.ready["event"] == "ready"
    assert daemon.ready["message"] == "Loaded pretrained weights"
    assert daemon.ready["tasks"]["osteo"]["available"] is True
    # a weights folder without a kind card serves without the image-kind gate, and says so
    assert daemon.ready["kind_gate"]["on"] is False and "no kind card" in daemon.ready["kind_gate"]["reason"]


def test_seed_style_request_gets_seed_keys_in_seed_order_and_files(daemon, inputs, tmp_path):
    out = tmp_path / "new" / "nested"  # the seed crashed when the folder did not exist
    reply = daemon.ask(request(inputs, out))
    assert list(reply)[:4] == SEED_KEYS
    assert reply["result"] == "ok"
    assert reply["diagnosis"] in DIAGNOSES
    assert reply["label"] in ("C1", "C3")
    assert 0.0 <= reply["probability"] <= 1.0
    assert (reply["label"] == "C3") == (reply["diagnosis"] == "Patient with Osteoporosis")
    assert reply["model"] == {"name": "osteo-tiny-test", "version": "test", "demo": True}
    assert reply["elapsed_ms"] > 0
    for key, kind in (("saliency_img_path", "saliency"), ("overlay_img_path", "overlay")):
        path = Path(reply[key])
        assert path.is_absolute() and path.parent == out.resolve()
        assert path.name.startswith(f"pano_{kind}_") and path.suffix == ".png"
        assert len(path.stem.split("_")[-1]) == 14  # %Y%m%d%H%M%S
        with Image.open(path) as image:
            assert image.size == (TINY_OSTEO_SIZE[1], TINY_OSTEO_SIZE[0])
    with Image.open(reply["saliency_img_path"]) as heat:
        assert heat.mode == "RGBA"  # the seed saved plt.cm.hot as RGBA
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_id_is_echoed_and_replies_keep_request_order(daemon, inputs, tmp_path):
    ids = ["a-1", 2, {"ris": "x"}, None]
    lines = b"".join(json.dumps(request(inputs, tmp_path, task="osteo", id=i)).encode() + b"\n" for i in ids)
    daemon.send_raw(lines)
    replies = [daemon.read_reply() for _ in ids]
    assert [r["id"] for r in replies] == ids
    assert all(r["result"] == "ok" and r["task"] == "osteo" for r in replies)
    paths = [r["saliency_img_path"] for r in replies]
    assert len(set(paths)) == len(paths), "a result was overwritten"


def test_never_overwrites_an_existing_file(daemon, inputs, tmp_path):
    first = daemon.ask(request(inputs, tmp_path))
    taken = Path(first["overlay_img_path"])
    stamp = taken.stem.split("_")[2]
    # Make every name for the next few seconds taken, so the next reply must add a suffix.
    for second in range(int(stamp), int(stamp) + 30):
        for kind in ("saliency", "overlay"):
            target = tmp_path / f"pano_{kind}_{second}.png"
            if not target.exists():
                target.write_bytes(b"existing result")
    second_reply = daemon.ask(request(inputs, tmp_path))
    for key in ("saliency_img_path", "overlay_img_path"):
        assert Path(second_reply[key]).stem.endswith("_1")
    assert taken.read_bytes()[:4] == b"\x89PNG"
    assert len(list(tmp_path.glob("*.png"))) >= 4


def test_explain_saliency_per_request(daemon, inputs, tmp_path):
    reply = daemon.ask(request(inputs, tmp_path, explain="saliency"))
    assert reply["result"] == "ok" and reply["explain"] == "saliency"


@pytest.mark.parametrize("line, code", [
    (b"{not json", "bad_json"),
    (b'{"img_path": "x.png", "destination_path": ', "bad_json"),
    (b"\xff\xfe\x00garbage\x80", "bad_json"),
    (b"[1, 2, 3]", "invalid_request"),
    (b'"just a string"', "invalid_request"),
    (b'{"img_path": 5, "destination_path": "/tmp"}', "invalid_request"),
    (b'{"img_path": "a.png", "destination_path": ["x"]}', "invalid_request"),
    (b'{"img_path": "a.png"}', "invalid_request"),
    (b'{"img_path": "a.png", "destination": "/tmp"}', "invalid_request"),
    (b'{"img_path": "a.png", "destination_path": "/tmp", "explain": "lime"}', "invalid_request"),
    (b'{"task": 3, "img_path": "a.png", "destination_path": "/tmp"}', "invalid_request"),
    (b'{"task": "dermatology", "img_path": "a.png", "destination_path": "/tmp"}', "unknown_task"),
    (b'{"op": "reboot"}', "invalid_request"),
    (b"[" * 100000 + b"]" * 100000, "bad_json"),
])
def test_bad_lines_get_their_code_and_the_daemon_keeps_serving(daemon, inputs, tmp_path, line, code):
    reply = daemon.ask(line)
    assert reply["result"] == "fail"
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    health = daemon.ask({"op": "health"})
    assert health["result"] == "ok"


def test_failure_keeps_the_seed_fields_and_echoes_id(daemon, tmp_path):
    reply = daemon.ask({"id": 9, "img_path": str(tmp_path / "missing.png"), "destination_path": str(tmp_path)})
    assert list(reply)[:4] == SEED_KEYS
    assert reply == {**reply, "result": "fail", "diagnosis": "", "saliency_img_path": "", "overlay_img_path": "",
                     "id": 9, "task": "osteo"}
    assert reply["error"]["code"] == "file_not_found"


@pytest.mark.parametrize("name, code", [
    ("truncated", "unreadable_image"),
    ("garbage", "unreadable_image"),
    ("tiny", "unreadable_image"),
    ("huge", "image_too_large"),
    ("multiframe", "unreadable_image"),
])
def test_bad_images_get_their_code(daemon, inputs, tmp_path, name, code):
    reply = daemon.ask({"img_path": str(inputs[name]), "destination_path": str(tmp_path)})
    assert reply["result"] == "fail" and reply["error"]["code"] == code, reply
    if name == "multiframe":   # refused, not silently read at frame 1
        assert "holds 2 frames" in reply["error"]["message"]
    assert daemon.ask(request(inputs, tmp_path))["result"] == "ok"


def test_folder_and_device_paths_are_refused(daemon, tmp_path):
    for path, code in ((tmp_path, "file_not_found"), ("/dev/zero", "unreadable_image")):
        reply = daemon.ask({"img_path": str(path), "destination_path": str(tmp_path)})
        assert reply["error"]["code"] == code, reply


def test_overlong_names_are_refused_or_shortened(daemon, inputs, tmp_path):
    reply = daemon.ask(request(inputs, tmp_path / ("x" * 300)))
    assert reply["error"]["code"] == "invalid_request", reply  # found by bench/fuzz_daemon.py
    long_input = tmp_path / ("p" * 250 + ".png")
    long_input.write_bytes(inputs["pano"].read_bytes())
    reply = daemon.ask({"img_path": str(long_input), "destination_path": str(tmp_path / "out")})
    assert reply["result"] == "ok", reply
    assert Path(reply["overlay_img_path"]).name.startswith("p" * 120 + "_overlay_")


def test_destination_that_is_a_file_is_invalid(daemon, inputs, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    reply = daemon.ask(request(inputs, blocker))
    assert reply["error"]["code"] == "invalid_request"


def test_a_request_that_fails_leaves_no_destination_folder_behind(daemon, inputs, tmp_path):
    failing = [{"img_path": str(tmp_path / "missing.png")}, {"img_path": str(inputs["truncated"])},
               {"img_path": str(inputs["huge"])}, {"img_path": str(inputs["pano"]), "explain": "lime"}]
    for k, fields in enumerate(failing):
        destination = tmp_path / f"never{k}" / "deeper"
        reply = daemon.ask({**fields, "destination_path": str(destination)})
        assert reply["result"] == "fail", reply
        assert not (tmp_path / f"never{k}").exists(), (fields, reply)
    reply = daemon.ask(request(inputs, tmp_path / "made" / "deeper"))
    assert reply["result"] == "ok" and Path(reply["overlay_img_path"]).parent == tmp_path / "made" / "deeper"


def test_a_destination_under_a_file_or_a_read_only_folder_is_refused_before_any_work(daemon, inputs, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    reply = daemon.ask(request(inputs, blocker / "sub"))
    assert reply["error"]["code"] == "invalid_request" and "Not a directory" in reply["error"]["message"], reply
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        reply = daemon.ask(request(inputs, locked / "sub"))
        assert reply["error"]["code"] == "path_not_allowed", reply
    assert daemon.ask(request(inputs, tmp_path / "fine"))["result"] == "ok"


def test_models_lists_the_card(daemon):
    reply = daemon.ask({"op": "models", "id": "m"})
    assert reply["result"] == "ok" and reply["id"] == "m"
    (card,) = reply["models"]
    assert card["task"] == "osteo" and card["labels"] == ["C1", "C3"]
    assert card["input"]["size"] == list(TINY_OSTEO_SIZE)
    assert len(card["folds"][0]["sha256"]) == 64


def test_known_task_without_a_model_is_unavailable(daemon, inputs, tmp_path):
    reply = daemon.ask(request(inputs, tmp_path, task="handbone"))
    assert reply["error"]["code"] == "model_unavailable"


def test_eof_answers_everything_then_exits_zero(tiny_weights, inputs, tmp_path):
    process = Daemon(str(tiny_weights), "--device", "cpu")
    body = b"".join(json.dumps(request(inputs, tmp_path, id=i)).encode() + b"\n" for i in range(3))
    process.send_raw(body + b"{broken\n\n")  # the empty line expects no reply
    assert process.close() == 0
    lines = process.rest_of_stdout().splitlines()
    replies = [json.loads(line) for line in lines]
    assert [r.get("id") for r in replies[:3]] == [0, 1, 2]
    assert replies[3]["error"]["code"] == "bad_json"
    assert len(replies) == 4


def test_sigterm_answers_accepted_requests_and_exits_zero(tiny_weights, inputs, tmp_path):
    process = Daemon(str(tiny_weights), "--device", "cpu")
    process.send_raw(b"".join(json.dumps(request(inputs, tmp_path, id=i)).encode() + b"\n" for i in range(2)))
    time.sleep(0.5)
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(60) == 0
    replies = [json.loads(line) for line in process.rest_of_stdout().splitlines()]
    assert [r["id"] for r in replies] == [0, 1] and all(r["result"] == "ok" for r in replies)


def test_shutdown_op(tiny_weights):
    process = Daemon(str(tiny_weights), "--device", "cpu")
    assert process.ask({"op": "shutdown"}) == {"result": "ok", "op": "shutdown"}
    assert process.proc.wait(30) == 0


def test_output_root_refuses_escapes(tiny_weights, inputs, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    process = Daemon(str(tiny_weights), "--device", "cpu", "--output-root", str(root))
    for destination in (outside, root / ".." / "outside", root / "link", root / "link" / "deeper"):
        reply = process.ask(request(inputs, destination))
        assert reply["error"]["code"] == "path_not_allowed", (destination, reply)
    assert process.ask(request(inputs, root / "ok"))["result"] == "ok"
    assert not any(outside.iterdir())
    process.close()


def test_tampered_weights_make_the_task_unavailable(tmp_path, inputs):
    weights = tmp_path / "weights"
    card_folder = write_tiny_osteo_card(weights / "osteo")
    fold = card_folder / "fold0.safetensors"
    data = bytearray(fold.read_bytes())
    data[-10] ^= 0xFF
    fold.write_bytes(bytes(data))
    process = Daemon(str(weights), "--device", "cpu")
    assert process.ready["tasks"]["osteo"]["available"] is False
    assert "sha256" in process.ready["tasks"]["osteo"]["reason"]
    reply = process.ask(request(inputs, tmp_path))
    assert reply["error"]["code"] == "model_unavailable"
    assert process.ask({"op": "health"})["result"] == "ok"
    assert process.close() == 0


def test_monochrome1_dicom_gives_the_same_diagnosis_as_its_png(daemon, tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from dicom_factory import write_dicom

    gray = panoramic_phantom(160, 320, seed=5)
    png = tmp_path / "pano.png"
    Image.fromarray(gray).save(png)
    # 12-bit data as a CR/DX detector stores it; MONOCHROME1 stores bone dark, the reader inverts it.
    stored = (gray.astype(np.uint16) * 16)
    write_dicom(tmp_path / "mono2.dcm", stored, photometric="MONOCHROME2", bits_stored=12,
                window=(2040, 4081))
    write_dicom(tmp_path / "mono1.dcm", (4080 - stored).astype(np.uint16), photometric="MONOCHROME1",
                bits_stored=12, window=(2040, 4081))
    write_dicom(tmp_path / "rle.dcm", stored, photometric="MONOCHROME2", bits_stored=12, window=(2040, 4081),
                transfer_syntax=RLELossless)
    write_dicom(tmp_path / "j2k.dcm", stored, photometric="MONOCHROME2", bits_stored=12, window=(2040, 4081),
                transfer_syntax=JPEG2000Lossless)
    replies = {name: daemon.ask({"img_path": str(tmp_path / name), "destination_path": str(tmp_path / "out")})
               for name in ("pano.png", "mono2.dcm", "mono1.dcm", "rle.dcm", "j2k.dcm")}
    assert all(r["result"] == "ok" for r in replies.values()), replies
    reference = replies["pano.png"]
    for name, reply in replies.items():
        assert reply["label"] == reference["label"], name
        assert reply["probability"] == pytest.approx(reference["probability"], abs=0.02), name
