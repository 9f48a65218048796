"""DICOM over TLS: SSL contexts (BCP 195), certificate checks, handshake failures in words.

The listener does each TLS handshake in the connection's own thread, bounded by the ACSE
timeout: pynetdicom's server does it in its accept loop with no timeout, so one client that
connects and says nothing would stop the whole TLS listener, and a failed handshake would
vanish without a log line.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("gateway.receive")

#: BCP 195 (RFC 9325 section 4.2) and DICOM PS3.15 B.9's "Non-downgrading BCP 195 TLS Profile"
#: cipher suites for TLS 1.2: ECDHE/DHE key exchange (forward secrecy) with AES-GCM only.
#: TLS 1.3 suites (all AEAD) are OpenSSL's defaults and are not restricted further.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
])

#: A connection closed before the handshake ended: a port probe or health check, not an attack.
CLOSED_DURING_HANDSHAKE = "the peer closed the connection during the TLS handshake"

#: A certificate expiring within this many days is reported at start and in ``status``.
EXPIRY_WARNING_DAYS = 30


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(cert_file: Path, key_file: Path, ca_file: Path | None,
                   require_client_cert: bool) -> ssl.SSLContext:
    """The TLS listener's context: our certificate, client certificates checked against ``ca_file``."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A destination's context: its certificate verified (system CAs unless ``ca_file``), ours presented."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.check_hostname = check_hostname
    return ctx


# --------------------------------------------------------------------------- certificate files


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_after: datetime


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the file ({exc.strerror or exc})") from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """The PEM certificates in ``path``; ValueError with a reason when there are none."""
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError("is not a PEM certificate file (no '-----BEGIN CERTIFICATE-----' block)")
    return certs


def load_private_key(path: Path):
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("is an encrypted private key; give an unencrypted key file readable "
                         "only by the gateway's user (chmod 600)") from None
    except (ValueError, Exception):  # noqa: BLE001 - cryptography raises several types for bad keys
        raise ValueError("is not a PEM private key") from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(cert: x509.Certificate, key) -> bool:
    return _spki(cert.public_key()) == _spki(key.public_key())


def subject_text(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def common_name(subject: x509.Name) -> str | None:
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def cert_info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(subject_text(cert), cert.not_valid_after_utc)


def check_pair(cert_file: Path, key_file: Path | None, now: datetime) -> list[tuple[str, str]]:
    """Problems with a certificate (and its key) as ``(which, reason)``; which is 'cert_file' or 'key_file'."""
    problems: list[tuple[str, str]] = []
    cert = key = None
    try:
        cert = load_certificates(cert_file)[0]
    except ValueError as exc:
        problems.append(("cert_file", str(exc)))
    if key_file is not None:
        try:
            key = load_private_key(key_file)
        except ValueError as exc:
            problems.append(("key_file", str(exc)))
        else:
            try:
                if key_file.stat().st_mode & 0o004:
                    problems.append(("key_file", "is readable by every user; chmod 600 it"))
            except OSError:
                pass
    if cert is not None:
        if cert.not_valid_after_utc <= now:
            problems.append(("cert_file", f"the certificate expired on "
                             f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; renew it"))
        elif cert.not_valid_before_utc > now:
            problems.append(("cert_file", f"the certificate is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
        if key is not None and not key_matches(cert, key):
            problems.append(("key_file", "does not match the certificate in cert_file "
                             "(different public key)"))
    return problems


def check_ca(ca_file: Path, now: datetime) -> list[str]:
    try:
        certs = load_certificates(ca_file)
    except ValueError as exc:
        return [str(exc)]
    if all(c.not_valid_after_utc <= now for c in certs):
        return ["every certificate in it has expired"]
    return []


def expiry_warning(key_path: str, cert_file: Path, now: datetime) -> str | None:
    """A sentence when the certificate expires within EXPIRY_WARNING_DAYS, else None."""
    try:
        cert = load_certificates(cert_file)[0]
    except ValueError:
        return None
    left = cert.not_valid_after_utc - now
    if left.total_seconds() <= 0 or left.days >= EXPIRY_WARNING_DAYS:
        return None
    return (f"{key_path}: the certificate {subject_text(cert)} expires on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (in {left.days} day(s)); renew it")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- handshake failures


def describe_ssl_error(exc: BaseException) -> str:
    """Why a handshake failed, in the words an admin searches for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        message = getattr(exc, "verify_message", "") or str(exc)
        if code == 62 or "Hostname mismatch" in message or "IP address mismatch" in message:
            return f"name mismatch: the peer's certificate is not for this host ({message})"
        if code == 10 or "expired" in message:
            return f"expired: the peer's certificate has expired ({message})"
        if code in (2, 18, 19, 20, 21) or "issuer" in message or "self-signed" in message:
            return f"unknown CA: the peer's certificate is not signed by a trusted CA ({message})"
        return f"certificate rejected: {message}"
    reason = getattr(exc, "reason", None) or ""
    text = str(exc)
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED") or \
            "certificate required" in text:
        return "no client certificate: the peer sent none and one is required"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE") or "unknown ca" in text:
        return "unknown CA: the peer does not trust our certificate's CA"
    if "CERTIFICATE_VERIFY_FAILED" in text or reason == "CERTIFICATE_VERIFY_FAILED":
        return f"unknown CA: the peer's certificate could not be verified ({text})"
    if reason in ("CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_EXPIRED") or "expired" in text:
        return "expired: a certificate has expired"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE") and \
            not isinstance(exc, ssl.SSLCertVerificationError):
        return "not TLS: the peer does not speak TLS on this port (plain DICOM on a TLS port, or the reverse?)"
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE",
                  "NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                  "VERSION_TOO_LOW"):
        return f"no shared protocol: the peer offers no TLS 1.2+ version or BCP 195 cipher we accept ({reason})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "the TLS handshake timed out"
    if isinstance(exc, ssl.SSLEOFError) or isinstance(exc, ConnectionError):
        return CLOSED_DURING_HANDSHAKE
    return f"TLS handshake failed: {reason or text}"


def peer_certificate(sock) -> dict | None:
    """The verified peer certificate as ``ssl.getpeercert()`` gives it, or None (plain TCP, none sent)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock.getpeercert() or None
    except (ValueError, OSError):
        return None


def cert_subject(cert: dict | None) -> str | None:
    """``CN=...,O=...`` from a ``getpeercert()`` dict."""
    if not cert:
        return None
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                     "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(reversed(parts)) or None


def cert_common_name(cert: dict | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


# --------------------------------------------------------------------------- the TLS listener


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the handshake moved into the connection's thread.

    ``gateway_handshake_timeout`` bounds it (the ACSE timeout); ``gateway_on_failure`` gets
    ``(address, reason)`` for each failed handshake (receive logs and audits it).
    """

    gateway_handshake_timeout: float = 30.0
    gateway_on_failure: Callable[[tuple, str], None] = staticmethod(lambda address, reason: None)

    def get_request(self):
        client, address = self.socket.accept()
        return self.ssl_context.wrap_socket(client, server_side=True,
                                            do_handshake_on_connect=False), address

    def process_request_thread(self, request, client_address) -> None:
        try:
            read_timeout = request.gettimeout()  # dimse.guard's node.network_timeout_seconds
            request.settimeout(self.gateway_handshake_timeout)
            request.do_handshake()
            request.settimeout(read_timeout)
        except (OSError, ValueError) as exc:
            self.gateway_on_failure(client_address, describe_ssl_error(exc))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def start_tls_server(ae, address: tuple[str, int], ssl_ctx: ssl.SSLContext, handshake_timeout: float,
                     on_failure: Callable[[tuple, str], None], **kwargs):
    """``ae.start_server(block=False)`` for the TLS listener, with our server class."""
    server = ae.make_server(address, ssl_context=ssl_ctx, server_class=TLSAssociationServer, **kwargs)
    server.gateway_handshake_timeout = handshake_timeout
    server.gateway_on_failure = on_failure
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer-TLS", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: shutdown() removes it from this list
    return server


def expiry_warnings(config, now: datetime) -> list[str]:
    """Every configured certificate that expires within EXPIRY_WARNING_DAYS, one sentence each."""
    found = []
    if config.node.tls is not None:
        found.append(expiry_warning("node.tls.cert_file", config.node.tls.cert_file, now))
    for name, dest in config.destinations.items():
        t = dest.tls if getattr(dest, "type", "dimse") == "dimse" else None
        if t is not None and t.cert_file is not None:
            found.append(expiry_warning(f"destinations.{name}.tls.cert_file", t.cert_file, now))
    return [w for w in found if w]


def is_tls(sock) -> bool:
    return isinstance(sock, ssl.SSLSocket)
