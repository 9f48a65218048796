"""Series-complete triggers in a running gateway: DCMTK storescu in, export folder and webhook out."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.conftest import REPO, free_port, stop_process, wait_until
from tests.helpers_series import make_series

STABLE = 1.0  # series_complete.stable_seconds: small, so the suite stays fast
#: For the two-burst test: the pause between bursts plus storescu's start-up (slow on a loaded
#: machine) must stay well below stable_seconds.
BURST_STABLE = 3.0


class Receiver:
    """A small HTTP server standing in for the AI tool's job endpoint; can be down for a while."""

    def __init__(self, port: int):
        self.port = port
        self.calls: list[tuple[dict, dict]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jobs"

    def start(self) -> None:
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                calls.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def receiver():
    r = Receiver(free_port())
    yield r
    r.stop()


def trigger_config(tmp_path: Path, receiver: Receiver | None, stable: float = STABLE, **match) -> dict:
    hook = {"webhook": {"url": receiver.url, "headers": {"X-Tool": "lung-ai"}}} if receiver else {}
    return {
        "series_complete": {"stable_seconds": stable},
        "triggers": [{"name": "lung-ai", "match": match or {"modality": ["CT"]},
                      "export_dir": str(tmp_path / "export"), **hook}],
        "retry": {"max_attempts": 50, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
    }


def manifest(export: Path, series_uid: str) -> dict | None:
    try:
        return yaml.safe_load((export / series_uid / "series.yaml").read_text())
    except FileNotFoundError:
        return None


def sop_order(paths) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def test_bursts_fire_once_late_instance_fires_revision_2_webhook_down_for_a_while(
        tmp_path, dcmtk, gateway_factory, receiver):
    gw = gateway_factory(**trigger_config(tmp_path, receiver, BURST_STABLE))  # receiver down for now
    export = tmp_path / "export"
    # An oblique series whose Instance Numbers and file names do not follow position.
    paths = make_series(tmp_path / "ct", 10, "CT", oblique_degrees=30, shuffle_numbers=True, seed=4)
    mr = make_series(tmp_path / "mr", 3, "MR")
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    sent_order = list(paths[:9])
    random.Random(2).shuffle(sent_order)
    # Two bursts with a pause well under stable_seconds; the MR series matches no trigger.
    dcmtk.storescu(gw.port, gw.ae_title, *sent_order[:5], *mr, calling="CT01").check_returncode()
    time.sleep(0.3)
    dcmtk.storescu(gw.port, gw.ae_title, *sent_order[5:], calling="CT01").check_returncode()
    first = wait_until(lambda: manifest(export, series_uid), 30, 0.05, "revision 1 to be exported")
    assert first["revision"] == 1
    assert first["instance_count"] == 9
    assert first["calling_ae_title"] == "CT01"
    assert first["modality"] == "CT"
    assert first["order"] == "slice_normal"
    # ascending position along the slice normal: the order make_series wrote, not arrival order
    assert first["sop_instance_uids"] == sop_order(paths[:9])
    assert first["files"] == [f"{uid}.dcm" for uid in first["sop_instance_uids"]]
    assert sorted(p.name for p in (export / series_uid).iterdir()) == sorted(first["files"] + ["series.yaml"])
    assert [p.name for p in export.iterdir()] == [series_uid]  # nothing for MR, no temporary folders

    # The webhook receiver is down: the call waits, visible in status.
    def failing():
        report = json.loads(gw.cli("status", "--json").stdout)["triggers"]["lung-ai"]
        return report if report["webhooks"]["last_error"] else None

    report = wait_until(failing, 30, 0.1, "the failed webhook attempt in status")
    assert report["webhooks"]["pending"] == 1 and report["webhooks"]["sent"] == 0
    assert "cannot reach" in report["webhooks"]["last_error"]
    assert report["series_fired"] == 1
    receiver.start()
    wait_until(lambda: receiver.calls, 30, 0.05, "the webhook call once the receiver is up")
    time.sleep(STABLE)  # no second call follows
    assert len(receiver.calls) == 1
    headers, body = receiver.calls[0]
    assert body == {**first, "export_path": str(export / series_uid)}
    assert headers["X-Tool"] == "lung-ai"
    assert headers["Idempotency-Key"] == f"lung-ai/{series_uid}/1"

    # A late instance reopens the series: revision 2 replaces the folder, one more call.
    dcmtk.storescu(gw.port, gw.ae_title, paths[9], calling="CT01").check_returncode()
    second = wait_until(lambda: (m := manifest(export, series_uid)) and m["revision"] == 2 and m,
                        30, 0.05, "revision 2")
    assert second["instance_count"] == 10
    assert second["sop_instance_uids"] == sop_order(paths)
    assert len(list((export / series_uid).glob("*.dcm"))) == 10
    wait_until(lambda: len(receiver.calls) == 2, 30, 0.05, "the revision 2 webhook")
    time.sleep(STABLE)
    assert [body["revision"] for _, body in receiver.calls] == [1, 2]
    report = json.loads(gw.cli("status", "--json").stdout)["triggers"]["lung-ai"]
    assert report["webhooks"]["sent"] == 2 and report["webhooks"]["pending"] == 0
    assert report["webhooks"]["last_error"] is None
    log = gw.log()
    assert f"series {series_uid} complete for trigger lung-ai: revision 2, 10 instance(s)" in log


CRASHING = """
import os, signal, sys, logging
from gateway import cli, config, service
point, path = sys.argv[1], sys.argv[2]
cfg = config.load(path)
cli.setup_logging(cfg.logging.level)
def hook(name):
    if name == point:
        logging.getLogger("test").warning("killing the process at %s", name)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
sys.exit(service.run(cfg, crash_hook=hook))
"""


@pytest.mark.parametrize("point", ["export_linked", "export_renamed"])
def test_sigkill_during_export_leaves_no_half_folder_and_no_duplicate(
        tmp_path, dcmtk, gateway_factory, receiver, point):
    receiver.start()
    gw = gateway_factory(start=False, **trigger_config(tmp_path, receiver))
    export = tmp_path / "export"
    script = tmp_path / "crashing_gateway.py"
    script.write_text(CRASHING)
    log = open(tmp_path / "crash.log", "ab")
    proc = subprocess.Popen([sys.executable, str(script), point, str(gw.config_path)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: "listening as" in (tmp_path / "crash.log").read_text(), 30, 0.05, "the gateway")
        paths = make_series(tmp_path / "ct", 6, "CT", oblique_degrees=10)
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        dcmtk.storescu(gw.port, gw.ae_title, *paths, calling="CT01").check_returncode()
        assert proc.wait(timeout=60) == -9, (tmp_path / "crash.log").read_text()[-2000:]
    finally:
        stop_process(proc)
    visible = [p.name for p in export.iterdir() if not p.name.startswith(".")] if export.exists() else []
    if point == "export_linked":
        assert visible == []  # no half folder: the temporary one is hidden, then swept
    else:
        assert visible == [series_uid]
        assert manifest(export, series_uid)["instance_count"] == 6
    assert receiver.calls == []
    gw.start()  # restart normally
    done = wait_until(lambda: manifest(export, series_uid), 30, 0.05, "the export after restart")
    wait_until(lambda: receiver.calls, 30, 0.05, "the webhook after restart")
    time.sleep(STABLE * 2)
    assert len(receiver.calls) == 1 and receiver.calls[0][1]["revision"] == 1
    assert done["revision"] == 1 and done["instance_count"] == 6
    assert done["sop_instance_uids"] == sop_order(paths)
    assert [p.name for p in export.iterdir()] == [series_uid]  # temporary folders swept
    report = json.loads(gw.cli("status", "--json").stdout)["triggers"]["lung-ai"]
    assert (report["series_fired"], report["series_open"], report["webhooks"]["sent"]) == (1, 0, 1)


def test_the_readme_ai_tool_turns_a_complete_series_into_a_seg_in_the_pacs(
        tmp_path, dcmtk, orthanc, gateway_factory):
    tool_file = REPO / "examples" / "lung_ai_tool.py"
    readme = (REPO / "README.md").read_text()
    assert f"```python\n{tool_file.read_text()}```" in readme  # the README shows this very file
    gw = gateway_factory(
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"results": ["pacs"]},
        **trigger_config(tmp_path, None),
    )
    export, inbox = tmp_path / "export", gw.config_path.parent / "inbox"
    export.mkdir()
    tool = subprocess.Popen([sys.executable, str(tool_file), str(export), str(inbox)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "tool.log", "wb"))
    try:
        paths = make_series(tmp_path / "ct", 6, "CT", oblique_degrees=15, shuffle_numbers=True, size=16)
        shuffled = list(paths)
        random.Random(9).shuffle(shuffled)
        dcmtk.storescu(gw.port, gw.ae_title, *shuffled, calling="CT01").check_returncode()

        def seg_in_pacs():
            found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SEG"}})
            return found or None

        [seg_id] = wait_until(seg_in_pacs, 60, 0.2, "the SEG in the PACS")
    finally:
        stop_process(tool)
    import highdicom as hd
    import io
    import numpy as np

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_id))))
    source = sop_order(paths)  # ascending along the slice normal
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=source, segment_numbers=[1],
                                            assert_missing_frames_are_empty=True)[..., 0].astype(bool)
    expected = np.zeros((6, 16, 16), bool)
    expected[3:] = True  # make_series fills slice k with k: the slices above the mean
    np.testing.assert_array_equal(got, expected)
    assert (inbox / "done").is_dir() and len(list((inbox / "done").glob("*.result.yaml"))) == 1
