"""Stable error codes: every failure becomes a reply ``{"result": "fail", "error": {code, message}}``."""
from __future__ import annotations

BAD_JSON = "bad_json"
INVALID_REQUEST = "invalid_request"
UNKNOWN_TASK = "unknown_task"
FILE_NOT_FOUND = "file_not_found"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
PATH_NOT_ALLOWED = "path_not_allowed"
MODEL_UNAVAILABLE = "model_unavailable"
WRONG_IMAGE_KIND = "wrong_image_kind"
INTERNAL = "internal"

ERROR_CODES = (BAD_JSON, INVALID_REQUEST, UNKNOWN_TASK, FILE_NOT_FOUND, UNREADABLE_IMAGE,
               IMAGE_TOO_LARGE, PATH_NOT_ALLOWED, MODEL_UNAVAILABLE, WRONG_IMAGE_KIND, INTERNAL)


class ServiceError(Exception):
    """A request failed in a way the client should be told about, with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
