"""How much preprocessed work may wait for the model: a byte budget over the prepared requests.

Workers start preprocessing in request order, and only while the prepared requests not yet
taken for inference hold fewer bytes than the budget; the count of waiting requests is bounded
by the server's admission window. So a burst of any length keeps at most about
``limit + workers x one request`` bytes of prepared inputs, and a worker blocked on the budget
never holds up the oldest request (everything it waits for is older, and the server takes
requests in order).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch


def held_bytes(prepared: Any) -> int:
    """Bytes of the arrays and tensors a prepared request holds (its fields, one level into
    lists, tuples and dicts)."""
    def size(value: Any) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, torch.Tensor):
            return value.element_size() * value.nelement()
        return 0

    if dataclasses.is_dataclass(prepared) and not isinstance(prepared, type):
        values = [getattr(prepared, f.name) for f in dataclasses.fields(prepared)]
    else:
        values = [prepared]
    total = 0
    for value in values:
        if isinstance(value, (list, tuple)):
            total += sum(size(item) for item in value)
        elif isinstance(value, dict):
            total += sum(size(item) for item in value.values())
        else:
            total += size(value)
    return total


class PreparedBudget:
    """Turns (in request order) and bytes for preprocessing workers; thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(0, int(limit_bytes))
        self._cond = threading.Condition()
        self._issued = 0   # tickets handed out
        self._turn = 0     # the ticket whose preprocessing may start next
        self.held = 0      # bytes of prepared requests not yet taken for inference
        self.waiting = 0   # how many those are
        self.peak_held = 0
        self.peak_waiting = 0

    def ticket(self) -> int:
        """A place in line, taken when a request is handed to the workers (main thread, in order)."""
        with self._cond:
            self._issued += 1
            return self._issued - 1

    def start(self, ticket: int) -> None:
        """Block a worker until it is this ticket's turn and the budget has room."""
        with self._cond:
            self._cond.wait_for(lambda: self._turn == ticket and self.held < max(self.limit, 1))
            self._turn += 1
            self._cond.notify_all()

    def prepared(self, nbytes: int) -> None:
        """A request finished preprocessing and now holds ``nbytes`` until it is taken."""
        with self._cond:
            self.held += nbytes
            self.waiting += 1
            self.peak_held = max(self.peak_held, self.held)
            self.peak_waiting = max(self.peak_waiting, self.waiting)

    def taken(self, nbytes: int) -> None:
        """A prepared request was taken for inference: its bytes leave the budget."""
        with self._cond:
            self.held -= nbytes
            self.waiting -= 1
            self._cond.notify_all()

    def status(self) -> dict[str, int]:
        """What ``op: health`` shows under ``queue``."""
        with self._cond:
            return {"limit_bytes": self.limit, "held_bytes": self.held, "waiting": self.waiting,
                    "peak_held_bytes": self.peak_held, "peak_waiting": self.peak_waiting}
