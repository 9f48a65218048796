"""Public-API mode: the PDU stream's framing read as it arrives, so a hostile peer is cut off
before pynetdicom buffers what it declares.

pynetdicom reads whatever PDU length a peer declares (a 4 GB P-DATA-TF would be read whole
into memory) and appends command-set fragments, and the data set of any message it does not
stream to a file, to in-memory buffers for as long as fragments keep coming. The fast path
bounds both inside pynetdicom (``dimse.fastpath``); with ``performance.pynetdicom_fast_path:
false`` the accepted socket itself is a ``socket.socket`` (or ``ssl.SSLSocket``) subclass whose
reads feed ``PduMeter``: only the Python standard library, no pynetdicom name. On a PDU longer
than ``node.max_pdu_size`` allows, a command set over ``MAX_COMMAND_BYTES`` or an in-memory data
set over ``MAX_IN_MEMORY_DATASET_BYTES`` (then after an A-ABORT), the connection is shut;
pynetdicom then sees a closed transport.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import NamedTuple

log = logging.getLogger("gateway.receive")

#: A command set is a few hundred bytes; C-ECHO has no data set and C-STORE data sets are
#: streamed to disk. More than this held in memory for one message is a hostile peer.
MAX_COMMAND_BYTES = 64 * 1024
MAX_IN_MEMORY_DATASET_BYTES = 1024 * 1024
#: A-ABORT, source: service provider (2), reason: not specified (0).
_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0])
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: none follows
_P_DATA_TF = 0x04


class Refusal(NamedTuple):
    """Why a connection ends; ``abort``: send A-ABORT first (inside an association's message)."""

    abort: bool
    reason: str

    def line(self, address: str) -> str:
        what = "aborting the association" if self.abort else "closing the connection"
        return f"{what} from {address}: {self.reason}"


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU accepted: ``node.max_pdu_size`` plus headers, never below 64 KiB
    (an A-ASSOCIATE-RQ with a user identity may exceed a small max PDU)."""
    return max(max_pdu, 65536) + 1024


def command_value(command: bytes, element: int) -> int | None:
    """A US element (0000,xxxx) of an encoded command set (implicit VR little endian)."""
    at = 0
    while at + 8 <= len(command):
        group, found, length = struct.unpack_from("<HHL", command, at)
        if (group, found) == (0x0000, element) and length == 2 and at + 10 <= len(command):
            return struct.unpack_from("<H", command, at + 8)[0]
        at += 8 + length
    return None


def command_field(command: bytes) -> int | None:
    """(0000,0100) Command Field."""
    return command_value(command, 0x0100)


class PduMeter:
    """PDU and PDV framing of one connection's incoming bytes; ``feed`` says what is wrong."""

    def __init__(self, limit: int):
        self.limit = limit
        self._head = bytearray()  # a PDU header (6 bytes) or PDV item header (6 bytes) in progress
        self._pdu_left = 0  # bytes of the current PDU's body still to come
        self._pdu_length = 0
        self._pdata = False  # the current PDU is a P-DATA-TF
        self._item_left = 0  # bytes of the current PDV's fragment still to come
        self._item_command = False
        self._item_last = False
        self._command = bytearray()  # the current message's command set so far
        self._store = False  # the current message is a C-STORE-RQ (its data set goes to a file)
        self._awaiting_data = False  # its command set is complete and announced a data set
        self._data = 0  # bytes of the current message's data set so far

    def where(self) -> str:
        """'n of m bytes' of the PDU being read."""
        return f"{self._pdu_length - self._pdu_left} of {self._pdu_length} bytes"

    def feed(self, data) -> Refusal | None:
        """Account for ``data``; why the connection must end, or None."""
        at, end = 0, len(data)
        while at < end:
            if self._pdu_left == 0:  # a PDU header
                take = min(6 - len(self._head), end - at)
                self._head += data[at:at + take]
                at += take
                if len(self._head) == 6:
                    pdu_type, _, length = struct.unpack(">BBL", self._head)
                    self._head.clear()
                    if length > self.limit:
                        return Refusal(False, f"it declared a PDU of {length} bytes, "
                                f"more than node.max_pdu_size allows ({self.limit})")
                    self._pdu_left, self._pdata = length, pdu_type == _P_DATA_TF
                    self._pdu_length = length
                continue
            if not self._pdata:
                skip = min(self._pdu_left, end - at)
                at += skip
                self._pdu_left -= skip
                continue
            if self._item_left == 0:  # a PDV item header: length (4), context ID, control header
                take = min(6 - len(self._head), end - at, self._pdu_left)
                self._head += data[at:at + take]
                at += take
                self._pdu_left -= take
                if len(self._head) == 6:
                    length, _, control = struct.unpack(">LBB", self._head)
                    self._head.clear()
                    problem = self._fragment(max(0, length - 2), bool(control & 0x01), bool(control & 0x02))
                    if problem:
                        return problem
                elif self._pdu_left == 0:
                    self._head.clear()  # malformed: pynetdicom rejects the PDU itself
                continue
            take = min(self._item_left, end - at, self._pdu_left)
            if self._item_command:
                self._command += data[at:at + take]
            at += take
            self._pdu_left -= take
            self._item_left -= take
            if self._item_left == 0:
                self._fragment_done()
        return None

    def _fragment(self, length: int, command: bool, last: bool) -> Refusal | None:
        """A PDV item header: count its fragment before any of it arrives."""
        self._item_left, self._item_command, self._item_last = length, command, last
        if command:
            if self._awaiting_data:
                return Refusal(True, "it started a new message before the data set of the last one ended")
            if len(self._command) + length > MAX_COMMAND_BYTES:
                return self._too_much(len(self._command) + length, self._data)
        else:
            self._data += length
            if not self._store and self._data > MAX_IN_MEMORY_DATASET_BYTES:
                return self._too_much(len(self._command), self._data)
        if length == 0:
            self._fragment_done()
        return None

    def _fragment_done(self) -> None:
        if not self._item_last:
            return
        if self._item_command:  # the command set is complete: does a data set follow into memory?
            command = bytes(self._command)
            self._store = command_field(command) == _C_STORE_RQ
            self._awaiting_data = command_value(command, 0x0800) not in (None, _NO_DATA_SET)
            self._command.clear()
            self._data = 0
        else:  # the data set is complete: the message is
            self._store, self._awaiting_data, self._data = False, False, 0

    @staticmethod
    def _too_much(command: int, data: int) -> Refusal:
        return Refusal(True, f"one message holds {command} command and {data} "
                "in-memory data set bytes, more than a C-ECHO/C-STORE needs")


class _Metered:
    """Reads go through ``gateway_meter``; on its first complaint: log, A-ABORT, shut, and every
    read from then on returns end of file. ``gateway_on_end`` (if set) is called once when the
    connection ends as far as reading goes: end of file, a stall, or a refusal."""

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.gateway_meter is None:
            return b""
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:  # the accepted socket's timeout (dimse.guard), in the middle of a PDU
            self._stalled()
            raise
        return data if data and self._metered(data) else self._ended(b"")

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        if self.gateway_meter is None:
            return 0
        try:
            n = super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            self._stalled()
            raise
        return n if n and self._metered(memoryview(buffer)[:n]) else self._ended(0)

    def _peer(self) -> str:
        try:
            peer = self.getpeername()
        except OSError:
            peer = None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def _stalled(self) -> None:
        log.warning("closing the connection from %s: it stopped in the middle of a PDU (%s) for more "
                    "than node.network_timeout_seconds (%g s)", self._peer(), self.gateway_meter.where(),
                    self.gettimeout() or 0)
        self._ended(None)

    def _ended(self, value):
        self.gateway_meter = None
        on_end, self.gateway_on_end = self.gateway_on_end, None
        if on_end is not None:
            on_end()
        return value

    def _metered(self, data) -> bool:
        refusal = self.gateway_meter.feed(data)
        if refusal is None:
            return True
        log.warning("%s", refusal.line(self._peer()))
        if refusal.abort:
            try:
                self.sendall(_ABORT)
            except OSError:
                pass
        try:
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return False


class MeteredSocket(_Metered, socket.socket):
    __slots__ = ("gateway_meter", "gateway_on_end")


class MeteredSSLSocket(_Metered, ssl.SSLSocket):
    pass


def metered(sock, max_pdu: int):
    """``sock`` (just accepted, plain or TLS) with its reads metered (see the module docstring)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.__class__ = MeteredSSLSocket
    else:
        timeout = sock.gettimeout()
        sock = MeteredSocket(fileno=sock.detach())
        sock.settimeout(timeout)
    sock.gateway_meter = PduMeter(pdu_limit(max_pdu))
    sock.gateway_on_end = None
    return sock
