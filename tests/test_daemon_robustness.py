"""The daemon under fire: hostile lines, a killed process, a vanished client, path escapes."""
from __future__ import annotations

import json
import signal
import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import Daemon, panoramic_phantom, write_tiny_osteo_card
from daemon.errors import ERROR_CODES

FIELDS = ["task", "id", "img_path", "destination_path", "explain", "op", "clinical", "threshold"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
hostile_objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=6)
hostile_lines = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    hostile_objects.map(lambda o: json.dumps(o).encode()),
    hostile_objects.map(lambda o: json.dumps(o).encode()[: max(1, len(json.dumps(o)) // 2)]),
    st.text(alphabet=string.printable.replace("\n", ""), max_size=200).map(str.encode),
)


@pytest.fixture(scope="module")
def daemon(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("roots")
    (root / "in").mkdir()
    (root / "out").mkdir()
    process = Daemon(str(tiny_weights), "--device", "cpu", "--input-root", str(root / "in"),
                     "--output-root", str(root / "out"))
    process.root = root
    yield process
    process.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(line=hostile_lines)
def test_every_hostile_line_gets_one_wellformed_reply(daemon, line):
    if not line.strip():
        return  # blank lines expect no reply
    daemon.send_raw(line + b"\n")
    reply = daemon.read_reply(timeout=60)
    assert reply["result"] in ("ok", "fail")
    if reply["result"] == "fail":
        assert reply["error"]["code"] in ERROR_CODES
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
        assert reply["error"]["code"] != "internal", reply


def test_still_healthy_after_the_fuzz_and_a_huge_line(daemon):
    daemon.send_raw(b'{"img_path": "' + b"x" * (10 << 20) + b'"}\n')
    assert daemon.read_reply()["error"]["code"] == "invalid_request"
    daemon.send_raw(b"[" * 5000 + b"\n")
    assert daemon.read_reply()["error"]["code"] in ("bad_json", "invalid_request")
    assert daemon.ask({"op": "health"})["result"] == "ok"


def test_input_root_refuses_escapes(daemon, tmp_path):
    inside = daemon.root / "in" / "pano.png"
    Image.fromarray(panoramic_phantom()).save(inside)
    outside = tmp_path / "outside.png"
    Image.fromarray(panoramic_phantom()).save(outside)
    (daemon.root / "in" / "link.png").symlink_to(outside)
    out = str(daemon.root / "out" / "r")
    for path in (outside, daemon.root / "in" / ".." / ".." / outside.name, daemon.root / "in" / "link.png"):
        reply = daemon.ask({"img_path": str(path), "destination_path": out})
        assert reply["error"]["code"] == "path_not_allowed", (path, reply)
    assert daemon.ask({"img_path": str(inside), "destination_path": out})["result"] == "ok"


def test_kill_9_leaves_no_partial_file_under_a_final_name(tiny_weights, tmp_path):
    image = tmp_path / "pano.png"
    Image.fromarray(panoramic_phantom(200, 400)).save(image)
    out = tmp_path / "out"
    process = Daemon(str(tiny_weights), "--device", "cpu")
    process.send_raw(b"".join(json.dumps({"id": i, "img_path": str(image), "destination_path": str(out)}).encode()
                              + b"\n" for i in range(30)))
    first = process.read_reply()
    time.sleep(0.3)
    process.proc.send_signal(signal.SIGKILL)
    process.proc.wait(30)
    replied = {first["saliency_img_path"], first["overlay_img_path"]}
    for line in process.rest_of_stdout().splitlines():
        reply = json.loads(line)
        replied |= {reply["saliency_img_path"], reply["overlay_img_path"]}
    finals = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert {str(p) for p in finals} >= replied
    for path in finals:
        with Image.open(path) as png:
            png.load()  # a truncated PNG raises here


def test_client_that_goes_away_ends_the_daemon_quietly(tiny_weights, tmp_path):
    image = tmp_path / "pano.png"
    Image.fromarray(panoramic_phantom()).save(image)
    process = Daemon(str(tiny_weights), "--device", "cpu")
    process.proc.stdout.close()
    for i in range(3):
        try:
            process.send_raw(json.dumps({"id": i, "img_path": str(image), "destination_path": str(tmp_path)}).encode()
                             + b"\n")
        except BrokenPipeError:
            break
    code = process.proc.wait(60)
    stderr = process.stderr_text()
    assert code == 0
    assert "Traceback" not in stderr
    assert stderr.count("stdout closed") == 1


def test_missing_weight_file_makes_the_task_unavailable(tmp_path):
    weights = tmp_path / "weights"
    (write_tiny_osteo_card(weights / "osteo") / "fold0.safetensors").unlink()
    process = Daemon(str(weights), "--device", "cpu")
    status = process.ready["tasks"]["osteo"]
    assert status["available"] is False and "missing" in status["reason"]
    reply = process.ask({"img_path": "x.png", "destination_path": str(tmp_path)})
    assert reply["error"]["code"] == "model_unavailable"
    assert process.close() == 0


def test_device_spec_parsing():
    from daemon.cli import parse_device_spec

    assert parse_device_spec("auto") == ("auto", {})
    assert parse_device_spec("cuda:0,handbone=cuda:1") == ("cuda:0", {"handbone": "cuda:1"})
    assert parse_device_spec("osteo=cpu") == ("auto", {"osteo": "cpu"})
    with pytest.raises(ValueError, match="unknown task"):
        parse_device_spec("lungs=cuda:0")


def test_cuda_request_without_cuda_falls_back_to_cpu(tiny_weights):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    process = Daemon(str(tiny_weights), "--device", "osteo=cuda:1")
    assert process.ready["tasks"]["osteo"]["device"] == "cpu"
    assert process.close() == 0
    assert "running on CPU" in process.stderr_text()
