"""The receiving AE: C-ECHO and C-STORE, the AE-title policy and the per-association limits.

Handlers stay thin: a C-STORE handler hands the spooled file to ``store.Store.ingest`` and
maps its ``Outcome`` to a DIMSE status; nothing here knows about paths or rows. Dependencies are
bound to the handlers through pynetdicom's ``evt_handlers`` arguments, never module state.

Instances are streamed to disk while they arrive (pynetdicom's chunked receive): each
C-STORE data set goes into a spool file (``spool``), then is renamed into the store, so
memory per association is bounded by one PDU whatever the instance's size. The handler
hands the spool file's first bytes (kept in memory) to ``store.ingest`` with the file, so
its header costs no read. pynetdicom itself is tuned per association at EVT_CONN_OPEN and
process-wide at start; ``dimse.fastpath`` says what each tuning replaces and why.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from gateway import audit as audit_trail
from gateway.storage import db
from gateway.storage.datadir import make_dir
from gateway.config import Config
from gateway.dimse import peers, tls
from gateway.errors import GatewayError
from gateway.logsafe import wire
from gateway.metrics import Metrics
from gateway.dimse.netutil import raw_socket, set_nodelay, wake_unrequested
from gateway.dimse.guard import ConnectionGuard
from gateway.dimse.meter import metered
from gateway.dimse.refusals import RefusalTrail
from gateway.dimse.spool import FREE_SPACE_CHECK_EVERY, Spooler, clean_spool, remove_pynetdicom_files
from gateway.storage.files import free_bytes
from gateway.routing.router import Router
from gateway.storage.header import UNCOMPRESSED
from gateway.storage.store import (
    Arrival,
    Expected,
    Outcome,
    Result,
    Source,
    Store,
    discard,
    tmp_dir,
)

log = logging.getLogger("gateway.receive")

#: Public-API mode: association threads of closed bare connects tolerated on top (see start_server).
PUBLIC_API_LINGERING_THREADS = 256

# The DIMSE status each store outcome is answered with (PS3.4 B.2.3).
STATUS = {
    Outcome.STORED: 0x0000,  # Success
    Outcome.INVALID: 0xC000,  # Error: Cannot understand (bad or mismatched UIDs)
    Outcome.UNREADABLE: 0xC000,  # Error: Cannot understand (not a parsable data set)
    Outcome.WRONG_STUDY: 0xC000,  # (STOW-RS only: C-STORE names no study)
    Outcome.NO_SPACE: 0xA700,  # Refused: Out of Resources (peer may retry later)
    Outcome.FAILED: 0xA700,  # Refused: Out of Resources (local I/O or database failure)
}


# --------------------------------------------------------------------------- handlers


def _peer(assoc) -> str:
    try:
        title = assoc.requestor.ae_title
    except AttributeError:
        title = None
    address = getattr(assoc.requestor, "address", "?")
    port = getattr(assoc.requestor, "port", "?")
    return f"AE {wire(title, 16)} at {address}:{port}" if title else f"{address}:{port}"


@dataclass(frozen=True)
class Limits:
    spool_dir: Path
    max_pdu: int
    max_instance_bytes: int
    min_free_bytes: int
    fast_path: bool = True


@dataclass
class _Counter:
    """Public-API mode: the bytes of the data set being received, counted as its PDUs arrive."""

    size: int = 0
    next_check: int = 0  # free space is checked when size reaches this (at the first fragment)
    problem: str | None = None
    started: float | None = None  # wall clock at its command set's end (pynetdicom opens its file after)
    complete: bool = False  # its last fragment arrived


@dataclass
class AssociationState:
    """What receive keeps per association (never attributes added to pynetdicom's objects)."""

    tally: audit_trail.Tally = field(default_factory=audit_trail.Tally)
    spooler: Spooler | None = None  # fast path: our spool files
    counter: _Counter = field(default_factory=_Counter)  # public API: the size limits


class Associations:
    """The registry ``receive`` owns: one ``AssociationState`` per live association."""

    def __init__(self):
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def open(self, assoc, state: AssociationState) -> None:
        with self._lock:
            self._states[assoc] = state

    def get(self, assoc) -> AssociationState | None:
        with self._lock:
            return self._states.get(assoc)

    def spooler(self, assoc) -> Spooler | None:
        state = self.get(assoc)
        return state.spooler if state is not None else None

    def oldest_transfer(self) -> float | None:
        """When the oldest data set still in transit (or being stored) started."""
        with self._lock:
            states = list(self._states.values())
        return min((s.counter.started for s in states if s.counter.started is not None), default=None)

    def pop_tally(self, assoc) -> audit_trail.Tally | None:
        """The association's tally, once (the audit message is written at most once)."""
        with self._lock:
            state = self._states.get(assoc)
            tally, state.tally = (state.tally, None) if state is not None else (None, None)
            return tally


def _on_conn_open(event, limits: Limits, registry: Associations) -> None:
    """Register this association; on the fast path: its spool, bounded socket reads, prompt serving."""
    assoc = event.assoc
    state = AssociationState()
    if limits.fast_path:
        from gateway.dimse.fastpath import tune_acceptor

        state.spooler = Spooler(limits.spool_dir, limits.max_instance_bytes, limits.min_free_bytes)
        registry.open(assoc, state)
        tune_acceptor(assoc, limits.max_pdu, lambda: _peer(assoc))
    else:
        registry.open(assoc, state)
        sock = raw_socket(assoc)
        if hasattr(sock, "gateway_on_end"):  # dimse.meter's socket
            sock.gateway_on_end = lambda: _on_read_end(assoc, limits, registry)
        _catch_write_errors(assoc, registry)


def _on_read_end(assoc, limits: Limits, registry: Associations) -> None:
    """Public-API mode: nothing more will arrive on this connection (end of file, a stall, a refusal).

    A thread still waiting for an A-ASSOCIATE-RQ is woken (it would hold a slot until the ACSE
    timeout), and pynetdicom's files of data sets that will never end are removed: every such
    file is older than the oldest data set still in transit.
    """
    wake_unrequested(assoc)
    state = registry.get(assoc)
    if state is not None and not state.counter.complete:
        state.counter.started = None  # its data set will never end
    oldest = registry.oldest_transfer()
    remove_pynetdicom_files(limits.spool_dir, None if oldest is None else oldest - _MTIME_SLACK)


#: File times lag the wall clock by up to a kernel tick; a file this much older is surely older.
_MTIME_SLACK = 1.0


def _catch_write_errors(assoc, registry: Associations) -> None:
    """Public-API mode: pynetdicom creates and writes its file in the DUL thread; an OSError there
    (no spool folder, no space) would end that thread with a traceback and leave the peer
    waiting. Caught here, it becomes the data set's problem: 0xA700 when the data set ends."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive) -> None:
        try:
            receive(primitive)
        except OSError as exc:
            state = registry.get(assoc)
            if state is not None and state.counter.problem is None:
                state.counter.problem = ("the disk is full" if exc.errno == errno.ENOSPC
                                         else f"cannot create a spool file: {exc.strerror or exc}")

    dimse.receive_primitive = receive_primitive


def _on_pdu_recv(event, limits: Limits, registry: Associations) -> None:
    """Public-API mode: count each C-STORE data set's bytes where they arrive (EVT_PDU_RECV).

    pynetdicom writes them to its temporary file once this handler returns. An instance over
    ``storage.max_instance_bytes``, free space below ``storage.min_free_bytes``, or a disk
    that cannot hold the next fragment, is answered 0xA700 when the data set ends, and its
    file removed; from the moment the problem is seen, the data set's fragments are emptied
    here, so the file stops growing and pynetdicom never writes into a full disk.
    """
    items = getattr(event.pdu, "presentation_data_value_items", None)
    state = registry.get(event.assoc)
    if not items or state is None:
        return
    counter = state.counter
    for item in items:
        data = item.presentation_data_value
        if not data:
            continue
        control = data[0]
        if control & 0x01:  # a command fragment: its last one starts a new message
            if control & 0x02:
                state.counter = counter = _Counter(started=time.time())
            continue
        counter.complete = bool(control & 0x02)
        counter.size += len(data) - 1
        if counter.problem is None:
            counter.problem = _over_limits(counter, len(data) - 1, limits)
        if counter.problem is not None and len(data) > 1:
            item.presentation_data_value = data[:1]  # the control header only: nothing to write


#: Public-API mode: a data set's fragment is refused unless the disk keeps this much free after it.
DISK_MARGIN = 1024 * 1024


def _over_limits(counter: _Counter, fragment: int, limits: Limits) -> str | None:
    """Why the data set being received must be refused, or None (free space checked more often
    the closer the disk is to its limit, at least every FREE_SPACE_CHECK_EVERY bytes)."""
    if counter.size > limits.max_instance_bytes:
        return f"instance is larger than storage.max_instance_bytes ({limits.max_instance_bytes} bytes)"
    if counter.size < counter.next_check:
        return None
    free = free_bytes(limits.spool_dir)
    headroom = free - fragment - max(limits.min_free_bytes, DISK_MARGIN)
    counter.next_check = counter.size + max(0, min(FREE_SPACE_CHECK_EVERY, headroom // 8))
    if limits.min_free_bytes and free - fragment < limits.min_free_bytes:
        return "free disk space fell below storage.min_free_bytes"
    if free - fragment < DISK_MARGIN:
        return "the disk is full"
    return None


def _on_conn_close(event, audit, registry: Associations) -> None:
    spooler = registry.spooler(event.assoc)
    if spooler is not None:
        spooler.discard_all()
    _audit_received(event, audit, registry)


def _audit_received(event, audit, registry: Associations) -> None:
    """What the association stored, once: at release, abort or close, whichever comes first.

    (pynetdicom may close an acceptor's socket without EVT_CONN_CLOSE after a release.)
    """
    tally = registry.pop_tally(event.assoc)
    if tally is not None and tally.studies:
        audit.record(audit_trail.INSTANCES_TRANSFERRED, audit_trail.Outcome.SUCCESS,
                     action=audit_trail.CREATE, participants=_audit_parties(event.assoc),
                     objects=tally.objects())


def _connection(assoc) -> tuple[str, bool, dict | None]:
    """(peer address, over TLS, verified client certificate) of an acceptor association."""
    sock = raw_socket(assoc)
    cert = tls.peer_certificate(sock)
    return str(getattr(assoc.requestor, "address", "?")), sock is not None and tls.is_tls(sock), cert


def _audit_parties(assoc, called: str | None = None, calling: str | None = None) -> list[dict]:
    address, over_tls, cert = _connection(assoc)
    if calling is None:
        try:
            calling = str(assoc.requestor.ae_title).strip()
        except AttributeError:
            calling = "?"
    if called is None:
        called = str(getattr(assoc.acceptor, "ae_title", "") or "").strip()
    return [
        audit_trail.participant(calling, requestor=True, address=address, role=audit_trail.SOURCE_ROLE,
                                alternative=tls.cert_subject(cert)),
        audit_trail.participant(called, requestor=False, role=audit_trail.DESTINATION_ROLE),
    ]


def _on_requested(event, config: Config, audit, metrics: Metrics) -> None:
    """security.peers: calling AE + address + TLS client certificate, before any negotiation."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "")).strip()
    address, over_tls, cert = _connection(assoc)
    reason = peers.rejection(config, calling, address, over_tls, tls.cert_common_name(cert))
    if reason is None:
        return
    allowed = config.security.allowed_calling_aets
    metrics.association(False, "calling_ae_not_allowed" if allowed and calling not in allowed
                        else "peer_not_allowed")
    log.warning("rejected association from AE %s at %s:%s: %s", wire(calling, 16), address,
                getattr(assoc.requestor, "port", "?"), wire(reason, 300))
    audit.record(audit_trail.USER_AUTHENTICATION, audit_trail.Outcome.MINOR_FAILURE,
                 type_codes=(audit_trail.LOGIN,), description=reason,
                 participants=_audit_parties(assoc, str(getattr(rq, "called_ae_title", "")).strip(),
                                             calling))
    assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, calling AE title not recognised
    assoc.kill()  # as pynetdicom's own rejection does: returns once the A-ASSOCIATE-RJ is out


def _on_established(event, audit, metrics: Metrics) -> None:
    log.info("association from %s established", _peer(event.assoc))
    metrics.association(True)
    audit.record(audit_trail.USER_AUTHENTICATION, audit_trail.Outcome.SUCCESS,
                 type_codes=(audit_trail.LOGIN,), participants=_audit_parties(event.assoc))


def _on_handshake_failed(address: tuple, reason: str, audit) -> None:
    where = f"{address[0]}:{address[1]}"
    if reason == tls.CLOSED_DURING_HANDSHAKE:
        log.debug("TLS connection from %s closed before its handshake ended (a port probe?)", where)
        return
    log.warning("rejected TLS connection from %s: %s", where, reason)
    audit.record(audit_trail.SECURITY_ALERT, audit_trail.Outcome.MINOR_FAILURE,
                 type_codes=(audit_trail.NODE_AUTHENTICATION,), description=reason,
                 participants=[audit_trail.participant("?", requestor=True, address=str(address[0]))])


def _on_rejected(event, config: Config, audit, metrics: Metrics) -> None:
    rq = event.assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "")).strip()
    called = str(getattr(rq, "called_ae_title", "")).strip()
    allowed = config.security.allowed_calling_aets
    if allowed and calling not in allowed:
        reason = f"calling AE title '{wire(calling, 16)}' is not in security.allowed_calling_aets"
        metrics.association(False, "calling_ae_not_allowed")
    elif config.node.require_called_ae_title and called != config.node.ae_title:
        reason = f"called AE title '{wire(called, 16)}' is not ours ({config.node.ae_title!r})"
        metrics.association(False, "called_ae_not_ours")
    else:
        reason = f"node.max_associations ({config.node.max_associations}) reached"
        metrics.association(False, "busy")
    log.warning("rejected association from %s: %s", _peer(event.assoc), reason)
    audit.record(audit_trail.USER_AUTHENTICATION, audit_trail.Outcome.MINOR_FAILURE,
                 type_codes=(audit_trail.LOGIN,), description=reason,
                 participants=_audit_parties(event.assoc, called, calling))


def _on_echo(event, registry: Associations) -> int:
    log.info("C-ECHO from %s", _peer(event.assoc))
    state = registry.get(event.assoc)
    if state is not None:
        state.counter = _Counter()  # no data set in transit
    return 0x0000


def _status(result: Result) -> Dataset:
    rsp = Dataset()
    rsp.Status = STATUS[result.outcome]
    if result.reason:
        rsp.ErrorComment = result.reason[:64]
    return rsp


def _patient_id(header) -> str | None:
    """The audit trail's Patient ID (from the data set ingest parsed); never fails a store."""
    try:
        return header.patient_id
    except Exception:  # an odd data set: the audit message just has no patient object
        return None


def _on_store(event, store: Store, on_queued: Callable[[Iterable[str]], None],
              registry: Associations, metrics: Metrics) -> Dataset:
    """Spooled data set -> store.ingest -> DIMSE status; log one line either way."""
    started = time.monotonic()  # the whole data set is here: store latency runs from now to Success
    assoc = event.assoc
    req = event.request
    calling = str(assoc.requestor.ae_title).strip()
    req_sop = str(req.AffectedSOPInstanceUID or "")
    dataset_path = event.dataset_path
    path = Path(dataset_path) if dataset_path else None  # None: pynetdicom could not make its file
    state = registry.get(assoc) or AssociationState()
    spool = state.spooler.take(path) if state.spooler is not None else None
    counter = state.counter
    head, problem = None, counter.problem
    if spool is not None:
        spool.finish()
        head, problem = spool.head, spool.problem
    if problem:
        if path is not None:
            discard(path)
        result = Result(Outcome.NO_SPACE, problem)
    else:
        # The called AE title the peer asked for (routing rules match it), not our own title:
        # they differ when node.require_called_ae_title is false.
        called = getattr(getattr(assoc.requestor, "primitive", None), "called_ae_title", None)
        arrival = Arrival(
            Source.DIMSE, calling_ae=calling, called_ae=str(called or assoc.acceptor.ae_title).strip(),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
        )
        expected = Expected(sop_instance_uid=req_sop, sop_class_uid=str(req.AffectedSOPClassUID or ""))
        result = store.ingest(path, arrival, expected, head=head)
    if result.outcome is Outcome.STORED:
        if spool is not None:
            spool.placed()
        log.info("received SOP %s from AE %s (%d bytes)", result.sop_instance_uid, wire(calling, 16),
                 result.size)
        if state.tally is not None:
            study = str(result.header.study_uid)  # its Patient ID once: a header walk per instance
            state.tally.add(study, str(result.header.series_uid), result.size or 0,
                            None if state.tally.has_patient(study) else _patient_id(result.header))
        metrics.received(calling, result.size or 0, time.monotonic() - started)
        if result.queued_for:
            log.info("queued SOP %s for %s", result.sop_instance_uid, ", ".join(result.queued_for))
            on_queued(result.queued_for)
    else:
        log.warning(
            "refused SOP %s from AE %s with 0x%04X: %s",
            wire(req_sop, 70), wire(calling, 16), STATUS[result.outcome], wire(result.reason, 300),
        )
    if spool is None and state.counter is counter:  # public-API mode
        state.counter = _Counter()  # its file is placed or gone: no data set in transit
    metrics.cstore_status(STATUS[result.outcome])
    return _status(result)


# --------------------------------------------------------------------------- the server


class ReceiveServer:
    """The listening AE; ``shutdown()`` stops accepting, lets running associations finish
    (bounded by ``grace`` seconds), aborts the rest and closes the database."""

    def __init__(self, ae: AE, servers: list, store: Store, config: Config, tls_server=None,
                 guard: ConnectionGuard | None = None):
        self.ae, self.servers, self.store, self.config = ae, servers, store, config
        self.guard = guard
        self.server = servers[0]
        plain = [s for s in servers if s is not tls_server]
        #: (host, port) of the plain listener (None when node.port is null), and of the TLS one.
        self.address = plain[0].server_address if plain else None
        self.tls_address = tls_server.server_address if tls_server is not None else None

    def shutdown(self, grace: float = 5.0) -> None:
        for server in self.servers:
            server.shutdown()  # no new connections
        deadline = time.monotonic() + grace
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._established():
            log.warning("aborting the association from %s at shutdown", _peer(assoc))
            assoc.abort(block=False)
        if self.guard is not None:
            self.guard.close_all()  # a DUL blocked reading a stalled peer cannot send the abort
        deadline = time.monotonic() + 2.0
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        # pynetdicom's network threads are not daemons: one waiting for an A-ASSOCIATE-RQ
        # that never comes (a port probe) would hold the process for the ACSE timeout, one
        # blocked reading a stalled peer's PDU for the network timeout: shut their sockets.
        if self.guard is not None:
            self.guard.close_all()
        for assoc in self._all():
            assoc.dul.kill_dul()
        for assoc in self._all():
            if assoc.dul.is_alive():  # a just-accepted connection's DUL may not have started yet
                assoc.dul.join(1.0)
        self.store.close()

    def _all(self) -> list:
        return [a for server in self.servers for a in server.active_associations]

    def _established(self) -> list:
        return [a for a in self._all() if a.is_established]


def _preferred_transfer_syntaxes() -> list[str]:
    """Every syntax pynetdicom knows, compressed ones first.

    pynetdicom accepts the first of *our* syntaxes that the peer proposed. A peer proposes a
    compressed syntax when its data is compressed (DCMTK's storescu proposes it next to the
    uncompressed ones); accepting an uncompressed one would make it decompress, or fail on a
    codec it lacks. Compressed first keeps every instance as it was sent.
    """
    uncompressed = [*UNCOMPRESSED[:2], DeflatedExplicitVRLittleEndian, *UNCOMPRESSED[2:]]
    compressed = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in uncompressed]
    return compressed + [ts for ts in uncompressed if ts in ALL_TRANSFER_SYNTAXES]


def start_server(config: Config, on_queued: Callable[[Iterable[str]], None],
                 audit=audit_trail.NULL, metrics: Metrics | None = None) -> ReceiveServer:
    """Start the SCP on ``node.host:node.port`` (and ``node.tls.port``); listening when this returns."""
    metrics = metrics if metrics is not None else Metrics()
    node = config.node
    spool_dir = tmp_dir(node.data_dir)
    make_dir(spool_dir)
    clean_spool(spool_dir)
    make_dir(config.store_dir)
    conn = db.connect(config.db_path)
    store = Store(
        node.data_dir, config.store_dir, conn,
        router=Router(config),
        min_free_bytes=config.storage.min_free_bytes,
    )
    registry = Associations()
    fast = config.performance.pynetdicom_fast_path
    if fast:
        from gateway.dimse.fastpath import SharedContexts, enable_spooling

        enable_spooling(registry.spooler)
    else:
        # pynetdicom's public API: its chunked receive, its temporary files on the store's
        # filesystem (so placing one is a rename), the sizes counted at EVT_PDU_RECV.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(spool_dir)

    ae = AE(ae_title=node.ae_title)
    # dimse.guard caps connections at node.max_associations; pynetdicom's own count also
    # holds threads still winding down after the guard closed their connection.
    ae.maximum_associations = 2 * node.max_associations
    if not fast:
        # A bare connect (a health check, a port probe) gives its pynetdicom thread back when
        # dimse.meter's socket reads its end; until then (or a connection pynetdicom never read
        # from) it may hold it up to node.acse_timeout_seconds: those must not make pynetdicom
        # refuse real peers. dimse.guard still caps open connections at node.max_associations.
        ae.maximum_associations += PUBLIC_API_LINGERING_THREADS
    ae.maximum_pdu_size = node.max_pdu_size
    ae.network_timeout = node.network_timeout_seconds
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.require_called_aet = node.require_called_ae_title
    ae.require_calling_aet = list(config.security.allowed_calling_aets)
    syntaxes = _preferred_transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)

    limits = Limits(spool_dir, node.max_pdu_size, config.storage.max_instance_bytes,
                    config.storage.min_free_bytes, fast)
    handlers = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_CONN_OPEN, _on_conn_open, [limits, registry]),
        (evt.EVT_CONN_CLOSE, _on_conn_close, [audit, registry]),
        (evt.EVT_REQUESTED, _on_requested, [config, audit, metrics]),
        (evt.EVT_ESTABLISHED, _on_established, [audit, metrics]),
        (evt.EVT_RELEASED, _audit_received, [audit, registry]),
        (evt.EVT_ABORTED, _audit_received, [audit, registry]),
        (evt.EVT_REJECTED, _on_rejected, [config, audit, metrics]),
        (evt.EVT_C_ECHO, _on_echo, [registry]),
        (evt.EVT_C_STORE, _on_store, [store, on_queued, registry, metrics]),
    ]
    if not fast:
        handlers.append((evt.EVT_PDU_RECV, _on_pdu_recv, [limits, registry]))
    contexts = SharedContexts(ae.supported_contexts) if fast else None
    servers, tls_server, port = [], None, node.port
    try:
        if node.port is not None:
            servers.append(ae.start_server((node.host, node.port), block=False,
                                           evt_handlers=handlers, contexts=contexts))
        if node.tls is not None:
            port = node.tls.port
            t = node.tls
            ctx = tls.server_context(t.cert_file, t.key_file, t.ca_file, t.require_client_cert)
            tls_server = tls.start_tls_server(
                ae, (node.host, t.port), ctx, node.acse_timeout_seconds,
                lambda address, reason: _on_handshake_failed(address, reason, audit),
                evt_handlers=handlers, contexts=contexts)
            servers.append(tls_server)
    except OSError as exc:
        for server in servers:
            server.shutdown()
        conn.close()
        key = "node.tls.port" if port != node.port else "node.port"
        raise GatewayError(
            f"cannot listen on {node.host}:{port}: {exc.strerror or exc} "
            f"(is another gateway running? change {key})"
        ) from None
    # Before any thread exists for a connection: one cap over both listeners and a read
    # timeout on every accepted socket (dimse.guard).
    guard = ConnectionGuard(node.max_associations, node.network_timeout_seconds,
                            refusals=RefusalTrail(audit, node.ae_title))
    adopt = None if fast else (lambda sock: metered(sock, node.max_pdu_size))
    for server in servers:
        guard.install(server, adopt)
    return ReceiveServer(ae, servers, store, config, tls_server, guard)
