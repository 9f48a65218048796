"""A destination's sender: claim due items, send them over one association, record each outcome.

The stored Part 10 files are streamed as they are (never decoded and re-encoded) unless the
destination accepted the SOP class only in another uncompressed transfer syntax. Outcomes:
Success/Warning -> sent; a failure status, a refused/rejected/aborted association or a timeout
-> retry after jittered exponential backoff, ``failed`` after ``retry.max_attempts``; a SOP
class or transfer syntax the destination refuses -> ``failed`` at once, with that reason.

pynetdicom negotiates, releases and aborts the association; between A-ASSOCIATE-AC and the
release the C-STORE requests and responses go over its socket from the sender's own thread
(``write_message``, ``read_response``): faster than its DUL thread, and free of its
lost-response race (see ``_take_socket``).
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.status import code_to_category

from gateway import db, queue, scu
from gateway.config import Config

log = logging.getLogger("gateway.forward")

#: Transfer syntaxes pydicom can convert between without a codec.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
#: What we offer for uncompressed data besides its own transfer syntax.
UNCOMPRESSED_OFFER = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: A-ASSOCIATE-RQ carries at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
#: Associations lost in a row (aborted, no response) before the rest of the batch backs off.
MAX_LOST_ASSOCIATIONS = 3
#: Outcomes are committed at least this often during a batch (and at its end).
COMMIT_EVERY_SECONDS = 0.5
COMMIT_EVERY_ITEMS = 100


def _name(uid: str) -> str:
    """'CT Image Storage (1.2.840.10008.5.1.4.1.1.2)' or just the UID when unknown."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


@dataclass
class _Plan:
    """The presentation contexts one association proposes, and the items that fit in them."""

    contexts: dict[str, list[str]] = field(default_factory=dict)  # key -> [abstract, ts...]
    items: list[queue.Item] = field(default_factory=list)
    overflow: list[queue.Item] = field(default_factory=list)


def _context_keys(item: queue.Item) -> list[tuple[str, tuple[str, ...]]]:
    """Contexts an item needs: one with exactly its stored syntax (so it can be streamed as it
    is), and for uncompressed data one offering Explicit and Implicit VR Little Endian as a
    fallback the file can be converted to when the destination refuses the stored syntax.

    Compressed data gets no fallback: we never decompress on the way out.
    """
    keys = [(item.sop_class_uid, (item.transfer_syntax,))]
    if item.transfer_syntax in UNCOMPRESSED or item.transfer_syntax == DeflatedExplicitVRLittleEndian:
        keys.append((item.sop_class_uid, UNCOMPRESSED_OFFER))
    return keys


def plan_contexts(items: list[queue.Item], limit: int = MAX_CONTEXTS) -> _Plan:
    """Group items into at most ``limit`` presentation contexts; the rest wait for the next association."""
    plan = _Plan()
    for item in items:
        keys = _context_keys(item)
        new = [k for k in keys if "|".join([k[0], *k[1]]) not in plan.contexts]
        if len(plan.contexts) + len(new) > limit:
            plan.overflow.append(item)
            continue
        for abstract, syntaxes in new:
            plan.contexts["|".join([abstract, *syntaxes])] = [abstract, *syntaxes]
        plan.items.append(item)
    return plan


def _take_socket(assoc) -> None:
    """Stop the association's DUL thread from reading: our thread reads the C-STORE responses.

    Two reasons not to use pynetdicom's DIMSE path for them. Its association thread polls
    the DIMSE queue without blocking whenever it is not paused and drops what it finds that
    is not a request ("Received unexpected C-STORE service message"); ``send_c_store``
    pauses it with a check that can race (about once in 3000 messages), and the sender then
    waits out the DIMSE timeout. And every response would cost a 1 ms poll sleep plus the
    PDU and command-set decoding in that thread. Nothing else arrives on a storage SCU's
    association between A-ASSOCIATE-AC and our first request, so this is switched at a PDU
    boundary; ``_give_back_socket`` before any release or abort, which the DUL must see.
    """
    assoc.dul._is_transport_event = lambda: False


def _give_back_socket(assoc) -> None:
    assoc.dul.__dict__.pop("_is_transport_event", None)


def _element(group_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, group_elem, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = str(uid).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_command(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1), ready to send.

    Built by hand: pydicom's writer costs about a millisecond per message here, as much as
    sending a 512 KiB image.
    """
    body = b"".join([
        _element(0x0002, _uid_value(sop_class_uid)),   # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", 0x0001)),    # Command Field: C-STORE-RQ
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", priority)),
        _element(0x0800, struct.pack("<H", 0x0001)),    # Command Data Set Type: present
        _element(0x1000, _uid_value(sop_instance_uid)),  # Affected SOP Instance UID
    ])
    return _element(0x0000, struct.pack("<I", len(body))) + body


_PDU_HEAD = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, PDV length, context, control


def dataset_offset(f: BinaryIO, path: Path) -> int:
    """Where the data set starts in a Part 10 file: after preamble, 'DICM' and the meta group.

    Read from the File Meta Information Group Length our own files always carry; anything
    else goes through pynetdicom's full meta parser.
    """
    head = f.read(144)
    if (len(head) == 144 and head[128:132] == b"DICM"
            and head[132:140] == b"\x02\x00\x00\x00UL\x04\x00"):
        return 144 + struct.unpack("<I", head[140:144])[0]
    return split_dataset(path)[1]


def write_message(assoc, context_id: int, command: bytes, source: BinaryIO, length: int) -> None:
    """Write a C-STORE request as P-DATA-TF PDUs straight to the association's socket.

    pynetdicom queues every PDU to its DUL thread, which encodes and sends one per loop turn:
    at the peers' usual 16 KiB maximum PDU that costs more than the network does. The DUL
    thread does not touch the socket meanwhile (``_take_socket``; a storage SCU has nothing
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
        sock.sendall(_PDU_HEAD.pack(4, 0, len(chunk) + 6, len(chunk) + 2, context_id, control) + chunk)
    buf = bytearray(_PDU_HEAD.size + min(fragment, max(length, 0)))
    view = memoryview(buf)
    remaining = length
    while True:
        n = min(fragment, remaining)
        got = 0
        while got < n:
            r = source.readinto(view[_PDU_HEAD.size + got:_PDU_HEAD.size + n])
            if not r:
                raise OSError(f"the file ended {remaining - got} bytes early")
            got += r
        remaining -= n
        control = 0x00 if remaining else 0x02
        _PDU_HEAD.pack_into(buf, 0, 4, 0, n + 6, n + 2, context_id, control)
        sock.sendall(view[: _PDU_HEAD.size + n])
        timer.restart()
        if not remaining:
            return


class _PeerGone(Exception):
    """The peer aborted, asked to release or broke the protocol while we waited."""


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


def _command_fields(command: bytes) -> dict[int, bytes]:
    """Element number -> value of an Implicit VR Little Endian command set (group 0000)."""
    fields, pos = {}, 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(command):
            raise _PeerGone("sent a malformed command set")
        fields[elem] = command[pos:pos + length]
        pos += length
    return fields


def read_response(assoc, message_id: int, max_pdu: int) -> tuple[int, str]:
    """Read P-DATA-TF PDUs from the socket until the C-STORE-RSP to ``message_id``: (status, comment).

    Raises ``_PeerGone`` for an A-ABORT, an A-RELEASE-RQ, anything else unexpected or a PDU
    longer than ``max_pdu``; ``TimeoutError`` when nothing comes within the socket timeout.
    """
    sock = assoc.dul.socket.socket
    timer = assoc.dul._idle_timer
    command = b""
    while True:
        head = _recv_exact(sock, 6, timer)
        pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
        if pdu_type == 0x07:
            raise _PeerGone("aborted the association")
        if pdu_type == 0x05:
            raise _PeerGone("asked to release the association in the middle of a C-STORE")
        if pdu_type != 0x04 or length > max_pdu + 6:
            raise _PeerGone(f"sent an unexpected PDU (type 0x{pdu_type:02X}, {length} bytes)")
        body = _recv_exact(sock, length, timer)
        pos = 0
        while pos + 6 <= len(body):
            item_len = struct.unpack_from(">I", body, pos)[0]
            control = body[pos + 5]
            data = body[pos + 6:pos + 4 + item_len]
            pos += 4 + item_len
            if not control & 0x01:
                raise _PeerGone("sent a data set with a C-STORE response")
            command += data
            if not control & 0x02:
                continue
            fields, command = _command_fields(command), b""
            field_ = fields.get(0x0100, b"")
            if field_ != b"\x01\x80" or len(fields.get(0x0900, b"")) != 2:
                raise _PeerGone("sent a message that is not a C-STORE response")
            if struct.unpack("<H", fields.get(0x0120, b"\0\0"))[0] != message_id:
                log.warning("ignored a C-STORE response to another message")
                continue
            comment = fields.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
            return struct.unpack("<H", fields[0x0900])[0], comment


class _Outcomes:
    """Item outcomes buffered and committed together: one fsync per few hundred ms, not per item.

    A crash before a commit leaves the items ``sending``; the next start requeues them and
    they are sent again (at-least-once, which C-STORE tolerates: same SOP Instance UID).
    """

    def __init__(self, sender: Sender):
        self.sender = sender
        self.ops: list[Callable] = []
        self.last_commit = time.monotonic()

    def add(self, op: Callable) -> None:
        self.ops.append(op)
        if len(self.ops) >= COMMIT_EVERY_ITEMS or time.monotonic() - self.last_commit > COMMIT_EVERY_SECONDS:
            self.commit()

    def commit(self) -> None:
        if self.ops:
            conn = self.sender._db()
            with db.transaction(conn):
                for op in self.ops:
                    op(conn)
            self.ops.clear()
        self.last_commit = time.monotonic()


class Sender:
    """Sends one destination's queue: ``run_once`` is one pass, the scheduler calls it on a timer.

    ``clock`` and ``rand`` come through the door so tests can control backoff.
    """

    def __init__(
        self,
        config: Config,
        name: str,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ):
        self.config = config
        self.name = name
        self.dest = scu.destination(config, name)
        self._clock = clock
        self._rand = rand
        self._stopping = threading.Event()
        self._busy = threading.Lock()  # one pass at a time, whoever calls
        self._conn = None
        self._ae: AE | None = None
        self._msg_id = 0

    # ------------------------------------------------------------------ public

    def run_once(self) -> int:
        """Send every item due now, batch by batch; return how many were sent."""
        sent = 0
        with self._busy:
            if self._stopping.is_set():
                return 0
            self._heal()
            while not self._stopping.is_set():
                items = self._claim()
                if not items:
                    break
                done, progress = self._send_batch(items)
                sent += done
                if not progress:
                    break
        return sent

    def stop(self) -> None:
        """Ask the running pass to end after the item in flight; unsent claimed items go back to pending."""
        self._stopping.set()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ queue

    def _db(self):
        if self._conn is None:
            self._conn = db.connect(self.config.db_path)
        return self._conn

    def _heal(self) -> None:
        """Only this sender claims this destination's rows, and never across passes: any row
        still ``sending`` between passes was left by a pass that died on an unexpected error."""
        conn = self._db()
        with db.transaction(conn):
            n = queue.requeue_stale(conn, self._clock(), self.name)
        if n:
            log.warning("requeued %d item(s) of %s left 'sending' by an interrupted pass", n, self.name)

    def _claim(self) -> list[queue.Item]:
        conn = self._db()
        with db.transaction(conn):
            return queue.claim_due(conn, self.name, self._clock(), self.config.forward.batch_size)

    def _delay(self, attempts: int) -> float:
        r = self.config.retry
        return queue.backoff_seconds(
            attempts, r.initial_backoff_seconds, r.max_backoff_seconds, self._rand
        )

    def _fail(
        self, out: _Outcomes, item: queue.Item, reason: str, permanent: bool = False, quiet: bool = False
    ) -> None:
        """Record a failed attempt; one log line unless ``quiet`` (the caller logs the batch)."""
        out.add(lambda conn: queue.mark_attempt_failed(
            conn, item.id, reason, self._clock(), self.config.retry.max_attempts,
            self._delay, permanent=permanent,
        ))
        attempt = item.attempts + 1  # as claimed; the row holds the exact count
        if permanent or attempt >= self.config.retry.max_attempts:
            log.error("failed SOP %s to %s for good after %d attempt(s): %s",
                      item.sop_instance_uid, self.name, attempt, reason)
        elif not quiet:
            log.warning("could not send SOP %s to %s (attempt %d of %d, will retry): %s",
                        item.sop_instance_uid, self.name, attempt,
                        self.config.retry.max_attempts, reason)

    def _fail_all(self, out: _Outcomes, items: list[queue.Item], reason: str) -> None:
        """The destination is unreachable: one line for the batch, not one per item."""
        if items:
            log.warning("could not send %d item(s) to %s, will retry with backoff: %s",
                        len(items), self.name, reason)
        for item in items:
            self._fail(out, item, reason, quiet=True)

    def _sent(self, out: _Outcomes, item: queue.Item, status: int) -> None:
        out.add(lambda conn: queue.mark_sent(conn, item.id, self._clock(), item.claimed_at))
        extra = "" if status == 0 else f" (warning 0x{status:04X})"
        log.info("sent SOP %s to %s%s", item.sop_instance_uid, self.name, extra)

    def _release(self, items: list[queue.Item]) -> None:
        if not items:
            return
        conn = self._db()
        with db.transaction(conn):
            queue.release(conn, [i.id for i in items], self._clock())

    # ------------------------------------------------------------------ network

    def _where(self) -> str:
        return f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}"

    def _associate(self, plan: _Plan):
        if self._ae is None:
            self._ae = scu.make_ae(self.config)
        contexts = [build_context(c[0], c[1:]) for c in plan.contexts.values()]
        assoc = self._ae.associate(
            self.dest.host, self.dest.port, contexts=contexts, ae_title=self.dest.ae_title,
            max_pdu=self.config.node.max_pdu_size, evt_handlers=scu.NODELAY_HANDLERS,
        )
        if assoc.is_established:
            _take_socket(assoc)
            # bounds write_message's sendall; the DUL only reads after select says data is there
            assoc.dul.socket.socket.settimeout(self.config.forward.dimse_timeout_seconds)
        return assoc

    @staticmethod
    def _choose_context(assoc, item: queue.Item):
        """(context, convert) for the item, or (None, reason) when the destination refused it."""
        same_class = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
        for cx in same_class:
            if cx.transfer_syntax[0] == item.transfer_syntax:
                return cx, False
        if item.transfer_syntax in (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian):
            for cx in same_class:
                if cx.transfer_syntax[0] in UNCOMPRESSED_OFFER:
                    return cx, True
        if not same_class:
            return None, f"{_name(item.sop_class_uid)} is not accepted by the destination"
        return None, (
            f"the destination refused transfer syntax {_name(item.transfer_syntax)} "
            f"for {_name(item.sop_class_uid)}"
        )

    def _next_msg_id(self) -> int:
        self._msg_id = self._msg_id % 65535 + 1
        return self._msg_id

    def _c_store(self, assoc, item: queue.Item, path: Path, cx, convert: bool) -> tuple[int, str]:
        """Send one C-STORE and read its own response: (status, error comment).

        The data set is streamed from the stored file after its meta header, as it is; only a
        conversion between uncompressed syntaxes decodes and re-encodes it.
        """
        msg_id = self._next_msg_id()
        command = c_store_command(msg_id, item.sop_class_uid, item.sop_instance_uid)
        if convert:
            ts = cx.transfer_syntax[0]
            data = encode(dcmread(path), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            if data is None:
                raise ValueError(f"pydicom cannot encode it as {ts.name}")
            with BytesIO(data) as source:
                write_message(assoc, cx.context_id, command, source, len(data))
        else:
            with open(path, "rb") as source:
                offset = dataset_offset(source, path)
                length = source.seek(0, 2) - offset
                source.seek(offset)
                write_message(assoc, cx.context_id, command, source, length)
        return read_response(assoc, msg_id, self.config.node.max_pdu_size)

    def _lost(self, exc: Exception) -> str:
        """One sentence for a request that got no response."""
        if isinstance(exc, _PeerGone):
            return f"{self._where()} {exc}"
        if isinstance(exc, TimeoutError):
            return (f"no C-STORE response from {self._where()} within "
                    f"{self.config.forward.dimse_timeout_seconds:g} s")
        return f"connection to {self._where()} lost while sending ({getattr(exc, 'strerror', None) or exc})"

    @staticmethod
    def _abort(assoc) -> None:
        _give_back_socket(assoc)
        if assoc.is_established:
            assoc.abort()

    # ------------------------------------------------------------------ a batch

    def _send_batch(self, items: list[queue.Item]) -> tuple[int, bool]:
        """Send claimed items over as few associations as possible; (sent, made progress)."""
        out = _Outcomes(self)
        data_dir = self.config.node.data_dir
        ready = []
        resolved = 0  # items that reached a final state: sent, or failed for good
        for item in items:
            if (data_dir / item.path).is_file():
                ready.append(item)
            else:
                self._fail(out, item, f"the stored file {item.path} is missing", permanent=True)
                resolved += 1
        plan = plan_contexts(ready)
        if plan.overflow:
            self._release(plan.overflow)
        todo = list(plan.items)
        sent = 0
        lost_in_row = 0
        retried: set[int] = set()
        assoc = None
        try:
            while todo and not self._stopping.is_set():
                if assoc is None or not assoc.is_established:
                    assoc = self._associate(plan)
                    if not assoc.is_established:
                        self._fail_all(out, todo, scu.describe_failure(assoc, self.dest))
                        todo = []
                        break
                item = todo[0]
                cx, convert = self._choose_context(assoc, item)
                if cx is None:
                    self._fail(out, item, convert, permanent=True)
                    resolved += 1
                    todo.pop(0)
                    continue
                try:
                    status, comment = self._c_store(assoc, item, data_dir / item.path, cx, convert)
                except (ConnectionError, TimeoutError, _PeerGone) as exc:
                    self._abort(assoc)
                    reason = self._lost(exc)
                    lost_in_row += 1
                    log.warning("%s (SOP %s); reconnecting", reason, item.sop_instance_uid)
                    if item.id not in retried:
                        retried.add(item.id)  # once more on a fresh association
                    else:
                        self._fail(out, item, reason)
                        todo.pop(0)
                    if lost_in_row >= MAX_LOST_ASSOCIATIONS:
                        self._fail_all(out, todo, reason)
                        todo = []
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    # unreadable file, or one pydicom cannot convert: the association's state is unknown
                    self._abort(assoc)
                    self._fail(out, item, f"cannot send the stored file {item.path}: {exc}")
                    todo.pop(0)
                    continue
                todo.pop(0)
                category = code_to_category(status)
                if category in ("Success", "Warning"):
                    lost_in_row = 0
                    sent += 1
                    resolved += 1
                    self._sent(out, item, status)
                else:
                    detail = f": {comment}" if comment else ""
                    self._fail(
                        out, item,
                        f"{self.dest.ae_title} answered C-STORE with status 0x{status:04X} ({category}){detail}",
                    )
        finally:
            if assoc is not None:
                _give_back_socket(assoc)
                if assoc.is_established:
                    assoc.release()
            out.commit()
            self._release(todo)
        return sent, bool(resolved or plan.overflow)
