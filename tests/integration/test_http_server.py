"""The HTTP server inside ``dicom-gateway run``: serves, logs one line per request, stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys

import httpx
import yaml

from tests.conftest import wait_until


def test_run_serves_http_and_stops_cleanly(gateway_factory):
    gw = gateway_factory()
    port = gw.config["http"]["port"]
    r = httpx.get(f"http://127.0.0.1:{port}/api/openapi.json", timeout=10)
    assert r.status_code == 200 and r.json()["info"]["title"] == "dicom-gateway"
    r = httpx.get(f"http://127.0.0.1:{port}/nowhere", timeout=10)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    wait_until(lambda: "GET /nowhere 404 - in=0 out=" in gw.log(), 10, what="the request log line")
    assert f"HTTP on http://127.0.0.1:{port}" in gw.log()
    assert gw.stop() == 0
    assert "Traceback" not in gw.log()


def test_port_in_use_is_one_sentence(gateway_factory):
    first = gateway_factory()
    second = gateway_factory(start=False, http={"port": first.config["http"]["port"]})
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(second.config_path)],
                          capture_output=True, text=True, timeout=60, cwd=second.config_path.parent)
    assert proc.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{first.config['http']['port']}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hash_secret_and_check_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gateway", "hash-secret"], input="my-token\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest.startswith("scrypt$") and "my-token" not in digest
    from gateway.web.hashing import verify

    assert verify("my-token", digest)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"http": {"host": "0.0.0.0"}}))
    proc = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("http.host: listening on a non-loopback address needs http.auth.tokens")
    path.write_text(yaml.safe_dump({"http": {"host": "0.0.0.0", "auth": {"tokens": [
        {"name": "ai", "hash": digest, "scopes": ["read"]}]}}}))
    proc = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gateway", "hash-secret"], input="",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "the secret is empty" in proc.stderr
