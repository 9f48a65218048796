"""Inbox job rows: the truth about each job's state, behind named functions (SQL stays in storage/).

A job is ``waiting`` from the first poll that sees it until it ends ``done`` (its derived
object stored, indexed and queued in the same transaction that marks it done, see
``store.Store.ingest``) or ``failed`` (with the sentence written to ``NAME.error.txt``).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable


class JobState(str, enum.Enum):
    WAITING = "waiting"  # seen, not finished: running now, or its source series has not arrived
    DONE = "done"  # derived object stored, indexed and queued; files in done/
    FAILED = "failed"  # bad job; files and NAME.error.txt in failed/


def get(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()


def add_waiting(conn: sqlite3.Connection, name: str, now: float) -> None:
    """A job seen for the first time (a row that exists already is kept)."""
    conn.execute("INSERT OR IGNORE INTO jobs (name, state, first_seen_at) VALUES (?, ?, ?)",
                 (name, JobState.WAITING.value, now))


def delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM jobs WHERE name = ?", (name,))


def waiting_names(conn: sqlite3.Connection) -> list[str]:
    return [r["name"] for r in conn.execute("SELECT name FROM jobs WHERE state = ?",
                                            (JobState.WAITING.value,))]


def forget_waiting(conn: sqlite3.Connection, names: Iterable[str]) -> None:
    """Drop the rows of waiting jobs whose files were taken away."""
    conn.executemany("DELETE FROM jobs WHERE name = ? AND state = ?",
                     [(name, JobState.WAITING.value) for name in names])


def mark_done(conn: sqlite3.Connection, name: str, sop_instance_uid: str, series_uid: str,
              now: float) -> None:
    conn.execute(
        "UPDATE jobs SET state = ?, finished_at = ?, sop_instance_uid = ?, series_uid = ?, "
        "error = NULL WHERE name = ?",
        (JobState.DONE.value, now, sop_instance_uid, series_uid, name),
    )


def start_derive(conn: sqlite3.Connection, name: str, files: str | None = None) -> None:
    """Count one derivation start of a job and record which files it reads (committed before
    the derivation runs)."""
    conn.execute("UPDATE jobs SET derive_attempts = derive_attempts + 1, "
                 "files = COALESCE(?, files) WHERE name = ?", (files, name))


def mark_failed(conn: sqlite3.Connection, name: str, error: str, now: float,
                files: str | None = None) -> None:
    conn.execute("UPDATE jobs SET state = ?, finished_at = ?, error = ?, files = COALESCE(?, files) "
                 "WHERE name = ?", (JobState.FAILED.value, now, error, files, name))


def counts(conn: sqlite3.Connection) -> dict:
    result = {state.value: 0 for state in JobState}
    for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        result[row["state"]] = row["n"]
    return result


def recent_failed(conn: sqlite3.Connection, limit: int = 10) -> list[dict]:
    """The latest failed inbox jobs with their one-sentence reasons, newest first."""
    rows = conn.execute(
        "SELECT name, error, finished_at FROM jobs WHERE state = ? ORDER BY finished_at DESC LIMIT ?",
        (JobState.FAILED.value, limit),
    )
    return [{"job": r["name"], "error": r["error"], "failed_at": r["finished_at"]} for r in rows]


def page(conn: sqlite3.Connection, state: str | None = None, limit: int = 50,
              offset: int = 0) -> tuple[int, list[dict]]:
    """One page of inbox jobs (latest first) with their state and reason, and the total matching."""
    where, args = ("WHERE state = ?", [state]) if state else ("", [])
    total = conn.execute(f"SELECT COUNT(*) AS n FROM jobs {where}", args).fetchone()["n"]
    rows = conn.execute(
        f"SELECT name, state, first_seen_at, finished_at, sop_instance_uid, series_uid, error FROM jobs "
        f"{where} ORDER BY COALESCE(finished_at, first_seen_at) DESC, name LIMIT ? OFFSET ?",
        (*args, limit, offset),
    ).fetchall()
    return total, [dict(r) for r in rows]
