"""Running out of memory on one request is a fail reply, not a dead daemon.

Out-of-memory cannot be provoked for real on a CPU test machine, so the real request loop
(``Server.serve``) runs in-process on the tiny osteo card, with the handler's ``infer``
monkeypatched to raise the errors torch and Python raise when an allocation fails.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import panoramic_phantom
from daemon.errors import UNREADABLE_IMAGE, ServiceError
from daemon.handlers.base import Job, Settings, TaskHandler, raised
from daemon.registry import Registry, load_registry
from daemon.server import Server, is_out_of_memory
from tasks.bundle import Bundle

CPU = torch.device("cpu")
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total capacity)"


class Stream:
    """The bytes the server writes: the ready line, then the replies."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.data.splitlines()]


def serve(registry: Registry, requests: list[dict[str, Any]], max_batch: int = 4) -> list[dict[str, Any]]:
    """Run the real loop over ``requests`` (all queued before it starts, so batches are deterministic)
    until EOF; return the replies after the ready line."""
    out = Stream()
    server = Server(Settings(device=CPU), "osteo", out, max_batch=max_batch, workers=1, registry=registry)
    for request in requests:
        server.lines.put(json.dumps(request).encode())
    read_end, write_end = os.pipe()
    os.close(write_end)  # the reader thread sees EOF at once and queues it behind the requests
    try:
        assert server.serve(read_end) == 0
    finally:
        os.close(read_end)
    ready, *replies = out.lines()
    assert ready["event"] == "ready"
    assert len(replies) == len(requests)
    return replies


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oom-inputs")
    for name in ("pano.png", "big.png"):
        Image.fromarray(panoramic_phantom()).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def registry(tiny_weights):
    return load_registry(tiny_weights, Settings(device=CPU))


@pytest.fixture
def faulty(registry, monkeypatch):
    """Make osteo's infer fail with ``error()`` when ``fails(batch_of_image_names)``; records batch sizes."""
    handler = registry.handlers["osteo"]
    real_preprocess, real_infer = handler.preprocess, handler.infer
    names: dict[int, str] = {}
    calls: list[int] = []

    def preprocess(job):
        prepared = real_preprocess(job)
        names[id(prepared)] = os.path.basename(job.options["img_path"])
        return prepared

    def install(fails, error=lambda: torch.OutOfMemoryError(CUDA_OOM)):
        def infer(batch):
            calls.append(len(batch))
            if fails([names[id(item)] for item in batch]):
                raise error()
            return real_infer(batch)
        monkeypatch.setattr(handler, "preprocess", preprocess)
        monkeypatch.setattr(handler, "infer", infer)
        return calls
    return install


def osteo(images, out, request_id, name="pano.png"):
    return {"id": request_id, "img_path": str(images / name), "destination_path": str(out)}


def test_a_batch_that_runs_out_of_memory_is_retried_one_by_one_and_later_batches_shrink(
        registry, faulty, images, tmp_path):
    calls = faulty(lambda names: len(names) > 1)
    requests = [osteo(images, tmp_path, i) for i in range(7)] + [{"op": "health", "id": "h"}]
    replies = serve(registry, requests)
    assert [reply.get("id") for reply in replies] == [0, 1, 2, 3, 4, 5, 6, "h"]
    assert [reply["result"] for reply in replies] == ["ok"] * 8
    assert replies[-1]["op"] == "health" and replies[-1]["replies"] == 7
    # 4 fails -> 4 alone; batches now hold 2: 2 fails -> 2 alone, cap 1; the last one alone.
    assert calls == [4, 1, 1, 1, 1, 2, 1, 1, 1]


def test_only_the_request_that_cannot_fit_alone_fails(registry, faulty, images, tmp_path):
    calls = faulty(lambda names: "big.png" in names)
    requests = [osteo(images, tmp_path, 0), osteo(images, tmp_path, 1), osteo(images, tmp_path, 2, "big.png"),
                osteo(images, tmp_path, 3), {"op": "health"}, osteo(images, tmp_path, 4)]
    replies = serve(registry, requests)
    assert [reply.get("id") for reply in replies] == [0, 1, 2, 3, None, 4]
    assert [reply["result"] for reply in replies] == ["ok", "ok", "fail", "ok", "ok", "ok"]
    failed = replies[2]
    assert failed["error"]["code"] == "internal"
    message = failed["error"]["message"]
    assert message.startswith("out of memory on cpu (OutOfMemoryError) while inferring this request alone")
    for hint in ("smaller image", "--max-pixels", "--max-batch 1"):
        assert hint in message
    # the seed's keys stay on an osteo failure, empty
    assert failed["diagnosis"] == "" and failed["saliency_img_path"] == "" and failed["overlay_img_path"] == ""
    assert replies[4]["op"] == "health" and replies[4]["replies"] == 4
    assert calls == [4, 1, 1, 1, 1, 1]  # the batch is retried one by one; after it, requests go alone (cap 2, one left)


@pytest.mark.parametrize("error", [
    lambda: torch.cuda.OutOfMemoryError(CUDA_OOM),
    lambda: RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 43486543872 bytes. Error code 12 (Cannot allocate memory)"),
    lambda: MemoryError(),
], ids=["torch.cuda.OutOfMemoryError", "RuntimeError-cuda", "RuntimeError-cpu-allocator", "MemoryError"])
def test_a_lone_request_out_of_memory_gets_a_fail_reply_and_the_next_one_is_served(
        registry, faulty, images, tmp_path, error):
    faulty(lambda names: "big.png" in names, error)
    replies = serve(registry, [osteo(images, tmp_path, "big", "big.png"), {"op": "health"},
                               osteo(images, tmp_path, "after")])
    assert replies[0]["result"] == "fail" and replies[0]["id"] == "big"
    assert replies[0]["error"]["code"] == "internal"
    assert replies[0]["error"]["message"].startswith("out of memory on cpu")
    assert replies[1]["result"] == "ok" and replies[1]["op"] == "health"
    assert replies[2]["result"] == "ok" and replies[2]["id"] == "after"


def test_other_batch_errors_are_still_isolated_and_do_not_shrink_batches(registry, faulty, images, tmp_path):
    calls = faulty(lambda names: "big.png" in names, lambda: ValueError("bad tensor"))
    requests = [osteo(images, tmp_path, 0, "big.png"), osteo(images, tmp_path, 1)] + \
        [osteo(images, tmp_path, i) for i in range(2, 4)]
    replies = serve(registry, requests, max_batch=2)
    assert [reply["result"] for reply in replies] == ["fail", "ok", "ok", "ok"]
    assert replies[0]["error"] == {"code": "internal", "message": "internal error (ValueError): bad tensor"}
    assert calls == [2, 1, 1, 2]


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


class CudaHandler(TaskHandler):
    """A handler that claims a CUDA device and runs nothing on it (to see the cache being emptied)."""
    task = "osteo"
    fields = frozenset({"img_path", "destination_path"})

    def validate(self, request):
        return Job(task=self.task, request=request)

    def preprocess(self, job):
        return job.request["id"]

    def infer(self, batch):
        if len(batch) > 1 or "big" in batch:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return batch

    def postprocess(self, job, prepared, inferred):
        return {"diagnosis": "", "saliency_img_path": "", "overlay_img_path": "", "echo": inferred}


def test_cuda_cache_is_emptied_before_the_retry(monkeypatch):
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    card = {"name": "fake", "version": "0", "task": "osteo"}
    handler = CudaHandler(card, Bundle(card), replace(Settings(device=CPU), device=torch.device("cuda:0")), source="test")
    registry = Registry(handlers={"osteo": handler})
    replies = serve(registry, [{"id": "a"}, {"id": "big"}, {"id": "c"}], max_batch=3)
    assert [reply["result"] for reply in replies] == ["ok", "fail", "ok"]
    assert replies[1]["error"]["message"].startswith("out of memory on cuda:0 (OutOfMemoryError)")
    assert len(emptied) == 2  # after the batch, and after the request that failed alone


def test_an_idle_daemon_trims_its_heap_once_per_idle_spell(registry, images, tmp_path, monkeypatch):
    """After a stream glibc holds the freed buffers (RSS stays up); idle for idle_trim_s after
    answering, the loop hands them back once, and not again until it has answered something."""
    import threading
    import time

    import daemon.server

    trims: list[float] = []
    monkeypatch.setattr(daemon.server, "trim_heap", lambda: trims.append(time.monotonic()))
    out = Stream()
    server = Server(Settings(device=CPU), "osteo", out, workers=1, registry=registry, idle_trim_s=0.2)
    read_end, write_end = os.pipe()
    thread = threading.Thread(target=server.serve, args=(read_end,), daemon=True)
    thread.start()

    def wait_for(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    try:
        wait_for(lambda: len(trims) == 1, "the trim after loading")  # the models' load leftovers
        os.write(write_end, json.dumps(osteo(images, tmp_path, 0)).encode() + b"\n")
        wait_for(lambda: len(out.lines()) == 2, "the reply")
        wait_for(lambda: len(trims) == 2, "the trim after the reply")
        time.sleep(1.0)
        assert len(trims) == 2  # nothing answered since: no more trims
        os.write(write_end, b'{"op": "health"}\n')
        wait_for(lambda: len(trims) == 3, "the trim after health")
    finally:
        os.close(write_end)
        thread.join(60)
        os.close(read_end)
    assert not thread.is_alive()
    assert [line.get("result") for line in out.lines()[1:]] == ["ok", "ok"]


class PerItemHandler(TaskHandler):
    """A handler whose items fail on their own: "refused" with its own error, "flaky" only inside a batch."""
    task = "osteo"
    fields = frozenset({"img_path", "destination_path"})
    calls: list[list[str]] = []

    def validate(self, request):
        return Job(task=self.task, request=request)

    def preprocess(self, job):
        return job.request["id"]

    def infer(self, batch):
        self.calls.append(list(batch))
        return [raised(self.refuse, item) or (RuntimeError("needs the GPU to itself")
                                             if item == "flaky" and len(batch) > 1 else item) for item in batch]

    @staticmethod
    def refuse(item):
        if item == "refused":
            raise ServiceError(UNREADABLE_IMAGE, "not a frontal film")

    def postprocess(self, job, prepared, inferred):
        return {"diagnosis": "", "saliency_img_path": "", "overlay_img_path": "", "echo": inferred}


def test_each_item_of_a_batch_fails_or_is_retried_on_its_own():
    handler = PerItemHandler({"name": "fake", "version": "0", "task": "osteo"}, Bundle({}), Settings(device=CPU), "test")
    replies = serve(Registry(handlers={"osteo": handler}), [{"id": i} for i in ("a", "refused", "flaky", "d")])
    assert [reply["result"] for reply in replies] == ["ok", "fail", "ok", "ok"]
    assert replies[1]["error"] == {"code": "unreadable_image", "message": "not a frontal film"}
    assert [reply.get("echo") for reply in replies] == ["a", None, "flaky", "d"]
    assert handler.calls == [["a", "refused", "flaky", "d"], ["flaky"]]   # only the item that failed in company is retried
