"""/metrics, /healthz and /readyz on a running gateway (and the scope rules in-process)."""

from __future__ import annotations

import json

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.config import parse
from gateway.web import hashing
from gateway.web.app import Deps, create_app
from tests.conftest import free_port, wait_until


def _scrape(url: str) -> dict[tuple, float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_running_gateway_exposes_metrics_and_is_ready(gateway_factory, dcmtk, ct_series):
    pacs_port = free_port()  # down: items stay pending
    gw = gateway_factory(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
                         routes={"received": ["pacs"]},
                         retry={"max_attempts": 100, "initial_backoff_seconds": 60, "max_backoff_seconds": 60},
                         security={"allowed_calling_aets": ["MODALITY"]})
    assert httpx.get(gw.http_url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(gw.http_url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and ready.json()["failed"] == []
    assert set(ready.json()["checks"]) == {"database", "free_space", "dicom_listener"}

    files = ct_series(4, rows=64, columns=64)
    assert dcmtk.storescu(gw.port, gw.ae_title, *files, calling="MODALITY").returncode == 0
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling="INTRUDER").returncode != 0
    wait_until(lambda: _scrape(gw.http_url).get(
        ("dicom_gateway_queue_items", (("destination", "pacs"), ("state", "pending")))) == 4, 30)
    s = _scrape(gw.http_url)
    exposed = {name for name, _ in s}
    # every metric the dashboards and alerts rely on is served by the running gateway
    for name in ("dicom_gateway_build_info", "dicom_gateway_queue_items",
                 "dicom_gateway_queue_oldest_pending_age_seconds", "dicom_gateway_free_disk_bytes",
                 "dicom_gateway_min_free_bytes", "dicom_gateway_database_up",
                 "dicom_gateway_store_duration_seconds_bucket", "dicom_gateway_http_requests_total",
                 "dicom_gateway_instances_sent_total", "dicom_gateway_send_retries_total"):
        assert name in exposed, name
    assert s[("dicom_gateway_queue_oldest_pending_age_seconds", (("destination", "pacs"),))] >= 0
    assert s[("dicom_gateway_http_requests_total", (("endpoint", "/readyz"), ("status", "200")))] == 1
    assert s[("dicom_gateway_instances_received_total", (("calling_ae", "MODALITY"),))] == 4
    assert s[("dicom_gateway_store_duration_seconds_count", ())] == 4
    assert s[("dicom_gateway_cstore_responses_total", (("status", "0x0000"),))] == 4
    assert s[("dicom_gateway_associations_total", (("reason", "calling_ae_not_allowed"),
                                                   ("result", "rejected")))] == 1
    hist = httpx.get(gw.http_url + "/api/history", timeout=10).json()
    assert sum(m["received"] for m in hist) == 4 and hist[-1]["store_seconds_avg"] is not None
    # /api/status is the same object as `status --json` (ages differ by the moments they were read)
    cli = json.loads(gw.cli("status", "--json").stdout)
    api = httpx.get(gw.http_url + "/api/status", timeout=10).json()
    assert set(api) == set(cli) and api["store"] == cli["store"] and api["queue_totals"] == cli["queue_totals"]
    assert set(api["destinations"]["pacs"]) == set(cli["destinations"]["pacs"])
    assert api["destinations"]["pacs"]["pending"] == cli["destinations"]["pacs"]["pending"] == 4


def test_readyz_names_the_failing_check(gateway_factory):
    gw = gateway_factory(storage={"min_free_bytes": 2**60})  # more than any disk has
    r = httpx.get(gw.http_url + "/readyz", timeout=10)
    assert r.status_code == 503
    body = r.json()
    assert body["failed"] == ["free_space"] and body["status"] == "not ready"
    assert "below storage.min_free_bytes" in body["detail"] and body["detail"].startswith("free_space: ")
    assert body["checks"]["database"] == {"ok": True}


def test_readyz_when_the_listener_is_gone(tmp_path):
    """Without a DICOM listener (nothing on node.port) the check fails by name."""
    port = free_port()
    config = parse({"node": {"data_dir": str(tmp_path / "var"), "port": port},
                    "storage": {"min_free_bytes": 0}}, base_dir=tmp_path)
    client = TestClient(create_app(config, Deps(config)))
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["failed"] == ["dicom_listener"]
    assert f"nothing accepts on 127.0.0.1:{port}" in r.json()["detail"]


def test_metrics_needs_read_scope_unless_from_loopback(tmp_path):
    config = parse({"node": {"data_dir": str(tmp_path / "var")},
                    "http": {"auth": {"tokens": [{"name": "prom", "hash": hashing.hash_secret("scrape-token-1"),
                                                  "scopes": ["read"]}]}}}, base_dir=tmp_path)
    m = metrics.build(config)
    app = create_app(config, Deps(config, extras={"metrics": m}))
    remote = TestClient(app)  # its client address is not loopback
    r = remote.get("/metrics")
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    r = remote.get("/metrics", headers={"Authorization": "Bearer scrape-token-1"})
    assert r.status_code == 200 and "dicom_gateway_queue_items" in r.text
    local = TestClient(app, client=("127.0.0.1", 50000))
    assert local.get("/metrics").status_code == 200
    assert remote.get("/healthz").status_code == 200  # probes are open
