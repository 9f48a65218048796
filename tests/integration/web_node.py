"""An in-process gateway HTTP node for DICOMweb tests: the real app on a real socket, own data_dir."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import Config, parse
from gateway.storage import db
from gateway.web import hashing
from gateway.web.server import HttpServer, deps_for
from tests.conftest import free_port

WRITER_TOKEN = "writer-token-0123456789"
READER_TOKEN = "reader-token-0123456789"
VIEWER = ("viewer", "viewer password")


@dataclass
class WebNode:
    config: Config
    server: HttpServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def db(self):
        return db.connect(self.config.db_path)

    def instance_rows(self) -> list:
        conn = self.db()
        try:
            return conn.execute("SELECT * FROM instances ORDER BY sop_instance_uid").fetchall()
        finally:
            conn.close()


def auth_section(hashes: dict) -> dict:
    return {"tokens": [{"name": "writer", "hash": hashes["writer"], "scopes": ["read", "write"]},
                       {"name": "reader", "hash": hashes["reader"], "scopes": ["read"]}],
            "users": [{"name": VIEWER[0], "hash": hashes["viewer"], "scopes": ["read"]}]}


_HASHES: dict = {}


def hashes() -> dict:
    if not _HASHES:
        _HASHES.update(writer=hashing.hash_secret(WRITER_TOKEN), reader=hashing.hash_secret(READER_TOKEN),
                       viewer=hashing.hash_secret(VIEWER[1]))
    return _HASHES


def bearer(token: str = WRITER_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str = VIEWER[0], password: str = VIEWER[1]) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def web_node(tmp_path):
    """Factory: ``web_node(auth=True, **sections)`` -> a running WebNode; stopped at teardown."""
    started: list[HttpServer] = []

    def start(folder: Path | None = None, auth: bool = True, **sections) -> WebNode:
        folder = folder or tmp_path / f"web{len(started)}"
        folder.mkdir(parents=True, exist_ok=True)
        raw = {"node": {"data_dir": "var", "port": free_port()}, "storage": {"min_free_bytes": 0},
               "http": {"port": free_port(), **({"auth": auth_section(hashes())} if auth else {})}}
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        config = parse(raw, base_dir=folder)
        server = HttpServer(config, deps_for(config)).start()
        started.append(server)
        return WebNode(config, server)

    yield start
    for server in started:
        server.shutdown()


def multipart_parts(response) -> list[tuple[dict, bytes]]:
    """The parts of a multipart/related response as (headers, body), parsed by the stdlib."""
    from email import policy
    from email.parser import BytesParser

    raw = b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content
    msg = BytesParser(policy=policy.HTTP).parsebytes(raw)
    assert msg.is_multipart(), response.headers["content-type"]
    return [({k.lower(): v for k, v in part.items()}, part.get_payload(decode=True)) for part in msg.iter_parts()]
