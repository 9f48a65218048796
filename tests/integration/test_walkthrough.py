"""The README walkthrough, run block by block as a new user would type it.

The blocks are read from README.md, so the README cannot drift from what works. The
walkthrough uses the default config and Orthanc's Debian defaults, so this test needs the
ports 11112, 8080 (its HTTP server), 4242 and 8042 free. One substitution: instead of ``Orthanc /etc/orthanc/``
(which would write into the machine's /var/lib/orthanc) the test starts Orthanc with the
same AE title and ports but a temporary storage folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_orthanc, port_open, require_program, stop_process, wait_until

PORTS = {"gateway": 11112, "gateway HTTP": 8080, "Orthanc DICOM": 4242, "Orthanc HTTP": 8042}


def walkthrough_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]


def sh(block: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-ec", block], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_readme_walkthrough_works_as_printed(tmp_path):
    blocks = walkthrough_blocks()
    assert len(blocks) == 6, blocks
    for name, port in PORTS.items():
        if port_open(port):
            pytest.fail(f"port {port} ({name}) is in use; the walkthrough needs it free")
    require_program("/usr/bin/curl")

    # A fresh checkout's layout: the default config, the scripts, and .venv (this test's Python).
    home = tmp_path / "checkout"
    (home / "config").mkdir(parents=True)
    (home / "scripts").mkdir()
    shutil.copy(REPO / "config" / "gateway.yaml", home / "config" / "gateway.yaml")
    shutil.copy(REPO / "scripts" / "make_ct_series.py", home / "scripts" / "make_ct_series.py")
    (home / ".venv").symlink_to(Path(sys.prefix))
    assert (home / ".venv" / "bin" / "dicom-gateway").exists()

    # 1. The PACS (see the module docstring for the one substitution).
    assert blocks[0] == "Orthanc /etc/orthanc/ &"
    orthanc = make_orthanc(tmp_path / "orthanc", aet="ORTHANC")
    orthanc.dicom_port, orthanc.http_port = 4242, 8042
    config = json.loads(orthanc.config_path.read_text())
    config.update(DicomPort=4242, HttpPort=8042)
    orthanc.config_path.write_text(json.dumps(config))
    orthanc.start()
    gateway = None
    try:
        # 2. The gateway, in the background, then C-ECHO to the PACS.
        assert blocks[1].endswith(" &")
        log = open(tmp_path / "gateway.log", "wb")
        gateway = subprocess.Popen(["bash", "-c", "exec " + blocks[1][:-2]], cwd=home,
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: port_open(11112) or gateway.poll() is not None, 30, what="the gateway")
        assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
        echo = sh(blocks[2], home)
        assert echo.returncode == 0, echo.stderr
        assert "C-ECHO orthanc: Success" in echo.stdout

        # 3. The modality sends 60 slices.
        sent = sh(blocks[3], home)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(list((home / "demo-ct").glob("*.dcm"))) == 60

        # 4. The AI tool drops a mask.
        drop = sh(blocks[4], home)
        assert drop.returncode == 0, drop.stderr

        # 5. It arrives: wait (bounded) for the gateway to report it sent, then run the block.
        def sent_one():
            out = subprocess.run([str(home / ".venv/bin/dicom-gateway"), "status", "--json"], cwd=home,
                                 capture_output=True, text=True, timeout=60)
            return out.returncode == 0 and json.loads(out.stdout)["destinations"]["orthanc"]["sent"] == 1

        wait_until(sent_one, 120, 0.5, "the derived SEG to be sent to Orthanc")
        watch = sh(blocks[5], home)
        assert watch.returncode == 0, watch.stderr
        assert "dest orthanc: 0 pending, 0 sending, 1 sent, 0 failed" in watch.stdout
        assert " 61 instances (1 derived)" in watch.stdout  # 60 received + 1 derived
        assert "sop_class: Segmentation Storage" in watch.stdout or "1.2.840.10008.5.1.4.1.1.66.4" in watch.stdout
        found = json.loads(watch.stdout[watch.stdout.index("\n[") + 1:])
        assert len(found) == 1 and found[0]["MainDicomTags"]["Modality"] == "SEG"
    finally:
        if gateway is not None and gateway.poll() is None:
            os.kill(gateway.pid, signal.SIGTERM)
            code = gateway.wait(timeout=15)
            assert code == 0, (tmp_path / "gateway.log").read_text()[-2000:]
        elif gateway is not None:
            stop_process(gateway)
        orthanc.stop()
