"""store: checked paths, atomic durable writes, the free-space floor, the receive step's outcomes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gateway.storage import db, index
from gateway.errors import InvalidUID, StorageFull
from gateway.storage.store import (
    Incoming,
    Outcome,
    Store,
    check_free_space,
    free_bytes,
    instance_path,
    place_atomic,
    write_atomic,
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


# --------------------------------------------------------------------------- Store.add_spooled


@pytest.fixture
def store(tmp_path):
    conn = db.connect(tmp_path / "var" / "gateway.sqlite3")
    yield Store(tmp_path / "var", tmp_path / "var" / "store", conn, ["pacs", "archive"],
                min_free_bytes=0, clock=lambda: 1000.0)
    conn.close()


def spooled(tmp_path: Path, sop: str = SOP, data: bytes = b"dataset", **kw) -> Incoming:
    spool = tmp_path / "var" / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"rx-{len(list(spool.iterdir()))}.dcm"
    path.write_bytes(data)
    fields = dict(spool_path=path, request_sop_instance_uid=sop, request_sop_class_uid=CT,
                  transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MODALITY", study_uid=STUDY,
                  series_uid=SERIES, sop_instance_uid=sop, sop_class_uid=CT)
    fields.update(kw)
    return Incoming(**fields)


def test_stored_instance_is_indexed_and_queued_in_one_go(tmp_path, store):
    result = store.add_spooled(spooled(tmp_path))
    assert result.outcome is Outcome.STORED and result.queued_for == ("pacs", "archive")
    assert result.path.read_bytes() == b"dataset"
    row = index.get_instance(store.conn, SOP)
    assert (row["study_uid"], row["series_uid"], row["sop_class_uid"], row["calling_ae"]) == (
        STUDY, SERIES, CT, "MODALITY")
    assert row["path"] == f"store/{STUDY}/{SERIES}/{SOP}.dcm" and row["size"] == 7
    assert row["origin"] == "received" and row["received_at"] == 1000.0
    queued = store.conn.execute(
        "SELECT destination, state FROM queue WHERE sop_instance_uid = ? ORDER BY destination", (SOP,)
    ).fetchall()
    assert [tuple(r) for r in queued] == [("archive", "pending"), ("pacs", "pending")]


def test_resend_replaces_the_file_and_keeps_one_row(tmp_path, store):
    store.add_spooled(spooled(tmp_path, data=b"first"))
    result = store.add_spooled(spooled(tmp_path, data=b"second version"))
    assert result.outcome is Outcome.STORED and result.path.read_bytes() == b"second version"
    assert store.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    assert store.conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 2


@pytest.mark.parametrize(
    "fields,reason",
    [({"sop_instance_uid": "../../evil", "request_sop_instance_uid": "../../evil"}, "not a DICOM UID"),
     ({"study_uid": None}, "Study Instance UID is missing"),
     ({"series_uid": "1.2/../../x"}, "Series Instance UID"),
     ({"request_sop_instance_uid": "1.2.3.4.6"}, "differs from"),
     ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}, "SOP Class UID"),
     ({"sop_class_uid": None}, "SOP Class UID is missing")],
)
def test_invalid_instances_leave_no_file_and_no_row(tmp_path, store, fields, reason):
    result = store.add_spooled(spooled(tmp_path, **fields))
    assert result.outcome is Outcome.INVALID and reason in result.reason
    assert not (tmp_path / "var" / "store").exists() or not any((tmp_path / "var" / "store").rglob("*.dcm"))
    assert store.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    assert store.conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0


def test_below_the_floor_is_no_space(tmp_path, store):
    store.min_free_bytes = free_bytes(tmp_path) + 10**15
    result = store.add_spooled(spooled(tmp_path))
    assert result.outcome is Outcome.NO_SPACE and "min_free_bytes" in result.reason
    assert store.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


def test_store_permissions_failure_is_failed_not_stored(tmp_path, store):
    if os.geteuid() == 0:
        # root ignores folder permissions: make the series folder a file instead
        target = tmp_path / "var" / "store" / STUDY
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not a folder")
    else:
        (tmp_path / "var" / "store").mkdir(parents=True)
        (tmp_path / "var" / "store").chmod(0o500)
    result = store.add_spooled(spooled(tmp_path))
    assert result.outcome is Outcome.FAILED
    assert store.conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
