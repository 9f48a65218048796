"""The durable forward queue: one row per (destination, instance), every state visible.

Enqueueing happens inside the caller's transaction (the one that indexes the instance), so
an instance is never stored without its queue rows, nor queued without being stored.
"""

from __future__ import annotations

import enum
import random
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.storage import db


class State(str, enum.Enum):
    PENDING = "pending"  # waiting for its next attempt (at next_attempt_at)
    SENDING = "sending"  # claimed by a sender; goes back to pending if the process dies
    SENT = "sent"  # the destination answered Success or Warning
    FAILED = "failed"  # gave up after retry.max_attempts (or a permanent refusal); see last_error


@dataclass(frozen=True)
class Item:
    id: int
    destination: str
    sop_instance_uid: str
    attempts: int
    path: str  # relative to data_dir
    sop_class_uid: str
    transfer_syntax: str
    claimed_at: float = 0.0  # when this claim was made; a re-enqueue after it means "send again"
    dataset_offset: int | None = None  # where the data set starts in the file (None: read the header)
    generation: int = 0  # the row's enqueue count at claim time; mark_sent compares it


def backoff_seconds(
    attempts: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before the next try after ``attempts`` failures: exponential, capped, jittered.

    "Full jitter" between half and all of the capped exponential delay, so many items that
    failed together do not all retry in the same second.
    """
    exponent = max(0, attempts - 1)
    base = min(maximum, initial * (2 ** min(exponent, 60)))
    return base * (0.5 + 0.5 * rand())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed item is tried again (``retry.*``), as a value."""

    max_attempts: int
    initial_seconds: float
    max_seconds: float
    rand: Callable[[], float] = random.random

    @classmethod
    def from_config(cls, retry, rand: Callable[[], float] = random.random) -> RetryPolicy:
        return cls(retry.max_attempts, retry.initial_backoff_seconds, retry.max_backoff_seconds, rand)

    def delay(self, attempts: int) -> float:
        return backoff_seconds(attempts, self.initial_seconds, self.max_seconds, self.rand)

    def final(self, attempts: int) -> bool:
        """True when the ``attempts``-th failure is the last one allowed."""
        return attempts >= self.max_attempts


def enqueue(
    conn: sqlite3.Connection, destinations: Iterable[str], sop_instance_uid: str, now: float
) -> None:
    """Queue an instance for each destination; a resend of a queued instance is sent again.

    A row being sent right now stays ``sending``; its bumped ``generation`` tells ``mark_sent``
    that the stored file changed meanwhile, so it goes back to pending instead of sent.
    """
    for dest in destinations:
        conn.execute(
            """INSERT INTO queue (destination, sop_instance_uid, state, attempts, next_attempt_at,
                                  last_error, enqueued_at, updated_at)
               VALUES (?, ?, 'pending', 0, ?, NULL, ?, ?)
               ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET
                   state = CASE WHEN state = 'sending' THEN state ELSE 'pending' END,
                   attempts = 0, next_attempt_at = excluded.next_attempt_at,
                   last_error = NULL, enqueued_at = excluded.enqueued_at,
                   updated_at = excluded.updated_at, generation = generation + 1""",
            (dest, sop_instance_uid, now, now, now),
        )


def claim_due(conn: sqlite3.Connection, destination: str, now: float, limit: int) -> list[Item]:
    """Mark up to ``limit`` due pending items of one destination as sending and return them.

    Call inside ``db.transaction`` so two claimers never take the same row.
    """
    rows = conn.execute(
        """SELECT q.id, q.destination, q.sop_instance_uid, q.attempts, i.path, i.sop_class_uid,
                  i.transfer_syntax, i.dataset_offset, q.generation
           FROM queue q JOIN instances i ON i.sop_instance_uid = q.sop_instance_uid
           WHERE q.destination = ? AND q.state = 'pending' AND q.next_attempt_at <= ?
           ORDER BY q.next_attempt_at, q.id LIMIT ?""",
        (destination, now, limit),
    ).fetchall()
    if rows:
        conn.executemany(
            "UPDATE queue SET state = 'sending', updated_at = ? WHERE id = ?",
            [(now, row["id"]) for row in rows],
        )
    return [Item(**dict(row), claimed_at=now) for row in rows]


def mark_sent(
    conn: sqlite3.Connection, item_id: int, now: float, claimed_at: float | None = None,
    generation: int | None = None,
) -> State:
    """The destination took the item; pending again if it was re-enqueued since its claim.

    ``generation`` (the claimed ``Item.generation``) decides; ``claimed_at`` is the older,
    clock-based check, kept for callers that have no generation.
    """
    if generation is not None:
        row = conn.execute("SELECT generation FROM queue WHERE id = ?", (item_id,)).fetchone()
        again = row is not None and row["generation"] != generation
    else:
        again = claimed_at is not None and conn.execute(
            "SELECT enqueued_at > ? AS again FROM queue WHERE id = ?", (claimed_at, item_id)
        ).fetchone()["again"]
    if again:
        conn.execute(
            "UPDATE queue SET state = 'pending', updated_at = ? WHERE id = ?", (now, item_id)
        )
        return State.PENDING
    conn.execute(
        "UPDATE queue SET state = 'sent', attempts = attempts + 1, last_error = NULL, "
        "updated_at = ? WHERE id = ?",
        (now, item_id),
    )
    return State.SENT


def mark_attempt_failed(
    conn: sqlite3.Connection,
    item_id: int,
    error: str,
    now: float,
    policy: RetryPolicy,
    permanent: bool = False,
    at_least: float | None = None,
) -> State:
    """Record a failed attempt: back to pending after the policy's delay (at least ``at_least``
    seconds, when the destination asked), or failed for good."""
    row = conn.execute("SELECT attempts FROM queue WHERE id = ?", (item_id,)).fetchone()
    attempts = (row["attempts"] if row else 0) + 1
    if permanent or attempts >= policy.max_attempts:
        conn.execute(
            "UPDATE queue SET state = 'failed', attempts = ?, last_error = ?, updated_at = ? "
            "WHERE id = ?",
            (attempts, error, now, item_id),
        )
        return State.FAILED
    delay = max(policy.delay(attempts), at_least or 0.0)
    conn.execute(
        "UPDATE queue SET state = 'pending', attempts = ?, last_error = ?, next_attempt_at = ?, "
        "updated_at = ? WHERE id = ?",
        (attempts, error, now + delay, now, item_id),
    )
    return State.PENDING


def release(conn: sqlite3.Connection, item_ids: Iterable[int], now: float) -> None:
    """Give claimed items back untouched (shutdown before they were tried)."""
    conn.executemany(
        "UPDATE queue SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'sending'",
        [(now, i) for i in item_ids],
    )


def requeue_stale(conn: sqlite3.Connection, now: float, destination: str | None = None) -> int:
    """Rows left ``sending`` by a crashed process (or pass) go back to pending; returns how many."""
    sql = "UPDATE queue SET state = 'pending', next_attempt_at = ?, updated_at = ? WHERE state = 'sending'"
    args: list = [now, now]
    if destination is not None:
        sql += " AND destination = ?"
        args.append(destination)
    return conn.execute(sql, args).rowcount


def retry_failed(conn: sqlite3.Connection, destination: str | None, now: float) -> int:
    """Put failed items (of one destination, or all) back to pending with fresh attempts."""
    sql = (
        "UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? "
        "WHERE state = 'failed'"
    )
    args: list = [now, now]
    if destination is not None:
        sql += " AND destination = ?"
        args.append(destination)
    return conn.execute(sql, args).rowcount


def destination_status(conn: sqlite3.Connection, destinations: Iterable[str], now: float) -> dict:
    """Per destination: counts per state, oldest pending age (s) and the last error seen."""
    result = {}
    names = list(destinations)
    names += [
        r["destination"]
        for r in conn.execute("SELECT DISTINCT destination FROM queue")
        if r["destination"] not in names
    ]
    for name in names:
        counts = db.counts_by_state(conn, "queue", "destination", name, (state.value for state in State))
        oldest = conn.execute(
            "SELECT MIN(enqueued_at) AS t FROM queue WHERE destination = ? "
            "AND state IN ('pending', 'sending')",
            (name,),
        ).fetchone()["t"]
        last = conn.execute(
            "SELECT last_error, next_attempt_at FROM queue WHERE destination = ? "
            "AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 1",
            (name,),
        ).fetchone()
        next_due = conn.execute(
            "SELECT MIN(next_attempt_at) AS t FROM queue WHERE destination = ? AND state = 'pending'",
            (name,),
        ).fetchone()["t"]
        result[name] = {
            **counts,
            "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 1),
            "next_attempt_in_seconds": None if next_due is None else round(max(0.0, next_due - now), 1),
            "last_error": last["last_error"] if last else None,
        }
    return result


def list_items(
    conn: sqlite3.Connection, destination: str | None = None, state: str | None = None,
    limit: int = 50, offset: int = 0,
) -> tuple[int, list[dict]]:
    """One page of queue items (newest change first) with their last error, and the total matching."""
    where, args = [], []
    if destination is not None:
        where.append("q.destination = ?")
        args.append(destination)
    if state is not None:
        where.append("q.state = ?")
        args.append(state)
    sql_where = f"WHERE {' AND '.join(where)}" if where else ""
    total = conn.execute(f"SELECT COUNT(*) AS n FROM queue q {sql_where}", args).fetchone()["n"]
    rows = conn.execute(
        f"""SELECT q.id, q.destination, q.sop_instance_uid, q.state, q.attempts, q.last_error,
                   q.enqueued_at, q.updated_at, q.next_attempt_at, i.study_uid, i.series_uid,
                   i.sop_class_uid
            FROM queue q LEFT JOIN instances i ON i.sop_instance_uid = q.sop_instance_uid
            {sql_where} ORDER BY q.updated_at DESC, q.id DESC LIMIT ? OFFSET ?""",
        (*args, limit, offset),
    ).fetchall()
    return total, [dict(r) for r in rows]


def retry_item(conn: sqlite3.Connection, item_id: int, now: float) -> State | None:
    """A failed item back to pending with fresh attempts, a waiting one due now; its state, None if absent."""
    row = conn.execute("SELECT state FROM queue WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        return None
    if row["state"] == State.FAILED.value:
        conn.execute("UPDATE queue SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? "
                     "WHERE id = ?", (now, now, item_id))
        return State.PENDING
    if row["state"] == State.PENDING.value:
        conn.execute("UPDATE queue SET next_attempt_at = ?, updated_at = ? WHERE id = ?", (now, now, item_id))
    return State(row["state"])
