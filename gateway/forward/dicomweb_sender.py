"""A DICOMweb destination's sender: claim due items, STOW-RS them, record each outcome.

Same queue and same promises as the DIMSE sender: an item is marked sent only when the
server's answer names it in its Referenced SOP Sequence; everything else is a retry after
backoff (``retry.max_attempts`` of them) or failed at once with the server's reason.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from pathlib import Path
from urllib.parse import urlsplit

from gateway import audit as audit_trail
from gateway.config import Config, DicomwebDestinationConfig
from gateway.forward.dicomweb import DicomwebTransport, parts_for
from gateway.forward.stowrs import Outcome, Verdict
from gateway.storage import db, queue

log = logging.getLogger("gateway.forward")


class DicomwebSender:
    """``run_once`` is one pass over the due items; the scheduler calls it on a timer."""

    def __init__(
        self,
        config: Config,
        name: str,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        transport: DicomwebTransport | None = None,
        audit=audit_trail.NULL,
    ):
        dest = config.destinations[name]
        assert isinstance(dest, DicomwebDestinationConfig)
        self.config = config
        self.name = name
        self.dest = dest
        self.audit = audit
        self._batch_sent = audit_trail.Tally()
        self._batch_failures: list[str] = []
        self._clock = clock
        self._rand = rand
        self._stopping = threading.Event()
        self._busy = threading.Lock()
        self._conn = None
        self.transport = transport or DicomwebTransport(
            name, dest, connect_timeout=config.forward.connect_timeout_seconds, clock=clock
        )

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
        self._stopping.set()

    def close(self) -> None:
        self.transport.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ queue

    def _db(self):
        if self._conn is None:
            self._conn = db.connect(self.config.db_path)
        return self._conn

    def _heal(self) -> None:
        conn = self._db()
        with db.transaction(conn):
            n = queue.requeue_stale(conn, self._clock(), self.name)
        if n:
            log.warning("requeued %d item(s) of %s left 'sending' by an interrupted pass", n, self.name)

    def _claim(self) -> list[queue.Item]:
        conn = self._db()
        with db.transaction(conn):
            return queue.claim_due(conn, self.name, self._clock(), self.config.forward.batch_size)

    def _delay(self, attempts: int, at_least: float | None = None) -> float:
        r = self.config.retry
        delay = queue.backoff_seconds(attempts, r.initial_backoff_seconds, r.max_backoff_seconds, self._rand)
        return max(delay, at_least or 0.0)

    def _record(self, results: list[tuple[queue.Item, Outcome]]) -> int:
        """Commit one request's outcomes together; log one line per instance; return how many were sent."""
        now = self._clock()
        sent = 0
        conn = self._db()
        with db.transaction(conn):
            for item, outcome in results:
                if outcome.verdict is Verdict.SENT:
                    queue.mark_sent(conn, item.id, now, item.claimed_at)
                    sent += 1
                    parts = Path(item.path).parts  # store/<study>/<series>/<sop>.dcm
                    if len(parts) >= 3:
                        self._batch_sent.add(parts[-3], parts[-2], 0)
                    continue
                self._batch_failures.append(outcome.reason or "unknown")
                wait = outcome.retry_after
                queue.mark_attempt_failed(
                    conn, item.id, outcome.reason or "unknown", now, self.config.retry.max_attempts,
                    lambda attempts, wait=wait: self._delay(attempts, wait),
                    permanent=outcome.verdict is Verdict.FAILED,
                )
        for item, outcome in results:
            attempt = item.attempts + 1
            if outcome.verdict is Verdict.SENT:
                extra = f" ({outcome.reason})" if outcome.reason else ""
                log.info("sent SOP %s to %s%s", item.sop_instance_uid, self.name, extra)
            elif outcome.verdict is Verdict.FAILED or attempt >= self.config.retry.max_attempts:
                log.error("failed SOP %s to %s for good after %d attempt(s): %s",
                          item.sop_instance_uid, self.name, attempt, outcome.reason)
        retries = [(i, o) for i, o in results if o.verdict is Verdict.RETRY
                   and i.attempts + 1 < self.config.retry.max_attempts]
        if retries:
            reasons = {o.reason for _, o in retries}
            if len(reasons) == 1:
                log.warning("could not send %d item(s) to %s, will retry with backoff: %s",
                            len(retries), self.name, retries[0][1].reason)
            else:
                for item, outcome in retries:
                    log.warning("could not send SOP %s to %s (attempt %d of %d, will retry): %s",
                                item.sop_instance_uid, self.name, item.attempts + 1,
                                self.config.retry.max_attempts, outcome.reason)
        return sent

    def _release(self, items: list[queue.Item]) -> None:
        if items:
            conn = self._db()
            with db.transaction(conn):
                queue.release(conn, [i.id for i in items], self._clock())

    # ------------------------------------------------------------------ a batch

    def _send_batch(self, items: list[queue.Item]) -> tuple[int, bool]:
        """(sent, made progress): progress means some item reached a final state."""
        by_id = {item.id: item for item in items}
        parts, missing = parts_for(items, self.config.node.data_dir)
        resolved = 0
        if missing:
            self._record([(item, Outcome(Verdict.FAILED, f"the stored file {item.path} is missing"))
                          for item in missing])
            resolved += len(missing)
        sent = 0
        done: set[int] = set()
        try:
            for results in self.transport.send(parts, self._stopping.is_set):
                sent += self._record([(by_id[part.item_id], outcome) for part, outcome in results])
                done.update(part.item_id for part, _ in results)
                resolved += sum(1 for _, outcome in results if outcome.verdict is not Verdict.RETRY)
        finally:
            self._release([by_id[p.item_id] for p in parts if p.item_id not in done])
            self._audit_batch()
        return sent, bool(resolved)

    def _audit_batch(self) -> None:
        """One DICOM Instances Transferred message per batch, as the DIMSE sender writes."""
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
                audit_trail.participant(self.dest.url, requestor=False,
                                        address=urlsplit(self.dest.url).hostname,
                                        alternative=f"destination {self.name}",
                                        role=audit_trail.DESTINATION_ROLE),
            ],
            objects=sent.objects())
