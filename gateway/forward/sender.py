"""One sender per destination: claim due items, hand them to the transport, record each outcome.

The sender knows the queue, not the protocol. A transport (``forward.dimse.DimseTransport``
for C-STORE, ``forward.dicomweb.DicomwebTransport`` for STOW-RS) takes a batch of claimed
queue items and yields ``(item, outcome.Outcome)`` lists as it finishes them; items it never
yields were not tried and go back to pending untouched. Outcomes: sent; retry after
jittered exponential backoff (``queue.RetryPolicy``), ``failed`` after ``retry.max_attempts``;
failed at once when the destination refuses an item for good or its stored file is missing.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from gateway import audit as audit_trail
from gateway.metrics import Metrics
from gateway.config import Config
from gateway.dimse import scu
from gateway.forward import outcome
from gateway.forward.outcome import Outcome, Verdict
from gateway.storage import db, qido, queue

log = logging.getLogger("gateway.forward")

#: Outcomes are committed at least this often during a batch (and at its end).
COMMIT_EVERY_SECONDS = 0.5
COMMIT_EVERY_ITEMS = 100


class Transport(Protocol):
    """How items reach a destination; ``send`` never raises for what the peer or network does."""

    def send(self, items: list[queue.Item], stopping: Callable[[], bool]
             ) -> Iterator[list[tuple[queue.Item, Outcome]]]: ...

    def close(self) -> None: ...


def make_transport(config: Config, name: str, clock: Callable[[], float] = time.time) -> Transport:
    """The transport for a destination's type: C-STORE (dimse) or STOW-RS (dicomweb)."""
    dest = scu.destination(config, name)
    if dest.type == "dicomweb":
        from gateway.forward.dicomweb import DicomwebTransport

        return DicomwebTransport(name, dest, connect_timeout=config.forward.connect_timeout_seconds,
                                 data_dir=config.node.data_dir, clock=clock)
    from gateway.forward.dimse import DimseTransport

    return DimseTransport(config, name)


class _Outcomes:
    """Item outcomes buffered and committed together: one fsync per few hundred ms, not per item.

    A crash before a commit leaves the items ``sending``; the next start requeues them and
    they are sent again (at-least-once, which C-STORE and STOW-RS tolerate: same SOP Instance UID).
    """

    def __init__(self, conn, clock: Callable[[], float], policy: queue.RetryPolicy):
        self.conn, self.clock, self.policy = conn, clock, policy
        self.pending: list[tuple[queue.Item, Outcome]] = []
        self.last_commit = time.monotonic()

    def add(self, item: queue.Item, result: Outcome) -> None:
        self.pending.append((item, result))
        if len(self.pending) >= COMMIT_EVERY_ITEMS or time.monotonic() - self.last_commit > COMMIT_EVERY_SECONDS:
            self.commit()

    def commit(self) -> None:
        if self.pending:
            now = self.clock()
            with db.transaction(self.conn):
                for item, result in self.pending:
                    if result.verdict is Verdict.SENT:
                        queue.mark_sent(self.conn, item.id, now, item.claimed_at, item.generation)
                    else:
                        queue.mark_attempt_failed(
                            self.conn, item.id, result.reason or "unknown", now, self.policy,
                            permanent=result.verdict is Verdict.FAILED, at_least=result.retry_after,
                        )
            self.pending.clear()
        self.last_commit = time.monotonic()


class Sender:
    """Sends one destination's queue: ``run_once`` is one pass, the scheduler calls it on a timer.

    ``clock`` and ``rand`` come through the door so tests can control backoff; so can the
    ``transport``.
    """

    def __init__(
        self,
        config: Config,
        name: str,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        audit=audit_trail.NULL,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.name = name
        self.metrics = metrics if metrics is not None else Metrics()
        self.dest = scu.destination(config, name)
        self.policy = queue.RetryPolicy.from_config(config.retry, rand)
        self.transport = transport or make_transport(config, name, clock)
        self.audit = audit
        self._clock = clock
        self._stopping = threading.Event()
        self._busy = threading.Lock()  # one pass at a time, whoever calls
        self._lazy_db = db.LazyConnection(config.db_path)
        self._batch_sent = audit_trail.Tally()
        self._batch_failures: list[str] = []

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
        self.transport.close()
        self._lazy_db.close()

    # ------------------------------------------------------------------ queue

    def _db(self):
        return self._lazy_db.get()

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

    def _release(self, items: list[queue.Item]) -> None:
        if items:
            conn = self._db()
            with db.transaction(conn):
                queue.release(conn, [i.id for i in items], self._clock())

    # ------------------------------------------------------------------ a batch

    def _send_batch(self, items: list[queue.Item]) -> tuple[int, bool]:
        """(sent, made progress): progress means some item reached a final state."""
        out = _Outcomes(self._db(), self._clock, self.policy)
        data_dir = self.config.node.data_dir
        ready, missing, done = [], [], set()
        for item in items:
            (ready if (data_dir / item.path).is_file() else missing).append(item)
        chunks = [[(item, outcome.missing(item.path)) for item in missing]] if missing else []
        sent = resolved = 0
        try:
            last = time.monotonic()
            for results in _chain(chunks, self.transport.send(ready, self._stopping.is_set)):
                # send latency per instance: the time this chunk took, shared by its instances
                each, last = (time.monotonic() - last) / max(1, len(results)), time.monotonic()
                self._log(results)
                for item, result in results:
                    done.add(item.id)
                    out.add(item, result)
                    final = result.verdict is not Verdict.RETRY or self.policy.final(item.attempts + 1)
                    if result.verdict is Verdict.SENT:
                        sent += 1
                        self._tally(item)
                        self.metrics.sent(self.name, each)
                    else:
                        self._batch_failures.append(result.reason or "unknown")
                        self.metrics.send_failed(self.name, for_good=final)
                    if final:
                        resolved += 1
        finally:
            out.commit()
            self._release([i for i in ready if i.id not in done])
            self._audit_batch()
        return sent, bool(resolved)

    def _log(self, results: list[tuple[queue.Item, Outcome]]) -> None:
        """One line per item sent or failed for good; one line for retries that share a reason."""
        retries = []
        for item, result in results:
            attempt = item.attempts + 1  # as claimed; the row holds the exact count
            if result.verdict is Verdict.SENT:
                extra = f" ({result.reason})" if result.reason else ""
                log.info("sent SOP %s to %s%s", item.sop_instance_uid, self.name, extra)
            elif result.verdict is Verdict.FAILED or self.policy.final(attempt):
                log.error("failed SOP %s to %s for good after %d attempt(s): %s",
                          item.sop_instance_uid, self.name, attempt, result.reason)
            else:
                retries.append((item, result))
        if len(retries) > 1 and len({r.reason for _, r in retries}) == 1:
            log.warning("could not send %d item(s) to %s, will retry with backoff: %s",
                        len(retries), self.name, retries[0][1].reason)
            return
        for item, result in retries:
            log.warning("could not send SOP %s to %s (attempt %d of %d, will retry): %s",
                        item.sop_instance_uid, self.name, item.attempts + 1,
                        self.policy.max_attempts, result.reason)

    # ------------------------------------------------------------------ audit

    def _tally(self, item: queue.Item) -> None:
        parts = Path(item.path).parts  # store/<study>/<series>/<sop>.dcm (files.instance_path)
        if len(parts) >= 3:
            self._batch_sent.add(parts[-3], parts[-2], 0)

    def _audit_batch(self) -> None:
        """One DICOM Instances Transferred message per batch: what reached the destination, what failed."""
        sent, failures = self._batch_sent, self._batch_failures
        self._batch_sent, self._batch_failures = audit_trail.Tally(), []
        if not sent.studies and not failures:
            return
        if not failures:
            result, description = audit_trail.Outcome.SUCCESS, None
        else:
            result = audit_trail.Outcome.MINOR_FAILURE if sent.studies else audit_trail.Outcome.SERIOUS_FAILURE
            description = f"{len(failures)} item(s) not delivered: {failures[-1]}"
        try:
            conn = self._db()
            for study in list(sent.studies):
                sent.set_patient(study, qido.patient_of_study(conn, study))
        except sqlite3.Error as exc:  # the message still goes out, without its patient object
            log.warning("audit: cannot look up the patients of a batch sent to %s: %s", self.name, exc)
        if self.dest.type == "dicomweb":
            who, address = self.dest.url, urlsplit(self.dest.url).hostname
        else:
            who, address = self.dest.ae_title, self.dest.host
        self.audit.record(
            audit_trail.INSTANCES_TRANSFERRED, result, action=audit_trail.READ, description=description,
            participants=[
                audit_trail.participant(self.config.calling_ae_title, requestor=True,
                                        role=audit_trail.SOURCE_ROLE),
                audit_trail.participant(who, requestor=False, address=address,
                                        alternative=f"destination {self.name}",
                                        role=audit_trail.DESTINATION_ROLE),
            ],
            objects=sent.objects())


def _chain(first: list, then: Iterator) -> Iterator:
    yield from first
    yield from then
