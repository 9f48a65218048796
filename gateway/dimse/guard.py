"""Every accepted connection is counted and timed before any thread is started for it.

pynetdicom's server starts two threads and holds a socket for every TCP connect, with no
limit and no read timeout: a peer that connects and says nothing, or sends part of a PDU
and stalls, holds all three for as long as it likes (a blocked read also stops the DUL's own
timers, and keeps the process alive after SIGTERM). ``ConnectionGuard.install`` hooks the
server's accept step (the listener thread, before any thread exists for the connection):

* every accepted socket gets a read/write timeout of ``node.network_timeout_seconds``: a
  read that waits longer ends the connection (pynetdicom treats it as a closed transport);
* at most ``node.max_associations`` connections are open at once. When all are taken, the
  oldest connection that has not finished associating after ``grace`` seconds is closed to
  make room (a port scan or a stalled peer cannot lock real modalities out); when every
  slot is an established association the new connection is closed at once;
* ``close_all`` shuts every connection's socket, so threads blocked in a read end now;
* every refusal and every connection closed to make room goes to the audit trail through
  ``dimse.refusals`` (at most one message per address and reason per second, with a count).

It works on any pynetdicom ``AssociationServer``; for TLS use ``dimse.tls``'s server class,
which does the handshake in the connection's own thread (pynetdicom's own does it in the
listener thread, where one silent peer would stall every accept).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pynetdicom import evt

from gateway.dimse.netutil import raw_socket

log = logging.getLogger("gateway.receive")

#: A connection younger than this is never closed to make room (a real peer associates in
#: milliseconds; a flood of new connects must not evict peers that are mid-negotiation).
EVICT_GRACE_SECONDS = 1.0
#: A-ASSOCIATE-RJ: rejected-transient (2), by the service provider's presentation layer (3),
#: local limit exceeded (2) -- what pynetdicom answers when it counts too many associations.
_REJECT_BUSY = bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2])
#: At most one "refused a connection" line per this many seconds (a flood logs a count).
REFUSAL_LOG_EVERY = 10.0


@dataclass
class _Conn:
    sock: Any
    address: str
    since: float
    assoc: Any = None  # set at EVT_CONN_OPEN

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    @property
    def established(self) -> bool:
        assoc = self.assoc
        return assoc is not None and bool(getattr(assoc, "is_established", False))

    @property
    def finished(self) -> bool:
        """Its association thread ran and ended (the socket may still be open: close it)."""
        assoc = self.assoc
        return assoc is not None and assoc.ident is not None and not assoc.is_alive()


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionGuard:
    """Caps and times the connections of one listening server (see the module docstring)."""

    def __init__(
        self,
        limit: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        grace: float = EVICT_GRACE_SECONDS,
        refusals=None,
    ):
        self.limit, self.timeout, self.grace, self.clock = limit, timeout, grace, clock
        self.refusals = refusals  # a dimse.refusals.RefusalTrail, or None: not audited
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._refused = 0
        self._refusal_logged_at = -REFUSAL_LOG_EVERY

    # ------------------------------------------------------------------ wiring

    def install(self, server, adopt: Callable[[Any], Any] | None = None) -> None:
        """Hook ``server`` (a pynetdicom AssociationServer, plain or TLS) before it serves;
        ``adopt`` may replace each accepted socket (``dimse.meter`` in public-API mode)."""
        accept = server.get_request  # the TLS listener's defers its handshake (dimse.tls)

        def get_request():
            sock, address = accept()
            sock.settimeout(self.timeout)
            return (adopt(sock) if adopt is not None else sock), address

        server.get_request = get_request
        server.verify_request = self.admit
        server.bind(evt.EVT_CONN_OPEN, self._opened)

    def _opened(self, event) -> None:
        sock = raw_socket(event.assoc)
        with self._lock:
            conn = self._conns.get(id(sock))
            if conn is not None and conn.sock is sock:
                conn.assoc = event.assoc

    # ------------------------------------------------------------------ the accept step

    def admit(self, sock, client_address) -> bool:
        """socketserver's verify_request: True to serve ``sock``, False closes it at once."""
        now = self.clock()
        address = f"{client_address[0]}:{client_address[1]}"
        audited, refused = None, False
        with self._lock:
            self._prune()
            if len(self._conns) >= self.limit:
                victim = self._oldest_unassociated(now)
                if victim is None:
                    self._refuse(sock, address, now)
                    refused = True
                    audited = (str(client_address[0]), f"node.max_associations ({self.limit}) reached, "
                               "every connection is an association in progress")
                else:
                    del self._conns[id(victim.sock)]
                    log.warning(
                        "closing the connection from %s: it has not associated after %.0f s and all "
                        "node.max_associations (%d) connections are taken", victim.address,
                        now - victim.since, self.limit,
                    )
                    _shut(victim.sock)
                    audited = (victim.address.rsplit(":", 1)[0], "closed before associating to make "
                               f"room: node.max_associations ({self.limit}) connections were taken")
            if not refused:
                self._conns[id(sock)] = _Conn(sock, address, now)
        if audited is not None and self.refusals is not None:
            self.refusals.refused(*audited)  # outside the lock: the audit queue may be slow
        return not refused

    def _prune(self) -> None:
        for key, conn in list(self._conns.items()):
            if conn.closed:
                del self._conns[key]
            elif conn.finished:  # the association ended without closing its socket
                _shut(conn.sock)
                try:
                    conn.sock.close()
                except OSError:
                    pass
                del self._conns[key]

    def _oldest_unassociated(self, now: float) -> _Conn | None:
        waiting = [c for c in self._conns.values()
                   if not c.established and now - c.since >= self.grace]
        return min(waiting, key=lambda c: c.since, default=None)

    def _refuse(self, sock, address: str, now: float) -> None:
        """Answer A-ASSOCIATE-RJ without reading (a real modality learns "retry later"); the
        caller closes the socket. Never blocks: the 10 bytes fit any send buffer."""
        if not isinstance(sock, ssl.SSLSocket):
            try:
                sock.send(_REJECT_BUSY, socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._refused += 1
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY:
            log.warning(
                "refused %d connection(s) (latest from %s): node.max_associations (%d) reached, "
                "every connection is an association in progress", self._refused, address, self.limit,
            )
            self._refused = 0
            self._refusal_logged_at = now

    # ------------------------------------------------------------------ views and shutdown

    def open_connections(self) -> int:
        with self._lock:
            self._prune()
            return len(self._conns)

    def close_all(self) -> None:
        """Shut every connection's socket: reads blocked on them return at once."""
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            _shut(conn.sock)
        if self.refusals is not None:
            self.refusals.close()  # counts still waiting are written before the trail closes
