"""The admin API: fuzzed from its own OpenAPI document (schemathesis), scopes, and what each call does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from gateway.config import parse
from gateway.storage import db, index, queue
from gateway.web import hashing
from gateway.web.app import Deps, create_app

ADMIN_TOKEN, READ_TOKEN = "admin-secret-token-1234", "read-secret-token-5678"


def _config(tmp_path: Path, auth: bool = False):
    raw = {"node": {"data_dir": str(tmp_path / "var"), "port": 9},
           "storage": {"min_free_bytes": 0},
           "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 9},
                            "ai": {"ae_title": "AI", "host": "127.0.0.1", "port": 9}}}
    if auth:
        raw["http"] = {"auth": {"tokens": [
            {"name": "ops", "hash": hashing.hash_secret(ADMIN_TOKEN), "scopes": ["read", "admin"]},
            {"name": "viewer", "hash": hashing.hash_secret(READ_TOKEN), "scopes": ["read"]}]}}
    return parse(raw, base_dir=tmp_path)


def _fill(config, n_failed: int = 3) -> None:
    conn = db.connect(config.db_path)
    now = time.time()
    with db.transaction(conn):
        for i in range(n_failed + 2):
            uid = f"1.2.826.0.1.{i + 1}"
            index.record_instance(conn, index.InstanceRecord(
                uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.9", "1.2.826.0.9.1", "1.2.840.10008.1.2.1",
                f"store/{uid}.dcm", 100, "CT", "received", now))
            queue.enqueue(conn, ["pacs", "ai"], uid, now)
        conn.execute("UPDATE queue SET state = 'failed', attempts = 5, last_error = 'cannot connect to PACS' "
                     "WHERE destination = 'pacs' AND id <= ?", (2 * n_failed,))
        conn.execute("INSERT INTO jobs (name, state, first_seen_at, finished_at, error) VALUES "
                     "('liver-1', 'failed', 1, 2, 'the array has 3 frames, the series 60')")
    conn.close()


@pytest.fixture
def api_app(tmp_path):
    config = _config(tmp_path)
    _fill(config)
    return create_app(config, Deps(config))


def test_admin_api_matches_its_openapi_document(api_app):
    """No 500s, and every response (status, content type, body) conforms to the published schema.

    Bounded: 25 generated requests per operation. (schemathesis' pytest plugin does not load
    under this pytest, so each operation's hypothesis strategy is driven here directly.)
    """
    loaded = schemathesis.openapi.from_asgi("/api/openapi.json", api_app)
    # this room's operations (the DICOMweb and job-upload ones have their own tests)
    ops = loaded.include(path_regex=r"^/api/(status|queue|retry|destinations|history|inbox/jobs$)").exclude(
        method="POST", path="/api/inbox/jobs")
    labels = []
    for result in ops.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate()

        check()
    assert len(labels) == 8, labels


def test_openapi_document_lists_the_admin_operations(api_app):
    from fastapi.testclient import TestClient

    doc = TestClient(api_app).get("/api/openapi.json").json()
    paths = doc["paths"]
    for path, method in [("/api/status", "get"), ("/api/queue", "get"), ("/api/queue/{item_id}/retry", "post"),
                         ("/api/destinations/{name}/retry", "post"), ("/api/retry", "post"),
                         ("/api/inbox/jobs", "get"), ("/api/destinations/{name}/echo", "post"),
                         ("/api/history", "get")]:
        assert method in paths[path], (path, method)


def test_scopes_and_what_the_calls_do(tmp_path):
    from fastapi.testclient import TestClient

    config = _config(tmp_path, auth=True)
    _fill(config, n_failed=3)
    client = TestClient(create_app(config, Deps(config)))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    viewer = {"Authorization": f"Bearer {READ_TOKEN}"}

    assert client.get("/api/status").status_code == 401
    assert "Bearer" in client.get("/api/status").headers["www-authenticate"]
    status = client.get("/api/status", headers=viewer).json()
    assert status["destinations"]["pacs"]["failed"] == 3 and status["queue_totals"]["failed"] == 3

    page = client.get("/api/queue", params={"destination": "pacs", "state": "failed", "limit": 2},
                      headers=viewer).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    assert page["items"][0]["last_error"] == "cannot connect to PACS"
    rest = client.get("/api/queue", params={"destination": "pacs", "state": "failed", "limit": 2, "offset": 2},
                      headers=viewer).json()
    assert len(rest["items"]) == 1 and rest["items"][0]["id"] not in {i["id"] for i in page["items"]}
    assert client.get("/api/queue", params={"destination": "nope"}, headers=viewer).status_code == 404

    jobs = client.get("/api/inbox/jobs", params={"state": "failed"}, headers=viewer).json()
    assert jobs["items"][0]["name"] == "liver-1" and "60" in jobs["items"][0]["error"]

    # mutations: read scope is not enough, a cross-site browser request is refused
    item = page["items"][0]["id"]
    assert client.post(f"/api/queue/{item}/retry", headers=viewer).status_code == 403
    r = client.post(f"/api/queue/{item}/retry", headers={**admin, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["detail"]
    r = client.post(f"/api/queue/{item}/retry", headers={**admin, "Origin": "http://testserver"})
    assert r.status_code == 200 and r.json() == {"id": item, "state": "pending"}
    assert client.get("/api/status", headers=viewer).json()["destinations"]["pacs"]["failed"] == 2
    assert client.post("/api/queue/999999/retry", headers=admin).status_code == 404
    sent = client.get("/api/queue", params={"destination": "ai", "limit": 1}, headers=viewer).json()["items"][0]
    conn = db.connect(config.db_path)
    conn.execute("UPDATE queue SET state = 'sent' WHERE id = ?", (sent["id"],))
    conn.close()
    r = client.post(f"/api/queue/{sent['id']}/retry", headers=admin)
    assert r.status_code == 409 and "sent" in r.json()["detail"]

    assert client.post("/api/destinations/pacs/retry", headers=admin).json() == {"retried": 2}
    assert client.post("/api/destinations/nope/retry", headers=admin).status_code == 404
    assert client.post("/api/retry", headers=admin).json() == {"retried": 0}
    assert client.get("/api/status", headers=viewer).json()["queue_totals"]["failed"] == 0

    echo = client.post("/api/destinations/pacs/echo", headers=admin).json()
    assert echo["ok"] is False and "cannot connect to PACS@127.0.0.1:9" in echo["detail"]
    assert client.post("/api/destinations/pacs/echo", headers=viewer).status_code == 403
