"""Connections the guard refuses, in the audit trail without letting a flood fill the disk.

``dimse.guard`` refuses connections before any thread exists for them (node.max_associations
reached) and closes unassociated ones to make room. Each is a security-relevant event, but a
flood makes thousands a second: ``RefusalTrail`` writes at most one audit message per address
and reason per ``window`` seconds, carrying how many refusals it stands for. The first refusal
from an address is written at once; the ones after it within the window are counted and
written when the window ends (the audit writer thread calls ``flush`` about once a second:
no thread of its own, so a flood costs no thread), and whatever is still counted at
``close`` is written then. At most ``max_addresses`` addresses are
tracked at once; refusals from further addresses are counted under ``*``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import audit as audit_trail

#: One audit message per address and reason per this many seconds, at most.
WINDOW_SECONDS = 1.0
#: Addresses tracked at once (a flood from a whole network is counted under "*").
MAX_ADDRESSES = 1024


@dataclass
class _Window:
    started: float  # when the last message for this key was written
    pending: int = 0  # refusals since then, not written yet


def message(host: str, reason: str, count: int, node_ae: str) -> dict:
    """``AuditLog.record`` arguments for ``count`` refused connections (pure)."""
    return dict(
        event_id=audit_trail.USER_AUTHENTICATION, outcome=audit_trail.Outcome.MINOR_FAILURE,
        type_codes=(audit_trail.LOGIN,),
        description=f"refused {count} connection(s) before association: {reason}",
        participants=[
            audit_trail.participant("?", requestor=True, address=host, role=audit_trail.SOURCE_ROLE),
            audit_trail.participant(node_ae, requestor=False, role=audit_trail.DESTINATION_ROLE),
        ],
    )


class RefusalTrail:
    """Aggregates refused connections per (address, reason) into bounded audit messages."""

    def __init__(self, audit, node_ae: str, clock: Callable[[], float] = time.monotonic,
                 window: float = WINDOW_SECONDS, max_addresses: int = MAX_ADDRESSES):
        self.audit, self.node_ae, self.clock = audit, node_ae, clock
        self.window, self.max_addresses = window, max_addresses
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        add_ticker = getattr(audit, "add_ticker", None)  # audit.AuditLog; NULL audits nothing
        if add_ticker is not None:
            add_ticker(self.flush)

    def refused(self, host: str, reason: str) -> None:
        """One refused connection from ``host``: written now, or counted for the window's end."""
        now = self.clock()
        with self._lock:
            key = (host, reason)
            if key not in self._windows and sum(1 for h, _ in self._windows if h != "*") >= self.max_addresses:
                key = ("*", reason)
            window = self._windows.get(key)
            if window is None or now - window.started >= self.window:
                count = 1 + (window.pending if window else 0)
                self._windows[key] = _Window(now)
                write = count
            else:
                window.pending += 1
                write = 0
            self._expire(now)
        if write:
            self._write(key, write)

    def flush(self, everything: bool = False) -> int:
        """Write the counts whose window has ended (all with ``everything``); return how many messages."""
        now = self.clock()
        due = []
        with self._lock:
            for key, window in self._windows.items():
                if window.pending and (everything or now - window.started >= self.window):
                    due.append((key, window.pending))
                    window.pending, window.started = 0, now
            self._expire(now)
        for key, count in due:
            self._write(key, count)
        return len(due)

    def pending(self) -> int:
        with self._lock:
            return sum(w.pending for w in self._windows.values())

    def close(self) -> None:
        """Write every count still waiting (before the audit trail itself closes)."""
        self.flush(everything=True)

    # ------------------------------------------------------------------ internals

    def _expire(self, now: float) -> None:
        """Forget quiet keys (nothing pending, window over): memory stays bounded."""
        for key in [k for k, w in self._windows.items() if not w.pending and now - w.started >= self.window]:
            del self._windows[key]

    def _write(self, key: tuple[str, str], count: int) -> None:
        args = message(key[0], key[1], count, self.node_ae)
        self.audit.record(args.pop("event_id"), args.pop("outcome"), **args)
