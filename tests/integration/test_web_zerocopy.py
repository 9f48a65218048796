"""Zero-copy bodies (web/zerocopy.py) on the real uvicorn server, and the buffered fallback without it."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.config import parse
from gateway.web import zerocopy
from gateway.web.app import Deps
from gateway.web.middleware import LimitsAndLog
from gateway.web.server import HttpServer
from gateway.web.wado import PiecesResponse
from tests.conftest import free_port


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # larger than a socket buffer: sendfile waits
    b.write_bytes(os.urandom(1000))
    return a, b


def _app(files, seen: dict):
    a, b = files
    size_a, size_b = a.stat().st_size, b.stat().st_size
    pieces = [b"head|", (str(a), 0, size_a), b"|mid|", (str(b), 100, 500), b"|tail"]
    expected = b"head|" + a.read_bytes() + b"|mid|" + b.read_bytes()[100:600] + b"|tail"

    async def body(request: Request):
        seen["extension"] = zerocopy.EXTENSION in request.scope.get("extensions", {})
        length = {} if request.query_params.get("chunked") else {"Content-Length": str(len(expected))}
        return PiecesResponse(pieces, length, "application/octet-stream")

    async def short(request: Request):  # the index promises more bytes than the file has
        return PiecesResponse([(str(b), 0, size_b + 50)], {"Content-Length": str(size_b + 50)},
                              "application/octet-stream")

    app = Starlette(routes=[Route("/body", body, methods=["GET", "HEAD"]), Route("/short", short)])
    return LimitsAndLog(app, 1 << 20, 30.0), expected


@pytest.fixture
def server(tmp_path, files):
    config = parse({"node": {"data_dir": "var", "port": free_port()}, "storage": {"min_free_bytes": 0},
                    "http": {"port": free_port()}}, base_dir=tmp_path)
    seen: dict = {}
    app, expected = _app(files, seen)
    srv = HttpServer(config, Deps(config=config), app=app).start()
    yield f"http://127.0.0.1:{srv.port}", expected, seen
    srv.shutdown()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pieces_go_out_byte_identical_with_content_length_chunked_and_head(server, caplog):
    url, expected, seen = server
    with httpx.Client(timeout=30) as client:
        with caplog.at_level("INFO", logger="gateway.http"):
            r = client.get(url + "/body")
        assert seen["extension"] is True  # the real server offers the zero-copy message
        assert r.status_code == 200 and r.headers["content-length"] == str(len(expected))
        assert r.content == expected
        assert any(f"out={len(expected)}" in rec.getMessage() for rec in caplog.records)  # logged bytes
        r = client.get(url + "/body", params={"chunked": "1"})
        assert r.headers.get("transfer-encoding") == "chunked" and r.content == expected
        r = client.head(url + "/body")
        assert r.status_code == 200 and r.content == b""
        assert client.get(url + "/body").content == expected  # the kept-alive connection still works


def test_the_fallback_without_the_extension_sends_the_same_bytes(files):
    seen: dict = {}
    app, expected = _app(files, seen)
    with TestClient(app) as client:
        r = client.get("/body")
    assert seen["extension"] is False
    assert r.status_code == 200 and r.content == expected


def test_a_short_file_aborts_the_response_and_the_server_keeps_serving(server):
    url, expected, _ = server
    with httpx.Client(timeout=30) as client:
        with pytest.raises(httpx.HTTPError):  # fewer bytes than Content-Length: the connection is cut
            client.get(url + "/short")
    assert httpx.get(url + "/body", timeout=30).content == expected


def test_a_client_that_goes_away_mid_body_costs_no_descriptor(server):
    url, expected, _ = server
    host, port = url.removeprefix("http://").split(":")
    httpx.get(url + "/body", timeout=30)  # warm: the first request opens what stays open
    before = _open_fds()
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /body HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    deadline = time.monotonic() + 10
    while _open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds() <= before
    assert httpx.get(url + "/body", timeout=30).content == expected


def test_a_missing_uvicorn_internal_falls_back_to_plain_h11_with_a_warning(tmp_path, files, monkeypatch, caplog):
    from uvicorn.protocols.http import h11_impl

    assert zerocopy.missing_from(zerocopy.INTERNALS) == []  # the pinned uvicorn has every name
    monkeypatch.delattr(h11_impl.H11Protocol, "handle_events")  # as if uvicorn renamed it
    config = parse({"node": {"data_dir": "var", "port": free_port()}, "storage": {"min_free_bytes": 0},
                    "http": {"port": free_port()}}, base_dir=tmp_path)
    seen: dict = {}
    app, expected = _app(files, seen)
    with caplog.at_level("WARNING", logger="gateway.http"):
        problems = zerocopy.missing_from(zerocopy.INTERNALS)
        protocol = zerocopy.http_protocol()
    monkeypatch.undo()  # uvicorn's own h11 protocol needs the method to serve
    assert problems == ["uvicorn.protocols.http.h11_impl.H11Protocol.handle_events (method)"]
    assert protocol == "h11"
    assert any("H11Protocol.handle_events" in r.getMessage() and "buffers" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr("gateway.web.server.http_protocol", lambda: protocol)
    srv = HttpServer(config, Deps(config=config), app=app).start()
    try:
        with httpx.Client(timeout=30) as client:
            r = client.get(f"http://127.0.0.1:{srv.port}/body")
        assert seen["extension"] is False  # plain h11 offers no zero-copy message
        assert r.status_code == 200 and r.content == expected  # the buffered stream, byte-identical
    finally:
        srv.shutdown()
