"""The one way in: ``Store.ingest`` takes a Part 10 file and makes it stored, indexed and queued.

Every source goes through it: C-STORE (receive), STOW-RS, ``dicom-gateway send`` and the
inbox's derived objects. One step, in this order: read the header (``header``), check the
UIDs (and what the request promised), ask the router which destinations get it, place the
file atomically (``files.place_atomic``), then in ONE transaction index it and queue it for
those destinations (and, for a derived object, mark its inbox job done). Only a ``STORED``
result may be acknowledged to anyone. The result's ``Outcome`` is the only thing a protocol
handler maps (receive to a DIMSE status, STOW-RS to an HTTP failure reason).

The router sees only the header (never pixel data) and the ``Arrival``; ``default_router``
is ``routes.received`` / ``routes.results`` or the explicit list an arrival carries.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from gateway.errors import InvalidUID, StorageFull, UnreadableHeader
from gateway.storage import db, index, jobs, qido, queue
from gateway.storage.datadir import FILE_MODE, make_dir
from gateway.storage.files import (
    COPY_BUFFER,
    FULL_ERRNOS,
    check_free_space,
    instance_path,
    place_atomic,
)
from gateway.storage.header import Header, read_header
from gateway.storage.uidlock import ProcessLocks, process_locks_for
from gateway.storage.uids import check_uid

log = logging.getLogger("gateway.store")

#: Every file ``ingest`` writes itself before placing it starts so (under ``data_dir/tmp``).
TEMP_PREFIX = "in-"


def tmp_dir(data_dir: Path) -> Path:
    """Where instances in transit live: on the store's filesystem, so placing is a rename."""
    return Path(data_dir) / "tmp"


class Source(str, enum.Enum):
    DIMSE = "dimse"  # a C-STORE from a peer
    STOW = "stow"  # a STOW-RS request
    SEND = "send"  # ``dicom-gateway send DEST PATH...``
    DERIVED = "derived"  # made by the inbox from an AI tool's array


#: The index's ``origin`` column (first release) for each source.
_ORIGIN = {Source.DIMSE: "received", Source.STOW: "received", Source.SEND: "manual",
           Source.DERIVED: "derived"}


@dataclass(frozen=True)
class Arrival:
    """Who brought an instance and how; the router and the index see this."""

    source: Source
    calling_ae: str | None = None
    called_ae: str | None = None
    peer: str | None = None  # network address of the sender, "host:port"
    identity: str | None = None  # authenticated HTTP user (STOW-RS)
    destinations: tuple[str, ...] | None = None  # explicit: ``send DEST``; None: the router decides
    job: str | None = None  # the inbox job a derived object comes from


@dataclass(frozen=True)
class Expected:
    """What the request promised, checked against the data set (None: not promised)."""

    sop_instance_uid: str | None = None  # C-STORE: Affected SOP Instance UID
    sop_class_uid: str | None = None  # C-STORE: Affected SOP Class UID
    study_uid: str | None = None  # STOW-RS: the study in the URL


@dataclass(frozen=True)
class RouteDecision:
    destinations: tuple[str, ...]
    rules: tuple[str, ...] = ()  # what decided (rule names, or the routes key), for the log
    #: Runs inside ingest's transaction after the queue rows (rule match counts, trigger state).
    in_transaction: Callable[[sqlite3.Connection], None] | None = None
    log_line: str = ""  # logged once the instance is stored ("routed SOP ... by rules ...")


Router = Callable[[Header, Arrival], RouteDecision]
#: Runs inside ingest's transaction for every stored instance (e.g. QIDO's attribute rows).
Indexer = Callable[[sqlite3.Connection, Header], None]


def default_router(received: Iterable[str], results: Iterable[str]) -> Router:
    """``routes.received`` for instances from outside, ``routes.results`` for derived ones;
    an arrival's explicit destinations win."""
    received, results = tuple(received), tuple(results)

    def route(header: Header, arrival: Arrival) -> RouteDecision:
        if arrival.destinations is not None:
            return RouteDecision(tuple(arrival.destinations), ("explicit",))
        if arrival.source is Source.DERIVED:
            return RouteDecision(results, ("routes.results",))
        return RouteDecision(received, ("routes.received",))

    return route


class Outcome(str, enum.Enum):
    STORED = "stored"  # the file is durable, indexed and queued for its destinations
    INVALID = "invalid"  # a UID is missing/invalid or differs from the request; nothing kept
    WRONG_STUDY = "wrong_study"  # its Study Instance UID is not the one the request named; nothing kept
    UNREADABLE = "unreadable"  # not a DICOM Part 10 file we can parse; nothing kept
    NO_SPACE = "no_space"  # disk full, below storage.min_free_bytes, or larger than allowed
    FAILED = "failed"  # any other local failure (I/O, database); nothing acknowledged


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""  # one sentence for the log and the peer (DIMSE Error Comment, HTTP body)
    sop_instance_uid: str | None = None
    path: Path | None = None
    size: int = 0
    queued_for: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    header: Header | None = None


def quarantine_dir(data_dir: Path) -> Path:
    """Where files the index cannot vouch for go (0700), instead of staying unacknowledged in the store."""
    return Path(data_dir) / "quarantine"


def quarantine(data_dir: Path, path: Path, reason: str) -> Path | None:
    """Move ``path`` into ``data_dir/quarantine`` (0600) with one log line; None if it is already gone."""
    folder = make_dir(quarantine_dir(data_dir))
    dest = folder / f"{path.name}.{secrets.token_hex(4)}"
    try:
        os.replace(path, dest)
        os.chmod(dest, FILE_MODE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot quarantine %s (%s): %s; removing it", path, reason, exc.strerror or exc)
        discard(path)
        return None
    log.warning("quarantined %s as %s: %s", path, dest, reason)
    return dest


class UidLocks:
    """One lock per SOP Instance UID (reference counted), so a file and its row change together;
    with ``between`` (``uidlock.ProcessLocks``) also against other processes on the same data folder."""

    def __init__(self, between: ProcessLocks | None = None):
        self._mutex = threading.Lock()
        self._locks: dict[str, list] = {}  # uid -> [Lock, holders and waiters]
        self._between = between

    @contextmanager
    def hold(self, uids: Iterable[str]):
        """Hold the locks of ``uids`` (sorted, so two batches never deadlock)."""
        taken = []
        try:
            for uid in sorted(set(uids)):
                with self._mutex:
                    entry = self._locks.setdefault(uid, [threading.Lock(), 0])
                    entry[1] += 1
                entry[0].acquire()
                taken.append(uid)
            with self._between.hold(taken) if self._between is not None else nullcontext():
                yield
        finally:
            for uid in reversed(taken):
                with self._mutex:
                    entry = self._locks[uid]
                    entry[0].release()
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._locks[uid]

    def __len__(self) -> int:
        return len(self._locks)


_SHARED_LOCKS: dict[Path, UidLocks] = {}
_SHARED_MUTEX = threading.Lock()


def uid_locks_for(store_dir: Path, data_dir: Path | None = None) -> UidLocks:
    """The one ``UidLocks`` of a store folder in this process (receive, STOW and inbox share it);
    with ``data_dir``, serialized with other processes too (``send`` next to ``run``)."""
    key = Path(os.path.abspath(store_dir))
    with _SHARED_MUTEX:
        return _SHARED_LOCKS.setdefault(
            key, UidLocks(process_locks_for(data_dir) if data_dir is not None else None))


def discard(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Store:
    """The store of one node: files under ``store_dir``, rows in the node's SQLite database.

    Safe to call from many threads (pynetdicom runs one per association): files are written
    in parallel, the shared connection is only used under a lock. ``checkpoint(name)`` is a
    test hook called at ``"placed"`` (file in place, transaction not yet committed); each of
    ``indexers`` adds its rows for a stored instance inside the ingest transaction.
    """

    def __init__(
        self,
        data_dir: Path,
        store_dir: Path,
        conn: sqlite3.Connection,
        *,
        router: Router,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] | None = None,
        indexers: Iterable[Indexer] = (qido.indexer,),
    ):
        self.data_dir = Path(data_dir)
        self.store_dir = Path(store_dir)
        self.tmp_dir = tmp_dir(self.data_dir)
        self.conn = conn
        self.router = router
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self.checkpoint = checkpoint or (lambda name: None)
        self.indexers = tuple(indexers)
        self._db_lock = threading.Lock()
        self._uid_locks = uid_locks_for(self.store_dir, self.data_dir)

    @classmethod
    def open(cls, config, router: Router | None = None, **kwargs) -> Store:
        """The store of ``config``'s node with its own database connection (``close()`` it)."""
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        if router is None:
            from gateway.routing.router import Router  # routing builds on this module

            router = Router(config)
        return cls(config.node.data_dir, config.store_dir, db.connect(config.db_path),
                   router=router, min_free_bytes=config.storage.min_free_bytes, **kwargs)

    def close(self) -> None:
        """Close the connection; a handler still running afterwards gets Outcome.FAILED."""
        with self._db_lock:
            self.conn.close()

    # ------------------------------------------------------------------ the one way in

    def ingest(self, path: Path, arrival: Arrival, expected: Expected | None = None,
               *, head: bytes | None = None) -> Result:
        """Check, place, index and queue the Part 10 file at ``path``; never raises for a bad instance.

        ``path`` is on the store's filesystem and ours: moved into the store when STORED,
        deleted otherwise (when the index write fails after placing, the file goes to
        ``data_dir/quarantine``). ``head``: the file's first bytes, when the
        caller has them in memory (receive's spool), so the header costs no read.
        """
        path = Path(path)
        try:
            result = self._ingest(path, arrival, expected or Expected(), head)
        except BaseException:
            discard(path)
            raise
        if result.outcome is not Outcome.STORED and result.path is None:
            discard(path)
        return result

    def ingest_many(self, items: list[tuple[Path, Arrival, Expected | None]], workers: int = 4) -> list[Result]:
        """``ingest`` for several files at once (a STOW-RS request): headers read and files placed
        by ``workers`` threads (their fsyncs overlap), then ONE transaction indexes and queues all
        of them. Results in the order of ``items``; each file is ours as in ``ingest``."""
        from concurrent.futures import ThreadPoolExecutor

        def read(item):
            path, arrival, expected = Path(item[0]), item[1], item[2] or Expected()
            try:
                return self._read(path, arrival, expected, None)
            except BaseException:
                discard(path)
                raise

        def place_all(group):  # one UID's files, in request order: the last one wins file and row
            out = []
            for i, r in group:
                try:
                    out.append((i, self._place(r)))
                except BaseException:
                    discard(r.path)
                    raise
            return out

        pool_size = min(workers, len(items))
        with ThreadPoolExecutor(max(pool_size, 1), thread_name_prefix="ingest") as pool:
            read_all = list(pool.map(read, items)) if pool_size > 1 else [read(item) for item in items]
            groups: dict[str, list] = {}
            for i, r in enumerate(read_all):
                if isinstance(r, _Read):
                    groups.setdefault(r.header.sop_instance_uid, []).append((i, r))
            prepared: list = list(read_all)
            # The UIDs stay locked from placing to commit: a concurrent ingest of the same UID
            # cannot slip its file in between our rename and our row.
            with self._uid_locks.hold(groups):
                placed_groups = (list(pool.map(place_all, groups.values())) if pool_size > 1
                                 else [place_all(g) for g in groups.values()])
                for group in placed_groups:
                    for i, p in group:
                        prepared[i] = p
                committed = iter(self._commit([p for p in prepared if isinstance(p, _Placed)]))
        out = []
        for (path, _, _), p in zip(items, prepared):
            result = next(committed) if isinstance(p, _Placed) else p
            if result.outcome is not Outcome.STORED and result.path is None:
                discard(Path(path))
            out.append(result)
        return out

    def ingest_written(self, write: Callable[[BinaryIO], None], arrival: Arrival,
                       expected: Expected | None = None) -> Result:
        """``ingest`` for a file we write first: ``write(f)`` writes the Part 10 file (a derived
        object, a copy of a file given to ``send``). Exceptions from ``write`` other than a
        full disk propagate (the temporary file is removed)."""
        try:
            check_free_space(self.store_dir, self.min_free_bytes)
            make_dir(self.tmp_dir)
            temp = self.tmp_dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}.dcm"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                try:
                    write(f)
                except BaseException:
                    discard(temp)
                    raise
        except StorageFull as exc:
            return Result(Outcome.NO_SPACE, str(exc))
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                return Result(Outcome.NO_SPACE, f"the disk holding {self.tmp_dir} is full; free space")
            return Result(Outcome.FAILED, f"cannot write a temporary file: {exc.strerror or exc}")
        return self.ingest(temp, arrival, expected)

    def ingest_dataset(self, ds, arrival: Arrival) -> Result:
        """``ingest`` for a pydicom Dataset with its file meta (a derived object)."""
        return self.ingest_written(lambda f: ds.save_as(f, enforce_file_format=True), arrival)

    def ingest_copy(self, source: Path, arrival: Arrival) -> Result:
        """``ingest`` for a copy of a file elsewhere (``send``); the file itself is left alone."""
        with open(source, "rb") as src:
            return self.ingest_written(lambda out: shutil.copyfileobj(src, out, COPY_BUFFER), arrival)

    def adopt(self, path: Path) -> Result:
        """Index a file found in the store without a row (start-up reconcile), as ``send`` records
        it but queued for no one; STORED, or a refusal (the caller quarantines the file)."""
        read = self._read(path, Arrival(Source.SEND), Expected(), None)
        if not isinstance(read, _Read):
            return read
        if read.target != path:
            return Result(Outcome.INVALID, f"its UIDs belong at {read.target}", read.header.sop_instance_uid)
        with self._uid_locks.hold([read.header.sop_instance_uid]):
            size = path.stat().st_size
            placed = self._placed(replace(read, decision=RouteDecision(())), size)
            return self._commit([placed])[0]

    # ------------------------------------------------------------------ the steps

    def _ingest(self, path: Path, arrival: Arrival, expected: Expected, head: bytes | None) -> Result:
        read = self._read(path, arrival, expected, head)
        if not isinstance(read, _Read):
            return read
        with self._uid_locks.hold([read.header.sop_instance_uid]):  # rename and row together
            placed = self._place(read)
            return self._commit([placed])[0] if isinstance(placed, _Placed) else placed

    def _read(self, path: Path, arrival: Arrival, expected: Expected, head: bytes | None) -> Result | _Read:
        """Read, check and route one file: a refusal ``Result``, or what to place."""
        try:
            header = read_header(path, head)
        except UnreadableHeader as exc:
            return Result(Outcome.UNREADABLE, str(exc))
        except OSError as exc:
            return Result(Outcome.FAILED, f"cannot read the received file: {exc.strerror or exc}")
        except Exception as exc:  # pydicom raises many types on malformed data
            return Result(Outcome.UNREADABLE, f"cannot parse the data set: {exc}"[:200])
        refused = _check(header, expected)
        if refused is not None:
            return replace(refused, header=header)
        sop = header.sop_instance_uid
        target = instance_path(self.store_dir, header.study_uid, header.series_uid, sop)
        decision = self.router(header, arrival)
        return _Read(path, header, target, decision, arrival)

    def _place(self, read: _Read) -> Result | _Placed:
        """Place one read file in the store (the caller holds its UID's lock): a failure or what to commit."""
        path, header, target, decision, arrival = read.path, read.header, read.target, read.decision, read.arrival
        sop = header.sop_instance_uid
        try:
            check_free_space(self.store_dir, self.min_free_bytes)
            size = place_atomic(path, target)
        except StorageFull as exc:
            return Result(Outcome.NO_SPACE, str(exc), sop, header=header)
        except OSError as exc:
            return Result(Outcome.FAILED, f"cannot write {target.name}: {exc.strerror or exc}", sop,
                          header=header)
        self.checkpoint("placed")
        return self._placed(read, size)

    def _placed(self, read: _Read, size: int) -> _Placed:
        """What the index transaction records for a file now at ``read.target``."""
        target, decision, arrival = read.target, read.decision, read.arrival
        header = replace(read.header, path=target)
        sop = header.sop_instance_uid
        now = self.clock()
        record = index.InstanceRecord(
            sop_instance_uid=sop,
            sop_class_uid=header.sop_class_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            transfer_syntax=header.transfer_syntax,
            path=str(target.relative_to(self.data_dir)),
            size=size,
            calling_ae=arrival.calling_ae,
            origin=_ORIGIN[arrival.source],
            received_at=now,
            job=arrival.job,
            dataset_offset=header.dataset_offset,
            source=arrival.source.value,
        )
        return _Placed(header, target, size, record, decision, arrival, now)

    def _commit(self, placed: list[_Placed]) -> list[Result]:
        """Index and queue placed files in ONE transaction; all STORED, or none (files stay)."""
        if not placed:
            return []
        try:
            with self._db_lock, db.transaction(self.conn):
                for p in placed:
                    sop, header, decision, arrival = p.record.sop_instance_uid, p.header, p.decision, p.arrival
                    index.record_instance(self.conn, p.record)
                    queue.enqueue(self.conn, decision.destinations, sop, p.now)
                    if arrival.source is Source.DERIVED and arrival.job is not None:
                        jobs.mark_done(self.conn, arrival.job, sop, header.series_uid, p.now)
                    for indexer in self.indexers:
                        try:
                            indexer(self.conn, header)
                        except sqlite3.Error:
                            raise
                        except Exception as exc:  # odd values: stored and queued all the same
                            log.warning("SOP %s: %s could not index it: %r", sop,
                                        getattr(indexer, "__name__", indexer), exc)
                    if decision.in_transaction is not None:
                        decision.in_transaction(self.conn)
        except sqlite3.Error as exc:
            # A file in the store must have its row: without one it goes to quarantine/.
            for p in placed:
                quarantine(self.data_dir, p.target, f"placed but not indexed: {exc}")
            if "full" in str(exc).lower():
                return [Result(Outcome.NO_SPACE, "the database disk is full; free space", p.record.sop_instance_uid,
                               header=p.header) for p in placed]
            return [Result(Outcome.FAILED, f"cannot index the instance: {exc}", p.record.sop_instance_uid,
                           header=p.header) for p in placed]
        results = []
        for p in placed:
            if p.decision.log_line:
                log.info("%s", p.decision.log_line)
            results.append(Result(Outcome.STORED, "", p.record.sop_instance_uid, p.target, p.size,
                                  p.decision.destinations, p.decision.rules, p.header))
        return results


@dataclass(frozen=True)
class _Read:
    """A file whose header is read, checked and routed, waiting to be placed."""

    path: Path
    header: Header
    target: Path
    decision: RouteDecision
    arrival: Arrival


@dataclass(frozen=True)
class _Placed:
    """A file checked and placed in the store, waiting for its index transaction."""

    header: Header
    target: Path
    size: int
    record: index.InstanceRecord
    decision: RouteDecision
    arrival: Arrival
    now: float


def _check(header: Header, expected: Expected) -> Result | None:
    """An INVALID/WRONG_STUDY result when the UIDs are unusable or break a promise; else None."""
    sop, sop_class = header.sop_instance_uid, header.sop_class_uid
    try:
        check_uid(header.study_uid, "Study Instance UID")
        check_uid(header.series_uid, "Series Instance UID")
        check_uid(sop, "SOP Instance UID")
        check_uid(sop_class, "SOP Class UID")
    except InvalidUID as exc:
        return Result(Outcome.INVALID, str(exc))
    if expected.sop_instance_uid is not None and sop != expected.sop_instance_uid:
        return Result(Outcome.INVALID, f"SOP Instance UID {sop} in the data set differs from "
                                       f"{expected.sop_instance_uid!s:.64} in the request")
    if expected.sop_class_uid is not None and sop_class != expected.sop_class_uid:
        return Result(Outcome.INVALID, f"SOP Class UID {sop_class} in the data set differs from "
                                       f"{expected.sop_class_uid!s:.64} in the request", sop)
    if header.media_sop_instance_uid != sop:
        return Result(Outcome.INVALID, f"its file meta names SOP Instance UID "
                                       f"{header.media_sop_instance_uid or '(none)'!s:.64}, the data set {sop}")
    if header.media_sop_class_uid != sop_class:
        return Result(Outcome.INVALID, f"its file meta names SOP Class UID "
                                       f"{header.media_sop_class_uid or '(none)'!s:.64}, the data set "
                                       f"{sop_class}", sop)
    if expected.study_uid is not None and header.study_uid != expected.study_uid:
        return Result(Outcome.WRONG_STUDY, f"its Study Instance UID {header.study_uid} differs from "
                                           f"{expected.study_uid!s:.64} in the request", sop)
    return None
