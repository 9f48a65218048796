"""Calling a destination: association setup shared by ``echo`` and the forward sender."""

from __future__ import annotations

import socket
import ssl
from datetime import datetime, timezone

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.config import Config, DestinationConfig
from gateway.errors import RetryLater, UnknownDestination
from gateway.dimse import tls
from gateway.dimse.netutil import CONNECTED, raw_socket, set_nodelay

NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_nodelay)]


def destination(config: Config, name: str) -> DestinationConfig:
    try:
        return config.destinations[name]
    except KeyError:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        raise UnknownDestination(
            f"destination {name!r} is not configured (known: {known})"
        ) from None


def make_ae(config: Config) -> AE:
    ae = AE(ae_title=config.calling_ae_title)
    ae.connection_timeout = config.forward.connect_timeout_seconds
    ae.acse_timeout = config.forward.acse_timeout_seconds
    ae.dimse_timeout = config.forward.dimse_timeout_seconds
    ae.network_timeout = config.forward.dimse_timeout_seconds
    return ae


def tls_args(dest: DestinationConfig):
    """pynetdicom's ``tls_args`` for a destination with ``tls``: (context, name to verify), else None."""
    t = dest.tls
    if t is None:
        return None
    ctx = tls.client_context(t.ca_file, t.cert_file, t.key_file, t.check_hostname)
    return ctx, t.server_name or dest.host


def probe_tls(dest: DestinationConfig, timeout: float) -> tuple[dict | None, str | None]:
    """Handshake with a TLS destination without sending DICOM: (its certificate, None), (None, why
    the handshake failed), or (None, None) when no TCP connection could be made."""
    ctx, name = tls_args(dest)
    try:
        raw = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except OSError:
        return None, None  # not a TLS matter: the caller says "cannot connect"
    try:
        with ctx.wrap_socket(raw, server_hostname=name) as sock:
            return sock.getpeercert(), None
    except (OSError, ValueError) as exc:
        return None, tls.describe_ssl_error(exc)
    finally:
        raw.close()


def describe_failure(assoc, dest: DestinationConfig, timeout: float = 10.0) -> str:
    """One sentence for an association that did not establish."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc not in CONNECTED:
        if dest.tls is not None:
            _, reason = probe_tls(dest, timeout)
            if reason is not None:
                return f"TLS handshake with {where} failed: {reason}"
        return f"cannot connect to {where} (connection refused or timed out)"
    if assoc.is_rejected:
        return f"association rejected by {where} (check the AE titles on both sides)"
    if assoc.is_aborted:
        return f"association aborted by {where} (is it a DICOM peer that knows our AE title?)"
    return f"no association with {where} (timed out)"


def describe_peer_certificate(cert: dict | None, version: str | None) -> str:
    """'TLSv1.3, peer certificate CN=...,O=... valid until 2027-01-31 12:00 UTC'."""
    if not cert:
        return f"{version or 'TLS'}, the peer sent no certificate"
    until = datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), timezone.utc)
    return (f"{version or 'TLS'}, peer certificate {tls.cert_subject(cert)} "
            f"valid until {until:%Y-%m-%d %H:%M} UTC")


def echo(config: Config, name: str) -> str | None:
    """C-ECHO the named destination; raise RetryLater with a reason when it does not answer Success.

    Returns what was learnt about the connection (the TLS peer certificate), or None.
    """
    dest = destination(config, name)
    ae = make_ae(config)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=NODELAY_HANDLERS,
        tls_args=tls_args(dest),
    )
    if not assoc.is_established:
        raise RetryLater(describe_failure(assoc, dest, config.forward.connect_timeout_seconds))
    detail = None
    sock = raw_socket(assoc)
    if tls.is_tls(sock):
        detail = describe_peer_certificate(sock.getpeercert(), sock.version())
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise RetryLater(f"no C-ECHO response from {dest.ae_title}@{dest.host}:{dest.port} (timed out)")
    if status.Status != 0x0000:
        raise RetryLater(f"C-ECHO to {name} answered status 0x{status.Status:04X}")
    return detail
