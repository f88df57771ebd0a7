"""The request loop: read lines from stdin, answer each with exactly one JSON line on stdout.

A reader thread turns stdin into a queue of lines, so EOF and SIGTERM/SIGINT are handled the
same way: everything already read is answered, then the process exits 0. Requests of one task
that are already waiting are inferred as one batch; replies always leave in request order.
Nothing but protocol lines reaches stdout: the real stdout is kept for replies and file
descriptor 1 is pointed at stderr, so stray prints from libraries land in the log.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator

import torch

from daemon import __version__
from daemon.errors import (INTERNAL, INVALID_REQUEST, MODEL_UNAVAILABLE, UNKNOWN_TASK, ServiceError)
from daemon.handlers.base import Job, Settings
from daemon.protocol import MAX_LINE_BYTES, OPS, TASKS, encode_reply, fail_reply, parse_line, reject_unknown_fields
from daemon.queue_budget import PreparedBudget, held_bytes
from daemon.registry import Registry

log = logging.getLogger("daemon.server")

_EOF = object()
_STOP = object()
# Prepared requests waiting for the model hold at most about this many bytes (--max-queue-mb).
DEFAULT_MAX_QUEUE_BYTES = 64 << 20

# Allocation failures: torch.OutOfMemoryError (CUDA), MemoryError (host), and RuntimeErrors whose
# text says so (CPU allocator, cuDNN/cuBLAS workspaces, older torch versions).
_OOM_TYPES = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that an allocation failed (GPU or host memory)."""
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _OOM_MARKERS)


class OutOfMemory(ServiceError):
    """An allocation failed: an ``internal`` error whose message says so and what to try."""

    def __init__(self, message: str) -> None:
        super().__init__(INTERNAL, message)


def _find_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


# Allocations of at least this size get their own mapping, given back to the OS when freed.
HEAP_MMAP_THRESHOLD = 16 << 20


def tune_heap() -> None:
    """glibc only: always map allocations of >= 16 MiB on their own. By default glibc raises that
    threshold to the largest block freed so far (up to 32 MB), after which the full-size image
    buffers of each request (up to 34 MB) are carved from the heap and a burst leaves it
    fragmented. At 16 MiB a 150-request burst peaks at 1.39x the idle RSS and returns to +1.2 %;
    1 MiB gave 1.33x but page-faulted every activation anew (handbone and brixia requests 30-40 %
    slower); bench/RESULTS.md, "Daemon burst"."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give the heap memory that glibc keeps after frees back to the OS. After a stream of
    requests it holds a few hundred MB of freed decode/activation buffers (bench/RESULTS.md,
    "Daemon RSS curve"); nothing is in use there, so the daemon does this when it goes idle."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory(device: torch.device) -> None:
    """After an allocation failure: collect garbage and hand the CUDA allocator's cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Oversized:
    """A line longer than the limit; its bytes were dropped as they arrived."""
    length: int


def read_lines(fd: int, lines: "queue.SimpleQueue[Any]", limit: int = MAX_LINE_BYTES) -> None:
    """Reader thread: split raw stdin into lines (bytes) and queue them; _EOF at the end.

    Reads the file descriptor directly (no Python buffered reader whose lock could be held at
    exit) and never holds more than ``limit`` bytes of one line.
    """
    pending = bytearray()
    dropped = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            if dropped:
                lines.put(Oversized(dropped + len(pending)))
            elif pending.strip():
                lines.put(bytes(pending))
            lines.put(_EOF)
            return
        pending += chunk
        while True:
            newline = pending.find(b"\n")
            if newline < 0:
                if len(pending) > limit:
                    dropped += len(pending)
                    pending.clear()
                break
            line = bytes(pending[:newline])
            del pending[:newline + 1]
            if dropped:
                lines.put(Oversized(dropped + len(line)))
                dropped = 0
            elif line.strip():
                lines.put(line)


@dataclass
class Entry:
    """One accepted line, from arrival to reply."""
    raw: Any
    started: float
    reply: dict[str, Any] | None = None
    job: Job | None = None
    preparing: Future | None = None
    prepared: Any = None
    inferred: Any = None
    control: dict[str, Any] | None = None  # an op line, answered when its turn comes
    stop_after: bool = False
    held_bytes: int = 0  # what its prepared input holds while it waits (daemon.queue_budget)


class Server:
    """Owns the registry, the reply stream and the loop.

    The loop is a small pipeline: lines already waiting are parsed and validated in order and
    their preprocessing (decode, rolling ball...) is handed to a thread pool; meanwhile the
    oldest request is inferred together with the requests of the same task right behind it
    (at most ``max_batch``), and replies leave strictly in request order. A lone request never
    waits for company.
    """

    def __init__(self, settings: Settings, default_task: str, out: BinaryIO | None, max_batch: int = 4,
                 workers: int = 2, registry: Registry | None = None, idle_trim_s: float = 2.0,
                 max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES) -> None:
        self.registry = registry or Registry()
        self.settings = settings
        self.default_task = default_task
        self.out = out
        self.max_batch = max(1, max_batch)
        self.max_pending = 2 * self.max_batch + max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="preprocess")
        self.budget = PreparedBudget(max_queue_bytes)  # bytes of prepared requests waiting for the model
        self.lines: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.started = time.time()
        self.answered = 0
        self.batch_caps: dict[str, int] = {}  # task -> largest batch still tried after running out of memory
        self.idle_trim_s = idle_trim_s  # idle this long after answering: trim_heap()
        self.heap_dirty = True  # answered something (or loaded the models) since the last trim

    # --- output -------------------------------------------------------------------------
    @staticmethod
    def encode(reply: dict[str, Any]) -> bytes:
        """One reply as its protocol line; a reply that is not valid JSON becomes an ``internal`` one."""
        try:
            return encode_reply(reply)
        except (TypeError, ValueError) as exc:
            log.error("reply could not be encoded: %s", exc)
            return encode_reply(fail_reply(INTERNAL, "reply could not be encoded as JSON",
                                           task=reply.get("task"), has_id="id" in reply, request_id=reply.get("id")))

    def emit(self, reply: dict[str, Any]) -> None:
        """Write one protocol line; a client that went away ends the process quietly."""
        data = self.encode(reply)
        try:
            self.out.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.warning("stdout closed by the client: exiting")
            os._exit(0)

    def ready_line(self) -> dict[str, Any]:
        return {"event": "ready", "message": "Loaded pretrained weights", "version": __version__,
                "device": str(self.settings.device), "precision": self.settings.precision, "amp": self.amp_tasks(),
                "default_task": self.default_task, "tasks": self.registry.status(),
                "kind_gate": self.registry.gate_status(), "pid": os.getpid()}

    def amp_tasks(self) -> list[str]:
        """Tasks whose forward passes run under float16 autocast (CUDA with ``--precision fp16``)."""
        return sorted(task for task, handler in self.registry.handlers.items() if getattr(handler, "amp", False))

    # --- signals and the loop -----------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop reading, answer what was accepted, exit 0."""
        def stop(signum, _frame):
            log.info("signal %d: finishing accepted requests, then exiting", signum)
            self.lines.put(_STOP)  # SimpleQueue.put is safe in a signal handler
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve(self, in_fd: int = 0) -> int:
        threading.Thread(target=read_lines, args=(in_fd, self.lines), name="stdin-reader", daemon=True).start()
        self.emit(self.ready_line())
        pending: deque[Entry] = deque()
        finished = False
        while True:
            # Admit what is already waiting (block only when there is nothing else to do).
            while not finished and len(pending) < self.max_pending:
                try:
                    if pending:
                        item = self.lines.get_nowait()
                    else:
                        item = self.lines.get(timeout=self.idle_trim_s if self.heap_dirty else None)
                except queue.Empty:
                    if not pending:  # idle since the last reply: hand freed heap back, then wait
                        self._trim_heap()
                        continue
                    break
                if item is _EOF or item is _STOP:
                    finished = True
                    break
                entry = Entry(raw=item, started=time.perf_counter())
                self._admit(entry)
                pending.append(entry)
                finished = entry.stop_after  # lines after a shutdown are not accepted
            if not pending:
                if finished:
                    self.pool.shutdown(wait=True)
                    log.info("exiting after %d replies", self.answered)
                    return 0
                continue
            self._answer_head(pending)

    def answer(self, requests: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Answer task requests without stdin (the Ray batch runner's actors): each goes through the
        same parsing, validation, batching, retries and error codes as a line read by ``serve``,
        and each reply, yielded in request order as soon as it is ready, is what that line gets."""
        lines = deque(json.dumps(request).encode() for request in requests)
        pending: deque[Entry] = deque()
        while lines or pending:
            while lines and len(pending) < self.max_pending:
                entry = Entry(raw=lines.popleft(), started=time.perf_counter())
                self._admit(entry)
                pending.append(entry)
            for reply in self._head_replies(pending):
                yield json.loads(self.encode(reply))
                self.answered += 1

    def _answer_head(self, pending: deque[Entry]) -> None:
        """Reply to the oldest entry, inferring it with the same-task requests queued right behind it."""
        for reply in self._head_replies(pending):
            self.emit(reply)
            self.answered += 1
            self.heap_dirty = True

    def _head_replies(self, pending: deque[Entry]) -> Iterator[dict[str, Any]]:
        """Infer the oldest entry with the same-task requests queued right behind it, then pop and
        yield every reply now at the front of the queue, in request order."""
        head = pending[0]
        if head.job is not None and head.reply is None:
            batch = [head]
            limit = min(self.max_batch, self.batch_caps.get(head.job.task, self.max_batch))
            for entry in list(pending)[1:]:
                if len(batch) >= limit or entry.job is None or entry.job.task != head.job.task:
                    break
                batch.append(entry)
            for entry in batch:
                self._collect(entry)
            self._infer([entry for entry in batch if entry.reply is None])
            for entry in batch:
                if entry.reply is None:
                    self._finish(entry)
        while pending and (pending[0].reply is not None or pending[0].control is not None):
            entry = pending.popleft()
            yield entry.reply if entry.reply is not None else self._control(entry.control)

    def _trim_heap(self) -> None:
        began = time.perf_counter()
        trim_heap()
        self.heap_dirty = False
        log.debug("idle: heap trimmed in %.1f ms", (time.perf_counter() - began) * 1000)

    # --- one request --------------------------------------------------------------------
    def _fail(self, entry: Entry, error: ServiceError, task: str | None, request: dict | None) -> None:
        entry.reply = fail_reply(error.code, error.message, task=task,
                                 has_id=isinstance(request, dict) and "id" in request,
                                 request_id=request.get("id") if isinstance(request, dict) else None,
                                 elapsed_ms=(time.perf_counter() - entry.started) * 1000)

    def _admit(self, entry: Entry) -> None:
        """Parse, route and validate one line in arrival order; start its preprocessing in the pool."""
        request: dict | None = None
        task: str | None = self.default_task
        try:
            if isinstance(entry.raw, Oversized):
                raise ServiceError(INVALID_REQUEST, f"request line of {entry.raw.length} bytes is longer than "
                                                    f"the {MAX_LINE_BYTES}-byte limit")
            request = parse_line(entry.raw)
            if "op" in request:
                task = None
                self._check_control(request)
                entry.control = request
                entry.stop_after = request["op"] == "shutdown"
                return
            task = self._route(request)
            handler = self.registry.handlers[task]
            entry.job = handler.validate(request)
            entry.job.started = entry.started
            entry.preparing = self.pool.submit(self._prepare, handler, entry, self.budget.ticket())
        except ServiceError as exc:
            self._fail(entry, exc, task, request)
        except Exception as exc:  # never let one request take the daemon down
            self._internal(entry, exc, task, request)

    def _prepare(self, handler: Any, entry: Entry, ticket: int) -> Any:
        """Worker: preprocess in request order, once the waiting prepared requests leave room."""
        self.budget.start(ticket)
        prepared = handler.preprocess(entry.job)
        entry.held_bytes = held_bytes(prepared)
        self.budget.prepared(entry.held_bytes)
        return prepared

    def _collect(self, entry: Entry) -> None:
        """Wait for an entry's preprocessing; its failure becomes its reply."""
        if entry.reply is not None or entry.prepared is not None:
            return
        try:
            entry.prepared = entry.preparing.result()
            self.budget.taken(entry.held_bytes)
        except ServiceError as exc:
            self._fail(entry, exc, entry.job.task, entry.job.request)
        except Exception as exc:
            self._internal(entry, exc, entry.job.task, entry.job.request)

    def _route(self, request: dict[str, Any]) -> str:
        task = request.get("task", self.default_task)
        if not isinstance(task, str):
            raise ServiceError(INVALID_REQUEST, "'task' must be a string")
        if task not in TASKS:
            raise ServiceError(UNKNOWN_TASK, f"unknown task {task[:64]!r}; tasks: {', '.join(TASKS)}")
        if task not in self.registry.handlers:
            reason = self.registry.unavailable.get(task, "not loaded (see --tasks and the weights folder)")
            raise ServiceError(MODEL_UNAVAILABLE, f"task {task!r} is unavailable: {reason}")
        return task

    @staticmethod
    def _check_control(request: dict[str, Any]) -> None:
        op = request["op"]
        if op not in OPS:
            raise ServiceError(INVALID_REQUEST, f"unknown op {str(op)[:64]!r}; ops: {', '.join(OPS)}")
        reject_unknown_fields(request, {"op", "id"})

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply to a checked op line, built when its turn comes (so health counts are current)."""
        op = request["op"]
        reply: dict[str, Any] = {"result": "ok", "op": op}
        if "id" in request:
            reply["id"] = request["id"]
        if op == "health":
            reply.update(tasks=self.registry.status(), kind_gate=self.registry.gate_status(),
                         uptime_s=round(time.time() - self.started, 1),
                         replies=self.answered, device=str(self.settings.device), version=__version__,
                         queue=self.budget.status())
        elif op == "models":
            reply["models"] = self.registry.models()
        return reply

    def _infer(self, entries: list[Entry]) -> None:
        """One ``infer`` call per task over these prepared requests.

        A batch that fails is retried one request at a time, so only the request that cannot be
        served alone gets a fail reply. When the batch ran out of memory, garbage is collected and
        the CUDA cache emptied first, and later batches of that task are capped at half the size.
        An item of a batch that raised its own error gets it as its reply when it is a ServiceError
        (the request's own refusal, e.g. brixia's film check); any other error of one item is retried
        alone like a failed batch.
        """
        by_task: dict[str, list[Entry]] = {}
        for entry in entries:
            by_task.setdefault(entry.job.task, []).append(entry)
        for task, group in by_task.items():
            handler = self.registry.handlers[task]
            failure, retry = self._try_infer(handler, group)
            if failure is None:
                for entry in retry:
                    failure, _ = self._try_infer(handler, [entry])
                    if failure is not None:
                        self._fail(entry, failure, task, entry.job.request)
                continue
            if len(group) == 1:
                self._fail(group[0], failure, task, group[0].job.request)
                continue
            if isinstance(failure, OutOfMemory):
                cap = max(1, len(group) // 2)
                if cap < self.batch_caps.get(task, self.max_batch):
                    self.batch_caps[task] = cap
                    log.warning("out of memory on a batch of %d %s requests: later %s batches hold at most %d",
                                len(group), task, task, cap)
            log.warning("batch of %d %s requests failed; retrying one by one", len(group), task)
            for entry in group:  # isolate the request that breaks the batch
                failure, _ = self._try_infer(handler, [entry])
                if failure is not None:
                    self._fail(entry, failure, task, entry.job.request)

    def _try_infer(self, handler: Any, group: list[Entry]) -> tuple[ServiceError | None, list[Entry]]:
        """Run ``handler.infer`` on ``group``; on failure return the error to reply with, after
        releasing memory when it was an allocation failure. The exception (whose traceback holds
        the failed call's tensors) is dropped before returning, so a retry gets that memory back.

        On success, items whose result is an exception are failed here: a ServiceError is that
        request's reply; another error, in a batch of several, returns the item to be retried alone
        (the second value); alone, it is that request's ``internal`` (or out-of-memory) reply."""
        retry: list[Entry] = []
        try:
            results = handler.infer([entry.prepared for entry in group])
            if len(results) != len(group):
                raise RuntimeError(f"{handler.task} infer returned {len(results)} results for {len(group)} requests")
        except ServiceError as exc:
            error = ServiceError(exc.code, exc.message)
        except Exception as exc:
            label = f"batch of {len(group)}" if len(group) > 1 else _label(group[0].job.request)
            error = self._error_for(exc, label, "inferring", handler.settings.device)
        else:
            for entry, result in zip(group, results):
                if isinstance(result, ServiceError):
                    self._fail(entry, ServiceError(result.code, result.message), entry.job.task, entry.job.request)
                elif isinstance(result, BaseException) and len(group) > 1:
                    log.warning("one request of a batch of %d %s requests failed (%s); retrying it alone",
                                len(group), handler.task, type(result).__name__)
                    retry.append(entry)
                elif isinstance(result, BaseException):
                    error = self._error_for(result, _label(entry.job.request), "inferring", handler.settings.device)
                    if isinstance(error, OutOfMemory):
                        release_memory(handler.settings.device)
                    self._fail(entry, error, entry.job.task, entry.job.request)
                else:
                    entry.inferred = result
            return None, retry
        if isinstance(error, OutOfMemory):
            release_memory(handler.settings.device)
        return error, retry

    def _finish(self, entry: Entry) -> None:
        handler = self.registry.handlers[entry.job.task]
        try:
            entry.reply = handler.finish(entry.job, entry.prepared, entry.inferred)
        except ServiceError as exc:
            self._fail(entry, exc, entry.job.task, entry.job.request)
        except Exception as exc:
            self._internal(entry, exc, entry.job.task, entry.job.request)

    def _internal(self, entry: Entry, exc: BaseException, task: str | None, request: dict | None) -> None:
        handler = self.registry.handlers.get(task) if task else None
        device = handler.settings.device if handler is not None else self.settings.device
        error = self._error_for(exc, _label(request), "preparing" if entry.prepared is None
                                else "writing the results of", device)
        if isinstance(error, OutOfMemory):
            release_memory(device)
        self._fail(entry, error, task, request)

    @staticmethod
    def _error_for(exc: BaseException, label: str, stage: str, device: torch.device) -> ServiceError:
        """Log ``exc`` with its traceback and turn it into an ``internal`` error (``OutOfMemory``
        when an allocation failed: its message says so and what to try)."""
        out_of_memory = is_out_of_memory(exc)
        log.error("%s on %s:\n%s", "out of memory" if out_of_memory else "internal error", label,
                  "".join(traceback.format_exception(exc)))
        name = type(exc).__name__
        if not out_of_memory:
            return ServiceError(INTERNAL, f"internal error ({name}): {str(exc)[:300]}")
        if stage == "inferring":
            where = f"on {device} ({name}) while inferring this request alone"
        else:
            where = f"in host memory ({name}) while {stage} this request"
        return OutOfMemory(f"out of memory {where}: send a smaller image or lower --max-pixels, run the daemon "
                           "with --max-batch 1, or give it more free memory; the daemon keeps serving")


def _label(request: Any) -> str:
    """How the log names a request: its id when it has one."""
    return f"request {request.get('id', '?')!r}" if isinstance(request, dict) else "request ?"
