"""Socket tuning shared by the SCP and SCU sides, and the one way to an association's socket.

``assoc.dul.socket.socket`` is beyond pynetdicom's public API: ``dimse.fence`` checks each
name at start, and every reader outside ``dimse.fastpath`` goes through ``raw_socket``.
"""

from __future__ import annotations

import socket
import threading
import weakref


def raw_socket(assoc):
    """The association's connected socket (plain or TLS), or None before or after it has one."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def wake_unrequested(assoc) -> None:
    """The connection ended before an A-ASSOCIATE-RQ (a port probe, a health check): wake the
    association thread, which would otherwise hold its slot until the ACSE timeout waiting for
    one. ``None`` is what pynetdicom itself reads as "no request came" (its timeout)."""
    if not assoc.is_established and getattr(assoc.requestor, "primitive", None) is None:
        assoc.dul.to_user_queue.put(None)


class _Connected:
    """Associations that got a TCP connection (EVT_CONN_OPEN), kept here rather than as an
    attribute added to pynetdicom's object: a failed one then says "refused" or "rejected"."""

    def __init__(self):
        self._lock = threading.Lock()
        self._assocs: weakref.WeakSet = weakref.WeakSet()

    def add(self, assoc) -> None:
        with self._lock:
            self._assocs.add(assoc)

    def __contains__(self, assoc) -> bool:
        with self._lock:
            return assoc in self._assocs


CONNECTED = _Connected()


def set_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle's algorithm off on the association socket.

    pynetdicom leaves it on; with DCMTK peers (Orthanc included) each small PDU then waits
    for a ~40 ms delayed ACK.
    """
    CONNECTED.add(event.assoc)
    sock = raw_socket(event.assoc)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # the peer may already have gone; the association reports that itself
