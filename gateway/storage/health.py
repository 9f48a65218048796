"""The readiness probe's write: one committed row, so a read-only, locked or full database is noticed."""

from __future__ import annotations

import sqlite3

from gateway.storage import db


def probe_write(conn: sqlite3.Connection, now: float) -> None:
    """Commit a one-row update (raises sqlite3.Error when the database cannot take writes)."""
    with db.transaction(conn):
        conn.execute("INSERT INTO health (id, checked_at) VALUES (1, ?) "
                     "ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at", (now,))
