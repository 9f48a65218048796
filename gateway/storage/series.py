"""Rows of routing and series-complete triggers: rule match counts, trigger state, the webhook queue.

The state machine itself is pure (``routing/triggers.py``); these functions read and write
its rows. ``record_arrival`` runs inside the ingest transaction, so an instance is never
stored without having touched its series' timestamp.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.storage import db
from gateway.routing.triggers import SeriesState, WebhookState, after_export, on_arrival


def count_rule_matches(conn: sqlite3.Connection, rules: Iterable[str], now: float) -> None:
    """Add one match to each rule named (inside the ingest transaction)."""
    conn.executemany(
        """INSERT INTO rule_matches (rule, matches, last_match_at) VALUES (?, 1, ?)
           ON CONFLICT(rule) DO UPDATE SET matches = matches + 1, last_match_at = excluded.last_match_at""",
        [(name, now) for name in rules],
    )


def rule_match_counts(conn: sqlite3.Connection | None, names: Iterable[str]) -> dict[str, dict]:
    """Per configured rule: how many instances it routed and when it last matched."""
    rows = {}
    if conn is not None:
        try:
            rows = {r["rule"]: r for r in conn.execute("SELECT * FROM rule_matches")}
        except sqlite3.OperationalError:  # a database not yet migrated by ``run``
            rows = {}
    return {
        name: {"matches": rows[name]["matches"] if name in rows else 0,
               "last_match_at": rows[name]["last_match_at"] if name in rows else None}
        for name in names
    }


def record_arrival(
    conn: sqlite3.Connection, series_uid: str, study_uid: str, matching: Iterable[str], now: float
) -> list[tuple[str, int]]:
    """An instance of ``series_uid`` arrived: touch its trigger rows, open the matching ones.

    Returns ``(trigger, revision)`` for each row that opened or reopened (for the log).
    Series that match no trigger and have no rows cost one index lookup, nothing stored.
    """
    existing = {
        r["trigger"]: r
        for r in conn.execute(
            "SELECT trigger, state, revision FROM series_triggers WHERE series_uid = ?", (series_uid,)
        )
    }
    opened = []
    for trigger in dict.fromkeys([*existing, *matching]):
        row = existing.get(trigger)
        old_state = SeriesState(row["state"]) if row else None
        state, revision = on_arrival(old_state, row["revision"] if row else None)
        if row is None:
            conn.execute(
                """INSERT INTO series_triggers (trigger, series_uid, study_uid, state, revision,
                                                last_arrival_at) VALUES (?, ?, ?, ?, ?, ?)""",
                (trigger, series_uid, study_uid, state.value, revision, now),
            )
        else:
            conn.execute(
                """UPDATE series_triggers SET state = ?, revision = ?, last_arrival_at = MAX(last_arrival_at, ?),
                          not_before = NULL WHERE trigger = ? AND series_uid = ?""",
                (state.value, revision, now, trigger, series_uid),
            )
        if old_state is not SeriesState.OPEN:
            opened.append((trigger, revision))
    return opened


@dataclass(frozen=True)
class DueSeries:
    trigger: str
    series_uid: str
    study_uid: str
    revision: int
    last_arrival_at: float


def due_series(conn: sqlite3.Connection, now: float, stable_seconds: float, limit: int = 100) -> list[DueSeries]:
    """Open series whose last instance is at least ``stable_seconds`` old, oldest first."""
    rows = conn.execute(
        """SELECT trigger, series_uid, study_uid, revision, last_arrival_at FROM series_triggers
           WHERE state = ? AND last_arrival_at <= ? AND (not_before IS NULL OR not_before <= ?)
           ORDER BY last_arrival_at LIMIT ?""",
        (SeriesState.OPEN.value, now - stable_seconds, now, limit),
    ).fetchall()
    return [DueSeries(**dict(r)) for r in rows]


def next_due_in(conn: sqlite3.Connection, now: float, stable_seconds: float) -> float | None:
    """Seconds until the next open series becomes due (None when none is open)."""
    row = conn.execute(
        "SELECT MIN(MAX(last_arrival_at + ?, COALESCE(not_before, 0))) AS t FROM series_triggers "
        "WHERE state = ?",
        (stable_seconds, SeriesState.OPEN.value),
    ).fetchone()
    return None if row["t"] is None else max(0.0, row["t"] - now)


def still_due(conn: sqlite3.Connection, due: DueSeries) -> bool:
    """The row is still the open revision we were about to export (nothing reopened it)."""
    row = conn.execute(
        "SELECT state, revision FROM series_triggers WHERE trigger = ? AND series_uid = ?",
        (due.trigger, due.series_uid),
    ).fetchone()
    return bool(row) and row["state"] == SeriesState.OPEN.value and row["revision"] == due.revision


def finish_export(
    conn: sqlite3.Connection, due: DueSeries, export_path: str, body: dict | None, now: float
) -> tuple[SeriesState, int]:
    """Revision ``due.revision`` is exported: mark it fired (or reopened) and queue its webhook.

    Call inside one transaction: the state change and the webhook row commit together, so
    each revision fires exactly once even if the process dies around the export.
    """
    row = conn.execute(
        "SELECT last_arrival_at FROM series_triggers WHERE trigger = ? AND series_uid = ?",
        (due.trigger, due.series_uid),
    ).fetchone()
    state, revision = after_export(due.revision, due.last_arrival_at, row["last_arrival_at"])
    conn.execute(
        """UPDATE series_triggers SET state = ?, revision = ?, fired_at = ?, export_path = ?,
                  last_error = NULL, not_before = NULL WHERE trigger = ? AND series_uid = ?""",
        (state.value, revision, now, export_path, due.trigger, due.series_uid),
    )
    if body is not None:
        conn.execute(
            """INSERT OR IGNORE INTO webhooks (trigger, series_uid, revision, body, state, attempts,
                   next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)""",
            (due.trigger, due.series_uid, due.revision, json.dumps(body), WebhookState.PENDING.value,
             now, now, now),
        )
    return state, revision


def export_failed(conn: sqlite3.Connection, due: DueSeries, error: str, not_before: float) -> None:
    """The export could not be written: keep the series open, retry after ``not_before``."""
    conn.execute(
        "UPDATE series_triggers SET last_error = ?, not_before = ? WHERE trigger = ? AND series_uid = ? "
        "AND revision = ?",
        (error, not_before, due.trigger, due.series_uid, due.revision),
    )


@dataclass(frozen=True)
class Webhook:
    id: int
    trigger: str
    series_uid: str
    revision: int
    body: str
    attempts: int


def due_webhooks(conn: sqlite3.Connection, now: float, limit: int = 50) -> list[Webhook]:
    rows = conn.execute(
        """SELECT id, trigger, series_uid, revision, body, attempts FROM webhooks
           WHERE state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?""",
        (WebhookState.PENDING.value, now, limit),
    ).fetchall()
    return [Webhook(**dict(r)) for r in rows]


def next_webhook_in(conn: sqlite3.Connection, now: float) -> float | None:
    row = conn.execute(
        "SELECT MIN(next_attempt_at) AS t FROM webhooks WHERE state = ?", (WebhookState.PENDING.value,)
    ).fetchone()
    return None if row["t"] is None else max(0.0, row["t"] - now)


def webhook_sent(conn: sqlite3.Connection, webhook_id: int, now: float) -> None:
    conn.execute(
        "UPDATE webhooks SET state = ?, attempts = attempts + 1, last_error = NULL, updated_at = ? "
        "WHERE id = ?",
        (WebhookState.SENT.value, now, webhook_id),
    )


def webhook_attempt_failed(
    conn: sqlite3.Connection, webhook_id: int, error: str, now: float, max_attempts: int,
    delay: Callable[[int], float], permanent: bool = False,
) -> WebhookState:
    """Back to pending after ``delay(attempts)``, or failed for good with the reason."""
    row = conn.execute("SELECT attempts FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
    attempts = (row["attempts"] if row else 0) + 1
    if permanent or attempts >= max_attempts:
        conn.execute(
            "UPDATE webhooks SET state = ?, attempts = ?, last_error = ?, updated_at = ? WHERE id = ?",
            (WebhookState.FAILED.value, attempts, error, now, webhook_id),
        )
        return WebhookState.FAILED
    conn.execute(
        "UPDATE webhooks SET attempts = ?, last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
        (attempts, error, now + delay(attempts), now, webhook_id),
    )
    return WebhookState.PENDING


def retry_failed_webhooks(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute(
        "UPDATE webhooks SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? WHERE state = ?",
        (WebhookState.PENDING.value, now, now, WebhookState.FAILED.value),
    ).rowcount


def trigger_status(conn: sqlite3.Connection | None, names: Iterable[str], now: float) -> dict[str, dict]:
    """Per configured trigger: series open/fired, export errors, webhook counts and last error."""
    names = list(names)
    try:
        if conn is not None:
            return _trigger_status(conn, names, now)
    except sqlite3.OperationalError:  # a database not yet migrated by ``run``
        pass
    return {name: {"series_open": 0, "series_fired": 0, "last_export_error": None,
                   "webhooks": {**{s.value: 0 for s in WebhookState}, "oldest_pending_age_seconds": None,
                                "last_error": None}}
            for name in names}


def _trigger_status(conn: sqlite3.Connection, names: list[str], now: float) -> dict[str, dict]:
    result = {}
    for name in names:
        counts = db.counts_by_state(conn, "series_triggers", "trigger", name, (s.value for s in SeriesState))
        hooks = db.counts_by_state(conn, "webhooks", "trigger", name, (s.value for s in WebhookState))
        export_error = conn.execute(
            "SELECT series_uid, last_error FROM series_triggers WHERE trigger = ? AND last_error IS NOT NULL "
            "ORDER BY last_arrival_at DESC LIMIT 1",
            (name,),
        ).fetchone()
        hook_error = conn.execute(
            "SELECT last_error FROM webhooks WHERE trigger = ? AND last_error IS NOT NULL AND state != ? "
            "ORDER BY updated_at DESC LIMIT 1",
            (name, WebhookState.SENT.value),
        ).fetchone()
        oldest = conn.execute(
            "SELECT MIN(created_at) AS t FROM webhooks WHERE trigger = ? AND state = ?",
            (name, WebhookState.PENDING.value),
        ).fetchone()["t"]
        result[name] = {
            "series_open": counts[SeriesState.OPEN.value],
            "series_fired": counts[SeriesState.FIRED.value],
            "last_export_error": (f"series {export_error['series_uid']}: {export_error['last_error']}"
                                  if export_error else None),
            "webhooks": {**hooks,
                         "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 1),
                         "last_error": hook_error["last_error"] if hook_error else None},
        }
    return result


def recent_triggers(conn: sqlite3.Connection, limit: int = 10) -> list[dict]:
    """The latest series trigger rows (fired or open), newest first, for the dashboard."""
    rows = conn.execute(
        "SELECT trigger, series_uid, study_uid, state, revision, last_arrival_at, fired_at, export_path, "
        "last_error FROM series_triggers ORDER BY COALESCE(fired_at, last_arrival_at) DESC LIMIT ?",
        (limit,),
    )
    return [dict(r) for r in rows]


def trigger_fire_counts(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, int]:
    """How many times each trigger fired, revisions included (an open revision n fired n - 1 times)."""
    rows = {r["trigger"]: r["n"] for r in conn.execute(
        "SELECT trigger, SUM(CASE WHEN state = 'fired' THEN revision ELSE revision - 1 END) AS n "
        "FROM series_triggers GROUP BY trigger")}
    return {name: int(rows.get(name) or 0) for name in names}
