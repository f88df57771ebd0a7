"""A burst never piles up more prepared input than the byte budget allows: with big requests
fewer wait for the model, and every request is still answered, in order."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import Daemon, panoramic_phantom, write_tiny_osteo_card
from daemon.handlers.base import Settings
from daemon.queue_budget import PreparedBudget, held_bytes
from daemon.registry import load_registry
from daemon.server import Server
from test_daemon_oom import Stream

CPU = torch.device("cpu")
BUDGET = 100_000  # bytes


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("queue-inputs") / "pano.png"
    Image.fromarray(panoramic_phantom(150, 300)).save(path)
    return path


def burst_through_the_server(tmp_path, size, image, monkeypatch, n=12):
    """The real loop and handler on a card of model ``size``, with a slow model (so prepared requests
    pile up), all requests queued at once; returns the replies and the queue's record."""
    registry = load_registry(write_tiny_osteo_card(tmp_path / f"w{size[0]}" / "osteo", size=size).parent,
                             Settings(device=CPU))
    handler = registry.handlers["osteo"]
    real_infer = handler.infer
    monkeypatch.setattr(handler, "infer", lambda batch: time.sleep(0.15) or real_infer(batch))
    out = Stream()
    server = Server(Settings(device=CPU), "osteo", out, max_batch=1, workers=2, registry=registry,
                    max_queue_bytes=BUDGET)
    server.max_pending = n + 1  # only the byte budget may hold the burst back
    for i in range(n):
        server.lines.put(json.dumps({"id": i, "img_path": str(image), "destination_path": str(tmp_path / "out")}).encode())
    server.lines.put(b'{"op": "health"}')
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        assert server.serve(read_end) == 0
    finally:
        os.close(read_end)
    _, *replies, health = out.lines()
    assert [r["id"] for r in replies] == list(range(n)) and all(r["result"] == "ok" for r in replies)
    return health["queue"], size[0] * size[1]


def test_big_requests_wait_fewer_at_a_time(tmp_path, image, monkeypatch):
    small, small_bytes = burst_through_the_server(tmp_path, (32, 64), image, monkeypatch)    # 2 kB each
    big, big_bytes = burst_through_the_server(tmp_path, (160, 320), image, monkeypatch)      # 51 kB each
    assert small["limit_bytes"] == big["limit_bytes"] == BUDGET
    # Workers start only while less than the budget waits: at most budget + one per worker.
    assert big["peak_held_bytes"] <= BUDGET + 2 * big_bytes
    assert big["peak_waiting"] <= 4
    assert small["peak_waiting"] >= 8  # the same budget lets many small ones wait
    assert small["held_bytes"] == big["held_bytes"] == 0 and small["waiting"] == big["waiting"] == 0


def test_the_flag_reaches_the_daemon_and_health_shows_the_queue(tiny_weights, image, tmp_path):
    process = Daemon(str(tiny_weights), "--device", "cpu", "--max-queue-mb", "0.05")
    lines = b"".join(f'{{"id": {i}, "img_path": "{image}", "destination_path": "{tmp_path}"}}\n'.encode()
                     for i in range(5))
    process.send_raw(lines + b'{"op": "health"}\n')
    replies = [process.read_reply() for _ in range(5)]
    assert all(r["result"] == "ok" for r in replies)
    queue = process.read_reply()["queue"]
    assert queue["limit_bytes"] == int(0.05 * (1 << 20)) and queue["held_bytes"] == 0
    assert 1 <= queue["peak_waiting"] and queue["peak_held_bytes"] <= queue["limit_bytes"] + 2 * 96 * 192
    assert process.close() == 0


def test_budget_turns_follow_request_order_and_wait_for_room():
    budget = PreparedBudget(100)
    tickets = [budget.ticket() for _ in range(3)]
    started: list[int] = []

    def worker(ticket: int) -> None:
        budget.start(ticket)
        started.append(ticket)
        budget.prepared(80)

    second = threading.Thread(target=worker, args=(tickets[1],))
    second.start()
    time.sleep(0.1)
    assert started == []            # ticket 1 waits for ticket 0's turn
    worker(tickets[0])
    second.join(5)
    assert started == [0, 1]        # 80 < 100 held when ticket 1 started
    third = threading.Thread(target=worker, args=(tickets[2],))
    third.start()
    time.sleep(0.1)
    assert started == [0, 1]        # 160 held: no room
    budget.taken(80)
    budget.taken(80)
    third.join(5)
    assert started == [0, 1, 2] and budget.status()["peak_waiting"] == 2


def test_held_bytes_counts_the_arrays_and_tensors_a_request_holds():
    import numpy as np

    from daemon.handlers.osteo import Prepared

    assert held_bytes(Prepared(shown=np.zeros((449, 954), np.uint8), method="gradcam")) == 449 * 954
    assert held_bytes({"frame": torch.zeros(3, 4), "name": "x"}) == 48
    assert held_bytes([np.zeros(10), torch.zeros(5, dtype=torch.float16), None]) == 80 + 10
