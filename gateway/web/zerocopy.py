"""Zero-copy response bodies for uvicorn's h11 protocol: stored files go to the socket by ``sendfile``.

WADO-RS sends stored files unchanged. Copying them through Python (read into a buffer in a
worker, write to the socket on the event loop) cost more CPU than everything else in the
request; so did the ASGI spec's per-file ``http.response.zerocopysend`` message (one
``loop.sendfile`` and one pass through every middleware per instance: a 200-instance series
spent more time in the event loop than Orthanc spends in total). Here a response sends ONE
message with the whole body as a list of pieces::

    {"type": "gateway.response.pieces", "pieces": [bytes | (path, offset, count), ...], "more_body": bool}

and a worker thread writes them to a duplicate of the connection's socket descriptor: bytes
with ``os.write``, file ranges with ``os.sendfile`` (the kernel hands page-cache pages to the
socket; no copy in this process, no buffer, and disk reads of a cold file block only the
worker). h11 still frames and counts the bytes (``send_with_data_passthrough`` takes any
object with a length, for exactly this). uvicorn offers no such hook, so
``ZeroCopyH11Protocol`` wraps each new request cycle's ``send`` and advertises the message in
``scope["extensions"]``; a server without it (tests' TestClient) does not advertise it and
the app streams buffers instead.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time

import logging

import h11

from gateway.dimse.fence import missing_from

try:
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # another uvicorn layout: ``missing()`` names it and the server runs plain h11
    H11Protocol = object

log = logging.getLogger("gateway.http")

EXTENSION = "gateway.response.pieces"
#: The uvicorn and h11 internals this module relies on (module, attribute path, kind), checked
#: at start like pynetdicom's (dimse/fence.py): when one is missing the server runs uvicorn's
#: plain h11 protocol and WADO-RS streams buffers, with a warning naming it.
INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("h11", "Connection.send_with_data_passthrough", "method"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.handle_events", "method"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.cycle", "instance attribute"),
    ("uvicorn.protocols.http.h11_impl", "RequestResponseCycle.send", "method"),
    *(("uvicorn.protocols.http.h11_impl", f"RequestResponseCycle.{name}", "instance attribute")
      for name in ("scope", "conn", "transport", "flow", "disconnected", "response_started",
                   "response_complete")),
    ("uvicorn.protocols.http.flow_control", "FlowControl.write_paused", "instance attribute"),
    ("uvicorn.protocols.http.flow_control", "FlowControl.drain", "method"),
)
#: A client that takes no bytes for this long is given up (the connection is closed).
STALL_SECONDS = 60.0


class SendStalled(OSError):
    """The client read nothing for STALL_SECONDS."""


class _Body:
    """Stands in for the body bytes in h11's writer (it frames and counts them by length only)."""

    __slots__ = ("pieces", "count")

    def __init__(self, pieces: list, count: int):
        self.pieces, self.count = pieces, count

    def __len__(self) -> int:
        return self.count


def body_bytes(message) -> int:
    """How many body bytes a ``gateway.response.pieces`` message sends (for logs and metrics)."""
    return sum(len(p) if isinstance(p, (bytes, bytearray)) else p[2] for p in message["pieces"])


def _write_all(fd: int, items: list, stop: threading.Event) -> None:
    """Write bytes and file ranges to a non-blocking socket, waiting (bounded) when it is full; close ``fd``."""
    try:
        _write_items(fd, items, stop)
    finally:
        os.close(fd)


def _write_items(fd: int, items: list, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)

    def wait_writable() -> None:
        deadline = time.monotonic() + STALL_SECONDS
        while not poller.poll(250):
            if stop.is_set():
                raise ConnectionAbortedError("the response was cancelled")
            if time.monotonic() > deadline:
                raise SendStalled(f"the client read nothing for {STALL_SECONDS:g} s")

    for item in items:
        if not isinstance(item, (bytes, bytearray)):
            path, offset, left = item
            with open(path, "rb") as f:
                while left:
                    try:
                        n = os.sendfile(fd, f.fileno(), offset, left)
                    except BlockingIOError:
                        wait_writable()
                        continue
                    if not n:
                        raise OSError(f"{os.path.basename(path)} is shorter than its index says")
                    offset += n
                    left -= n
        else:
            view = memoryview(item)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    wait_writable()
                    continue
                view = view[n:]


def _pieces_send(cycle, send):
    """``cycle.send`` that also takes ``gateway.response.pieces`` messages."""

    async def psend(message) -> None:
        if message["type"] != EXTENSION:
            await send(message)
            return
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"{EXTENSION} is only allowed within a started response body")
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        count = body_bytes(message)
        items: list = []
        if count:
            for item in cycle.conn.send_with_data_passthrough(h11.Data(data=_Body(message["pieces"], count))):
                items += item.pieces if isinstance(item, _Body) else [item]
        transport = cycle.transport
        # Bytes the transport still holds (a header that did not fit the socket) go first.
        deadline = time.monotonic() + STALL_SECONDS
        while transport.get_write_buffer_size() and not transport.is_closing():
            if time.monotonic() > deadline:
                transport.close()
            await asyncio.sleep(0.001)
        if transport.is_closing():
            cycle.disconnected = True
            return
        # A duplicate descriptor: the socket stays ours even if the loop closes its own; the
        # worker closes it when it is done (also after a cancel, which ``stop`` tells it).
        fd = os.dup(transport.get_extra_info("socket").fileno())
        stop = threading.Event()
        try:
            await asyncio.to_thread(_write_all, fd, items, stop)
        except (ConnectionError, SendStalled):
            cycle.disconnected = True
            transport.close()
            return
        finally:
            stop.set()
        if not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return psend


class ZeroCopyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with ``gateway.response.pieces`` offered to every HTTP request."""

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        cycle = self.cycle
        # A new request's cycle: its ASGI task is created but has not run yet, so the app sees
        # the extension in its scope and calls the wrapped send.
        if cycle is not None and cycle is not before:
            cycle.scope.setdefault("extensions", {})[EXTENSION] = {}
            cycle.send = _pieces_send(cycle, cycle.send)


def http_protocol():
    """uvicorn's ``http`` setting: ``ZeroCopyH11Protocol`` when every name in ``INTERNALS`` is
    there, else plain ``"h11"`` (correct, slower) and one warning saying what is missing."""
    problems = missing_from(INTERNALS)
    if problems:
        log.warning("WADO-RS sends stored files through buffers instead of sendfile: the installed "
                    "uvicorn/h11 lack %s; install the versions pyproject.toml names", ", ".join(problems))
        return "h11"
    return ZeroCopyH11Protocol
