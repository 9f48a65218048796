"""systemd's readiness protocol (sd_notify): a datagram to $NOTIFY_SOCKET, nothing when it is unset.

``Type=notify`` units start their dependents only after READY=1, so ``run`` sends it once the
DICOM listener accepts; STOPPING=1 tells systemd a SIGTERM is being honoured. A few lines of
socket code instead of a dependency (python-systemd needs libsystemd headers to build).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("gateway.service")


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to the service manager; False when not under systemd."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", message.split("\n")[0], exc)
        return False
    return True
