"""A destination's sender: claim due items, send them over one association, record each outcome.

The stored Part 10 files are streamed as they are (never decoded and re-encoded) unless the
destination accepted the SOP class only in another uncompressed transfer syntax. Outcomes:
Success/Warning -> sent; a failure status, a refused/rejected/aborted association or a timeout
-> retry after jittered exponential backoff, ``failed`` after ``retry.max_attempts``; a SOP
class or transfer syntax the destination refuses -> ``failed`` at once, with that reason.

pynetdicom negotiates, releases and aborts the association; between A-ASSOCIATE-AC and the
release the C-STORE requests and responses go over its socket from the sender's own thread
(``dimse.fastpath``: ``write_message``, ``read_response``): faster than its DUL
thread, and free of its lost-response race (see ``dimse.fastpath.take_socket``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from pynetdicom.status import code_to_category

from gateway import audit as audit_trail
from gateway.storage import db, queue
from gateway.dimse import scu
from gateway.config import Config
from gateway.logsafe import wire
from gateway.dimse.codec import store_request_bytes
from gateway.storage.header import read_header
from gateway.dimse.fastpath import PeerGone, give_back_socket, read_response, take_socket, write_message

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
        audit=audit_trail.NULL,
    ):
        self.config = config
        self.audit = audit
        self._tls_args = None  # built at the first association (loads the CA and key files)
        self._batch_sent = audit_trail.Tally()
        self._batch_failures: list[str] = []
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
        self._batch_failures.append(reason)
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
        parts = Path(item.path).parts  # store/<study>/<series>/<sop>.dcm (files.instance_path)
        if len(parts) >= 3:
            self._batch_sent.add(parts[-3], parts[-2], 0)
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
        if self.dest.tls is not None and self._tls_args is None:
            self._tls_args = scu.tls_args(self.dest)
        contexts = [build_context(c[0], c[1:]) for c in plan.contexts.values()]
        assoc = self._ae.associate(
            self.dest.host, self.dest.port, contexts=contexts, ae_title=self.dest.ae_title,
            max_pdu=self.config.node.max_pdu_size, evt_handlers=scu.NODELAY_HANDLERS,
            tls_args=self._tls_args,
        )
        if assoc.is_established:
            if not take_socket(assoc):
                give_back_socket(assoc)
                assoc.abort()
                return assoc
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
        command = store_request_bytes(msg_id, item.sop_class_uid, item.sop_instance_uid)
        if convert:
            ts = cx.transfer_syntax[0]
            data = encode(dcmread(path), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            if data is None:
                raise ValueError(f"pydicom cannot encode it as {ts.name}")
            with BytesIO(data) as source:
                write_message(assoc, cx.context_id, command, source, len(data))
        else:
            with open(path, "rb") as source:
                offset = item.dataset_offset
                if offset is None:  # stored by the first release: no offset in the index
                    offset = read_header(path).dataset_offset
                length = source.seek(0, 2) - offset
                source.seek(offset)
                write_message(assoc, cx.context_id, command, source, length)
        return read_response(assoc, msg_id, self.config.node.max_pdu_size)

    def _lost(self, exc: Exception) -> str:
        """One sentence for a request that got no response."""
        if isinstance(exc, PeerGone):
            return f"{self._where()} {exc}"
        if isinstance(exc, TimeoutError):
            return (f"no C-STORE response from {self._where()} within "
                    f"{self.config.forward.dimse_timeout_seconds:g} s")
        return f"connection to {self._where()} lost while sending ({getattr(exc, 'strerror', None) or exc})"

    @staticmethod
    def _abort(assoc) -> None:
        give_back_socket(assoc)
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
                        self._fail_all(out, todo, scu.describe_failure(
                            assoc, self.dest, self.config.forward.connect_timeout_seconds))
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
                except (ConnectionError, TimeoutError, PeerGone) as exc:
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
                    detail = f": {wire(comment, 64)}" if comment else ""
                    self._fail(
                        out, item,
                        f"{self.dest.ae_title} answered C-STORE with status 0x{status:04X} ({category}){detail}",
                    )
        finally:
            if assoc is not None:
                give_back_socket(assoc)
                if assoc.is_established:
                    assoc.release()
            out.commit()
            self._release(todo)
            self._audit_batch()
        return sent, bool(resolved or plan.overflow)

    def _audit_batch(self) -> None:
        """One DICOM Instances Transferred message per batch: what reached the destination, what failed."""
        sent, failures = self._batch_sent, self._batch_failures
        self._batch_sent, self._batch_failures = audit_trail.Tally(), []
        if not sent.studies and not failures:
            return
        if not failures:
            outcome, description = audit_trail.Outcome.SUCCESS, None
        else:
            outcome = audit_trail.Outcome.MINOR_FAILURE if sent.studies else audit_trail.Outcome.SERIOUS_FAILURE
            description = f"{len(failures)} item(s) not delivered: {failures[-1]}"
        self.audit.record(
            audit_trail.INSTANCES_TRANSFERRED, outcome, action=audit_trail.READ, description=description,
            participants=[
                audit_trail.participant(self.config.calling_ae_title, requestor=True,
                                        role=audit_trail.SOURCE_ROLE),
                audit_trail.participant(self.dest.ae_title, requestor=False,
                                        address=self.dest.host,
                                        alternative=f"destination {self.name}",
                                        role=audit_trail.DESTINATION_ROLE),
            ],
            objects=sent.objects())
