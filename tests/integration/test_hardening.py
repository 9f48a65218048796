"""Hardening against real DCMTK peers and hostile raw-socket peers: one process per data folder,
private files, logs that cannot be forged, bounded connections and work per message."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from tests.conftest import free_port, wait_until
from tests.integration.modes import fast_path, performance  # noqa: F401 (fixture)


def var(gw) -> Path:
    return gw.config_path.parent / "var"


def inbox(gw) -> Path:
    return gw.config_path.parent / "inbox"


def db_rows(gw, sql: str, args=()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{var(gw) / 'gateway.sqlite3'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def drop_job(folder: Path, name: str, array, sidecar: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", array)
    tmp = folder / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(sidecar))
    os.rename(tmp, folder / f"{name}.yaml")


# --------------------------------------------------------------------------- one process per data folder


def test_second_run_on_the_same_data_dir_exits_2_before_touching_it(dcmtk, gateway_factory):
    gw = gateway_factory()
    # An item the first gateway is "sending" (a destination only it would know): a second run
    # that went ahead would requeue it at start.
    conn = sqlite3.connect(var(gw) / "gateway.sqlite3")
    with conn:
        conn.execute(
            "INSERT INTO queue (destination, sop_instance_uid, state, next_attempt_at, enqueued_at, "
            "updated_at) VALUES ('elsewhere', '1.2.3', 'sending', 0, 0, 0)"
        )
    conn.close()
    second = yaml.safe_load(gw.config_path.read_text())
    second["node"]["port"] = free_port()
    second["node"]["data_dir"] = str(var(gw))
    second_path = gw.config_path.parent / "second.yaml"
    second_path.write_text(yaml.safe_dump(second))

    result = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(second_path)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another 'dicom-gateway run'" in lines[0], lines
    assert f"PID {gw.proc.pid}" in lines[0]
    assert [r["state"] for r in db_rows(gw, "SELECT state FROM queue")] == ["sending"]
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0  # the first one is unharmed


def test_run_reconciles_the_store_before_listening(dcmtk, gateway_factory, ct_series):
    gw = gateway_factory(start=False)
    src = pydicom.dcmread(ct_series(1, 16, 16)[0])
    study, series, sop = str(src.StudyInstanceUID), str(src.SeriesInstanceUID), str(src.SOPInstanceUID)
    folder = var(gw) / "store" / study / series
    folder.mkdir(parents=True)
    src.save_as(folder / f"{sop}.dcm", enforce_file_format=True)  # renamed, never indexed
    (folder / "1.2.3.999.dcm").write_bytes(b"\0" * 200)  # unreadable
    (folder / f".{sop}.dcm.0a1b2c.tmp").write_bytes(b"half")
    (var(gw) / "tmp").mkdir()
    (var(gw) / "tmp" / "rx-1.dcm").write_bytes(b"spooled")
    gw.start()

    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    rows = db_rows(gw, "SELECT origin, size FROM instances WHERE sop_instance_uid = ?", (sop,))
    assert [(r["origin"], r["size"]) for r in rows] == [("manual", (folder / f"{sop}.dcm").stat().st_size)]
    assert sorted(p.name for p in folder.iterdir()) == [f"{sop}.dcm"]
    assert list((var(gw) / "tmp").iterdir()) == []
    quarantined = list((var(gw) / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("1.2.3.999.dcm.")
    assert stat.S_IMODE(quarantined[0].stat().st_mode) == 0o600


# --------------------------------------------------------------------------- data at rest


def test_everything_written_is_private_whatever_the_umask(dcmtk, gateway_factory, ct_series, fast_path):
    old = os.umask(0o022)
    try:
        gw = gateway_factory(performance=performance(fast_path))
    finally:
        os.umask(old)
    files = ct_series(3, 64, 64)
    result = dcmtk.storescu(gw.port, gw.ae_title, *files)
    assert result.returncode == 0, result.stderr
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    drop_job(inbox(gw), "good", np.ones((3, 64, 64), bool), {"source": {"series_instance_uid": series}})
    drop_job(inbox(gw), "bad", np.ones((2, 64, 64), bool), {"source": {"series_instance_uid": series}})
    # result.yaml / error.txt are written first, then the job's files are moved: wait for both
    wait_until(lambda: (inbox(gw) / "done" / "good.npy").exists() and (inbox(gw) / "failed" / "bad.npy").exists()
               and (inbox(gw) / "done" / "good.result.yaml").exists()
               and (inbox(gw) / "failed" / "bad.error.txt").exists(), 60, 0.1, "both jobs to finish")

    written = [var(gw), *var(gw).rglob("*"), inbox(gw) / "done", inbox(gw) / "failed",
               *(inbox(gw) / "done").iterdir(), *(inbox(gw) / "failed").iterdir()]
    kinds = {"dir": 0, "file": 0}
    wrong = []
    for path in written:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            kinds["dir"] += 1
            expected = 0o700
        else:
            kinds["file"] += 1
            expected = 0o600
        if stat.S_IMODE(st.st_mode) != expected:
            wrong.append(f"{path.relative_to(gw.config_path.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    assert wrong == []
    names = {p.name for p in written}
    assert {"gateway.sqlite3", "gateway.sqlite3-wal", "gateway.lock", "good.npy", "bad.error.txt"} <= names
    assert kinds["file"] >= 10 and kinds["dir"] >= 6


# --------------------------------------------------------------------------- logs


def test_wire_values_cannot_forge_log_lines(dcmtk, gateway_factory, tmp_path):
    gw = gateway_factory()
    # DCMTK drops whitespace from UIDs it sends, but not escape sequences: this one would move
    # the cursor up and erase the refusal line on a terminal, leaving a forged one visible.
    forged = "2.25.1\x1b[1A\x1b[2K\x1b[1GreceivedSOP9.9.9"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = forged
    ds.file_meta.MediaStorageSOPInstanceUID = forged
    path = tmp_path / "forged.dcm"
    with pytest.warns(UserWarning):
        ds.save_as(path, enforce_file_format=True)
    result = dcmtk.storescu(gw.port, gw.ae_title, path, calling="MODALITY", extra=("-v",))
    wait_until(lambda: "refused SOP" in gw.log(), 15,
               what=f"the refusal line; storescu said {result.stdout + result.stderr}; log {gw.log()}")
    log = gw.log()
    assert "\x1b" not in log
    refusal = next(line for line in log.splitlines() if "refused SOP" in line)
    assert "refused SOP 2.25.1\\x1b[1A\\x1b[2K\\x1b[1GreceivedSOP9.9.9 from AE MODALITY" in refusal
