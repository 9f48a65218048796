"""The README's Operations curl examples, run literally against a running gateway (only the port differs)."""

from __future__ import annotations

import json
import os
import re
import subprocess

from gateway.web import hashing
from tests.conftest import REPO, free_port, require_program, wait_until

TOKEN = "ops-token-for-the-readme-test"


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def _curl_blocks(title: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", _section(title), re.S)
    return [b for b in blocks if b.lstrip().startswith("curl ")]


def _run(block: str, port: int) -> list[str]:
    """Each line of the block as a command; its stdout."""
    require_program("/usr/bin/curl")
    out = []
    for line in block.strip().splitlines():
        cmd = line.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "TOKEN": TOKEN})
        assert result.returncode == 0, (cmd, result.stderr)
        out.append(result.stdout)
    return out


def test_readme_operations_curl_examples(gateway_factory, dcmtk, ct_series):
    gw = gateway_factory(
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        routes={"received": ["pacs"]},
        retry={"max_attempts": 1, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
        http={"port": free_port(), "auth": {"tokens": [
            {"name": "ops", "hash": hashing.hash_secret(TOKEN), "scopes": ["read", "admin"]}]}},
    )
    port = gw.config["http"]["port"]
    files = ct_series(2, rows=32, columns=32)
    assert dcmtk.storescu(gw.port, gw.ae_title, *files, calling="MODALITY").returncode == 0
    wait_until(lambda: json.loads(gw.cli("status", "--json").stdout)["destinations"]["pacs"]["failed"] == 2,
               60, 0.3, "both items failed (the PACS is down)")

    (health,) = _curl_blocks("Health checks")
    (ready,) = _run(health, port)
    assert json.loads(ready) == {"status": "ready", "failed": [], "checks": {
        "database": {"ok": True}, "free_space": {"ok": True}, "dicom_listener": {"ok": True}}}

    (admin,) = _curl_blocks("Admin API")
    queue_page, retried = _run(admin, port)
    page = json.loads(queue_page)
    assert page["total"] == 2 and all("cannot connect to PACS" in i["last_error"] for i in page["items"])
    assert json.loads(retried) == {"retried": 2}
