"""The dashboard's server-rendered HTML: every section readable without JavaScript, values escaped."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from gateway import metrics
from gateway.config import parse
from gateway.storage import db, index, queue
from gateway.web import hashing
from gateway.web.app import Deps, create_app


def test_every_section_is_rendered_on_the_server(tmp_path):
    config = parse({"node": {"data_dir": str(tmp_path / "var"), "ae_title": "GW-HTML"},
                    "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
                    "triggers": [{"name": "lung-ai", "match": {"modality": ["CT"]}, "export_dir": "export"}]},
                   base_dir=tmp_path)
    conn = db.connect(config.db_path)
    now = time.time()
    with db.transaction(conn):
        index.record_instance(conn, index.InstanceRecord(
            "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9", "1.2.840.10008.1.2.1", "s/1.dcm", 10,
            "CT", "received", now))
        queue.enqueue(conn, ["pacs"], "1.2.3.4", now)
        conn.execute("UPDATE queue SET state = 'failed', last_error = '<script>alert(1)</script> refused'")
        conn.execute("INSERT INTO jobs (name, state, first_seen_at, finished_at, error) VALUES "
                     "('liver-7', 'failed', ?, ?, 'the array has 3 frames, the series 60.')", (now, now))
        conn.execute("INSERT INTO series_triggers (trigger, series_uid, study_uid, state, revision, "
                     "last_arrival_at, fired_at, export_path) VALUES ('lung-ai', '1.2.3.9', '1.2.3', 'fired', 2, ?, ?, "
                     "'/srv/ai/incoming/1.2.3.9')", (now, now))
    conn.close()
    m = metrics.build(config)
    m.received("CT", 100, 0.02)
    m.sent("pacs", 0.1)
    client = TestClient(create_app(config, Deps(config, extras={"metrics": m})))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; refused" in html
    assert 'data-destination="pacs"' in html and '<td class="n failed">1</td>' in html
    assert "liver-7" in html and "the array has 3 frames, the series 60." in html
    assert "lung-ai" in html and "/srv/ai/incoming/1.2.3.9" in html and ">fired<" in html
    assert html.count("<svg") == 2 and "<polyline" in html  # the last hour's charts, drawn on the server
    assert 'action="/api/queue/1/retry"' in html and 'action="/api/destinations/pacs/retry"' in html
    assert "https://" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert client.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/nothing.js").status_code == 404
    assert client.get("/dashboard/fragment").text.startswith('<section id="node">')


def test_retry_buttons_only_for_admins(tmp_path):
    config = parse({"node": {"data_dir": str(tmp_path / "var")},
                    "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
                    "http": {"auth": {"users": [
                        {"name": "viewer", "hash": hashing.hash_secret("look-only-1"), "scopes": ["read"]},
                        {"name": "admin", "hash": hashing.hash_secret("fix-things-1"), "scopes": ["read", "admin"]}]}}},
                   base_dir=tmp_path)
    conn = db.connect(config.db_path)
    with db.transaction(conn):
        index.record_instance(conn, index.InstanceRecord(
            "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9", "1.2.840.10008.1.2.1", "s/1.dcm", 10,
            "CT", "received", time.time()))
        queue.enqueue(conn, ["pacs"], "1.2.3.4", time.time())
        conn.execute("UPDATE queue SET state = 'failed', last_error = 'refused'")
    conn.close()
    client = TestClient(create_app(config, Deps(config)))
    assert client.get("/").status_code == 401
    viewer = client.get("/", auth=("viewer", "look-only-1")).text
    assert "refused" in viewer and "/retry" not in viewer
    admin = client.get("/", auth=("admin", "fix-things-1")).text
    assert 'action="/api/queue/1/retry"' in admin
