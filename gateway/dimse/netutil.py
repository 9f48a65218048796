"""Socket tuning shared by the SCP and SCU sides."""

from __future__ import annotations

import socket


def set_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle's algorithm off on the association socket.

    pynetdicom leaves it on; with DCMTK peers (Orthanc included) each small PDU then waits
    for a ~40 ms delayed ACK.
    """
    event.assoc.gateway_connected = True  # lets a failed association say "refused" vs "rejected"
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # the peer may already have gone; the association reports that itself
