"""A small Python client that runs the daemon as a subprocess and talks the line protocol.

    with DaemonClient("weights/") as client:
        reply = client.request({"task": "osteo", "img_path": "pano.png", "destination_path": "out/"})
        for reply in client.map(requests):   # pipelined, replies in request order
            ...

It waits for the ready line, gives every request an ``id`` (unless it has one) and matches the
reply by it, applies a timeout, starts the daemon again if it died, and shuts it down cleanly.
Other languages need nothing of this: write one JSON line, read one JSON line (README).
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

RUN_MODEL = Path(__file__).resolve().parents[1] / "run_model.py"


class DaemonError(RuntimeError):
    """The daemon could not be started, or died while a request was in flight."""


class DaemonClient:
    """Runs ``python run_model.py WEIGHTS ARGS...`` and exchanges protocol lines with it."""

    def __init__(self, weights: str | os.PathLike, *args: str, timeout: float = 600.0,
                 start_timeout: float = 300.0, stderr: IO | int | None = None, restart: bool = True,
                 python: str = sys.executable) -> None:
        self.command = [python, str(RUN_MODEL), os.fspath(weights), *args]
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.stderr = stderr
        self.restart = restart
        self.ready: dict[str, Any] | None = None
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)

    # --- process lifecycle --------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the daemon and wait for its ready line (which is returned)."""
        self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self.stderr, cwd=os.getcwd())
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        self.ready = self._next_line(self.start_timeout)
        if self.ready.get("event") != "ready":
            raise DaemonError(f"expected the ready line, got {self.ready}")
        return self.ready

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_running(self) -> None:
        if self.alive:
            return
        if self._proc is not None and not self.restart:
            raise DaemonError(f"daemon exited with status {self._proc.returncode}")
        self.start()

    def close(self, timeout: float = 60.0) -> int | None:
        """Close stdin (the daemon answers what it has, then exits 0) and wait; kill if it hangs."""
        if self._proc is None:
            return None
        try:
            if self._proc.stdin and not self._proc.stdin.closed:
                self._proc.stdin.close()
            return self._proc.wait(timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self._proc.kill()
            return self._proc.wait()
        finally:
            self._proc = None

    def __enter__(self) -> "DaemonClient":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- lines --------------------------------------------------------------------------
    @staticmethod
    def _pump(stream: IO[bytes], lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def _next_line(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply from the daemon within {timeout:.0f} s") from None
        if line is None:
            code = self._proc.wait() if self._proc else None
            raise DaemonError(f"daemon exited (status {code}) before replying")
        return json.loads(line)

    def _send(self, request: dict[str, Any]) -> Any:
        request = dict(request)
        request.setdefault("id", f"client-{next(self._ids)}")
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise DaemonError("daemon closed its input") from None
        return request["id"]

    def _reply_for(self, request_id: Any, timeout: float) -> dict[str, Any]:
        """Read replies until the one for ``request_id`` (stale replies of timed-out requests are skipped)."""
        while True:
            reply = self._next_line(timeout)
            if reply.get("id") == request_id:
                return reply

    # --- requests -----------------------------------------------------------------------
    def request(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its reply."""
        self._ensure_running()
        return self._reply_for(self._send(request), timeout or self.timeout)

    def map(self, requests: Iterable[dict[str, Any]], in_flight: int = 8,
            timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Pipeline requests (at most ``in_flight`` unanswered) and yield replies in request order."""
        self._ensure_running()
        waiting: deque = deque()
        for request in requests:
            waiting.append(self._send(request))
            if len(waiting) >= in_flight:
                yield self._reply_for(waiting.popleft(), timeout or self.timeout)
        while waiting:
            yield self._reply_for(waiting.popleft(), timeout or self.timeout)

    def health(self) -> dict[str, Any]:
        return self.request({"op": "health"})

    def models(self) -> list[dict[str, Any]]:
        return self.request({"op": "models"})["models"]
