"""Where an instance's file goes (checked UIDs only) and how it gets there atomically.

Layout: ``<store_dir>/<study uid>/<series uid>/<sop instance uid>.dcm``. Every file is first
written (or spooled) under a temporary name on the same filesystem, fsynced, renamed over
its final name and then the folder is fsynced: after a crash a path holds either the old
complete file or the new complete one, never a partial one, and a rename that was reported
done survives power loss (the folder fsync is what makes the rename itself durable).

``Store.add_spooled`` is the whole receive step after the bytes arrived: check, place,
then index and queue in one transaction. It returns an ``Outcome``; only ``receive`` knows
what DIMSE status each outcome means.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from gateway.storage import db, index, queue
from gateway.errors import InvalidUID, StorageFull
from gateway.storage.uids import check_uid

log = logging.getLogger("gateway.store")

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class Outcome(str, enum.Enum):
    STORED = "stored"  # the file is durable, indexed and queued for routes.received
    INVALID = "invalid"  # a UID is missing/invalid or differs from the request; nothing kept
    UNREADABLE = "unreadable"  # the bytes are not a DICOM data set we can parse; nothing kept
    NO_SPACE = "no_space"  # disk full, below storage.min_free_bytes, or larger than allowed
    FAILED = "failed"  # any other local failure (I/O, database); nothing acknowledged


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""  # one sentence for the log and the peer's Error Comment
    sop_instance_uid: str | None = None
    path: Path | None = None
    size: int = 0
    queued_for: tuple[str, ...] = ()


# --------------------------------------------------------------------------- files


def instance_path(store_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``store_dir/<study>/<series>/<sop>.dcm``; raises ``InvalidUID`` unless all three are UIDs.

    Only strings that pass ``uids.check_uid`` (digits and dots) become path parts, so no
    dataset content can place a file outside ``store_dir``.
    """
    study = check_uid(study_uid, "Study Instance UID")
    series = check_uid(series_uid, "Series Instance UID")
    sop = check_uid(sop_uid, "SOP Instance UID")
    return Path(store_dir) / study / series / f"{sop}.dcm"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder created so the new entries survive a crash."""
    folder = Path(folder)
    if folder.is_dir():
        return
    missing = []
    probe = folder
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)  # readable by the gateway's user only, whatever the umask
        except FileExistsError:
            pass  # another thread made it; its creator fsyncs the parent
        _fsync_dir(path.parent)


def _storage_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(f"the disk holding {path.parent} is full; free space and the peer may resend")
    return exc


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Create or replace ``path`` with what ``write(file)`` writes; return the size in bytes.

    The data goes to a temporary file in the same folder, is fsynced, renamed over ``path``
    and the folder is fsynced. ``ENOSPC``/``EDQUOT`` raise ``errors.StorageFull``; on any
    failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        ensure_dir(path.parent)
    except OSError as exc:
        raise _storage_error(exc, path) from exc
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _storage_error(exc, path) from exc
        raise
    _fsync_dir(path.parent)
    return size


def place_atomic(src: Path, path: Path) -> int:
    """Move an already written file ``src`` onto ``path`` durably (fsync, rename, fsync folder).

    ``src`` should be on the same filesystem (then this is a rename); otherwise it is copied
    with ``write_atomic``. Returns the size; ``src`` is gone afterwards on success.
    """
    src, path = Path(src), Path(path)
    try:
        ensure_dir(path.parent)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.replace(src, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _storage_error(exc, path) from exc
        with open(src, "rb") as f:
            size = write_atomic(path, lambda out: shutil.copyfileobj(f, out, 1024 * 1024))
        src.unlink()
        return size
    _fsync_dir(path.parent)
    return size


def free_bytes(folder: Path) -> int:
    """Bytes available to us on the filesystem holding ``folder`` (the nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def check_free_space(folder: Path, min_free_bytes: int) -> None:
    """Raise ``StorageFull`` when the disk holding ``folder`` is below its free-space floor."""
    if min_free_bytes <= 0:
        return
    free = free_bytes(folder)
    if free < min_free_bytes:
        raise StorageFull(
            f"only {free / 1e6:.0f} MB free under {folder}, below storage.min_free_bytes "
            f"({min_free_bytes / 1e6:.0f} MB); free space or lower the floor"
        )


# --------------------------------------------------------------------------- the receive step


@dataclass(frozen=True)
class Incoming:
    """What the network side knows about one received instance (spooled to ``spool_path``)."""

    spool_path: Path  # a Part 10 file on the store's filesystem, ours to move or delete
    request_sop_instance_uid: str
    request_sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    study_uid: str | None  # as read from the data set
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None


class Store:
    """The store of one node: files under ``store_dir``, rows in the node's SQLite database.

    Safe to call from many threads (pynetdicom runs one per association): files are written
    in parallel, the shared connection is only used under a lock.
    """

    def __init__(
        self,
        data_dir: Path,
        store_dir: Path,
        conn: sqlite3.Connection,
        routes: Iterable[str],
        min_free_bytes: int,
        clock: Callable[[], float] = time.time,
    ):
        self.data_dir = Path(data_dir)
        self.store_dir = Path(store_dir)
        self.conn = conn
        self.routes = tuple(routes)
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self._db_lock = threading.Lock()

    def close(self) -> None:
        """Close the connection; a handler still running afterwards gets Outcome.FAILED."""
        with self._db_lock:
            self.conn.close()

    def add_spooled(self, item: Incoming) -> Result:
        """Check, place and index one spooled instance; never raises for a per-instance problem."""
        sop = item.sop_instance_uid
        try:
            path = instance_path(self.store_dir, item.study_uid, item.series_uid, sop)
            check_uid(item.sop_class_uid, "SOP Class UID")
        except InvalidUID as exc:
            return Result(Outcome.INVALID, str(exc), None)
        if sop != item.request_sop_instance_uid:
            return Result(
                Outcome.INVALID,
                f"SOP Instance UID {sop} in the data set differs from {item.request_sop_instance_uid!s:.64} "
                "in the request",
                None,
            )
        if item.sop_class_uid != item.request_sop_class_uid:
            return Result(
                Outcome.INVALID,
                f"SOP Class UID {item.sop_class_uid} in the data set differs from "
                f"{item.request_sop_class_uid!s:.64} in the request",
                sop,
            )
        try:
            check_free_space(self.store_dir, self.min_free_bytes)
            size = place_atomic(item.spool_path, path)
        except StorageFull as exc:
            return Result(Outcome.NO_SPACE, str(exc), sop)
        except OSError as exc:
            return Result(Outcome.FAILED, f"cannot write {path.name}: {exc.strerror or exc}", sop)
        now = self.clock()
        record = index.InstanceRecord(
            sop_instance_uid=sop,
            sop_class_uid=item.sop_class_uid,
            study_uid=item.study_uid,
            series_uid=item.series_uid,
            transfer_syntax=item.transfer_syntax,
            path=str(path.relative_to(self.data_dir)),
            size=size,
            calling_ae=item.calling_ae,
            origin="received",
            received_at=now,
        )
        try:
            with self._db_lock, db.transaction(self.conn):
                index.record_instance(self.conn, record)
                queue.enqueue(self.conn, self.routes, sop, now)
        except sqlite3.Error as exc:
            # The file stays (a resend replaces it); without a row it is not acknowledged.
            if "full" in str(exc).lower():
                return Result(Outcome.NO_SPACE, "the database disk is full; free space", sop)
            return Result(Outcome.FAILED, f"cannot index the instance: {exc}", sop)
        return Result(Outcome.STORED, "", sop, path, size, self.routes)
