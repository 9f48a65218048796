"""Checking a destination of either type: C-ECHO for DIMSE, one QIDO-RS query for DICOMweb."""

from __future__ import annotations

from gateway.config import Config
from gateway.dimse import scu


def echo(config: Config, name: str) -> str:
    """What answered, as a phrase; raises a GatewayError saying what failed (connect, TLS, auth, status)."""
    dest = scu.destination(config, name)
    if dest.type == "dicomweb":
        from gateway.forward.dicomweb import DicomwebTransport

        transport = DicomwebTransport(name, dest, connect_timeout=config.forward.connect_timeout_seconds)
        try:
            status, _seconds = transport.echo()
        finally:
            transport.close()
        return f"QIDO-RS: HTTP {status} from {dest.url}/studies?limit=1 (reachable, credentials accepted)"
    detail = scu.echo(config, name)  # over TLS: the protocol and the peer's certificate
    return "C-ECHO: Success" + (f" ({detail})" if detail else "")
