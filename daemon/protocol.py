"""The line protocol: parse one request line, check common fields, and shape replies.

A request is one JSON object per line. ``{"op": ...}`` lines are control lines; anything else
is a task request (``task`` defaults to ``--default-task``). Replies keep the osteo seed's keys
first and in its order, so the original clients keep working.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO

from daemon.errors import BAD_JSON, INVALID_REQUEST, ServiceError

OPS = ("health", "models", "shutdown")
TASKS = ("osteo", "scar", "brixia", "handbone")
MAX_LINE_BYTES = 1 << 20  # a request is a few hundred bytes; anything past 1 MiB is not one
MAX_JSON_DEPTH = 32
# An osteo failure carries the seed's empty fields so that its clients keep parsing replies.
SEED_FAIL_FIELDS = {"diagnosis": "", "saliency_img_path": "", "overlay_img_path": ""}


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def parse_line(raw: bytes) -> dict[str, Any]:
    """Bytes of one line -> request object; ServiceError(bad_json / invalid_request) otherwise."""
    if len(raw) > MAX_LINE_BYTES:
        raise ServiceError(INVALID_REQUEST, f"request line of {len(raw)} bytes is longer than the "
                                            f"{MAX_LINE_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(BAD_JSON, f"request line is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise ServiceError(BAD_JSON, "request JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ServiceError(BAD_JSON, f"request line is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(request, dict):
        raise ServiceError(INVALID_REQUEST, f"a request must be a JSON object, got {type(request).__name__}")
    if _depth(request, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ServiceError(INVALID_REQUEST, f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return request


def require_string(request: dict[str, Any], field: str, *, optional: bool = False) -> str | None:
    """A non-empty string field, or ServiceError(invalid_request) naming the field."""
    if field not in request or request[field] is None:
        if optional:
            return None
        raise ServiceError(INVALID_REQUEST, f"'{field}' is required")
    value = request[field]
    if not isinstance(value, str) or not value.strip():
        raise ServiceError(INVALID_REQUEST, f"'{field}' must be a non-empty string")
    if "\x00" in value:
        raise ServiceError(INVALID_REQUEST, f"'{field}' contains a NUL character")
    return value


def reject_unknown_fields(request: dict[str, Any], allowed: set[str]) -> None:
    """Unknown fields are refused, so that a typo (``destination``) is loud rather than ignored."""
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise ServiceError(INVALID_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                            f"allowed: {', '.join(sorted(allowed))}")


def fail_reply(code: str, message: str, *, task: str | None = None, request_id: Any = None,
               has_id: bool = False, elapsed_ms: float | None = None) -> dict[str, Any]:
    """A failure reply: seed keys first for osteo, then task, id, error and timing."""
    reply: dict[str, Any] = {"result": "fail"}
    if task == "osteo":
        reply.update(SEED_FAIL_FIELDS)
    if task is not None:
        reply["task"] = task
    if has_id:
        reply["id"] = request_id
    reply["error"] = {"code": code, "message": message}
    if elapsed_ms is not None:
        reply["elapsed_ms"] = round(elapsed_ms, 1)
    return reply


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply as one line of ASCII-safe JSON (non-ASCII escaped, so any client decoding works)."""
    return json.dumps(reply, ensure_ascii=True, allow_nan=False, separators=(", ", ": ")).encode("ascii") + b"\n"


def claim_stdout() -> BinaryIO:
    """Keep the real stdout for protocol lines and send everything else written to fd 1 to stderr.

    Lives here, in a module without heavy imports, so the CLI can call it before torch and the
    model libraries are imported: nothing they print at import time can reach the protocol.
    """
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol_fd, "wb", buffering=0)
