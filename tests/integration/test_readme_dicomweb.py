"""The README's DICOMweb server examples (token, STOW, QIDO, WADO, jobs, 401), run literally with curl.

The blocks are read from README.md and run as printed, with one substitution: the README's
``127.0.0.1:8080`` becomes a free port (several test runs share this machine). The gateway's
config is the README's ``http`` block with that port and the hash the first block printed
(the Basic user's placeholder hash replaced by a real one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, GatewayProcess, free_port, require_program, wait_until
from tests.integration.web_node import multipart_parts
from gateway.web import hashing


def section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## DICOMweb server", 1)[1].split("\n## ", 1)[0]


def blocks(kind: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{kind}\n(.*?)```", section(), flags=re.S)]


def json_values(text: str) -> list:
    """Several JSON documents printed one after the other."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        value, end = decoder.raw_decode(text, pos)
        out.append(value)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class _Response:
    def __init__(self, content_type: str, content: bytes):
        self.headers = {"content-type": content_type}
        self.content = content


def _multipart_file(path: Path) -> list:
    data = path.read_bytes()
    boundary = data.split(b"\r\n", 1)[0][2:].decode()
    return multipart_parts(_Response(f"multipart/related; boundary={boundary}", data))


def test_readme_dicomweb_examples_run_literally(tmp_path):
    require_program("/usr/bin/curl")
    port = free_port()
    sh_blocks = [b.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for b in blocks("sh")]
    assert sum("127.0.0.1:8080" in b for b in blocks("sh")) >= 4
    assert len(sh_blocks) == 6, sh_blocks
    home = tmp_path / "checkout"
    (home / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "make_ct_series.py", home / "scripts")
    (home / ".venv").symlink_to(Path(sys.prefix))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(block: str) -> str:
        r = subprocess.run(["bash", "-ec", block], cwd=home, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, f"{block}\n{r.stderr}"
        return r.stdout

    # 1. a token and its hash
    digest = sh(sh_blocks[0]).strip()
    token = (home / "ai-tool.token").read_text().strip()
    assert hashing.verify(token, digest) and (home / "ai-tool.token").stat().st_mode & 0o777 == 0o600

    # the README's http block, with the printed hash
    [http_yaml] = [b for b in blocks("yaml") if b.startswith("http:")]
    http = yaml.safe_load(http_yaml)["http"]
    assert http["port"] == 8080
    http["port"] = port
    http["auth"]["tokens"][0]["hash"] = digest
    http["auth"]["users"][0]["hash"] = hashing.hash_secret("viewer password")
    config = {"node": {"ae_title": "GATEWAY", "port": free_port(), "data_dir": "var"},
              "storage": {"min_free_bytes": 0}, "inbox": {"path": "inbox", "poll_interval_seconds": 0.3},
              "http": http}
    (home / "gateway.yaml").write_text(yaml.safe_dump(config))
    gw = GatewayProcess(home / "gateway.yaml")
    gw.start()
    try:
        # 2. STOW-RS
        stow = json.loads(sh(sh_blocks[1]).strip().splitlines()[-1])  # after make_ct_series says what it wrote
        assert len(stow["00081199"]["Value"]) == 3 and "00081198" not in stow
        # 3. QIDO-RS
        studies, series, instances = json_values(sh(sh_blocks[2]))
        assert len(studies) == 1 and studies[0]["00081030"]["Value"] == ["Synthetic CT"]
        assert len(series) == 1 and series[0]["00080060"]["Value"] == ["CT"]
        assert len(instances) == 2
        # 4. WADO-RS
        sh(sh_blocks[3])
        parts = _multipart_file(home / "study.multipart")
        assert sorted(body for _, body in parts) == sorted(p.read_bytes() for p in (home / "web-ct").glob("*.dcm"))
        meta = json.loads((home / "study-metadata.json").read_text())
        assert len(meta) == 3 and all("BulkDataURI" in m["7FE00010"] for m in meta)
        [(headers, frame)] = _multipart_file(home / "frame1.multipart")
        assert len(frame) == 64 * 64 * 2 and headers["content-type"].startswith("application/octet-stream")
        # 5. an AI job over HTTP
        posted, state = json_values(sh(sh_blocks[4]))
        assert posted == {"name": "web-mask-1", "state": "queued"}
        assert state["name"] == "web-mask-1" and state["state"] in ("queued", "waiting", "done")
        done = wait_until(lambda: (lambda s: s if s["state"] in ("done", "failed") else None)(
            json.loads(sh('curl -s -H "Authorization: Bearer $(cat ai-tool.token)" '
                          f"http://127.0.0.1:{port}/api/inbox/jobs/web-mask-1"))), 60, 0.3, "the job")
        assert done["state"] == "done" and done["result"]["sop_class"], done
        # 6. no token: 401
        assert sh(sh_blocks[5]).strip() == "401"
    finally:
        assert gw.stop() == 0
    log = gw.log()
    assert token not in log and "Traceback" not in log
