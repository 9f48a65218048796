"""One pure-ASGI layer around every request: body size and read-stall bounds, one log line.

Pure ASGI (not ``BaseHTTPMiddleware``) so request and response bodies stay streamed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from gateway.web import zerocopy

log = logging.getLogger("gateway.http")


class BodyTooLarge(Exception):
    """The request body passed ``http.max_request_bytes``."""


class BodyStalled(Exception):
    """No body bytes arrived within ``http.read_timeout_seconds``."""


class LimitsAndLog:
    """413 beyond ``max_request_bytes``, 408 when the body stalls; log method, path, status, identity, bytes, ms."""

    def __init__(self, app, max_request_bytes: int, read_timeout: float):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        scope.setdefault("state", {})
        state = {"in": 0, "out": 0, "status": 0, "started": False}
        limit = self.max_request_bytes

        async def send_error(status: int, detail: str) -> None:
            body = json.dumps({"detail": detail}).encode()
            await send_logged({"type": "http.response.start", "status": status,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(body)).encode()),
                                           (b"connection", b"close")]})
            await send_logged({"type": "http.response.body", "body": body})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            elif message["type"] == zerocopy.EXTENSION:
                state["out"] += zerocopy.body_bytes(message)
            await send(message)

        async def limited_receive():
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise BodyStalled() from None
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
                if state["in"] > limit:
                    raise BodyTooLarge()
            return message

        declared = _content_length(scope)
        try:
            if declared is not None and declared > limit:
                await send_error(413, f"the request body of {declared} bytes is larger than "
                                 f"http.max_request_bytes ({limit}); send fewer instances per request")
            else:
                await self.app(scope, limited_receive, send_logged)
        except BodyTooLarge:
            if not state["started"]:
                await send_error(413, f"the request body is larger than http.max_request_bytes ({limit}); "
                                 "send fewer instances per request")
        except BodyStalled:
            if not state["started"]:
                await send_error(408, f"the request body stalled for more than {self.read_timeout:g} s "
                                 "(http.read_timeout_seconds); send it again")
        finally:
            identity = scope["state"].get("identity", "-")
            ms = 1000 * (time.monotonic() - start)
            log.info("%s %s %d %s in=%d out=%d %.0fms", scope.get("method"), scope.get("path"),
                     state["status"], identity, state["in"], state["out"], ms)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
