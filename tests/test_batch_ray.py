"""The offline batch on a local Ray: the rows and files of one daemon, a dying actor, resume."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from conftest import PATIENT, REPO, panoramic_phantom, write_tiny_osteo_card, write_tiny_scar_card
from daemon import ray_batch
from daemon.batch import main as batch_main

pytestmark = pytest.mark.slow  # each Ray run starts actors that import torch and load the models

STAMP = re.compile(r"_\d{14}(_\d+)?(?=\.\w+$)")


class DyingWorker(ray_batch.BatchWorker):
    """An actor whose process exits on ``die-twice.png`` (every time: in its batch, then alone), and on
    ``die-once.png`` the first time."""
    once_marker = ""  # a file created by the first death on die-once.png, set by the test

    def answer(self, requests):
        for request in requests:
            name = Path(request.get("img_path", "")).name
            if name == "die-twice.png" or (name == "die-once.png" and _first_time(self.once_marker)):
                os._exit(1)
            yield from super().answer([request])


def _first_time(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DyingWorker travels to the actors
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    write_tiny_osteo_card(root / "osteo")
    write_tiny_scar_card(root / "scar", folds=1)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Osteo phantoms, scar photos and a corrupt file, and a requests file over them (two tasks)."""
    from train.phantoms.scar import scar_photo

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "pano" / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.png", "sub/b.png", "c.png")):
        Image.fromarray(panoramic_phantom(seed=i)).save(folder / "pano" / name)
    (folder / "pano" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(scar_photo(0.5, (90, 120), np.random.default_rng(0))).save(folder / "neck.jpg", quality=90)
    requests = [
        {"task": "osteo", "img_path": str(folder / "pano" / "a.png")},
        {"task": "scar", "id": "photo+table", "img_path": str(folder / "neck.jpg"), "clinical": PATIENT},
        {"task": "osteo", "img_path": str(folder / "pano" / "sub" / "b.png"), "explain": "saliency"},
        {"task": "osteo", "img_path": str(folder / "pano" / "broken.png")},
        {"task": "scar", "clinical": PATIENT},
        {"task": "scar", "img_path": str(folder / "neck.jpg")},
        {"task": "osteo", "img_path": "pano/missing.png"},  # relative: as the driver's working folder says
        {"task": "osteo", "img_path": str(folder / "pano" / "c.png"), "destination": "typo"},
        {"task": "brixia", "img_path": str(folder / "pano" / "c.png")},
    ]
    (folder / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return folder


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def comparable(rows: list[dict[str, str]], out: Path) -> list[dict[str, str]]:
    """Rows with their output paths made relative to ``out`` and the time stamps dropped."""
    result = []
    for row in rows:
        paths = {key: STAMP.sub("", str(Path(path).relative_to(out.resolve())))
                 for key, path in json.loads(row["paths"]).items()}
        result.append({**row, "paths": paths})
    return result


def output_images(rows: list[dict[str, str]]) -> dict[tuple[int, str], np.ndarray]:
    """Every output file of every row, decoded, keyed by (row, reply field)."""
    return {(number, key): np.asarray(Image.open(path))
            for number, row in enumerate(rows) for key, path in json.loads(row["paths"]).items()}


def run_batch(*argv: str, cwd: Path) -> int:
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return batch_main(["--no-progress", *argv])
    finally:
        os.chdir(previous)


def test_the_ray_batch_gives_the_rows_and_files_of_the_single_process_batch(local_ray, weights, inputs, tmp_path,
                                                                            monkeypatch):
    single, on_ray = tmp_path / "single", tmp_path / "ray"
    args = [str(weights), str(inputs / "requests.jsonl"), "--task", "osteo"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray gives a 1-CPU actor: the same float sums
    assert run_batch(*args, "--out", str(single), "--", "--device", "cpu", cwd=inputs) == 1
    assert run_batch(*args, "--out", str(on_ray), "--ray", "--actors", "2", "--batch-size", "2", cwd=inputs) == 1

    rows = read_summary(single)
    assert comparable(read_summary(on_ray), on_ray) == comparable(rows, single)
    assert [row["error_code"] for row in rows] == ["", "", "", "unreadable_image", "", "", "file_not_found",
                                                   "invalid_request", "model_unavailable"]
    assert "'pano/missing.png' does not exist" in rows[6]["error"]
    single_files, ray_files = output_images(rows), output_images(read_summary(on_ray))
    assert set(ray_files) == set(single_files) and len(single_files) == 8  # 2 osteo + 2 scar requests, 2 files each
    for key, image in single_files.items():
        assert ray_files[key].shape == image.shape
        assert np.abs(ray_files[key].astype(int) - image).max() <= 1, key
    assert sorted(STAMP.sub("", p.name) for p in on_ray.rglob("*.png")) == \
        sorted(STAMP.sub("", p.name) for p in single.rglob("*.png"))


@pytest.fixture(scope="module")
def dying_run(local_ray, weights, inputs, tmp_path_factory):
    """A folder run whose actors die on two of its images: once on one, every time on the other."""
    folder = tmp_path_factory.mktemp("pano")
    shutil.copytree(inputs / "pano", folder, dirs_exist_ok=True)
    for name in ("die-once.png", "sub/die-twice.png"):
        shutil.copy(inputs / "pano" / "a.png", folder / name)
    out = tmp_path_factory.mktemp("dying") / "out"
    # Batches of 3: [a, broken, c], [die-once, sub/b, sub/die-twice]; one actor, so that each death
    # is followed by exactly one new actor (every start imports torch: seconds on 2 cores).
    argv = [str(weights), str(folder), "--task", "osteo", "--out", str(out), "--ray", "--actors", "1",
            "--batch-size", "3"]
    DyingWorker.once_marker = str(out.parent / "died-once")
    patch = pytest.MonkeyPatch()
    patch.setattr(ray_batch, "BatchWorker", DyingWorker)
    try:
        code = run_batch(*argv, cwd=folder)
    finally:
        patch.undo()
    return argv, folder, out, code


def test_an_actor_that_dies_is_replaced_and_its_requests_retried_once_then_reported(dying_run):
    argv, folder, out, code = dying_run
    rows = read_summary(out)
    assert code == 1
    assert [Path(row["img_path"]).name for row in rows] == \
        ["a.png", "broken.png", "c.png", "die-once.png", "b.png", "die-twice.png"]  # every request, in order
    by_name = {Path(row["img_path"]).name: row for row in rows}
    assert Path(out.parent / "died-once").exists()
    assert by_name["die-once.png"]["result"] == "ok"  # its retry, alone on a new actor, succeeded
    assert by_name["b.png"]["result"] == "ok"  # unanswered when its actor died: retried alone
    assert by_name["broken.png"]["error_code"] == "unreadable_image"
    lost = by_name["die-twice.png"]
    assert lost["result"] == "fail" and lost["error_code"] == "internal"
    assert "actor died" in lost["error"] and "retried alone once" in lost["error"]
    assert all(by_name[name]["result"] == "ok" for name in ("a.png", "b.png", "c.png"))


def test_a_rerun_resumes_and_only_redoes_what_failed(dying_run):
    argv, folder, out, _ = dying_run
    before = {p.name for p in out.rglob("*.png")}
    first = read_summary(out)
    (folder / "broken.png").write_bytes((folder / "c.png").read_bytes())  # repaired since
    assert run_batch(*argv, cwd=folder) == 0  # the plain actors this time
    rows = read_summary(out)
    assert [row["img_path"] for row in rows] == [row["img_path"] for row in first]
    assert all(row["result"] == "ok" for row in rows)
    kept = ("a.png", "c.png", "die-once.png", "b.png")
    assert all(next(r for r in rows if r["img_path"].endswith("/" + name)) ==
               next(r for r in first if r["img_path"].endswith("/" + name)) for name in kept)
    new = {p.name for p in out.rglob("*.png")} - before
    assert sorted(STAMP.sub("", name) for name in new) == ["broken_overlay.png", "broken_saliency.png",
                                                           "die-twice_overlay.png", "die-twice_saliency.png"]


def test_importing_the_daemon_never_imports_ray():
    code = ("import importlib, pkgutil, sys, daemon, run_model\n"
            "for module in pkgutil.walk_packages(daemon.__path__, 'daemon.'):\n"
            "    if module.name != 'daemon.ray_batch':\n"
            "        importlib.import_module(module.name)\n"
            "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
