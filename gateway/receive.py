"""The receiving AE: C-ECHO and C-STORE, the AE-title policy and the per-association limits.

Handlers stay thin: a C-STORE handler hands the spooled bytes to ``store.Store`` and maps
its ``Outcome`` to a DIMSE status; nothing here knows about paths or rows. Dependencies are
bound to the handlers through pynetdicom's ``evt_handlers`` arguments, never module state.

Instances are streamed to disk while they arrive (pynetdicom's chunked receive): each
C-STORE data set goes into a spool file under ``data_dir/tmp`` (the store's filesystem),
then is renamed into the store. Memory per association is therefore bounded by one PDU,
whatever the instance's size.

pynetdicom is tuned in two scopes. Per association (bound at EVT_CONN_OPEN): TCP_NODELAY,
bounded bulk socket reads, a DUL loop that waits on its socket instead of sleeping, requests
served in the thread that decoded them, hand-encoded C-STORE responses, and no per-PDU debug
logging handlers. Process-wide (``_enable_spooling``, pynetdicom offers no other hook):
chunked C-STORE receive, and the temp-file and file-meta functions pynetdicom's DIMSE layer
calls; each replacement hands anything that is not one of our spool files to the original.
The closing notes of bench/receive.py say what each change bought.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AE,
    AllStoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
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
_HEAD_BYTES = 64 * 1024  # the UIDs are near the start of any sane data set


# --------------------------------------------------------------------------- spooling


class _FdSink:
    """Unbuffered writes to one file descriptor (SpoolFile does its own buffering)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)


class SpoolFile:
    """The file pynetdicom streams one C-STORE data set into (in place of its temp file).

    It never raises into pynetdicom's network thread: a full disk, a free-space floor or an
    instance larger than ``storage.max_instance_bytes`` stops the writing, drops what was
    written and records the ``problem``; the C-STORE handler answers it with 0xA700. The
    first ``_HEAD_BYTES`` are also kept in memory so the handler reads the UIDs from there.
    """

    def __init__(self, path: Path, max_bytes: int, min_free_bytes: int):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.name = str(path)
        self.file = self  # pynetdicom calls ``file.flush()`` after every fragment
        self._sink = _FdSink(fd)
        self._folder = path.parent
        self._max_bytes = max_bytes
        self._min_free = min_free_bytes
        self._next_check = _FREE_SPACE_CHECK_EVERY
        self._pending = bytearray()
        self.head = bytearray()
        self.size = 0
        self.problem: str | None = None

    def write(self, data) -> int:
        n = len(data)
        if self.problem is not None:
            return n
        self.size += n
        if len(self.head) < _HEAD_BYTES:
            self.head += data[: _HEAD_BYTES - len(self.head)]
        if self.size > self._max_bytes:
            return self._give_up(
                f"instance is larger than storage.max_instance_bytes ({self._max_bytes} bytes)", n
            )
        if self._min_free and self.size >= self._next_check:
            self._next_check += _FREE_SPACE_CHECK_EVERY
            if free_bytes(self._folder) < self._min_free:
                return self._give_up("free disk space fell below storage.min_free_bytes", n)
        self._pending += data
        if len(self._pending) >= _SPOOL_BUFFER:
            self._drain()
        return n

    def _drain(self) -> None:
        try:
            self._sink.write(self._pending)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._give_up("the disk is full" if full else f"cannot spool: {exc.strerror}", 0)
        self._pending.clear()

    def _give_up(self, problem: str, n: int) -> int:
        self.problem = problem
        self._pending = bytearray()
        self.head = bytearray()
        try:
            self._sink.truncate()  # give the space back now, not when the data set ends
        except OSError:
            pass
        return n

    def flush(self) -> None:
        """pynetdicom flushes after every fragment; we write in large pieces instead."""

    def finish(self) -> None:
        """Write out what is buffered (the handler calls this once the data set is complete)."""
        if self.problem is None and self._pending:
            self._drain()

    def placed(self) -> None:
        """The file was renamed into the store: make pynetdicom's later unlink a no-op."""
        self.name = self.name + ".placed"

    def close(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close()
            except OSError:
                pass
            self._sink = None


@dataclass
class Spooler:
    """Per-association spool settings, attached to the association at connection time."""

    folder: Path
    max_bytes: int
    min_free_bytes: int
    files: dict[str, SpoolFile] = field(default_factory=dict)

    prefix: str = field(default_factory=lambda: f"rx-{secrets.token_hex(6)}-")
    count: int = 0

    def open(self) -> SpoolFile:
        self.count += 1
        spool = SpoolFile(self.folder / f"{self.prefix}{self.count}.dcm", self.max_bytes,
                          self.min_free_bytes)
        self.files[spool.name] = spool
        return spool

    def take(self, path) -> SpoolFile | None:
        return self.files.pop(str(path), None)

    def discard_all(self) -> None:
        """Close and remove spool files no handler took (a request pynetdicom refused itself)."""
        while self.files:
            _, spool = self.files.popitem()
            spool.close()
            try:
                os.unlink(spool.name)
            except OSError:
                pass


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


# --------------------------------------------------------------------------- hand-encoded messages
#
# Two small encodings pynetdicom builds through pydicom Datasets for every C-STORE: the
# spool file's File Meta group and the C-STORE response. Both have a fixed shape; writing
# them directly saves ~15-20% of the per-instance CPU. Anything unusual takes pynetdicom's
# own path (unit tests compare both byte for byte).


def _element_bytes(group: int, elem: int, value: bytes, vr: bytes | None) -> bytes:
    """One little endian element; ``vr=None`` for implicit VR, explicit short/long otherwise."""
    head = struct.pack("<HH", group, elem)
    if vr is None:
        return head + struct.pack("<L", len(value)) + value
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def _sh(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


@dataclass(frozen=True)
class _MetaRequest:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


_pynetdicom_create_file_meta = dimse_messages.create_file_meta
_pynetdicom_write_file_meta_info = dimse_messages.write_file_meta_info


def _create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax, **kwargs):
    """For our spool files: remember the three values; ``_write_file_meta_info`` encodes them."""
    values = (str(sop_class_uid or ""), str(sop_instance_uid or ""), str(transfer_syntax or ""))
    if kwargs or max(map(len, values)) > 1024:
        return _pynetdicom_create_file_meta(
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax, **kwargs)
    return _MetaRequest(*values)


def _write_file_meta_info(fp, file_meta, *args, **kwargs):
    if not isinstance(file_meta, _MetaRequest):
        return _pynetdicom_write_file_meta_info(fp, file_meta, *args, **kwargs)
    fp.write(file_meta_bytes(file_meta.sop_class_uid, file_meta.sop_instance_uid,
                             file_meta.transfer_syntax))


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The File Meta group pynetdicom writes for a received data set (without the preamble)."""
    body = b"".join((
        _element_bytes(0x0002, 0x0001, b"\x00\x01", b"OB"),
        _element_bytes(0x0002, 0x0002, _ui(sop_class_uid), b"UI"),
        _element_bytes(0x0002, 0x0003, _ui(sop_instance_uid), b"UI"),
        _element_bytes(0x0002, 0x0010, _ui(transfer_syntax), b"UI"),
        _element_bytes(0x0002, 0x0012, _ui(PYNETDICOM_IMPLEMENTATION_UID), b"UI"),
        _element_bytes(0x0002, 0x0013, _sh(PYNETDICOM_IMPLEMENTATION_VERSION), b"SH"),
    ))
    return _element_bytes(0x0002, 0x0000, struct.pack("<L", len(body)), b"UL") + body


def store_response_bytes(sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str) -> bytes:
    """A C-STORE-RSP command set (implicit VR little endian) without comment or offending element."""
    body = b"".join((
        _element_bytes(0x0000, 0x0002, _ui(sop_class_uid), None),
        _element_bytes(0x0000, 0x0100, struct.pack("<H", 0x8001), None),
        _element_bytes(0x0000, 0x0120, struct.pack("<H", message_id), None),
        _element_bytes(0x0000, 0x0800, struct.pack("<H", 0x0101), None),
        _element_bytes(0x0000, 0x0900, struct.pack("<H", status), None),
        _element_bytes(0x0000, 0x1000, _ui(sop_instance_uid), None),
    ))
    return _element_bytes(0x0000, 0x0000, struct.pack("<L", len(body)), None) + body


def _fast_store_responses(dimse) -> None:
    """Send plain C-STORE responses (status only) hand-encoded; everything else as before."""
    original = dimse.send_msg

    def send_msg(primitive, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and len(primitive.AffectedSOPInstanceUID) <= 1024
        ):
            cmd = store_response_bytes(
                str(primitive.AffectedSOPClassUID), int(primitive.MessageIDBeingRespondedTo),
                int(primitive.Status), str(primitive.AffectedSOPInstanceUID),
            )
            limit = dimse.maximum_pdu_size
            if not limit or len(cmd) + 6 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + cmd))
                dimse.dul.send_pdu(pdata)
                return
        original(primitive, context_id)

    dimse.send_msg = send_msg


def _enable_spooling() -> None:
    """Make pynetdicom stream C-STORE data sets to files (process-wide library settings)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_file
    dimse_messages.create_file_meta = _create_file_meta
    dimse_messages.write_file_meta_info = _write_file_meta_info


# --------------------------------------------------------------------------- the association's I/O

_IDLE_WAIT = 0.002  # longest a DUL thread waits for socket data before checking its queues
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _GatewaySocket(AssociationSocket):
    """The acceptor's socket, tuned; swapped in for pynetdicom's at connection time.

    * ``recv`` refuses PDUs longer than ``node.max_pdu_size`` allows (pynetdicom buffers
      whatever length a peer declares, so a declared 4 GB PDU would be read whole) and reads
      into one buffer instead of 4 KiB pieces.
    * every read re-arms TCP_QUICKACK, so the ACK goes out at once: a peer that leaves
      Nagle's algorithm on (DCMTK as Debian installs it) otherwise holds its next small
      write until our delayed ACK fires, ~40 ms per message.
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
            self._closed()
            return bytearray()
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                view.release()
                self._closed()
                return buf[:got]
            got += n
        if _QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        return buf

    def _closed(self) -> None:
        """The connection ends here. If it never sent an A-ASSOCIATE-RQ (a port probe, a
        health check), wake the association thread, which would otherwise hold a
        node.max_associations slot until the ACSE timeout waiting for one."""
        assoc = self.assoc
        if not assoc.is_established and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(None)  # read as "no request came": the thread ends

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


_STANDARD_LOG_HANDLERS = [
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
]


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
    _fast_store_responses(assoc.dimse)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's per-PDU/per-message logging handlers cost ~5% of a small C-STORE
        # even when their output is filtered out; bound only to this association.
        for event_type, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event_type, handler)


def _on_conn_close(event) -> None:
    spooler = getattr(event.assoc, "gateway_spooler", None)
    if spooler is not None:
        spooler.discard_all()


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


_WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _NeedFile(Exception):
    """The in-memory head is not enough (or too unusual): parse the file with pydicom."""


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR, value length, header length) of the element at ``pos`` (little endian)."""
    if pos + 8 > len(buf):
        raise _NeedFile
    tag = (int.from_bytes(buf[pos:pos + 2], "little") << 16) | int.from_bytes(buf[pos + 2:pos + 4], "little")
    if not explicit or tag >> 16 == 0xFFFE:
        return tag, None, int.from_bytes(buf[pos + 4:pos + 8], "little"), 8
    vr = bytes(buf[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedFile
        return tag, vr, int.from_bytes(buf[pos + 8:pos + 12], "little"), 12
    return tag, vr, int.from_bytes(buf[pos + 6:pos + 8], "little"), 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``."""
    while True:
        tag, _, length, _ = _element(buf, pos, explicit)
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _NeedFile
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, up to the item delimiter
            tag, vr, length, header = _element(buf, pos, explicit)
            if tag == _ITEM_END:
                pos += 8
                break
            pos += header
            if length == _UNDEFINED:
                if explicit and vr != b"SQ":
                    raise _NeedFile  # UN of undefined length: leave it to pydicom
                pos = _skip_sequence(buf, pos, explicit)
            else:
                pos += length


def _uids_from_head(head: bytes, transfer_syntax: str) -> dict[str, str | None]:
    """The four UIDs from the first bytes of a spooled Part 10 file, without pydicom.

    Handles the little endian transfer syntaxes (every compressed one included); raises
    ``_NeedFile`` for big endian, deflate, or when the UIDs are not within ``head``.
    """
    if transfer_syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian) or head[128:132] != b"DICM":
        raise _NeedFile
    explicit = transfer_syntax != ImplicitVRLittleEndian
    if _element(head, 132, True)[0] != 0x00020000:
        raise _NeedFile
    pos = 144 + int.from_bytes(head[140:144], "little")  # past the file meta group
    found: dict[str, str | None] = dict.fromkeys(_WANTED.values())
    while True:
        if pos == len(head) and len(head) < _HEAD_BYTES:
            return found  # the whole (short) data set was read
        tag, vr, length, header = _element(head, pos, explicit)
        if tag > 0x0020000E:
            return found
        pos += header
        if length == _UNDEFINED:
            if explicit and vr != b"SQ":
                raise _NeedFile
            pos = _skip_sequence(head, pos, explicit)
            continue
        if tag in _WANTED:
            if pos + length > len(head):
                raise _NeedFile
            found[_WANTED[tag]] = bytes(head[pos:pos + length]).decode("latin-1").rstrip("\x00 ")
        pos += length


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
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            try:
                if spool is None:
                    raise _NeedFile
                uids = _uids_from_head(spool.head, transfer_syntax)
            except _NeedFile:
                ds = _read_uids(path)
                uids = {name: ds.get(name) for name in _WANTED.values()}
            item = Incoming(
                spool_path=Path(path),
                request_sop_instance_uid=req_sop,
                request_sop_class_uid=str(req.AffectedSOPClassUID or ""),
                transfer_syntax=transfer_syntax,
                calling_ae=calling,
                study_uid=uids["StudyInstanceUID"],
                series_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"],
                sop_class_uid=uids["SOPClassUID"],
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

    def __init__(self, ae: AE, server, store: Store, config: Config):
        self.ae, self.server, self.store, self.config = ae, server, store, config
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
        self.store.close()

    def _established(self) -> list:
        return [a for a in self.server.active_associations if a.is_established]


def _preferred_transfer_syntaxes() -> list[str]:
    """Every syntax pynetdicom knows, compressed ones first.

    pynetdicom accepts the first of *our* syntaxes that the peer proposed. A peer proposes a
    compressed syntax when its data is compressed (DCMTK's storescu proposes it next to the
    uncompressed ones); accepting an uncompressed one would make it decompress, or fail on a
    codec it lacks. Compressed first keeps every instance as it was sent.
    """
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    compressed = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in uncompressed]
    return compressed + [ts for ts in uncompressed if ts in ALL_TRANSFER_SYNTAXES]


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
    syntaxes = _preferred_transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)

    limits = Limits(spool_dir, node.max_pdu_size, config.storage.max_instance_bytes,
                    config.storage.min_free_bytes)
    handlers = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_CONN_OPEN, _on_conn_open, [limits]),
        (evt.EVT_CONN_CLOSE, _on_conn_close),
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
    return ReceiveServer(ae, server, store, config)
