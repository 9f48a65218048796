"""The receiving AE: C-ECHO and C-STORE, the AE-title policy and the per-association limits.

Handlers stay thin: a C-STORE handler hands the spooled bytes to ``store.Store`` and maps
its ``Outcome`` to a DIMSE status; nothing here knows about paths or rows. Dependencies are
bound to the handlers through pynetdicom's ``evt_handlers`` arguments, never module state.

Instances are streamed to disk while they arrive (pynetdicom's chunked receive): each
C-STORE data set goes into a spool file under ``data_dir/tmp`` (the store's filesystem),
then is renamed into the store. Memory per association is therefore bounded by one PDU,
whatever the instance's size.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    AllStoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from gateway import db
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.netutil import set_nodelay
from gateway.store import Incoming, Outcome, Result, Store, free_bytes

log = logging.getLogger("gateway.receive")

# The DIMSE status each store outcome is answered with (PS3.4 B.2.3).
STATUS = {
    Outcome.STORED: 0x0000,  # Success
    Outcome.INVALID: 0xC000,  # Error: Cannot understand (bad or mismatched UIDs)
    Outcome.UNREADABLE: 0xC000,  # Error: Cannot understand (not a parsable data set)
    Outcome.NO_SPACE: 0xA700,  # Refused: Out of Resources (peer may retry later)
    Outcome.FAILED: 0xA700,  # Refused: Out of Resources (local I/O or database failure)
}

_LAST_UID_TAG = 0x0020000E  # Series Instance UID: the data set is read up to here, no further
_FREE_SPACE_CHECK_EVERY = 64 * 1024 * 1024
_SPOOL_BUFFER = 1024 * 1024


# --------------------------------------------------------------------------- spooling


class SpoolFile:
    """The file pynetdicom streams one C-STORE data set into (in place of its temp file).

    It never raises into pynetdicom's network thread: a full disk, a free-space floor or an
    instance larger than ``storage.max_instance_bytes`` stops the writing, drops what was
    written and records the ``problem``; the C-STORE handler answers it with 0xA700.
    """

    def __init__(self, folder: Path, max_bytes: int, min_free_bytes: int):
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=folder)
        self.name = name
        self.file = self  # pynetdicom calls ``file.flush()`` after every fragment
        self._f = os.fdopen(fd, "wb", buffering=_SPOOL_BUFFER)
        self._folder = folder
        self._max_bytes = max_bytes
        self._min_free = min_free_bytes
        self._next_check = _FREE_SPACE_CHECK_EVERY
        self.size = 0
        self.problem: str | None = None

    def write(self, data) -> int:
        n = len(data)
        if self.problem is not None:
            return n
        self.size += n
        if self.size > self._max_bytes:
            return self._give_up(
                f"instance is larger than storage.max_instance_bytes ({self._max_bytes} bytes)", n
            )
        if self._min_free and self.size >= self._next_check:
            self._next_check += _FREE_SPACE_CHECK_EVERY
            if free_bytes(self._folder) < self._min_free:
                return self._give_up("free disk space fell below storage.min_free_bytes", n)
        try:
            self._f.write(data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return self._give_up("the disk is full" if full else f"cannot spool: {exc.strerror}", n)
        return n

    def _give_up(self, problem: str, n: int) -> int:
        self.problem = problem
        try:
            self._f.seek(0)
            self._f.truncate()  # give the space back now, not when the data set ends
        except OSError:
            pass
        return n

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; we only flush once the data set is complete."""

    def finish(self) -> None:
        """Push buffered bytes to the file (the handler calls this before reading it)."""
        if self.problem is None:
            try:
                self._f.flush()
            except OSError as exc:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                self._give_up("the disk is full" if full else f"cannot spool: {exc.strerror}", 0)

    def placed(self) -> None:
        """The file was renamed into the store: make pynetdicom's later unlink a no-op."""
        self.name = self.name + ".placed"

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


@dataclass
class Spooler:
    """Per-association spool settings, attached to the association at connection time."""

    folder: Path
    max_bytes: int
    min_free_bytes: int
    files: dict[str, SpoolFile] = field(default_factory=dict)

    def open(self) -> SpoolFile:
        spool = SpoolFile(self.folder, self.max_bytes, self.min_free_bytes)
        self.files[spool.name] = spool
        return spool

    def take(self, path) -> SpoolFile | None:
        return self.files.pop(str(path), None)


_pynetdicom_temp_file = dimse_messages.NamedTemporaryFile


def _spool_file(*args, **kwargs):
    """Stands in for pynetdicom's NamedTemporaryFile: our spool file on receiving associations.

    pynetdicom decodes incoming P-DATA in the association's DUL thread, whose ``assoc`` tells
    which server (and so which spool folder and limits) the data set belongs to.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    spooler = getattr(assoc, "gateway_spooler", None)
    if spooler is None:
        return _pynetdicom_temp_file(*args, **kwargs)
    return spooler.open()


def _enable_spooling() -> None:
    """Make pynetdicom stream C-STORE data sets to files (process-wide library settings)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_file


# --------------------------------------------------------------------------- the association's I/O

_IDLE_WAIT = 0.002  # longest a DUL thread waits for socket data before checking its queues


class _GatewaySocket(AssociationSocket):
    """The acceptor's socket, tuned; swapped in for pynetdicom's at connection time.

    * ``recv`` refuses PDUs longer than ``node.max_pdu_size`` allows (pynetdicom buffers
      whatever length a peer declares, so a declared 4 GB PDU would be read whole) and reads
      into one buffer instead of 4 KiB pieces.
    * ``ready`` waits on the socket (up to ``_IDLE_WAIT``) instead of the DUL thread sleeping
      a fixed millisecond between polls: a request is read as soon as it arrives.
    """

    gateway_limit: int
    gateway_peer: Callable[[], str]

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.gateway_limit:
            log.warning(
                "closing the connection from %s: it declared a PDU of %d bytes, more than "
                "node.max_pdu_size allows (%d)", self.gateway_peer(), nr_bytes, self.gateway_limit,
            )
            return bytearray()
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                view.release()
                return buf[:got]
            got += n
        return buf

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            return False
        dul = self.assoc.dul
        busy = bool(dul.to_provider_queue.queue) or bool(dul.event_queue.queue)
        try:
            ready, _, _ = select.select([self.socket], [], [], 0 if busy else _IDLE_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")
            return False
        return bool(ready)


class _ServeAtOnce(queue.Queue):
    """Stands in for the DIMSE message queue: serves C-STORE/C-ECHO requests immediately.

    pynetdicom's association thread polls this queue every millisecond, and the response
    then waits for the DUL thread's next poll. Serving the request in the DUL thread that
    just decoded it sends the response on that thread's very next step instead.
    """

    def __init__(self, assoc):
        super().__init__()
        self._assoc = assoc

    def put(self, item, block=True, timeout=None):
        context_id, msg = item
        assoc = self._assoc
        if (
            isinstance(msg, (C_STORE, C_ECHO))
            and threading.current_thread() is assoc.dul
            and context_id in assoc._accepted_cx
            and msg.is_valid_request
        ):
            assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


def _peer(assoc) -> str:
    try:
        title = assoc.requestor.ae_title
    except AttributeError:
        title = None
    address = getattr(assoc.requestor, "address", "?")
    port = getattr(assoc.requestor, "port", "?")
    return f"AE {title} at {address}:{port}" if title else f"{address}:{port}"


# --------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class Limits:
    spool_dir: Path
    max_pdu: int
    max_instance_bytes: int
    min_free_bytes: int


def _on_conn_open(event, limits: Limits) -> None:
    """Bind this association's spool settings, bounded socket reads and prompt serving."""
    assoc = event.assoc
    assoc.gateway_spooler = Spooler(limits.spool_dir, limits.max_instance_bytes, limits.min_free_bytes)
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = _GatewaySocket
        # Association PDUs (A-ASSOCIATE-RQ with user identity) may exceed a small max PDU.
        sock.gateway_limit = max(limits.max_pdu, 65536) + 1024
        sock.gateway_peer = lambda: _peer(assoc)
        assoc.dul._run_loop_delay = 0  # the socket wait above paces the DUL loop
    assoc.dimse.msg_queue = _ServeAtOnce(assoc)


def _on_established(event) -> None:
    log.info("association from %s established", _peer(event.assoc))


def _on_rejected(event, config: Config) -> None:
    rq = event.assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "")).strip()
    called = str(getattr(rq, "called_ae_title", "")).strip()
    allowed = config.security.allowed_calling_aets
    if allowed and calling not in allowed:
        reason = f"calling AE title {calling!r} is not in security.allowed_calling_aets"
    elif config.node.require_called_ae_title and called != config.node.ae_title:
        reason = f"called AE title {called!r} is not ours ({config.node.ae_title!r})"
    else:
        reason = f"node.max_associations ({config.node.max_associations}) reached"
    log.warning("rejected association from %s: %s", _peer(event.assoc), reason)


def _on_echo(event) -> int:
    log.info("C-ECHO from %s", _peer(event.assoc))
    return 0x0000


def _read_uids(path: Path) -> Dataset:
    """The data set's top-level elements up to Series Instance UID (pixel data is never read)."""
    with open(path, "rb") as f:
        return read_partial(
            f, stop_when=lambda tag, vr, length: tag > _LAST_UID_TAG, defer_size=4096
        )


def _status(result: Result) -> Dataset:
    rsp = Dataset()
    rsp.Status = STATUS[result.outcome]
    if result.reason:
        rsp.ErrorComment = result.reason[:64]
    return rsp


def _on_store(event, store: Store, on_queued: Callable[[Iterable[str]], None]) -> Dataset:
    """Spooled data set -> store.add_spooled -> DIMSE status; log one line either way."""
    assoc = event.assoc
    req = event.request
    calling = str(assoc.requestor.ae_title).strip()
    req_sop = str(req.AffectedSOPInstanceUID or "")
    path = event.dataset_path
    spool = assoc.gateway_spooler.take(path)
    result = None
    if spool is not None:
        spool.finish()
        if spool.problem:
            result = Result(Outcome.NO_SPACE, spool.problem, None)
    if result is None:
        try:
            ds = _read_uids(path)
            item = Incoming(
                spool_path=Path(path),
                request_sop_instance_uid=req_sop,
                request_sop_class_uid=str(req.AffectedSOPClassUID or ""),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_ae=calling,
                study_uid=ds.get("StudyInstanceUID"),
                series_uid=ds.get("SeriesInstanceUID"),
                sop_instance_uid=ds.get("SOPInstanceUID"),
                sop_class_uid=ds.get("SOPClassUID"),
            )
        except Exception as exc:  # pydicom raises many types on malformed data
            result = Result(Outcome.UNREADABLE, f"cannot parse the data set: {exc}"[:200], None)
        else:
            result = store.add_spooled(item)
    if result.outcome is Outcome.STORED:
        if spool is not None:
            spool.placed()
        log.info("received SOP %s from AE %s (%d bytes)", result.sop_instance_uid, calling, result.size)
        if result.queued_for:
            log.info("queued SOP %s for %s", result.sop_instance_uid, ", ".join(result.queued_for))
            on_queued(result.queued_for)
    else:
        log.warning(
            "refused SOP %.70s from AE %s with 0x%04X: %s",
            req_sop, calling, STATUS[result.outcome], result.reason,
        )
    return _status(result)


# --------------------------------------------------------------------------- the server


class ReceiveServer:
    """The listening AE; ``shutdown()`` stops accepting, lets running associations finish
    (bounded by ``grace`` seconds), aborts the rest and closes the database."""

    def __init__(self, ae: AE, server, conn, config: Config):
        self.ae, self.server, self.conn, self.config = ae, server, conn, config
        self.address = server.server_address

    def shutdown(self, grace: float = 5.0) -> None:
        self.server.shutdown()  # no new connections
        deadline = time.monotonic() + grace
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._established():
            log.warning("aborting the association from %s at shutdown", _peer(assoc))
            assoc.abort(block=False)
        deadline = time.monotonic() + 2.0
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        # pynetdicom's network threads are not daemons: one waiting for an A-ASSOCIATE-RQ
        # that never comes (a port probe) would hold the process for the ACSE timeout.
        for assoc in self.server.active_associations:
            assoc.dul.kill_dul()
        for assoc in self.server.active_associations:
            assoc.dul.join(1.0)
        self.conn.close()

    def _established(self) -> list:
        return [a for a in self.server.active_associations if a.is_established]


def _clean_spool(folder: Path) -> None:
    """Spool files left by a crash are incomplete and were never acknowledged: remove them."""
    for leftover in folder.glob("rx-*.dcm*"):
        try:
            leftover.unlink()
        except OSError:
            pass


def start_server(config: Config, on_queued: Callable[[Iterable[str]], None]) -> ReceiveServer:
    """Start the SCP on ``node.host:node.port``; it is listening when this returns."""
    node = config.node
    spool_dir = node.data_dir / "tmp"
    spool_dir.mkdir(parents=True, exist_ok=True)
    _clean_spool(spool_dir)
    config.store_dir.mkdir(parents=True, exist_ok=True)
    conn = db.connect(config.db_path)
    store = Store(
        data_dir=node.data_dir,
        store_dir=config.store_dir,
        conn=conn,
        routes=config.routes.received,
        min_free_bytes=config.storage.min_free_bytes,
    )
    _enable_spooling()

    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.network_timeout = node.network_timeout_seconds
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.require_called_aet = node.require_called_ae_title
    ae.require_calling_aet = list(config.security.allowed_calling_aets)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)

    limits = Limits(spool_dir, node.max_pdu_size, config.storage.max_instance_bytes,
                    config.storage.min_free_bytes)
    handlers = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_CONN_OPEN, _on_conn_open, [limits]),
        (evt.EVT_ESTABLISHED, _on_established),
        (evt.EVT_REJECTED, _on_rejected, [config]),
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_C_STORE, _on_store, [store, on_queued]),
    ]
    try:
        server = ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)
    except OSError as exc:
        conn.close()
        raise GatewayError(
            f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc} "
            "(is another gateway running? change node.port)"
        ) from None
    return ReceiveServer(ae, server, conn, config)
