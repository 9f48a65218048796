"""http.auth: salted hashes, the config's secure-by-default rule, 401/403 from require_scope."""

from __future__ import annotations

import base64
import logging

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from gateway.config import parse
from gateway.errors import ConfigError
from gateway.web import hashing
from gateway.web.app import create_app
from gateway.web.auth import Identity, require_scope

TOKEN = "s3cret-token-for-tests"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hashes():
    return {"token": hashing.hash_secret(TOKEN), "password": hashing.hash_secret(PASSWORD),
            "admin": hashing.hash_secret("admin-token")}


def test_hash_is_salted_and_verifies():
    a, b = hashing.hash_secret("x"), hashing.hash_secret("x")
    assert a != b and a.startswith("scrypt$")
    assert hashing.verify("x", a) and hashing.verify("x", b)
    assert not hashing.verify("y", a)
    assert "plain-secret-value" not in hashing.hash_secret("plain-secret-value")
    assert hashing.check_format(a) == a
    with pytest.raises(ValueError, match="hash-secret"):
        hashing.check_format("plain-secret")
    with pytest.raises(ValueError, match="empty"):
        hashing.hash_secret("")


def test_non_loopback_without_auth_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        parse({"http": {"host": "0.0.0.0"}})
    assert err.value.problems == [
        "http.host: listening on a non-loopback address needs http.auth.tokens or http.auth.users "
        "(make hashes with 'dicom-gateway hash-secret'), got '0.0.0.0'"
    ]
    # loopback without auth, or disabled, is fine
    parse({"http": {"host": "::1"}})
    parse({"http": {"host": "0.0.0.0", "enabled": False}})


def test_config_refuses_a_plain_secret_and_reads_sizes(hashes):
    with pytest.raises(ConfigError) as err:
        parse({"http": {"auth": {"tokens": [{"name": "ai", "hash": "hunter2", "scopes": ["read", "root"]}]}}})
    text = "\n".join(err.value.problems)
    assert "http.auth.tokens[0].hash: must be a hash printed by 'dicom-gateway hash-secret'" in text
    assert "http.auth.tokens[0].scopes[1]: must be one of read, write, admin, got 'root'" in text
    config = parse({"http": {"host": "0.0.0.0", "max_request_bytes": "8 GiB",
                             "auth": {"tokens": [{"name": "ai", "hash": hashes["token"]}]}}})
    assert config.http.max_request_bytes == 8 * 2**30
    with pytest.raises(ConfigError, match=r"http.auth.users\[1\].name: names must be unique"):
        parse({"http": {"auth": {"users": [{"name": "v", "hash": hashes["token"]},
                                           {"name": "v", "hash": hashes["token"]}]}}})


def _client(hashes, **http):
    config = parse({"http": {"auth": {
        "tokens": [{"name": "ai-tool", "hash": hashes["token"], "scopes": ["read", "write"]},
                   {"name": "ops", "hash": hashes["admin"], "scopes": ["admin"]}],
        "users": [{"name": "viewer", "hash": hashes["password"], "scopes": ["read"]}],
    }, **http}})
    app = create_app(config, routers=False)
    router = APIRouter()

    @router.get("/probe/{scope}")
    def probe(scope: str, identity: Identity = Depends(require_scope("read"))):
        return {"who": str(identity)}

    @router.post("/write")
    def write(identity: Identity = Depends(require_scope("write"))):
        return {"who": str(identity)}

    app.include_router(router)
    return TestClient(app)


def test_401_403_and_both_schemes(hashes, caplog):
    client = _client(hashes)
    caplog.set_level(logging.INFO, logger="gateway.http")
    r = client.get("/probe/x")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="dicom-gateway", Basic realm="dicom-gateway", charset="UTF-8"'
    assert "authentication required" in r.json()["detail"]
    r = client.get("/probe/x", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.get("/probe/x", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json() == {"who": "token:ai-tool"}
    r = client.get("/probe/x", headers={"Authorization": "Bearer admin-token"})
    assert r.status_code == 403 and "token:ops lacks the 'read' scope" in r.json()["detail"]
    basic = base64.b64encode(f"viewer:{PASSWORD}".encode()).decode()
    r = client.get("/probe/x", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and r.json() == {"who": "user:viewer"}
    r = client.post("/write", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 403
    bad = base64.b64encode(b"viewer:nope").decode()
    assert client.get("/probe/x", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    assert client.get("/probe/x", headers={"Authorization": "Basic !!!"}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.http"]
    assert any(line.startswith("GET /probe/x 200 token:ai-tool in=0 out=") for line in lines), lines
    assert any(line.startswith("POST /write 403 user:viewer") for line in lines), lines
    assert not any(TOKEN in line or PASSWORD in line or basic in line for line in caplog.text.splitlines())


def test_anonymous_on_loopback_without_credentials():
    app = create_app(parse({}), routers=False)

    @app.get("/w")
    def w(identity: Identity = Depends(require_scope("admin"))):
        return {"who": str(identity)}

    assert TestClient(app).get("/w").json() == {"who": "anonymous"}


def test_request_size_bound(hashes):
    client = _client(hashes, max_request_bytes=1000)
    r = client.post("/write", content=b"x" * 1001, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413
    assert "http.max_request_bytes (1000)" in r.json()["detail"]
