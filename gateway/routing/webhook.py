"""The durable webhook queue's sender: one POST per fired series revision, retried with backoff.

Rows are written in the transaction that marks a revision fired (``storage/series.py``), so
a webhook is never lost across restarts. A 2xx answer marks it sent; anything else (refused
connection, timeout, 5xx, 429) retries after the forward queue's backoff, and after
``retry.max_attempts`` it is ``failed`` with the reason, visible in ``status``. Each request
carries ``Idempotency-Key: <trigger>/<series>/<revision>`` so a receiver can drop a repeat
(a response lost after the receiver acted is the only way one can happen).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.routing.triggers import WebhookState
from gateway.storage import db, series
from gateway.storage.queue import backoff_seconds

log = logging.getLogger("gateway.webhook")

#: Answers that will not change by asking again: give up at once (with the server's words).
_PERMANENT = {400, 401, 403, 404, 405, 410, 413, 415, 422}


def read_token(path: Path) -> str:
    """The bearer token from its file (first line, stripped); ConfigError saying which file."""
    try:
        token = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        why = "it is empty" if isinstance(exc, IndexError) else getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([f"webhook token_file {path}: cannot read a token ({why})"]) from None
    if not token:
        raise ConfigError([f"webhook token_file {path}: cannot read a token (it is empty)"])
    return token


class Webhooks:
    """One pass sends every due webhook (``run_once``); the scheduler calls it, so do tests."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.hooks = {t.name: t.webhook for t in config.triggers if t.webhook is not None}
        self.tokens = {name: read_token(h.token_file) for name, h in self.hooks.items() if h.token_file}
        self._client = httpx.Client(follow_redirects=False)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._db = db.LazyConnection(config.db_path)

    @property
    def conn(self) -> sqlite3.Connection:
        return self._db.get()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        with self._lock:
            self._client.close()
            self._db.close()

    def _delay(self, attempts: int) -> float:
        r = self.config.retry
        return backoff_seconds(attempts, r.initial_backoff_seconds, r.max_backoff_seconds)

    def run_once(self) -> int:
        """POST every due webhook; return how many were delivered."""
        with self._lock:
            try:
                due = series.due_webhooks(self.conn, self.clock())
            except sqlite3.Error as exc:
                log.warning("cannot read the webhook queue now: %s", exc)
                return 0
            sent = 0
            for item in due:
                if self._stop.is_set():
                    break
                sent += self._send(item)
            return sent

    def _send(self, item: series.Webhook) -> int:
        hook = self.hooks.get(item.trigger)
        label = f"webhook of trigger {item.trigger} for series {item.series_uid} revision {item.revision}"
        if hook is None:
            self._record(item, "its trigger no longer has a webhook in the config", permanent=True)
            return 0
        headers = {"Content-Type": "application/json", **hook.headers,
                   "Idempotency-Key": f"{item.trigger}/{item.series_uid}/{item.revision}"}
        if item.trigger in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[item.trigger]}"
        try:
            response = self._client.post(hook.url, content=item.body.encode(), headers=headers,
                                         timeout=hook.timeout_seconds)
        except httpx.TimeoutException:
            self._record(item, f"no answer from {hook.url} within {hook.timeout_seconds:g}s")
            return 0
        except httpx.HTTPError as exc:
            self._record(item, f"cannot reach {hook.url}: {type(exc).__name__}: {exc}")
            return 0
        if 200 <= response.status_code < 300:
            with db.transaction(self.conn):
                series.webhook_sent(self.conn, item.id, self.clock())
            log.info("%s delivered (HTTP %d)", label, response.status_code)
            return 1
        words = " ".join(response.text.split())[:200]
        reason = f"{hook.url} answered HTTP {response.status_code}" + (f": {words}" if words else "")
        self._record(item, reason, permanent=response.status_code in _PERMANENT)
        return 0

    def _record(self, item: series.Webhook, reason: str, permanent: bool = False) -> None:
        with db.transaction(self.conn):
            state = series.webhook_attempt_failed(
                self.conn, item.id, reason, self.clock(), self.config.retry.max_attempts, self._delay,
                permanent=permanent,
            )
        what = f"webhook of trigger {item.trigger} for series {item.series_uid} revision {item.revision}"
        if state is WebhookState.FAILED:
            log.error("%s failed for good: %s (dicom-gateway retry brings it back)", what, reason)
        else:
            log.warning("%s not delivered, retried later: %s", what, reason)
