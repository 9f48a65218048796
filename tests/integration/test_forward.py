"""Forwarding against real peers: Orthanc (the PACS) and DCMTK storescp.

Most scenarios run `dicom-gateway run` as a subprocess and queue work with
`dicom-gateway send` or a DCMTK storescu "modality"; two call ``Sender.run_once`` directly.
Images are small (64x64) and backoff settings short so the file stays quick.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from gateway import config as config_mod
from gateway.storage import db, queue, sendfiles
from gateway.forward import sender as forward
from tests.conftest import free_port, port_open, stop_process, wait_until
from tests.integration.modes import fast_path, performance  # noqa: F401 (fixture)

SMALL = {"rows": 64, "columns": 64}


def queue_counts(gw, dest: str) -> dict:
    """The queue as the gateway's database has it right now (read-only, like `status`)."""
    conn = db.connect_readonly(Path(gw.config_path).parent / "var" / "gateway.sqlite3")
    if conn is None:
        return {s.value: 0 for s in queue.State}
    try:
        return queue.destination_status(conn, [dest], time.time())[dest]
    finally:
        conn.close()


def status_json(gw) -> dict:
    result = gw.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send(gw, dest: str, *paths) -> None:
    result = gw.cli("send", dest, *paths)
    assert result.returncode == 0, result.stderr


def dest_cfg(aet: str, port: int) -> dict:
    return {"ae_title": aet, "host": "127.0.0.1", "port": port}


def assert_in_orthanc_unchanged(orthanc, paths) -> None:
    """Each file is in Orthanc under the same SOP Instance UID with byte-identical pixel data."""
    for path in paths:
        original = pydicom.dcmread(path)
        orthanc_id = orthanc.find_instance(original.SOPInstanceUID)
        assert orthanc_id is not None, f"{original.SOPInstanceUID} is not in Orthanc"
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        assert stored.PixelData == original.PixelData


def test_received_and_sent_instances_reach_orthanc_unchanged(dcmtk, orthanc, ct_series, gateway_factory, fast_path):
    gw = gateway_factory(
        performance=performance(fast_path),
        destinations={"pacs": dest_cfg(orthanc.aet, orthanc.dicom_port)},
        routes={"received": ["pacs"]},
    )
    received = ct_series(4, **SMALL)
    result = dcmtk.storescu(gw.port, gw.ae_title, *received)
    assert result.returncode == 0, result.stderr
    manual = ct_series(3, **SMALL)
    send(gw, "pacs", manual[0].parent)
    wait_until(lambda: queue_counts(gw, "pacs")["sent"] == 7, 60, 0.2, "7 items sent to Orthanc")
    assert_in_orthanc_unchanged(orthanc, received + manual)
    report = status_json(gw)["destinations"]["pacs"]
    assert (report["sent"], report["failed"], report["pending"], report["sending"]) == (7, 0, 0, 0)
    assert "sent SOP" in gw.log()


def test_orthanc_down_for_30_seconds_costs_a_delay_not_an_image(orthanc, ct_series, gateway_factory):
    # Both fast-path modes at once (one gateway each, the same 30 s outage): twice the cover, once the wait.
    gws = {fast: gateway_factory(
        performance=performance(fast),
        destinations={"pacs": dest_cfg(orthanc.aet, orthanc.dicom_port)},
        retry={"max_attempts": 100, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 4},
    ) for fast in (True, False)}
    orthanc.stop()
    stopped_at = time.monotonic()
    paths = {fast: ct_series(50, **SMALL, seed=10 + fast) for fast in gws}
    for fast, gw in gws.items():
        send(gw, "pacs", paths[fast][0].parent)

    def backing_off(gw):
        d = status_json(gw)["destinations"]["pacs"]
        return d if d["pending"] == 50 and d["last_error"] and d["next_attempt_in_seconds"] is not None else None

    for gw in gws.values():
        shown = wait_until(lambda: backing_off(gw), 30, 0.5, "status to show the backoff")
        assert "cannot connect" in shown["last_error"]
        assert shown["failed"] == 0 and shown["sent"] == 0
    time.sleep(max(0.0, 30 - (time.monotonic() - stopped_at)))
    for gw in gws.values():
        counts = queue_counts(gw, "pacs")
        assert counts["failed"] == 0 and counts["sent"] == 0
    orthanc.start()
    for gw in gws.values():
        wait_until(lambda: queue_counts(gw, "pacs")["sent"] == 50, 60, 0.2, "all 50 sent after the restart")
        assert queue_counts(gw, "pacs")["failed"] == 0
    assert int(orthanc.get("/statistics")["CountInstances"]) == 100
    for fast in gws:
        assert_in_orthanc_unchanged(orthanc, paths[fast][:3])


def test_gateway_killed_during_a_batch_sends_everything_after_restart(orthanc, ct_series, gateway_factory,
                                                                     fast_path):
    gw = gateway_factory(
        destinations={"pacs": dest_cfg(orthanc.aet, orthanc.dicom_port)}, start=False,
        performance=performance(fast_path),
    )
    paths = ct_series(200, rows=128, columns=128)
    send(gw, "pacs", paths[0].parent)  # queued before the gateway runs: one batch of 200
    gw.start()
    wait_until(lambda: int(orthanc.get("/statistics")["CountInstances"]) >= 5, 60, 0.02,
               "the batch to be under way")
    gw.kill()
    left = queue_counts(gw, "pacs")
    assert left["sending"] + left["pending"] > 0, "the batch finished before the kill; make it larger"
    gw.start()
    wait_until(lambda: queue_counts(gw, "pacs")["sent"] == 200, 120, 0.2, "all 200 sent after restart")
    assert "requeued" in gw.log()
    assert int(orthanc.get("/statistics")["CountInstances"]) == 200


def test_sigterm_mid_batch_leaves_nothing_sending(ct_series, storescp, gateway_factory, fast_path):
    port, out, _proc = storescp()
    gw = gateway_factory(destinations={"scp": dest_cfg("STORESCP", port)}, start=False,
                         performance=performance(fast_path))
    paths = ct_series(300, rows=128, columns=128)
    send(gw, "scp", paths[0].parent)
    gw.start()
    wait_until(lambda: out.exists() and len(list(out.iterdir())) >= 5, 60, 0.02, "the batch to be under way")
    assert gw.stop() == 0
    counts = queue_counts(gw, "scp")
    assert counts["sending"] == 0
    assert counts["sent"] + counts["pending"] == 300 and counts["failed"] == 0


def test_closed_port_fails_after_max_attempts_then_retry_sends(ct_series, storescp, gateway_factory, fast_path):
    port = free_port()  # nothing listens here yet
    gw = gateway_factory(
        performance=performance(fast_path),
        destinations={"scp": dest_cfg("STORESCP", port)},
        retry={"max_attempts": 3, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
    )
    paths = ct_series(3, **SMALL)
    send(gw, "scp", *paths)
    wait_until(lambda: queue_counts(gw, "scp")["failed"] == 3, 60, 0.2, "3 items failed")
    report = status_json(gw)["destinations"]["scp"]
    assert "cannot connect" in report["last_error"] and report["sent"] == 0
    assert "for good after 3 attempt(s)" in gw.log()

    _port, out, _proc = storescp(port=port)
    result = gw.cli("retry", "scp")
    assert result.returncode == 0 and "3 failed item(s)" in result.stdout
    wait_until(lambda: queue_counts(gw, "scp")["sent"] == 3, 60, 0.2, "3 items sent after retry")
    received = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert received == {pydicom.dcmread(p).SOPInstanceUID for p in paths}


def test_a_hung_destination_does_not_hold_up_a_live_one(ct_series, storescp, gateway_factory, fast_path):
    # The dead PACS accepts TCP connections and never answers: every attempt waits for the
    # ACSE timeout, the worst case for a sender that would block the others.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        port, out, _proc = storescp()
        gw = gateway_factory(
            performance=performance(fast_path),
            destinations={"live": dest_cfg("STORESCP", port), "dead": dest_cfg("DEAD", hung.getsockname()[1])},
            forward={"poll_interval_seconds": 0.2, "acse_timeout_seconds": 5},
            retry={"max_attempts": 100, "initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
        )
        paths = ct_series(20, **SMALL)
        send(gw, "dead", paths[0].parent)
        time.sleep(1)  # the dead sender is now stuck in its first association attempt
        send(gw, "live", paths[0].parent)
        wait_until(lambda: queue_counts(gw, "live")["sent"] == 20, 30, 0.1, "the live destination to get all 20")
        dead = queue_counts(gw, "dead")
        assert dead["sent"] == 0 and dead["failed"] == 0
        assert len(list(out.iterdir())) == 20
    finally:
        hung.close()


# --------------------------------------------------------------------------- in-process sender


def sender_config(tmp_path: Path, port: int, aet: str = "STORESCP", fast: bool = True,
                  **retry) -> config_mod.Config:
    return config_mod.parse(
        {
            "performance": performance(fast),
            "node": {"ae_title": "GATEWAY", "data_dir": str(tmp_path / "var")},
            "storage": {"min_free_bytes": 0},
            "destinations": {"scp": dest_cfg(aet, port)},
            "retry": {"max_attempts": 3, "initial_backoff_seconds": 0.1, "max_backoff_seconds": 0.2, **retry},
            "forward": {"dimse_timeout_seconds": 10},
        }
    )


def test_refused_transfer_syntax_fails_at_once_with_that_reason(tmp_path, ct_series, storescp, fast_path):
    port, out, _proc = storescp()  # DCMTK storescp accepts uncompressed syntaxes only
    plain = ct_series(1, **SMALL)[0]
    ds = pydicom.dcmread(plain)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    jpeg = tmp_path / "j2k.dcm"
    ds.save_as(jpeg, enforce_file_format=True)

    config = sender_config(tmp_path, port, fast=fast_path)
    report = sendfiles.queue_files(config, "scp", [plain, jpeg])
    assert report.queued == 2 and report.problems == []
    sender = forward.Sender(config, "scp")
    try:
        assert sender.run_once() == 1
    finally:
        sender.close()
    conn = db.connect(config.db_path)
    rows = {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM queue")}
    conn.close()
    refused = rows[ds.SOPInstanceUID]
    assert refused["state"] == "failed" and refused["attempts"] == 1
    assert "refused transfer syntax JPEG 2000" in refused["last_error"]
    assert len(list(out.iterdir())) == 1


def test_explicit_vr_files_are_converted_for_an_implicit_only_peer(tmp_path, dcmtk, ct_series, fast_path):
    port = free_port()
    out = tmp_path / "implicit-out"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk.path("storescp"), "+xi", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=dcmtk.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 15, what="storescp +xi to listen")
        paths = ct_series(3, **SMALL)
        config = sender_config(tmp_path, port, fast=fast_path)
        assert sendfiles.queue_files(config, "scp", paths).queued == 3
        sender = forward.Sender(config, "scp")
        try:
            assert sender.run_once() == 3
        finally:
            sender.close()
        for path in paths:
            original = pydicom.dcmread(path)
            got = pydicom.dcmread(next(out.glob(f"*{original.SOPInstanceUID}*")))
            assert got.PixelData == original.PixelData
    finally:
        stop_process(proc)


def test_send_reports_files_it_cannot_queue(tmp_path, ct_series):
    config = sender_config(tmp_path, free_port())
    good = ct_series(2, **SMALL)
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    report = sendfiles.queue_files(config, "scp", [*good, junk, tmp_path / "missing.dcm"])
    assert report.queued == 2
    assert len(report.problems) == 2
    assert any("not a DICOM Part 10 file" in p for p in report.problems)
    assert any("no such file" in p for p in report.problems)
    conn = db.connect(config.db_path)
    origins = {r["origin"] for r in conn.execute("SELECT origin FROM instances")}
    conn.close()
    assert origins == {"manual"}


def test_peer_abort_mid_batch_reconnects_and_loses_nothing(tmp_path, ct_series, storescp, fast_path):
    """storescp killed and restarted under a batch: the aborted item is retried, none is lost."""
    port, out, proc = storescp()
    paths = ct_series(120, rows=128, columns=128)
    config = sender_config(tmp_path, port, fast=fast_path, max_attempts=20)
    assert sendfiles.queue_files(config, "scp", paths).queued == 120
    sender = forward.Sender(config, "scp")
    try:
        worker = threading.Thread(target=sender.run_once)
        worker.start()
        wait_until(lambda: len(list(out.iterdir())) >= 10, 30, 0.01, "the batch to be under way")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        worker.join(timeout=60)
        assert not worker.is_alive()
        storescp(port=port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sender.run_once()
            conn = db.connect(config.db_path)
            counts = queue.destination_status(conn, ["scp"], time.time())["scp"]
            conn.close()
            if counts["sent"] == 120:
                break
            time.sleep(0.1)
        assert counts["sent"] == 120 and counts["failed"] == 0
    finally:
        sender.close()


@pytest.fixture(autouse=True)
def _quiet_pynetdicom():
    """pynetdicom logs every refused connection at ERROR; the scenarios cause many on purpose."""
    import logging

    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_a_response_that_never_comes_replaces_the_association_and_retries(tmp_path, ct_series, fast_path):
    """A peer that answers one C-STORE too late (a lost response looks the same to us): the
    sender gives up on it after the DIMSE timeout, opens a new association, sends the item
    again and marks it sent only on the second, real response. The peer is pynetdicom's own
    storage SCP whose handler stalls once."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    paths = ct_series(4, **SMALL)
    slow_uid = pydicom.dcmread(paths[1]).SOPInstanceUID
    seen: list[str] = []
    resent = threading.Event()

    def on_store(event):
        uid = event.request.AffectedSOPInstanceUID
        seen.append(uid)
        if uid == slow_uid and seen.count(uid) == 1:
            # Stall past the sender's 1 s DIMSE timeout, until its retry has arrived (bounded).
            resent.wait(10)
        elif uid == slow_uid:
            resent.set()
        return 0x0000

    scp = AE(ae_title="SLOWSCP")
    scp.add_supported_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        config = config_mod.parse(
            {
                "node": {"ae_title": "GATEWAY", "data_dir": str(tmp_path / "var")},
                "storage": {"min_free_bytes": 0},
                "destinations": {"scp": dest_cfg("SLOWSCP", port)},
                "forward": {"dimse_timeout_seconds": 1},
                "performance": performance(fast_path),
            }
        )
        assert sendfiles.queue_files(config, "scp", paths).queued == 4
        sender = forward.Sender(config, "scp")
        try:
            assert sender.run_once() == 4
        finally:
            sender.close()
    finally:
        server.shutdown()
    assert seen.count(slow_uid) == 2
    conn = db.connect(config.db_path)
    states = {r["sop_instance_uid"]: r["state"] for r in conn.execute("SELECT * FROM queue")}
    conn.close()
    assert set(states.values()) == {"sent"}
