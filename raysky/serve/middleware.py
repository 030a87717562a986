"""ASGI middleware of the live endpoint: the JSON access log (one line per request, with its
request id, sizes and timings) and the request-body limit, plus the JSON error answer both use.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import JSONResponse

from raysky.serve.errors import ApiError, BodyTooLarge, error_body

ACCESS_LOGGER = "raysky.serve.access"
ACCESS_SCOPE_KEY = "raysky.access"
"""Where a request's access-log entry lives in its ASGI scope, for the routes to fill in."""
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonLineFormatter(logging.Formatter):
    """Formats a record whose ``msg`` is a dict as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = record.msg if isinstance(record.msg, dict) else {"message": record.getMessage()}
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_access_log(path: str | None = None) -> logging.Logger:
    """Send the access log to stderr (the replica's log) and, if given, append it to ``path``.

    Idempotent: calling it again with the same path adds no second handler.
    """
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO)
    access.propagate = False  # Serve's own handlers would wrap the JSON in their format
    wanted = {("stream", None)} | ({("file", str(path))} if path else set())
    present = {getattr(h, "_raysky_key", None) for h in access.handlers}
    for key in wanted - present:
        handler = (logging.StreamHandler(sys.stderr) if key[0] == "stream"
                   else logging.FileHandler(key[1], encoding="utf-8"))
        handler._raysky_key = key  # type: ignore[attr-defined]
        handler.setFormatter(JsonLineFormatter())
        access.addHandler(handler)
    return access


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AccessLogMiddleware:
    """One JSON line per request: time, request id, method, path, status, latency and the
    uploaded image's size. Deliberately nothing from the form body or query string, so patient
    metadata and image ids never reach the logs."""

    def __init__(self, app, logger_: logging.Logger):
        self.app = app
        self.logger = logger_

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Serve's proxy assigns x-request-id and echoes it in the response; outside Serve we
        # make one up and echo it ourselves.
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        entry: dict[str, Any] = {"request_id": request_id}
        scope[ACCESS_SCOPE_KEY] = entry
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if not incoming:
                    message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record = {
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
            }
            record.update((k, v) for k, v in entry.items() if k != "request_id")
            self.logger.info(record)


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` with 413: at once from ``Content-Length``, or while
    reading a chunked body, before it is buffered in full."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = too_large(self.max_bytes) if declared.isdigit() else ApiError(
                400, "bad_request", "invalid Content-Length header")
            await error_response(scope, error)(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def too_large(max_bytes: int) -> ApiError:
    """The 413 answer to a body past ``max_bytes``."""
    return ApiError(413, "body_too_large",
                    f"request body exceeds the limit of {max_bytes} bytes")


def scope_request_id(scope: dict) -> str | None:
    """The request id the access log gave this request (None outside the middleware)."""
    return scope.get(ACCESS_SCOPE_KEY, {}).get("request_id")


def error_response(scope: dict, error: ApiError) -> JSONResponse:
    """``error`` as its JSON answer, with the request id, and noted in the access log."""
    body = error_body(error.code, error.detail, error.field, scope_request_id(scope))
    entry = scope.get(ACCESS_SCOPE_KEY)
    if entry is not None:
        entry["error"] = error.code  # the code only: details may echo client input
    return JSONResponse(body, status_code=error.status, headers=error.headers)
