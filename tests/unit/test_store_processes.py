"""Two processes storing one SOP Instance UID at once (``send`` next to ``run``) leave the file
and its index row agreeing: the per-UID lock holds between processes too (storage.uidlock)."""

from __future__ import annotations

import multiprocessing
import random
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from gateway.storage import db, index, uidlock
from gateway.storage.store import Outcome, Store, default_router
from tests.unit.test_store import DIMSE, SOP, dataset

ROUNDS = 60


def _worker(var: str, n: int, barrier, errors) -> None:
    """One process: every round, store SOP with this worker's own content, the window between
    rename and commit widened (0-4 ms) as on a loaded machine."""
    rnd = random.Random(n)

    def widen(point):
        if point == "placed":
            threading.Event().wait(rnd.random() * 0.004)

    data_dir = Path(var)
    conn = db.connect(data_dir / "gateway.sqlite3")
    store = Store(data_dir, data_dir / "store", conn, router=default_router(["pacs"], []), checkpoint=widen)
    try:
        for r in range(ROUNDS):
            ds = dataset(pixels=bytes([n + 1]) * (16 + 64 * n))  # each worker's file has its own size
            ds.preamble = b"\0" * 128
            spool = data_dir / "tmp" / f"w{n}-{r}.dcm"
            ds.save_as(spool, implicit_vr=ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian)
            barrier.wait(60)
            result = store.ingest(spool, DIMSE)
            if result.outcome is not Outcome.STORED:
                errors.put(f"round {r}: {result.outcome} {result.reason}")
            barrier.wait(60)  # the parent compares file and row now
            barrier.wait(60)
    finally:
        conn.close()


def test_two_processes_storing_one_uid_leave_file_and_row_agreeing(tmp_path):
    var = tmp_path / "var"
    (var / "tmp").mkdir(parents=True)
    db.connect(var / "gateway.sqlite3").close()  # the schema, before the workers race for it
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(str(var), n, barrier, errors)) for n in range(2)]
    for w in workers:
        w.start()
    disagree = []
    conn = db.connect(var / "gateway.sqlite3")
    try:
        for r in range(ROUNDS):
            barrier.wait(120)  # both start storing
            barrier.wait(120)  # both done
            row = index.get_instance(conn, SOP)
            on_disk = (var / row["path"]).stat().st_size
            if on_disk != row["size"]:
                disagree.append((r, on_disk, row["size"]))
            barrier.wait(120)
    finally:
        conn.close()
        for w in workers:
            w.join(60)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers)
    assert errors.empty()
    print(f"\n{len(disagree)} of {ROUNDS} rounds ended with the file and its row disagreeing")
    assert disagree == []
    assert (var / uidlock.LOCK_NAME).stat().st_mode & 0o777 == 0o600


def test_a_uid_is_locked_between_processes_not_only_threads(tmp_path):
    """The record lock itself: a second process cannot take a UID this one holds."""
    locks = uidlock.ProcessLocks(tmp_path / uidlock.LOCK_NAME)
    ctx = multiprocessing.get_context("spawn")
    with locks.hold(["1.2.3"]):
        probe = ctx.Process(target=_try_lock, args=(str(tmp_path / uidlock.LOCK_NAME), "1.2.3"))
        probe.start()
        probe.join(60)
        assert probe.exitcode == BUSY  # held here: the other process could not take it
        other = ctx.Process(target=_try_lock, args=(str(tmp_path / uidlock.LOCK_NAME), "1.2.4"))
        other.start()
        other.join(60)
        assert other.exitcode == 0  # another UID is free
    probe = ctx.Process(target=_try_lock, args=(str(tmp_path / uidlock.LOCK_NAME), "1.2.3"))
    probe.start()
    probe.join(60)
    assert probe.exitcode == 0  # released


BUSY = 3


def _try_lock(path: str, uid: str) -> None:
    """Exit 0 when the UID's record lock could be taken, BUSY when another process holds it."""
    import fcntl
    import os
    import sys

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, uidlock.slot(uid))
    except OSError:
        sys.exit(BUSY)
    sys.exit(0)
