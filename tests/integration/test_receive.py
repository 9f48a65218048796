"""Receive with real DCMTK peers: what is acknowledged is on disk, indexed, and inside the store."""

from __future__ import annotations

import hashlib
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import wait_until
from tests.integration.modes import fast_path, performance  # noqa: F401 (fixture)

MB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def var(gw) -> Path:
    return gw.config_path.parent / "var"


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the preamble and file meta: the data set as written."""
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def rows(gw) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(f"file:{var(gw) / 'gateway.sqlite3'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
    finally:
        conn.close()


def stored_files(gw) -> list[Path]:
    return sorted((var(gw) / "store").rglob("*.dcm"))


def everything_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


def store_ok(dcmtk, gw, *files, calling="STORESCU", extra=()):
    result = dcmtk.storescu(gw.port, gw.ae_title, *files, calling=calling, extra=("-v", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    responses = [line for line in result.stderr.splitlines() if "Received Store Response" in line]
    assert len(responses) == len(files) and all("Success" in r for r in responses), result.stderr[-3000:]
    return result


def store_statuses(dcmtk, gw, *files, calling="STORESCU") -> list[str]:
    """The store responses storescu reported, one per file (keeps going after failures)."""
    result = dcmtk.storescu(gw.port, gw.ae_title, *files, calling=calling, extra=("-v", "-nh"))
    return [line.split("(", 1)[-1].rstrip(")") for line in result.stderr.splitlines()
            if "Received Store Response" in line]


def assert_stored_as_sent(gw, sources: list[Path], calling="STORESCU"):
    index = rows(gw)
    for src in sources:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        row = index[ds.SOPInstanceUID]
        path = var(gw) / row["path"]
        assert path == var(gw) / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_bytes(path) == dataset_bytes(src), f"{src.name} not stored byte-identical"
        assert row["size"] == path.stat().st_size and row["calling_ae"] == calling
        assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert (row["study_uid"], row["series_uid"], row["sop_class_uid"]) == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID)
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


# --------------------------------------------------------------------------- storing


def test_store_bundled_and_synthetic_series_then_echo(dcmtk, gateway_factory, ct_series, tmp_path, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    bundled = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    series = ct_series(100, 128, 128)
    store_ok(dcmtk, gw, *bundled)
    store_ok(dcmtk, gw, *series)

    # pydicom's samples end in Data Set Trailing Padding, which storescu does not send;
    # every other element arrives unchanged.
    for src in bundled:
        sent = pydicom.dcmread(src)
        del sent[0xFFFCFFFC]
        stored = pydicom.dcmread(var(gw) / rows(gw)[sent.SOPInstanceUID]["path"])
        assert stored == sent and stored.PixelData == sent.PixelData
    assert_stored_as_sent(gw, series)
    assert len(rows(gw)) == 102 and len(stored_files(gw)) == 102
    assert not list((var(gw) / "tmp").iterdir()), "spool files left behind"
    log = gw.log()
    assert f"received SOP {pydicom.dcmread(series[0]).SOPInstanceUID} from AE STORESCU" in log

    status = gw.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"instances": 102' in status.stdout and '"series": 3' in status.stdout


def test_compressed_instances_are_stored_as_received(dcmtk, gateway_factory, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    # storescu proposes the compressed syntax first and the uncompressed ones after it;
    # the gateway must pick the compressed one (DCMTK cannot decode JPEG 2000 here anyway).
    files = []
    for name, propose in (("JPEG2000.dcm", "-xw"), ("SC_rgb_rle.dcm", "-xr")):
        files.append(Path(get_testdata_file(name)))
        store_ok(dcmtk, gw, files[-1], extra=(propose,))
    for src in files:
        sent = pydicom.dcmread(src)
        stored = pydicom.dcmread(var(gw) / rows(gw)[sent.SOPInstanceUID]["path"])
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID  # no transcoding
        assert stored.PixelData == sent.PixelData


def test_same_sop_instance_again_replaces_and_keeps_one_row(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    first = ct_series(1, 64, 64)[0]
    store_ok(dcmtk, gw, first)
    changed = pydicom.dcmread(first)
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(first.with_name("changed.dcm"))
    store_ok(dcmtk, gw, first.with_name("changed.dcm"))
    index = rows(gw)
    assert len(index) == 1 and len(stored_files(gw)) == 1
    assert dataset_bytes(stored_files(gw)[0]) == dataset_bytes(first.with_name("changed.dcm"))


def test_four_parallel_storescu_all_stored_and_indexed(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    series = [ct_series(50, 64, 64, seed=k) for k in range(4)]
    procs = [
        subprocess.Popen(
            [dcmtk.path("storescu"), "-aet", f"SCU{k}", "-aec", gw.ae_title, "127.0.0.1",
             str(gw.port), *map(str, files)],
            env=dcmtk.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, files in enumerate(series)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    index = rows(gw)
    assert len(index) == 200 and len(stored_files(gw)) == 200
    for k, files in enumerate(series):
        assert_stored_as_sent(gw, files, calling=f"SCU{k}")


def test_routes_received_queue_each_instance_in_the_same_step(dcmtk, gateway_factory, ct_series, fast_path):
    # The destination is never started: the items just wait, visibly, in the queue.
    gw = gateway_factory(
        performance=performance(fast_path),
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 9}},
        routes={"received": ["pacs"], "results": []},
        retry={"max_attempts": 100, "initial_backoff_seconds": 600, "max_backoff_seconds": 600},
    )
    files = ct_series(3, 64, 64)
    store_ok(dcmtk, gw, *files)
    conn = sqlite3.connect(f"file:{var(gw) / 'gateway.sqlite3'}?mode=ro", uri=True)
    try:
        queued = {r[0] for r in conn.execute("SELECT sop_instance_uid FROM queue WHERE destination='pacs'")}
    finally:
        conn.close()
    assert queued == set(rows(gw))
    assert "queued SOP" in gw.log()


# --------------------------------------------------------------------------- AE titles


def test_unknown_calling_ae_is_rejected_with_a_reason(dcmtk, gateway_factory, fast_path):
    gw = gateway_factory(security={"allowed_calling_aets": ["GOODSCU"]}, performance=performance(fast_path))
    refused = dcmtk.echoscu(gw.port, gw.ae_title, calling="BADSCU")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling="GOODSCU").returncode == 0
    wait_until(lambda: "calling AE title 'BADSCU' is not in security.allowed_calling_aets" in gw.log(),
               10, what="the rejection log line")


def test_wrong_called_ae_is_rejected_unless_relaxed(dcmtk, gateway_factory, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    refused = dcmtk.echoscu(gw.port, "SOMEONE-ELSE")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    wait_until(lambda: "called AE title 'SOMEONE-ELSE' is not ours" in gw.log(), 10, what="log line")

    relaxed = gateway_factory(node={"require_called_ae_title": False}, performance=performance(fast_path))
    assert dcmtk.echoscu(relaxed.port, "SOMEONE-ELSE").returncode == 0


# --------------------------------------------------------------------------- limits


def hold_association(gw, timeout: float = 1.0):
    """An established association from this process (pynetdicom SCU), left open."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)

    def associate():
        assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
        return assoc if assoc.is_established else None

    return wait_until(associate, timeout, 0.2, "an association")


def test_max_associations_rejects_the_extra_one(dcmtk, gateway_factory, fast_path):
    # The fixture's readiness probes (bare TCP connects) must not hold the only slot.
    gw = gateway_factory(node={"max_associations": 1}, performance=performance(fast_path))
    holder = hold_association(gw, timeout=3)
    try:
        refused = dcmtk.echoscu(gw.port, gw.ae_title)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
        wait_until(lambda: "node.max_associations (1) reached" in gw.log(), 10, what="log line")
    finally:
        holder.release()
    wait_until(lambda: dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0, 10, 0.2, "a free slot")


def test_idle_association_is_closed_after_the_network_timeout(gateway_factory, fast_path):
    gw = gateway_factory(node={"network_timeout_seconds": 1}, performance=performance(fast_path))
    holder = hold_association(gw)
    try:
        wait_until(lambda: not holder.is_established, 15, 0.1, "the gateway to drop the idle association")
    finally:
        if holder.is_established:
            holder.abort()


# --------------------------------------------------------------------------- hostile input


def test_hostile_sop_instance_uid_is_refused_and_nothing_escapes(dcmtk, gateway_factory, tmp_path, monkeypatch,
                                                                fast_path):
    # An in-process service.run (unit tests) leaves pydicom's validation at IGNORE: warn here.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.WARN)
    gw = gateway_factory(performance=performance(fast_path))
    sent = tmp_path / "sent"
    sent.mkdir()
    outside = lambda: {p for p in everything_under(tmp_path) if gw.config_path.parent not in p.parents}
    for k, bad_uid in enumerate(["../../evil", "1.2.3/../../x", "1.2." + "3" * 62]):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = bad_uid
        ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
        evil = sent / f"evil{k}.dcm"
        with pytest.warns(UserWarning):  # pydicom rightly complains while we build the bad file
            ds.save_as(evil, enforce_file_format=True)
        before = outside()

        statuses = store_statuses(dcmtk, gw, evil)
        assert statuses == ["Error: CannotUnderstand"], bad_uid
        assert rows(gw) == {} and stored_files(gw) == []
        assert not list((var(gw) / "tmp").iterdir())
        assert outside() == before
        assert not any("evil" in p.name or p.name.startswith("x") for p in everything_under(tmp_path)
                       if p.parent != sent)
    assert gw.log().count("refused SOP") == 3 and "0xC000" in gw.log()
    assert "pydicom" not in gw.log() and "Traceback" not in gw.log()  # our one line, no library noise
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0


def test_absurd_pdu_length_closes_that_connection_only(dcmtk, gateway_factory, fast_path):
    gw = gateway_factory(node={"max_pdu_size": 65536}, performance=performance(fast_path))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\0" * 1024)
        s.settimeout(10)
        try:
            closed = s.recv(1024) == b""  # the gateway closes; it never reads 4 GB
        except ConnectionResetError:
            closed = True
        assert closed
        wait_until(lambda: "declared a PDU of 4294967280 bytes" in gw.log(), 10, what="log line")
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    proc = psutil.Process(gw.proc.pid)
    assert proc.memory_info().rss < 500 * MB


# --------------------------------------------------------------------------- durability


def test_kill_9_after_success_loses_nothing(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(performance=performance(fast_path))
    files = ct_series(30, 128, 128)
    store_ok(dcmtk, gw, *files)
    gw.kill()  # SIGKILL right after storescu reported success for the whole batch
    stale = var(gw) / "tmp" / "rx-0123456789ab-7.dcm"
    stale.write_bytes(b"\0" * 1000)  # what a crash mid-transfer leaves: never acknowledged
    gw.start()
    assert not stale.exists()
    assert len(rows(gw)) == 30
    assert_stored_as_sent(gw, files)
    for path in stored_files(gw):
        pydicom.dcmread(path).pixel_array  # readable to the last byte
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0


# --------------------------------------------------------------------------- large objects


def write_big_multiframe(path: Path, frames: int, rows: int = 512, columns: int = 512) -> None:
    """A multi-frame 16-bit Secondary Capture, pixel data streamed in so the test stays small too."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Big^Object", "BIG1", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.save_as(path, enforce_file_format=True)
    frame_bytes = rows * columns * 2
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frame_bytes * frames))
        frame = bytearray(frame_bytes)
        for k in range(frames):
            frame[0:8] = struct.pack("<Q", k)  # every frame differs
            f.write(frame)


def sha256_of_dataset(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        while chunk := f.read(8 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def test_600_mb_instance_with_bounded_memory(dcmtk, gateway_factory, tmp_path, fast_path):
    big = tmp_path / "big.dcm"
    write_big_multiframe(big, frames=1200)  # 1200 x 512 x 512 x 2 bytes = 629 MB of pixels
    assert big.stat().st_size > 600 * 1000 * 1000
    gw = gateway_factory(node={"max_pdu_size": 262144}, performance=performance(fast_path))
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0  # warm up, then take the baseline
    proc = psutil.Process(gw.proc.pid)
    idle = proc.memory_info().rss
    peak, done = [idle], threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak.append(proc.memory_info().rss)
            except psutil.Error:
                return
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        store_ok(dcmtk, gw, big)
    finally:
        done.set()
        sampler.join()
    grown = max(peak) - idle
    print(f"gateway RSS idle {idle / MB:.0f} MiB, peak {max(peak) / MB:.0f} MiB (+{grown / MB:.0f} MiB)")
    assert grown <= 150 * 1000 * 1000, f"peak RSS grew by {grown / MB:.0f} MiB while receiving"
    (stored,) = stored_files(gw)
    assert sha256_of_dataset(stored) == sha256_of_dataset(big)
    stored.unlink()  # 600 MB less to clean up
    big.unlink()


# --------------------------------------------------------------------------- disk space


def test_below_min_free_bytes_is_out_of_resources(dcmtk, gateway_factory, ct_series, fast_path):
    gw = gateway_factory(storage={"min_free_bytes": 2**60}, performance=performance(fast_path))
    files = ct_series(2, 64, 64)
    assert store_statuses(dcmtk, gw, *files) == ["Refused: OutOfResources"] * 2
    assert rows(gw) == {} and stored_files(gw) == []
    assert "storage.min_free_bytes" in gw.log()
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0


def test_an_instance_over_max_instance_bytes_is_out_of_resources(dcmtk, gateway_factory, ct_series, fast_path):
    """storage.max_instance_bytes holds end to end in both modes: a real storescu gets 0xA700,
    nothing is kept, the next instance within the limit is stored."""
    small = ct_series(1, 64, 64)[0]  # ~9 kB
    big = ct_series(1, 256, 256, seed=7)[0]  # ~132 kB
    gw = gateway_factory(storage={"min_free_bytes": 0, "max_instance_bytes": 64 * 1024},
                         performance=performance(fast_path))
    assert store_statuses(dcmtk, gw, big) == ["Refused: OutOfResources"]
    assert rows(gw) == {} and stored_files(gw) == []
    assert "storage.max_instance_bytes" in gw.log()
    store_ok(dcmtk, gw, small)
    assert len(rows(gw)) == 1
    assert not list((var(gw) / "tmp").iterdir()), "a refused instance left its file behind"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """An 8 MiB tmpfs mounted in the test's folder (unmounted at teardown)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_disk_full_is_out_of_resources_then_recovers(dcmtk, gateway_factory, ct_series, tiny_filesystem, fast_path):
    gw = gateway_factory(folder=tiny_filesystem / "gw", storage={"min_free_bytes": 0},
                         performance=performance(fast_path))
    try:
        files = ct_series(2, 512, 512)  # ~525 kB each
        store_ok(dcmtk, gw, files[0])
        filler = tiny_filesystem / "filler"
        free = shutil.disk_usage(tiny_filesystem).free
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - 200 * 1024))  # leave 200 kB: less than one slice

        assert store_statuses(dcmtk, gw, files[1]) == ["Refused: OutOfResources"]
        assert set(rows(gw)) == {pydicom.dcmread(files[0]).SOPInstanceUID}
        assert len(stored_files(gw)) == 1, "a half-written file was left in the store"
        assert not list((var(gw) / "tmp").iterdir()), "a half-written spool file was left"
        assert "the disk is full" in gw.log()
        assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0  # still serving

        filler.unlink()  # space is back: the same node takes the same instance, no restart
        store_ok(dcmtk, gw, files[1])
        assert len(rows(gw)) == 2
        assert_stored_as_sent(gw, files)
    finally:
        gw.stop()


def test_endless_command_fragments_abort_that_association_only(dcmtk, gateway_factory, fast_path):
    """A peer that never ends a message cannot make the gateway buffer it without limit."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from gateway.dimse.codec import PDATA_HEAD
    from gateway.dimse.fastpath import take_socket

    gw = gateway_factory(performance=performance(fast_path))
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    assert take_socket(assoc)  # from here on the test writes raw PDUs
    sock = assoc.dul.socket.socket
    context_id = assoc.accepted_contexts[0].context_id
    fragment = b"\0" * 8192
    aborted = False
    sock.settimeout(10)
    try:
        for _ in range(64):  # 512 KiB of command set, never the last fragment
            sock.sendall(PDATA_HEAD.pack(4, 0, len(fragment) + 6, len(fragment) + 2, context_id, 0x01) + fragment)
    except OSError:
        aborted = True
    try:
        reply = sock.recv(16)
        aborted = aborted or reply == b"" or reply[0] == 0x07  # A-ABORT or closed
    except OSError:
        aborted = True
    assert aborted
    wait_until(lambda: "aborting the association from" in gw.log(), 10, what="the abort's log line")
    assert "more than a C-ECHO/C-STORE needs" in gw.log()
    assoc.dul.kill_dul()
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
