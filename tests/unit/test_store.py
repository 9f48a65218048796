"""storage.files (checked paths, atomic durable writes, the free-space floor) and the one ingest
path, ``Store.ingest``: every outcome, the router, the index row and the queue rows."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.errors import InvalidUID, StorageFull
from gateway.storage import db, index, jobs
from gateway.storage.files import (
    check_free_space,
    free_bytes,
    instance_path,
    place_atomic,
    write_atomic,
)
from gateway.storage.header import read_header
from gateway.storage.store import (
    Arrival,
    Expected,
    Outcome,
    RouteDecision,
    Source,
    Store,
    default_router,
)

STUDY, SERIES, SOP, CT = "1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2"


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- instance_path


def test_instance_path_layout(tmp_path):
    assert instance_path(tmp_path, STUDY, SERIES, SOP) == tmp_path / STUDY / SERIES / f"{SOP}.dcm"


@pytest.mark.parametrize(
    "study,series,sop",
    [("../..", SERIES, SOP), (STUDY, "1.2/../..", SOP), (STUDY, SERIES, "../../evil"),
     (STUDY, SERIES, "1" * 65), (None, SERIES, SOP), (STUDY, SERIES, "")],
)
def test_instance_path_refuses_anything_but_uids(tmp_path, study, series, sop):
    with pytest.raises(InvalidUID):
        instance_path(tmp_path, study, series, sop)


# --------------------------------------------------------------------------- write_atomic


def test_write_atomic_creates_folders_and_returns_size(tmp_path):
    path = instance_path(tmp_path / "store", STUDY, SERIES, SOP)
    assert write_atomic(path, lambda f: f.write(b"DICM" * 10)) == 40
    assert path.read_bytes() == b"DICM" * 10
    assert leftovers(tmp_path) == []


def test_write_atomic_replaces_existing_file(tmp_path):
    path = tmp_path / "a.dcm"
    write_atomic(path, lambda f: f.write(b"old"))
    write_atomic(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.dcm"
    write_atomic(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise ValueError("encoder failed")

    with pytest.raises(ValueError):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_enospc_at_the_file_layer_is_storage_full_and_leaves_nothing(tmp_path):
    path = tmp_path / "s" / "a.dcm"

    def disk_full(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageFull, match="full"):
        write_atomic(path, disk_full)
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_place_atomic_moves_a_spooled_file(tmp_path):
    src = tmp_path / "spool.dcm"
    src.write_bytes(b"payload")
    dest = instance_path(tmp_path / "store", STUDY, SERIES, SOP)
    assert place_atomic(src, dest) == 7
    assert dest.read_bytes() == b"payload" and not src.exists()
    src.write_bytes(b"payload 2")
    place_atomic(src, dest)
    assert dest.read_bytes() == b"payload 2"


# --------------------------------------------------------------------------- free space


def test_free_space_floor(tmp_path):
    check_free_space(tmp_path, 0)
    check_free_space(tmp_path / "not" / "yet", 1)
    with pytest.raises(StorageFull, match="storage.min_free_bytes"):
        check_free_space(tmp_path, free_bytes(tmp_path) + 10**15)


# --------------------------------------------------------------------------- Store.ingest

DIMSE = Arrival(Source.DIMSE, calling_ae="MODALITY", called_ae="GATEWAY", peer="127.0.0.1:4000")


@pytest.fixture
def conn(tmp_path):
    conn = db.connect(tmp_path / "var" / "gateway.sqlite3")
    yield conn
    conn.close()


@pytest.fixture
def store(tmp_path, conn):
    return Store(tmp_path / "var", tmp_path / "var" / "store", conn,
                 router=default_router(["pacs", "archive"], ["ai"]), clock=lambda: 1000.0)


def dataset(sop: str = SOP, study: str | None = STUDY, series: str = SERIES, sop_class: str | None = CT,
            media_sop: str | None = None, ts: str = ExplicitVRLittleEndian, pixels: bytes = b"\1\2" * 8) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class or CT
    ds.file_meta.MediaStorageSOPInstanceUID = media_sop or sop
    ds.file_meta.TransferSyntaxUID = ts
    if sop_class is not None:
        ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.PatientID = "P1"
    ds.Modality = "CT"
    if study is not None:
        ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Rows, ds.Columns, ds.BitsAllocated = 4, 2, 16
    ds.PixelData = pixels
    return ds


def spooled(tmp_path: Path, ds: Dataset | None = None, raw: bytes | None = None) -> Path:
    """A file in data_dir/tmp, as receive's spool or STOW's temp file leaves it."""
    spool = tmp_path / "var" / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"rx-{len(list(spool.iterdir()))}.dcm"
    ds = ds or dataset()
    if raw is not None:
        path.write_bytes(raw)
    else:  # as it is: pydicom would otherwise fix a file meta that disagrees with the data set
        ds.preamble = b"\0" * 128
        ds.save_as(path, implicit_vr=ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian,
                   little_endian=True)
    return path


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def nothing_kept(tmp_path, conn) -> bool:
    store_dir = tmp_path / "var" / "store"
    stored = list(store_dir.rglob("*.dcm")) if store_dir.exists() else []
    spool = tmp_path / "var" / "tmp"
    return not stored and not list(spool.iterdir()) and count(conn, "instances") == 0 and count(conn, "queue") == 0


def test_stored_instance_is_placed_indexed_and_queued_in_one_go(tmp_path, store, conn):
    src = spooled(tmp_path)
    data = src.read_bytes()
    result = store.ingest(src, DIMSE, Expected(SOP, CT))
    assert result.outcome is Outcome.STORED and result.queued_for == ("pacs", "archive")
    assert result.rules == ("routes.received",)
    assert result.path.read_bytes() == data and not src.exists()
    row = index.get_instance(conn, SOP)
    assert (row["study_uid"], row["series_uid"], row["sop_class_uid"], row["calling_ae"]) == (
        STUDY, SERIES, CT, "MODALITY")
    assert row["path"] == f"store/{STUDY}/{SERIES}/{SOP}.dcm" and row["size"] == len(data)
    assert row["origin"] == "received" and row["source"] == "dimse" and row["received_at"] == 1000.0
    assert row["transfer_syntax"] == ExplicitVRLittleEndian
    assert row["dataset_offset"] == read_header(result.path).dataset_offset > 132
    queued = conn.execute(
        "SELECT destination, state FROM queue WHERE sop_instance_uid = ? ORDER BY destination", (SOP,)
    ).fetchall()
    assert [tuple(r) for r in queued] == [("archive", "pending"), ("pacs", "pending")]
    assert result.header.dataset.PatientID == "P1"  # the header stays readable after the move


def test_the_fast_head_gives_the_same_result(tmp_path, store, conn):
    src = spooled(tmp_path, dataset(ts=ImplicitVRLittleEndian))
    result = store.ingest(src, DIMSE, Expected(SOP, CT), head=src.read_bytes()[:200])
    assert result.outcome is Outcome.STORED
    assert index.get_instance(conn, SOP)["transfer_syntax"] == ImplicitVRLittleEndian
    assert result.header.dataset.Modality == "CT"


def test_resend_replaces_the_file_and_keeps_one_row(tmp_path, store, conn):
    store.ingest(spooled(tmp_path, dataset(pixels=b"\1" * 16)), DIMSE)
    result = store.ingest(spooled(tmp_path, dataset(pixels=b"\2" * 16)), DIMSE)
    assert result.outcome is Outcome.STORED and result.path.read_bytes().endswith(b"\2" * 16)
    assert count(conn, "instances") == 1 and count(conn, "queue") == 2


@pytest.mark.parametrize(
    "ds,expected,reason",
    [(dataset(sop="1.2.03"), None, "not a DICOM UID"),
     (dataset(study=None), None, "Study Instance UID is missing"),
     (dataset(series="1.2.3.4.5." + "6" * 60), None, "Series Instance UID is 70 characters"),
     (dataset(sop_class=None), None, "SOP Class UID is missing"),
     (dataset(), Expected(sop_instance_uid="1.2.3.4.6"), "differs from 1.2.3.4.6 in the request"),
     (dataset(), Expected(sop_class_uid="1.2.840.10008.5.1.4.1.1.4"), "SOP Class UID"),
     (dataset(media_sop="1.2.3.4.7"), None, "file meta names SOP Instance UID 1.2.3.4.7")],
)
def test_invalid_instances_leave_no_file_and_no_row(tmp_path, store, conn, ds, expected, reason):
    result = store.ingest(spooled(tmp_path, ds), DIMSE, expected)
    assert result.outcome is Outcome.INVALID and reason in result.reason
    assert nothing_kept(tmp_path, conn)


def test_a_study_other_than_the_requested_one_is_wrong_study(tmp_path, store, conn):
    stow = Arrival(Source.STOW, identity="alice", peer="127.0.0.1:5000")
    result = store.ingest(spooled(tmp_path), stow, Expected(study_uid="1.2.9"))
    assert result.outcome is Outcome.WRONG_STUDY and "1.2.9" in result.reason
    assert nothing_kept(tmp_path, conn)
    assert store.ingest(spooled(tmp_path), stow, Expected(study_uid=STUDY)).outcome is Outcome.STORED


@pytest.mark.parametrize("raw,reason", [(b"not DICOM" * 40, "not a DICOM Part 10 file"),
                                        (b"\0" * 128 + b"DICM" + b"\2\0", "ends inside its file meta")])
def test_unreadable_files_are_unreadable_and_removed(tmp_path, store, conn, raw, reason):
    result = store.ingest(spooled(tmp_path, raw=raw), DIMSE)
    assert result.outcome is Outcome.UNREADABLE and reason in result.reason
    assert nothing_kept(tmp_path, conn)


def test_below_the_floor_is_no_space(tmp_path, store, conn):
    store.min_free_bytes = free_bytes(tmp_path) + 10**15
    result = store.ingest(spooled(tmp_path), DIMSE)
    assert result.outcome is Outcome.NO_SPACE and "min_free_bytes" in result.reason
    assert nothing_kept(tmp_path, conn)


def test_store_permissions_failure_is_failed_not_stored(tmp_path, store, conn):
    if os.geteuid() == 0:
        # root ignores folder permissions: make the study folder a file instead
        target = tmp_path / "var" / "store" / STUDY
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not a folder")
    else:
        (tmp_path / "var" / "store").mkdir(parents=True)
        (tmp_path / "var" / "store").chmod(0o500)
    result = store.ingest(spooled(tmp_path), DIMSE)
    assert result.outcome is Outcome.FAILED and "cannot write" in result.reason
    assert count(conn, "instances") == 0 and not list((tmp_path / "var" / "tmp").iterdir())


def test_a_database_failure_is_failed_and_nothing_is_acknowledged(tmp_path, store, conn):
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'no'); END")
    result = store.ingest(spooled(tmp_path), DIMSE)
    assert result.outcome is Outcome.FAILED and "cannot index" in result.reason
    assert count(conn, "instances") == 0 and count(conn, "queue") == 0  # one transaction: both or none


def test_explicit_destinations_and_derived_objects_route_as_asked(tmp_path, store, conn):
    given = spooled(tmp_path, dataset(sop="1.2.3.4.8")).rename(tmp_path / "given.dcm")
    sent = store.ingest_copy(given, Arrival(Source.SEND, destinations=("pacs",)))
    assert given.exists()  # a copy: the user's file stays
    assert sent.outcome is Outcome.STORED and sent.queued_for == ("pacs",) and sent.rules == ("explicit",)
    assert index.get_instance(conn, "1.2.3.4.8")["origin"] == "manual"
    with db.transaction(conn):
        jobs.add_waiting(conn, "job-1", 900.0)
    derived = store.ingest_dataset(dataset(sop="1.2.3.4.9"), Arrival(Source.DERIVED, job="job-1"))
    assert derived.outcome is Outcome.STORED and derived.queued_for == ("ai",)
    row = index.get_instance(conn, "1.2.3.4.9")
    assert (row["origin"], row["job"]) == ("derived", "job-1")
    job = jobs.get(conn, "job-1")  # marked done in the same transaction
    assert (job["state"], job["sop_instance_uid"], job["finished_at"]) == ("done", "1.2.3.4.9", 1000.0)
    assert not list((tmp_path / "var" / "tmp").iterdir())


def test_the_router_sees_the_header_and_the_arrival(tmp_path, conn):
    seen = []

    def router(header, arrival):
        seen.append((header.dataset.Modality, arrival.calling_ae))
        return RouteDecision(("ct-archive",), ("modality is CT",))

    points = []
    store = Store(tmp_path / "var", tmp_path / "var" / "store", conn, router=router,
                  checkpoint=points.append)
    result = store.ingest(spooled(tmp_path), DIMSE)
    assert result.queued_for == ("ct-archive",) and result.rules == ("modality is CT",)
    assert seen == [("CT", "MODALITY")] and points == ["placed"]


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path, store, conn):
    def broken(f):
        f.write(b"half")
        raise ValueError("encoder failed")

    with pytest.raises(ValueError):
        store.ingest_written(broken, Arrival(Source.DERIVED))
    assert not list((tmp_path / "var" / "tmp").iterdir()) and count(conn, "instances") == 0
