"""Where the gateway replaces parts of pynetdicom 3.0.x, what each replaces, and why.

Every piece here reaches into pynetdicom internals (``AssociationSocket``, the DUL's
``_run_loop_delay``, ``_is_transport_event`` and ``_idle_timer``, the DIMSE provider's
``msg_queue`` and ``send_msg``, ``dimse_messages``' module functions), hence the
``pynetdicom>=3.0,<3.1`` pin in pyproject.toml: check these again before moving it. The
bytes themselves come from ``gateway.dimse.codec``. The closing notes of bench/receive.py say
what each receive-side change bought.

Receiving, per association (``tune_acceptor``, called at EVT_CONN_OPEN):

* ``AssociationSocket`` -> ``_GatewaySocket``: TCP_QUICKACK after every read, one read
  into one buffer bounded by ``node.max_pdu_size`` (pynetdicom reads whatever length a peer
  declares, in 4 KiB pieces), and ``ready`` waits on the socket instead of the DUL thread
  sleeping between polls (``_run_loop_delay = 0``).
* the DIMSE ``msg_queue`` -> ``_ServeAtOnce``: C-STORE/C-ECHO requests are served in the
  DUL thread that decoded them, not by the association thread's 1 ms poll.
* ``Association._run_reactor`` -> ``_waiting_reactor``: the association thread sleeps until
  its DUL hands it a primitive or a message (``to_user_queue`` and ``msg_queue`` set an
  Event) instead of waking every millisecond and taking the GIL from the receiving thread.
* ``DIMSEServiceProvider.send_msg`` -> plain C-STORE responses hand-encoded
  (``dimse.store_response_bytes``) instead of built through a pydicom Dataset.
* pynetdicom's standard per-PDU/per-message logging handlers are unbound when its logger
  is quiet: they cost ~5% of a small C-STORE even when their output is filtered out.

Receiving, process-wide (``enable_spooling``; pynetdicom offers no other hook):
``_config.STORE_RECV_CHUNKED_DATASET`` (stream C-STORE data sets to files), and
``dimse_messages.NamedTemporaryFile`` / ``create_file_meta`` / ``write_file_meta_info``
replaced so the data set goes into our ``spool.SpoolFile`` with a hand-encoded file meta
group. Each replacement hands anything that is not one of our spool files to the original.

Sending (forward), between A-ASSOCIATE-AC and the release: the C-STORE requests and
responses go over the association's socket from the sender's own thread (``take_socket``,
``write_message``, ``read_response``) instead of through the DUL thread's queues: faster,
and free of pynetdicom's lost-response race (see ``take_socket``). pynetdicom still
negotiates, releases and aborts the association.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, Callable

from pynetdicom import _config, dimse_messages, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from gateway.errors import PeerGone
from gateway.dimse.meter import MAX_COMMAND_BYTES, MAX_IN_MEMORY_DATASET_BYTES, pdu_limit
from gateway.dimse.codec import (
    ABORT,
    PDATA_HEAD,
    PDATA_TF,
    PDU_HEAD,
    RELEASE_RQ,
    MalformedCommand,
    command_fields,
    file_meta_bytes,
    pdv_items,
    store_response_bytes,
)

# The lines logged here are receive's and forward's events: they keep those modules' loggers.
_rx_log = logging.getLogger("gateway.receive")
_tx_log = logging.getLogger("gateway.forward")


# --------------------------------------------------------------------------- receiving: process-wide

_pynetdicom_temp_file = dimse_messages.NamedTemporaryFile
_pynetdicom_create_file_meta = dimse_messages.create_file_meta
_pynetdicom_write_file_meta_info = dimse_messages.write_file_meta_info


#: receive's lookup: the ``spool.Spooler`` of an association (None: not one of ours).
_spooler_for: Callable[[object], object | None] = lambda assoc: None


def _spool_file(*args, **kwargs):
    """Stands in for pynetdicom's NamedTemporaryFile: our spool file on receiving associations.

    pynetdicom decodes incoming P-DATA in the association's DUL thread, whose ``assoc`` tells
    which server (and so which spool folder and limits) the data set belongs to: receive's
    registry of associations (``enable_spooling(spooler_for)``) knows its ``spool.Spooler``.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    spooler = _spooler_for(assoc) if assoc is not None else None
    if spooler is None:
        return _pynetdicom_temp_file(*args, **kwargs)
    return spooler.open()


@dataclass(frozen=True)
class _MetaRequest:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


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


def enable_spooling(spooler_for: Callable[[object], object | None]) -> None:
    """Make pynetdicom stream C-STORE data sets into our spool files (process-wide library settings).

    ``spooler_for(assoc)``: the association's ``spool.Spooler``, or None for pynetdicom's own file.
    """
    global _spooler_for
    _spooler_for = spooler_for
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_file
    dimse_messages.create_file_meta = _create_file_meta
    dimse_messages.write_file_meta_info = _write_file_meta_info


# --------------------------------------------------------------------------- receiving: per association

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
    gateway_tls: bool = False

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.gateway_limit:
            _rx_log.warning(
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
            try:
                n = sock.recv_into(view[got:], nr_bytes - got)
            except TimeoutError:  # the accepted socket's timeout (dimse.guard)
                _rx_log.warning(
                    "closing the connection from %s: it stopped in the middle of a PDU (%d of "
                    "%d bytes) for more than node.network_timeout_seconds (%g s)",
                    self.gateway_peer(), got, nr_bytes, sock.gettimeout() or 0,
                )
                n = 0
            except OSError:
                n = 0
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
        if self.gateway_tls and self.socket.pending():
            return True  # TLS: decrypted bytes already buffered, which select cannot see
        dul = self.assoc.dul
        busy = bool(dul.to_provider_queue.queue) or bool(dul.event_queue.queue)
        try:
            ready, _, _ = select.select([self.socket], [], [], 0 if busy else _IDLE_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")
            return False
        return bool(ready)


_assoc_log = logging.getLogger("pynetdicom.association")  # pynetdicom's lines, from our reactor too
#: How often the association thread looks at its DUL when nothing woke it (DUL death, the
#: idle timer): pynetdicom looks every millisecond.
REACTOR_TICK = 0.05


class _WakingQueue(queue.Queue):
    """A queue whose ``put`` also sets ``gateway_wake`` (an Event), so a thread can sleep on it."""

    gateway_wake: threading.Event | None = None

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        if self.gateway_wake is not None:
            self.gateway_wake.set()


def _waiting_reactor(assoc, wake: threading.Event) -> None:
    """pynetdicom's acceptor loop (``Association._run_reactor``) sleeping on ``wake`` instead
    of waking every millisecond: each wake took the GIL from the DUL thread that receives.

    ``wake`` is set when the DUL hands the association a primitive (release, abort) or a
    message, and the loop still looks every ``REACTOR_TICK`` for what sets nothing (the DUL
    thread's end, the idle timer). The checks are pynetdicom 3.0's, in its order.
    """
    assoc._is_paused = False
    while not assoc._kill:
        wake.wait(REACTOR_TICK)
        wake.clear()  # before the checks: a put after this wakes the next wait
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)
        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            _assoc_log.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            line = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                line += " (A-P-ABORT)"
            _assoc_log.info(line)
            assoc.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            _assoc_log.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


def _wake_reactor_on_news(assoc) -> None:
    """Run ``_waiting_reactor`` for this association, woken by its DUL's primitives and messages."""
    wake = threading.Event()
    to_user = assoc.dul.to_user_queue
    to_user.gateway_wake = wake
    to_user.__class__ = _WakingQueue  # the same object: nothing the DUL already put is lost
    assoc.dimse.msg_queue.gateway_wake = wake
    assoc._run_reactor = lambda: _waiting_reactor(assoc, wake)


class _ServeAtOnce(_WakingQueue):
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


_STANDARD_LOG_HANDLERS = [
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
]


def tune_acceptor(assoc, max_pdu: int, peer: Callable[[], str]) -> None:
    """Bounded socket reads, prompt serving and fast responses for one receiving association.

    ``max_pdu`` is ``node.max_pdu_size``; ``peer`` names the peer for the log line when a
    PDU is refused.
    """
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = _GatewaySocket
        sock.gateway_limit = pdu_limit(max_pdu)
        sock.gateway_peer = peer
        sock.gateway_tls = isinstance(sock.socket, ssl.SSLSocket)
        assoc.dul._run_loop_delay = 0  # the socket wait above paces the DUL loop
    assoc.dimse.msg_queue = _ServeAtOnce(assoc)
    _wake_reactor_on_news(assoc)
    _fast_store_responses(assoc.dimse)
    _bound_message_buffers(assoc, peer)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's per-PDU/per-message logging handlers cost ~5% of a small C-STORE
        # even when their output is filtered out; bound only to this association.
        for event_type, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event_type, handler)


class SharedContexts(list):
    """The SCP's supported presentation contexts, shared by every association.

    pynetdicom deep-copies the server's contexts for each new association (~80 ms here for
    every storage class times every transfer syntax, 16% of receive CPU). Negotiation only
    reads them (``presentation.negotiate_as_acceptor`` builds new result contexts), so each
    association gets a plain list of the same objects instead.
    """

    def __deepcopy__(self, memo) -> list:
        return list(self)



def _bound_message_buffers(assoc, peer: Callable[[], str]) -> None:
    """Abort an association whose message fragments pile up in memory.

    pynetdicom appends command-set fragments (and any data set it does not spool) to
    in-memory buffers for as long as the peer keeps sending fragments without the "last"
    bit: only PDU sizes were bounded, not how many of them one message may span.
    """
    dimse = assoc.dimse
    original = dimse.receive_primitive

    def bounded(primitive) -> None:
        original(primitive)
        msg = dimse.message
        if msg is None:
            return
        command = msg.encoded_command_set.tell()
        data = getattr(msg, "data_set", None)  # BytesIO unless spooled to a file
        in_memory = data.tell() if isinstance(data, BytesIO) else 0
        if command > MAX_COMMAND_BYTES or in_memory > MAX_IN_MEMORY_DATASET_BYTES:
            _rx_log.warning(
                "aborting the association from %s: one message holds %d command and %d "
                "in-memory data set bytes, more than a C-ECHO/C-STORE needs",
                peer(), command, in_memory,
            )
            dimse.message = None
            assoc.dul.event_queue.put("Evt19")  # invalid PDU data: the DUL sends A-ABORT

    dimse.receive_primitive = bounded


# --------------------------------------------------------------------------- sending


def take_socket(assoc, timeout: float = 5.0) -> bool:
    """Stop the association's DUL thread from reading: our thread reads the C-STORE responses.

    Two reasons not to use pynetdicom's DIMSE path for them. Its association thread polls
    the DIMSE queue without blocking whenever it is not paused and drops what it finds that
    is not a request ("Received unexpected C-STORE service message"); ``send_c_store``
    pauses it with a check that can race (about once in 3000 messages), and the sender then
    waits out the DIMSE timeout. And every response would cost a 1 ms poll sleep plus the
    PDU and command-set decoding in that thread. Nothing else arrives on a storage SCU's
    association between A-ASSOCIATE-AC and our first request, so this is switched at a PDU
    boundary; ``give_back_socket`` before any release or abort, which the DUL must see.

    The hand-over waits until the DUL thread has called the replacement once: until then it
    may be inside the original check (it looked the method up before we swapped it), and if
    our request's response arrived meanwhile it would read that PDU itself and ours would
    wait out the DIMSE timeout (seen about once in ten associations before this wait).
    Returns False when the DUL thread did not come round within ``timeout`` (it has died).
    """
    parked = threading.Event()

    def paused() -> bool:
        parked.set()
        return False

    assoc.dul._is_transport_event = paused
    return parked.wait(timeout)


def give_back_socket(assoc) -> None:
    assoc.dul.__dict__.pop("_is_transport_event", None)


class DirectLink:
    """C-STORE requests and responses over a taken association socket (see ``direct_socket``)."""

    def __init__(self, assoc):
        self._assoc = assoc

    def write_message(self, context_id: int, command: bytes, source: BinaryIO, length: int) -> None:
        write_message(self._assoc, context_id, command, source, length)

    def read_response(self, message_id: int, max_pdu: int) -> tuple[int, str]:
        return read_response(self._assoc, message_id, max_pdu)


@contextmanager
def direct_socket(assoc, timeout: float) -> Iterator[DirectLink]:
    """Take an established association's socket from its DUL thread, give it back on exit.

    Inside, requests and responses go straight over the socket (``write_message`` and
    ``read_response`` through the yielded link), every send and wait bounded by ``timeout``.
    Release or abort the association only after the block: the DUL must see those.
    Raises ``errors.PeerGone`` when the DUL thread did not hand the socket over (it died).
    """
    try:
        if not take_socket(assoc):
            raise PeerGone("stopped answering before the first request")
        # bounds write_message's sendall; the DUL only reads after select says data is there
        assoc.dul.socket.socket.settimeout(timeout)
        yield DirectLink(assoc)
    finally:
        give_back_socket(assoc)


def write_message(assoc, context_id: int, command: bytes, source: BinaryIO, length: int) -> None:
    """Write a C-STORE request as P-DATA-TF PDUs straight to the association's socket.

    pynetdicom queues every PDU to its DUL thread, which encodes and sends one per loop turn:
    at the peers' usual 16 KiB maximum PDU that costs more than the network does. The DUL
    thread does not touch the socket meanwhile (``take_socket``; a storage SCU has nothing
    else to send), so the request goes out here: the ``command`` set, then ``length`` bytes of data set read
    from ``source`` into one reused buffer, every PDU within the peer's maximum length. A
    peer that stops reading makes ``sendall`` time out (socket timeout = DIMSE timeout).
    """
    peer_max = assoc.acceptor.maximum_length or 0
    fragment = peer_max - 6 if peer_max else 1024 * 1024
    sock = assoc.dul.socket.socket
    timer = assoc.dul._idle_timer  # sent without the DUL: keep its idle timeout from firing
    for start in range(0, len(command), fragment):
        chunk = command[start:start + fragment]
        control = 0x03 if start + fragment >= len(command) else 0x01
        sock.sendall(PDATA_HEAD.pack(PDATA_TF, 0, len(chunk) + 6, len(chunk) + 2, context_id, control) + chunk)
    buf = bytearray(PDATA_HEAD.size + min(fragment, max(length, 0)))
    view = memoryview(buf)
    remaining = length
    while True:
        n = min(fragment, remaining)
        got = 0
        while got < n:
            r = source.readinto(view[PDATA_HEAD.size + got:PDATA_HEAD.size + n])
            if not r:
                raise OSError(f"the file ended {remaining - got} bytes early")
            got += r
        remaining -= n
        control = 0x00 if remaining else 0x02
        PDATA_HEAD.pack_into(buf, 0, PDATA_TF, 0, n + 6, n + 2, context_id, control)
        sock.sendall(view[: PDATA_HEAD.size + n])
        timer.restart()
        if not remaining:
            return


def _recv_exact(sock, n: int, timer) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if not r:
            raise ConnectionResetError("the peer closed the connection")
        got += r
        timer.restart()
    return bytes(buf)


def read_response(assoc, message_id: int, max_pdu: int) -> tuple[int, str]:
    """Read P-DATA-TF PDUs from the socket until the C-STORE-RSP to ``message_id``: (status, comment).

    Raises ``PeerGone`` for an A-ABORT, an A-RELEASE-RQ, anything else unexpected or a PDU
    longer than ``max_pdu``; ``TimeoutError`` when nothing comes within the socket timeout.
    """
    sock = assoc.dul.socket.socket
    timer = assoc.dul._idle_timer
    command = b""
    while True:
        pdu_type, length = PDU_HEAD.unpack(_recv_exact(sock, PDU_HEAD.size, timer))
        if pdu_type == ABORT:
            raise PeerGone("aborted the association")
        if pdu_type == RELEASE_RQ:
            raise PeerGone("asked to release the association in the middle of a C-STORE")
        if pdu_type != PDATA_TF or length > max_pdu + 6:
            raise PeerGone(f"sent an unexpected PDU (type 0x{pdu_type:02X}, {length} bytes)")
        try:
            pdvs = list(pdv_items(_recv_exact(sock, length, timer)))
        except MalformedCommand as exc:
            raise PeerGone(f"sent a malformed P-DATA-TF PDU: {exc}") from None
        for control, data in pdvs:
            if not control & 0x01:
                raise PeerGone("sent a data set with a C-STORE response")
            command += data
            if len(command) > MAX_COMMAND_BYTES:
                raise PeerGone(
                    f"sent a response command set of more than {MAX_COMMAND_BYTES} bytes "
                    "(a C-STORE response is a few hundred)")
            if not control & 0x02:
                continue
            try:
                fields = command_fields(command)
            except MalformedCommand:
                raise PeerGone("sent a malformed command set") from None
            command = b""
            if fields.get(0x0100, b"") != b"\x01\x80" or len(fields.get(0x0900, b"")) != 2:
                raise PeerGone("sent a message that is not a C-STORE response")
            if struct.unpack("<H", fields.get(0x0120, b"\0\0"))[0] != message_id:
                _tx_log.warning("ignored a C-STORE response to another message")
                continue
            comment = fields.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
            return struct.unpack("<H", fields[0x0900])[0], comment
