"""Embedding: the Python client and the offline batch runner, both through the real daemon."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import panoramic_phantom
from daemon.batch import main as batch_main
from daemon.batch import requests_from
from daemon.client import DaemonClient


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-in")
    (folder / "sub").mkdir()
    for i, name in enumerate(("a.png", "sub/b.png")):
        Image.fromarray(panoramic_phantom(seed=i)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def test_client_requests_maps_times_out_and_restarts(tiny_weights, images, tmp_path):
    request = {"img_path": str(images / "a.png"), "destination_path": str(tmp_path)}
    with DaemonClient(tiny_weights, "--device", "cpu") as client:
        assert client.ready["message"] == "Loaded pretrained weights"
        reply = client.request(request)
        assert reply["result"] == "ok" and reply["id"].startswith("client-")
        replies = list(client.map([{**request, "id": i} for i in range(3)], in_flight=2))
        assert [r["id"] for r in replies] == [0, 1, 2]
        with pytest.raises(TimeoutError):
            client.request(request, timeout=0.001)
        assert client.health()["result"] == "ok"  # the late reply of the timed-out request is skipped
        client._proc.kill()
        client._proc.wait()
        assert client.request(request)["result"] == "ok"  # started again


def test_batch_over_a_folder_writes_a_summary_and_a_rerun_only_redoes_what_failed(tiny_weights, images, tmp_path):
    out = tmp_path / "results"
    argv = [str(tiny_weights), str(images), "--task", "osteo", "--out", str(out), "--no-progress",
            "--", "--device", "cpu"]
    assert batch_main(argv) == 1  # one input is broken
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    by_name = {row["img_path"].rsplit("/", 1)[-1]: row for row in rows}
    assert by_name["broken.png"]["error_code"] == "unreadable_image"
    ok = by_name["b.png"]
    assert ok["result"] == "ok" and ok["prediction"] in ("Healthy Patient", "Patient with Osteoporosis")
    paths = json.loads(ok["paths"])
    assert paths["overlay_img_path"].startswith(str((out / "sub").resolve()))

    first, files = (out / "summary.csv").read_text(), sorted(out.rglob("*.png"))
    assert batch_main(argv) == 1  # only broken.png was sent again, and failed again
    assert (out / "summary.csv").read_text() == first
    assert sorted(out.rglob("*.png")) == files  # no ok request was run twice


def test_a_folder_of_a_pacs_export_gives_a_request_per_image_with_or_without_a_suffix(tmp_path):
    from dicom_factory import phantom, write_dicom

    source = tmp_path / "export"
    (source / "SER1").mkdir(parents=True)
    write_dicom(source / "SER1" / "IM0001", phantom(bits=12))
    Image.fromarray(panoramic_phantom(seed=0)).save(source / "a.png")
    (source / "DICOMDIR.txt").write_text("index\n")
    requests = requests_from(source, "osteo", tmp_path / "out")
    assert [r["img_path"] for r in requests] == [str((source / "SER1" / "IM0001").resolve()), str((source / "a.png").resolve())]
    assert requests[0]["destination_path"] == str((tmp_path / "out" / "SER1").resolve())
