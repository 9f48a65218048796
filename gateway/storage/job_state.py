"""One inbox job's row, for the HTTP job API (reads only)."""

from __future__ import annotations

import sqlite3


def get(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    """The ``jobs`` row of ``name`` (state, error, derived UIDs), or None."""
    return conn.execute(
        "SELECT name, state, first_seen_at, finished_at, sop_instance_uid, series_uid, error "
        "FROM jobs WHERE name = ?", (name,)).fetchone()
