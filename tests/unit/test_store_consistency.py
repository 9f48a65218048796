"""A store file and its index row never disagree: per-UID serialization of rename + commit,
quarantine when the commit fails after the rename, and the start-up reconcile."""

from __future__ import annotations

import logging
import random
import stat
import threading

import pytest

from gateway.storage import index
from gateway.storage.files import instance_path
from gateway.storage.reconcile import reconcile
from gateway.storage.store import Outcome, Store, UidLocks, default_router

from tests.unit.test_store import DIMSE, SERIES, SOP, STUDY, conn, count, dataset, spooled  # noqa: F401


@pytest.fixture
def store(tmp_path, conn):  # noqa: F811
    rnd = random.Random(7)

    def widen(point):  # widen the window between rename and commit, as a loaded machine does
        if point == "placed":
            threading.Event().wait(rnd.random() * 0.004)

    return Store(tmp_path / "var", tmp_path / "var" / "store", conn,
                 router=default_router(["pacs"], []), checkpoint=widen)


def file_and_row_agree(tmp_path, conn) -> tuple[int, int]:  # noqa: F811
    row = index.get_instance(conn, SOP)
    return (tmp_path / "var" / row["path"]).stat().st_size, row["size"]


def test_two_ingests_of_one_uid_at_once_leave_the_file_and_its_row_agreeing(tmp_path, store, conn):  # noqa: F811
    for round_ in range(40):
        paths = [spooled(tmp_path, dataset(pixels=b"\1\2" * 8)), spooled(tmp_path, dataset(pixels=b"\3\4" * 64))]
        start = threading.Barrier(2)
        results = [None, None]

        def one(i):
            start.wait()
            results[i] = store.ingest(paths[i], DIMSE)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert all(r.outcome is Outcome.STORED for r in results)
        on_disk, in_row = file_and_row_agree(tmp_path, conn)
        assert on_disk == in_row, f"round {round_}: file has {on_disk} bytes, its row says {in_row}"
    assert count(conn, "instances") == 1 and len(store._uid_locks) == 0


def test_a_stow_batch_and_a_c_store_of_one_uid_at_once_agree(tmp_path, store, conn):  # noqa: F811
    for round_ in range(25):
        batch = [(spooled(tmp_path, dataset(pixels=b"\1\2" * 8)), DIMSE, None),
                 (spooled(tmp_path, dataset(sop="1.2.3.4.6")), DIMSE, None),
                 (spooled(tmp_path, dataset(pixels=b"\5\6" * 32)), DIMSE, None)]
        single = spooled(tmp_path, dataset(pixels=b"\3\4" * 64))
        start = threading.Barrier(2)

        def many():
            start.wait()
            store.ingest_many(batch)

        t = threading.Thread(target=many)
        t.start()
        start.wait()
        assert store.ingest(single, DIMSE).outcome is Outcome.STORED
        t.join(10)
        on_disk, in_row = file_and_row_agree(tmp_path, conn)
        assert on_disk == in_row, f"round {round_}: file has {on_disk} bytes, its row says {in_row}"
    assert len(store._uid_locks) == 0


def test_a_database_failure_after_the_rename_quarantines_the_file(tmp_path, store, conn, caplog):  # noqa: F811
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'no'); END")
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        result = store.ingest(spooled(tmp_path), DIMSE)
    assert result.outcome is Outcome.FAILED and result.path is None
    assert not list((tmp_path / "var" / "store").rglob("*.dcm"))  # no file without a row
    assert count(conn, "instances") == 0
    quarantined = list((tmp_path / "var" / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(f"{SOP}.dcm.")
    assert stat.S_IMODE((tmp_path / "var" / "quarantine").stat().st_mode) == 0o700
    assert stat.S_IMODE(quarantined[0].stat().st_mode) == 0o600
    assert [r.message for r in caplog.records if "quarantined" in r.message][0].count("\n") == 0
    assert len([r for r in caplog.records if "quarantined" in r.message]) == 1


def test_reconcile_indexes_orphans_quarantines_unreadable_files_and_removes_temp_files(tmp_path, store, conn):  # noqa: F811
    store_dir = tmp_path / "var" / "store"
    orphan = instance_path(store_dir, STUDY, SERIES, SOP)
    orphan.parent.mkdir(parents=True)
    ds = dataset()
    ds.save_as(orphan, enforce_file_format=True)
    garbage = orphan.parent / "1.2.3.4.99.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    misplaced = store_dir / STUDY / "1.2.3.4.7.dcm"
    dataset(sop="1.2.3.4.7").save_as(misplaced, enforce_file_format=True)
    temp = orphan.parent / f".{orphan.name}.abcdef.tmp"
    temp.write_bytes(b"half")
    spool = spooled(tmp_path)

    done = reconcile(store)

    assert done.indexed == 1 and done.quarantined == 2 and done.removed == 2
    row = index.get_instance(conn, SOP)
    assert row is not None and row["size"] == orphan.stat().st_size and row["origin"] == "manual"
    assert count(conn, "queue") == 0  # recorded, not sent anywhere
    assert not garbage.exists() and not misplaced.exists() and not temp.exists() and not spool.exists()
    assert len(list((tmp_path / "var" / "quarantine").iterdir())) == 2
    assert reconcile(store) == type(done)()  # nothing left to do
    assert orphan.exists()


def test_uid_locks_are_freed_after_use():
    locks = UidLocks()
    with locks.hold(["2", "1", "2"]):
        assert len(locks) == 2
    assert len(locks) == 0


def test_every_store_of_one_folder_shares_its_uid_locks(tmp_path, conn):  # noqa: F811
    make = lambda: Store(tmp_path / "var", tmp_path / "var" / "store", conn, router=default_router([], []))  # noqa: E731
    assert make()._uid_locks is make()._uid_locks  # receive, STOW and the inbox each open one


def test_reconcile_forgets_a_row_whose_file_a_failed_resend_took_away(tmp_path, store, conn, caplog):  # noqa: F811
    assert store.ingest(spooled(tmp_path), DIMSE).outcome is Outcome.STORED
    other = "1.2.3.4.8"
    assert store.ingest(spooled(tmp_path, dataset(sop=other)), DIMSE).outcome is Outcome.STORED
    # The resend replaces the indexed file, then its commit fails: the new file is quarantined
    # and the old row points to a file that is gone.
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'no'); END")
    assert store.ingest(spooled(tmp_path, dataset(pixels=b"\7\7" * 16)), DIMSE).outcome is Outcome.FAILED
    conn.execute("DROP TRIGGER refuse")
    gone = tmp_path / "var" / index.get_instance(conn, SOP)["path"]
    assert not gone.exists()

    with caplog.at_level(logging.WARNING, logger="gateway.reconcile"):
        done = reconcile(store)

    assert done.forgotten == 1 and done.indexed == 0 and done.quarantined == 0
    assert index.get_instance(conn, SOP) is None
    assert conn.execute("SELECT COUNT(*) FROM instance_attributes WHERE sop_instance_uid = ?", (SOP,)).fetchone()[0] == 0
    items = conn.execute("SELECT state, last_error FROM queue WHERE sop_instance_uid = ?", (SOP,)).fetchall()
    assert items and all(r["state"] == "failed" and "was gone when the gateway started" in r["last_error"] for r in items)
    assert index.get_instance(conn, other) is not None  # the others are untouched
    assert {r["state"] for r in conn.execute("SELECT state FROM queue WHERE sop_instance_uid = ?", (other,))} == {"pending"}
    lines = [r.message for r in caplog.records if "gone from the store" in r.message]
    assert len(lines) == 1 and str(gone.relative_to(tmp_path / "var")) in lines[0]
    assert reconcile(store) == type(done)()  # nothing left to do


def test_reconcile_leaves_the_index_alone_when_no_indexed_file_is_there(tmp_path, store, conn, caplog):  # noqa: F811
    assert store.ingest(spooled(tmp_path), DIMSE).outcome is Outcome.STORED
    (tmp_path / "var" / "store").rename(tmp_path / "var" / "unmounted")  # as an unmounted volume
    with caplog.at_level(logging.ERROR, logger="gateway.reconcile"):
        assert reconcile(store).forgotten == 0
    assert index.get_instance(conn, SOP) is not None
    assert any("is the store folder mounted" in r.message for r in caplog.records)
