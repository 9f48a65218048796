"""The AI result inbox against real programs: dciodvfy, highdicom, Orthanc, the gateway process.

Source series are indexed directly into the gateway's store and database (as the receive
step would), so these tests exercise the inbox alone; the end-to-end test covers storescu.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.pixels import apply_modality_lut

from gateway import config as config_mod
from gateway.storage import db, files, index
from gateway.derive import derive
from gateway import status
from gateway.inbox.inbox import CHECKPOINTS, Inbox
from tests.conftest import REPO, gateway_config, port_open, wait_until

N, R, C = 8, 64, 64


# --------------------------------------------------------------------------- helpers


def load_config(folder: Path, **sections) -> config_mod.Config:
    folder.mkdir(parents=True, exist_ok=True)
    return config_mod.load(gateway_config(folder, **sections))


def index_sources(config: config_mod.Config, paths) -> None:
    """Put files into the store and index exactly as the receive step does."""
    conn = db.connect(config.db_path)
    try:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            dest = files.instance_path(config.store_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                       ds.SOPInstanceUID)
            data = Path(path).read_bytes()
            size = files.write_atomic(dest, lambda f, data=data: f.write(data))
            with db.transaction(conn):
                index.record_instance(conn, index.InstanceRecord(
                    sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    path=str(dest.relative_to(config.node.data_dir)), size=size,
                    calling_ae="TEST", origin="received", received_at=time.time(),
                ))
    finally:
        conn.close()


def drop_job(inbox: Path, name: str, array, sidecar, *, npz: bool = False) -> None:
    """Write like an AI tool should: the array first, the sidecar last by rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    if array is not None:
        if npz:
            np.savez(inbox / f"{name}.npz", mask=array)
        else:
            np.save(inbox / f"{name}.npy", array)
    text = sidecar if isinstance(sidecar, str) else yaml.safe_dump(sidecar)
    tmp = inbox / f".{name}.yaml.tmp"
    tmp.write_text(text)
    os.rename(tmp, inbox / f"{name}.yaml")


def derived_rows(config: config_mod.Config, job: str | None = None) -> list[sqlite3.Row]:
    conn = db.connect(config.db_path)
    try:
        sql = "SELECT * FROM instances WHERE origin = 'derived'"
        args: tuple = ()
        if job is not None:
            sql += " AND job = ?"
            args = (job,)
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def error_text(inbox: Path, name: str) -> str:
    return (inbox / "failed" / f"{name}.error.txt").read_text()


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def series(ct_series):
    paths = ct_series(N, R, C, shuffle_instance_numbers=True, seed=5)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return paths, sources


# --------------------------------------------------------------------------- every kind


def test_every_kind_is_valid_reads_back_and_orthanc_accepts_it(tmp_path, series, dciodvfy, orthanc):
    paths, sources = series
    config = load_config(
        tmp_path / "gw",
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"results": ["pacs"]},
    )
    index_sources(config, paths)
    series_uid = str(sources[0].SeriesInstanceUID)
    src = {"series_instance_uid": series_uid}
    rng = np.random.default_rng(11)
    mask = np.zeros((N, R, C), bool)
    mask[2:6, 10:40, 20:50] = rng.random((4, 30, 30)) > 0.4
    labels = np.zeros((N, R, C), np.uint8)
    labels[1:7, 5:25, 5:25] = 1
    labels[1:7, 30:50, 5:25] = 2
    labels[3:5, 30:60, 30:60] = 3
    word = rng.integers(0, 4096, (N, R, C), dtype=np.uint16)
    signed_labels = np.zeros((N, R, C), np.int16)
    signed_labels[0:4, 8:16, 8:16] = 1
    signed_labels[4:8, 40:60, 40:60] = 2
    signed = rng.integers(-1024, 3072, (N, R, C)).astype(np.int16)
    rgb = rng.integers(0, 256, (N, R, C, 3), dtype=np.uint8)
    single = rng.integers(0, 256, (R, C), dtype=np.uint8)
    jobs = {
        "mask": (mask, {"source": src, "segments": [{"label": "lesion", "algorithm_name": "lesion-net"}]}),
        "labels": (labels, {"source": src, "segments": [
            {"label": "liver", "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}},
            {"label": "spleen"}, {"label": "kidney"}]}),
        "word": (word, {"source": src, "bits_stored": 12, "series_description": "heat map"}),
        "signed_labels": (signed_labels, {"source": src, "segments": [{"label": "a"}, {"label": "b"}]}),
        "signed": (signed, {"source": src, "kind": "secondary_capture"}),
        "rgb": (rgb, {"source": src}),
        "single": (single, {"source": {"study_instance_uid": str(sources[0].StudyInstanceUID)}}),
        "bits": (mask, {"source": src, "kind": "secondary_capture"}),
        "bytes": (labels * 60, {"source": src}),
    }
    inbox_dir = config.inbox.path
    for name, (arr, spec) in jobs.items():
        drop_job(inbox_dir, name, arr, spec, npz=name == "labels")

    queued: list = []
    inbox = Inbox(config, on_queued=queued.append)
    try:
        assert inbox.run_once() == len(jobs)
        assert inbox.run_once() == 0  # nothing left: each job ran once
    finally:
        inbox.close()
    assert queued == [("pacs",)] * len(jobs)
    assert sorted(p.name for p in inbox_dir.iterdir() if p.is_file()) == []
    assert not list((inbox_dir / "failed").iterdir())

    ascending = [s.SOPInstanceUID for s in sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))]
    expected_class = {
        "mask": derive.SEGMENTATION_STORAGE, "labels": derive.SEGMENTATION_STORAGE,
        "signed_labels": derive.SEGMENTATION_STORAGE, "word": derive.MF_GRAYSCALE_WORD_SC,
        "signed": derive.MF_GRAYSCALE_WORD_SC, "rgb": derive.MF_TRUE_COLOR_SC,
        "single": derive.SECONDARY_CAPTURE, "bits": derive.MF_SINGLE_BIT_SC,
        "bytes": derive.MF_GRAYSCALE_BYTE_SC,
    }
    for name, (arr, _spec) in jobs.items():
        rows = derived_rows(config, name)
        assert len(rows) == 1, name
        row = rows[0]
        result = yaml.safe_load((inbox_dir / "done" / f"{name}.result.yaml").read_text())
        assert result["sop_instance_uid"] == row["sop_instance_uid"]
        assert result["series_instance_uid"] == row["series_uid"] != series_uid
        assert (inbox_dir / "done" / f"{name}.yaml").exists()
        path = config.node.data_dir / row["path"]
        assert dciodvfy(path) == [], name
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == expected_class[name], name
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == sources[0].PatientID
        if ds.SOPClassUID == derive.SEGMENTATION_STORAGE:
            seg = hd.seg.segread(path)
            numbers = [s.SegmentNumber for s in ds.SegmentSequence]
            got = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=ascending, segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
            if arr.dtype == bool:
                np.testing.assert_array_equal(got[..., 0].astype(bool), arr)
            else:
                for k in numbers:
                    np.testing.assert_array_equal(got[..., k - 1].astype(bool), arr == k, err_msg=name)
        elif name == "signed":
            np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), arr)
        else:
            np.testing.assert_array_equal(ds.pixel_array, arr, err_msg=name)
        answer = orthanc.post("/instances", path.read_bytes())
        assert answer["Status"] == "Success", (name, answer)
        assert orthanc.find_instance(row["sop_instance_uid"]) is not None

    # Each derived object is queued for the results route, and status counts the jobs.
    conn = db.connect(config.db_path)
    try:
        pending = conn.execute(
            "SELECT COUNT(*) FROM queue WHERE destination = 'pacs' AND state = 'pending'"
        ).fetchone()[0]
    finally:
        conn.close()
    assert pending == len(jobs)
    report = status.collect(config, time.time())
    assert report["inbox"] == {"waiting": 0, "done": len(jobs), "failed": 0, "recent_failures": []}
    assert report["store"]["derived"] == len(jobs)


# --------------------------------------------------------------------------- bad jobs


def test_bad_jobs_fail_with_one_sentence_and_good_jobs_still_succeed(tmp_path, series):
    paths, sources = series
    config = load_config(tmp_path / "gw", inbox={"source_wait_seconds": 60})
    index_sources(config, paths)
    inbox_dir = config.inbox.path
    src = {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    good = np.zeros((N, R, C), bool)
    good[3, 10:20, 10:20] = True
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, good)

    drop_job(inbox_dir, "good_before", good, {"source": src})
    bad = {
        "shape": (np.zeros((N, 32, 32), bool), {"source": src}, "does not match"),
        "too_few_frames": (np.zeros((N - 2, R, C), bool), {"source": src}, "does not match"),
        "float": (np.zeros((N, R, C), np.float32), {"source": src}, "floating point"),
        "complex": (np.zeros((N, R, C), np.complex64), {"source": src}, "not supported"),
        "bits": (np.full((N, R, C), 5000, np.uint16), {"source": src, "bits_stored": 12}, "bits_stored 12"),
        "label_too_big": (np.full((N, R, C), 4, np.uint8), {"source": src, "segments": [{"label": "a"}]},
                          "1 segment(s)"),
        "not_mapping": (good, "- just\n- a list\n", "mapping"),
        "huge_sidecar": (good, f"source: {{series_instance_uid: '{src['series_instance_uid']}'}}\n#{'x' * 70000}\n",
                         "64 KiB"),
        "unknown_key": (good, {"source": src, "colour": "red"}, "'colour' is not known"),
        "bad_yaml": (good, "source: [unclosed\n", "not valid YAML"),
        "no_uid": (good, {"source": {"series_instance_uid": "1.2.x"}}, "DICOM UID"),
    }
    for name, (arr, spec, _) in bad.items():
        drop_job(inbox_dir, name, arr, spec)
    # Files that are not what they claim.
    (inbox_dir / "corrupt.npy").write_bytes(b"\x93NUMPY garbage that is not an array header")
    drop_job(inbox_dir, "corrupt", None, {"source": src})
    np.save(inbox_dir / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    drop_job(inbox_dir, "pickled", None, {"source": src})
    np.save(inbox_dir / "truncated.npy", good)
    data = (inbox_dir / "truncated.npy").read_bytes()
    (inbox_dir / "truncated.npy").write_bytes(data[:-100])
    drop_job(inbox_dir, "truncated", None, {"source": src})
    with open(inbox_dir / "absurd.npy", "wb") as f:  # a header promising 1 TB must not be allocated
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|b1", "fortran_order": False, "shape": (100_000, 100_000, 100)})
        f.write(bytes(100))
    drop_job(inbox_dir, "absurd", None, {"source": src})
    np.savez(inbox_dir / "two_arrays.npz", a=good, b=good)
    drop_job(inbox_dir, "two_arrays", None, {"source": src})
    (inbox_dir / "corrupt_zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    drop_job(inbox_dir, "corrupt_zip", None, {"source": src})
    os.symlink(outside, inbox_dir / "escape.npy")
    drop_job(inbox_dir, "escape", None, {"source": src})
    os.symlink(inbox_dir / "nowhere.npy", inbox_dir / "dangling.npy")
    drop_job(inbox_dir, "dangling", None, {"source": src})
    (inbox_dir / "folder.npy").mkdir()
    drop_job(inbox_dir, "folder", None, {"source": src})
    drop_job(inbox_dir, "no_array", None, {"source": src})
    np.save(inbox_dir / "both.npy", good)
    np.savez(inbox_dir / "both.npz", good)
    drop_job(inbox_dir, "both", None, {"source": src})
    unknown = {"series_instance_uid": "1.2.826.0.1.3680043.8.498.424242"}
    drop_job(inbox_dir, "unknown_source", good, {"source": unknown})
    drop_job(inbox_dir, "more_frames", np.zeros((N + 2, R, C), bool), {"source": src})
    # Not jobs at all: an array still waiting for its sidecar, hidden and partial files.
    np.save(inbox_dir / "no_sidecar_yet.npy", good)
    (inbox_dir / ".hidden.yaml").write_text("x")
    (inbox_dir / "partial.yaml.part").write_text("x")
    (inbox_dir / "writing.yaml.tmp").write_text("x")
    drop_job(inbox_dir, "good_after", good, {"source": src})

    clock = Clock()
    inbox = Inbox(config, clock=clock)
    try:
        inbox.run_once()
        failed = {p.name[: -len(".error.txt")] for p in (inbox_dir / "failed").glob("*.error.txt")}
        expected = {
            **{name: words for name, (_, _, words) in bad.items()},
            "corrupt": "not a readable NumPy", "pickled": "pickle", "two_arrays": "exactly one",
            "truncated": "is truncated", "absurd": "promises 1000000000000 bytes",
            "corrupt_zip": "not a readable NumPy", "escape": "outside the inbox",
            "dangling": "cannot read", "folder": "cannot read", "no_array": "write the array first",
            "both": "keep only one",
        }
        assert failed == set(expected)
        for name, words in expected.items():
            text = error_text(inbox_dir, name)
            assert words in text, (name, text)
            assert text.count("\n") == 1 and text.rstrip().endswith("."), text
            assert not (inbox_dir / f"{name}.yaml").exists()
        # The waiting ones are still in the inbox, the good ones are done.
        assert (inbox_dir / "unknown_source.yaml").exists() and (inbox_dir / "more_frames.yaml").exists()
        for name in ("good_before", "good_after"):
            assert (inbox_dir / "done" / f"{name}.result.yaml").exists()
            assert len(derived_rows(config, name)) == 1
        assert (inbox_dir / "no_sidecar_yet.npy").exists()
        assert (inbox_dir / ".hidden.yaml").exists() and (inbox_dir / "writing.yaml.tmp").exists()
        assert status.collect(config, clock.now)["inbox"]["waiting"] == 2

        # After inbox.source_wait_seconds the waiting jobs give up, naming the series.
        clock.now += 61
        assert inbox.run_once() == 2
    finally:
        inbox.close()
    text = error_text(inbox_dir, "unknown_source")
    assert unknown["series_instance_uid"] in text and "60 seconds" in text
    assert "does not match" in error_text(inbox_dir, "more_frames")
    assert len(derived_rows(config)) == 2
    assert (inbox_dir / "no_sidecar_yet.npy").exists()


def test_a_job_waits_for_its_source_series_then_succeeds(tmp_path, series):
    paths, sources = series
    config = load_config(tmp_path / "gw")
    mask = np.ones((N, R, C), bool)
    drop_job(config.inbox.path, "early", mask, {"source": {"series_instance_uid": str(sources[0].SeriesInstanceUID)}})
    inbox = Inbox(config)
    try:
        assert inbox.run_once() == 0
        index_sources(config, paths[: N // 2])  # the series is still arriving
        assert inbox.run_once() == 0
        assert (config.inbox.path / "early.yaml").exists()
        index_sources(config, paths[N // 2:])
        assert inbox.run_once() == 1
    finally:
        inbox.close()
    assert len(derived_rows(config, "early")) == 1
    assert (config.inbox.path / "done" / "early.result.yaml").exists()


def redrop_later(inbox: Path, name: str, array, sidecar) -> None:
    """Drop a job again with files clearly newer than anything before (coarse mtime clocks)."""
    drop_job(inbox, name, array, sidecar)
    later = time.time() + 5
    for path in inbox.glob(f"{name}.*"):
        os.utime(path, (later, later))


def test_a_fixed_job_can_be_dropped_again_under_the_same_name(tmp_path, series):
    paths, sources = series
    config = load_config(tmp_path / "gw")
    index_sources(config, paths)
    src = {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    inbox_dir = config.inbox.path
    inbox = Inbox(config)
    try:
        drop_job(inbox_dir, "retry", np.zeros((N, R, C), np.float64), {"source": src})
        assert inbox.run_once() == 1
        assert "floating point" in error_text(inbox_dir, "retry")
        redrop_later(inbox_dir, "retry", np.ones((N, R, C), bool), {"source": src})
        assert inbox.run_once() == 1
        assert len(derived_rows(config, "retry")) == 1
        # A done name used again is refused, and the done record stays.
        redrop_later(inbox_dir, "retry", np.ones((N, R, C), bool), {"source": src})
        assert inbox.run_once() == 1
        assert "already done" in error_text(inbox_dir, "retry")
        assert len(derived_rows(config, "retry")) == 1
    finally:
        inbox.close()


def test_a_waiting_job_taken_away_is_forgotten(tmp_path, series):
    _, sources = series
    config = load_config(tmp_path / "gw")
    src = {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    drop_job(config.inbox.path, "later", np.ones((N, R, C), bool), {"source": src})
    inbox = Inbox(config)
    try:
        inbox.run_once()
        assert status.collect(config, time.time())["inbox"]["waiting"] == 1
        for path in config.inbox.path.glob("later.*"):
            path.unlink()
        inbox.run_once()
        assert status.collect(config, time.time())["inbox"] == {"waiting": 0, "done": 0, "failed": 0, "recent_failures": []}
    finally:
        inbox.close()


# --------------------------------------------------------------------------- crashes


def start_crashing(gw, point: str) -> subprocess.Popen:
    """``run`` with an inbox crash hook (a callable handed to service.run) that SIGKILLs it at ``point``."""
    log = open(gw.config_path.parent / "gateway.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.crashing_run", str(gw.config_path), point],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    log.close()
    gw.log_path = gw.config_path.parent / "gateway.log"
    return proc


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_sigkill_at_any_point_yields_exactly_one_object(tmp_path, series, gateway_factory, point):
    paths, sources = series
    gw = gateway_factory(tmp_path / "gw", start=False, inbox={"poll_interval_seconds": 0.2})
    config = config_mod.load(gw.config_path)
    index_sources(config, paths)
    gw.proc = start_crashing(gw, point)
    wait_until(lambda: gw.proc.poll() is not None or port_open(gw.port), 30, 0.05, "the gateway to listen")
    mask = np.zeros((N, R, C), bool)
    mask[2:5, 10:30, 10:30] = True
    drop_job(config.inbox.path, "crashy", mask, {"source": {"series_instance_uid": str(sources[0].SeriesInstanceUID)}})
    proc = gw.proc
    wait_until(lambda: proc.poll() is not None, 60, 0.05, f"the gateway to kill itself at {point}")
    assert proc.returncode == -signal.SIGKILL, gw.log()[-2000:]
    gw.proc = None

    gw.start()  # no crash hook this time
    done = config.inbox.path / "done" / "crashy.result.yaml"
    # Finished = the result written AND the job's files moved out of the inbox (a crash
    # before the move leaves the result file behind already).
    wait_until(lambda: done.exists() and not list(config.inbox.path.glob("crashy.*")), 60, 0.05,
               "the job to finish after the restart")
    gw.kill()  # the job is committed and moved; a graceful stop adds nothing here
    rows = derived_rows(config, "crashy")
    assert len(rows) == 1, [dict(r) for r in rows]
    result = yaml.safe_load(done.read_text())
    assert result["sop_instance_uid"] == rows[0]["sop_instance_uid"]
    # Exactly one file in the store besides the sources, and it is the indexed one.
    source_uids = {s.SOPInstanceUID for s in sources}
    files = [p for p in config.store_dir.rglob("*.dcm") if p.stem not in source_uids]
    assert [p.stem for p in files] == [rows[0]["sop_instance_uid"]]
    assert not list(config.inbox.path.glob("crashy.*"))
    assert not (config.inbox.path / "failed" / "crashy.error.txt").exists()
    shown = gw.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["inbox"] == {"waiting": 0, "done": 1, "failed": 0, "recent_failures": []}
    assert "inbox    0 waiting, 1 done, 0 failed" in gw.cli("status").stdout


# --------------------------------------------------------------------------- offline


def test_offline_encode_writes_what_the_inbox_would(tmp_path, series, dciodvfy):
    paths, sources = series
    folder = Path(paths[0]).parent
    labels = np.zeros((N, R, C), np.uint8)
    labels[2:6, 10:30, 10:30] = 1
    labels[2:6, 40:50, 40:50] = 2
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "labels.yaml").write_text(yaml.safe_dump({
        "source": {"series_instance_uid": str(sources[0].SeriesInstanceUID)},
        "segments": [{"label": "one"}, {"label": "two"}],
    }))
    out = tmp_path / "out" / "labels.dcm"
    cmd = [sys.executable, "-m", "gateway", "encode", str(tmp_path / "labels.npy"),
           "--sidecar", str(tmp_path / "labels.yaml"), "--source", str(folder), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Segmentation, 2 segment(s), 8 frame(s)" in result.stdout
    assert dciodvfy(out) == []
    seg = hd.seg.segread(out)
    ascending = [s.SOPInstanceUID for s in sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=ascending, segment_numbers=[1, 2],
                                            assert_missing_frames_are_empty=True)
    for k in (1, 2):
        np.testing.assert_array_equal(got[..., k - 1].astype(bool), labels == k)

    # --keep-empty-frames keeps every slice of every segment.
    kept = tmp_path / "out" / "kept.dcm"
    result = subprocess.run(cmd[:-1] + [str(kept), "--keep-empty-frames"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert f"Segmentation, 2 segment(s), {2 * N} frame(s)" in result.stdout
    assert pydicom.dcmread(kept).NumberOfFrames == 2 * N

    # A bad job: exit 1, one line, no file.
    np.save(tmp_path / "labels.npy", labels.astype(np.float32))
    bad_out = tmp_path / "bad.dcm"
    result = subprocess.run(cmd[:-1] + [str(bad_out)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "floating point" in result.stderr
    assert not bad_out.exists()


# --------------------------------------------------------------------------- the whole node


def test_sources_over_cstore_results_forwarded_to_orthanc(tmp_path, series, dcmtk, orthanc, gateway_factory):
    """storescu -> gateway (receive + index) -> inbox -> routes.results -> Orthanc over C-STORE."""
    paths, sources = series
    gw = gateway_factory(
        tmp_path / "gw",
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes={"results": ["pacs"]},
        inbox={"poll_interval_seconds": 0.2},
    )
    inbox_dir = Path(gw.config_path).parent / gw.config["inbox"]["path"]
    src = {"series_instance_uid": str(sources[0].SeriesInstanceUID)}
    mask = np.zeros((N, R, C), bool)
    mask[2:6, 20:40, 20:40] = True
    # The job arrives before its source: it waits, then runs once the series is in.
    drop_job(inbox_dir, "early_mask", mask, {"source": src, "series_description": "AI mask"})
    wait_until(lambda: "job early_mask waits for source series" in gw.log(), 30, 0.05,
               "the job to wait for its source")
    sent = dcmtk.storescu(gw.port, gw.ae_title, *paths)
    assert sent.returncode == 0, sent.stderr
    heat = np.arange(N * R * C, dtype=np.uint16).reshape(N, R, C) % 4096
    drop_job(inbox_dir, "heat", heat, {"source": src, "bits_stored": 12, "series_description": "AI heat"})

    def derived_in_orthanc():
        found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {
            "StudyInstanceUID": str(sources[0].StudyInstanceUID)}})
        return found if len(found) == 2 else None

    ids = wait_until(derived_in_orthanc, 60, 0.2, "Orthanc to hold the two derived objects")
    got = {}
    for orthanc_id in ids:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        got[ds.SeriesDescription] = ds
    assert set(got) == {"AI mask", "AI heat"}
    seg = hd.seg.Segmentation.from_dataset(got["AI mask"])
    ascending = [s.SOPInstanceUID for s in sorted(sources, key=lambda s: float(s.ImagePositionPatient[2]))]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=ascending, segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[..., 0]
    np.testing.assert_array_equal(pixels.astype(bool), mask)
    np.testing.assert_array_equal(got["AI heat"].pixel_array, heat)
    log = gw.log()
    for ds in got.values():
        assert f"derived SOP {ds.SOPInstanceUID}" in log
        assert f"queued SOP {ds.SOPInstanceUID} for pacs" in log
