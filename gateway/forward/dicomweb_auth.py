"""Credentials for DICOMweb destinations: Bearer, Basic and OAuth2 client credentials.

Secrets come only from files. A credential gives the headers for the next request and, after
a 401, says whether a fresh credential is worth one more try (OAuth2: a new token; Bearer and
Basic: only when their file changed since it was read). Nothing here logs a secret.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.config import BasicAuth, BearerAuth, OAuth2Auth
from gateway.errors import AuthRefused, RetryLater

log = logging.getLogger("gateway.forward")

#: A token is renewed this long before it expires (or a fifth of its lifetime, if shorter).
REFRESH_MARGIN_SECONDS = 60.0
#: The longest token endpoint answer we read.
MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024


class SecretFile:
    """A secret read from a file, and read again whenever the file changes (rotation without restart).

    A missing, unreadable or empty file is a retry, not a refusal: someone may be replacing it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._key: tuple | None = None
        self._value = ""

    def _stat_key(self) -> tuple:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise RetryLater(f"cannot read the secret file {self.path}: {exc.strerror or exc}") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        """Whether the file differs from what was last read."""
        return self._stat_key() != self._key

    def value(self) -> str:
        key = self._stat_key()
        if key != self._key:
            try:
                text = self.path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise RetryLater(f"cannot read the secret file {self.path}: {exc}") from None
            if not text:
                raise RetryLater(f"the secret file {self.path} is empty")
            if self._key is not None:
                log.info("re-read the secret file %s (it changed)", self.path)
            self._key, self._value = key, text
        return self._value


class NoAuth:
    """No credential: nothing to add, nothing to refresh."""

    kind = "none"

    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Bearer(NoAuth):
    kind = "bearer"

    def __init__(self, cfg: BearerAuth):
        self.token = SecretFile(cfg.token_file)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.value()}"}

    def refresh(self) -> bool:
        """A 401 is worth one more try only if someone put a new token in the file meanwhile."""
        return self.token.changed()


class Basic(NoAuth):
    kind = "basic"

    def __init__(self, cfg: BasicAuth):
        self.username = cfg.username
        self.password = SecretFile(cfg.password_file)

    def headers(self) -> dict[str, str]:
        pair = f"{self.username}:{self.password.value()}".encode("utf-8")
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}

    def refresh(self) -> bool:
        return self.password.changed()


class OAuth2(NoAuth):
    """Client credentials grant (RFC 6749 4.4): the token is cached and renewed before it expires."""

    kind = "oauth2"

    def __init__(
        self,
        cfg: OAuth2Auth,
        client_factory: Callable[[], httpx.Client],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.secret = SecretFile(cfg.client_secret_file)
        self._client_factory = client_factory
        self._client: httpx.Client | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.fetched = 0  # tokens fetched so far (tests and status read it)

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def refresh(self) -> bool:
        """After a 401: always worth one new token."""
        with self._lock:
            self._token = None
        return True

    def _fetch(self) -> None:
        if self._client is None:
            self._client = self._client_factory()
        form = {"grant_type": "client_credentials", "client_id": self.cfg.client_id,
                "client_secret": self.secret.value()}
        if self.cfg.scope:
            form["scope"] = self.cfg.scope
        where = f"the token endpoint {self.cfg.token_url}"
        try:
            response = self._client.post(self.cfg.token_url, data=form,
                                         headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise RetryLater(f"{where} did not answer: {describe_http_error(exc)}") from None
        body = response.content[:MAX_TOKEN_RESPONSE_BYTES]
        if response.status_code in (400, 401, 403):
            raise AuthRefused(f"{where} refused the client credentials (HTTP {response.status_code}): "
                              f"{_oauth_error(body)}")
        if response.status_code != 200:
            raise RetryLater(f"{where} answered HTTP {response.status_code}: {_oauth_error(body)}")
        try:
            data = response.json()
            token = data["access_token"]
            if not isinstance(token, str) or not token:
                raise ValueError("empty access_token")
            lifetime = float(data.get("expires_in") or 0)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RetryLater(f"{where} answered without a usable access_token ({exc})") from None
        now = self._clock()
        self._token = token
        if lifetime > 0:
            self._renew_at = now + lifetime - min(REFRESH_MARGIN_SECONDS, lifetime / 5)
        else:
            self._renew_at = float("inf")  # no expiry given: renewed on a 401
        self.fetched += 1
        log.info("got an OAuth2 token from %s (valid %s)", self.cfg.token_url,
                 f"{lifetime:g} s" if lifetime > 0 else "until refused")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _oauth_error(body: bytes) -> str:
    """RFC 6749 5.2's error and error_description, or the start of the body."""
    try:
        import json

        data = json.loads(body)
        if isinstance(data, dict) and "error" in data:
            desc = data.get("error_description")
            return f"{data['error']}" + (f" ({desc})" if desc else "")
    except ValueError:
        pass
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    return text or "(no body)"


#: TLS alerts a server sends about the client's certificate (OpenSSL reason codes).
_CLIENT_CERT_REFUSED = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
})


def _describe_tls_alert(err: "ssl.SSLError") -> str:
    """A TLS failure other than our check of the server: the server's alerts about our certificate say so."""
    reason = err.reason or ""
    words = reason.lower().replace("_", " ") if reason else str(err)
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return (f"TLS: the server requires a client certificate and we sent none ({words}): "
                "set tls.client_cert_file and tls.client_key_file")
    if reason in _CLIENT_CERT_REFUSED:
        return (f"TLS: the server refused our client certificate ({words}): tls.client_cert_file "
                "must be valid and signed by a CA the server trusts")
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        return (f"TLS: handshake failed ({words}): no common protocol or cipher, or the server "
                "requires a client certificate (tls.client_cert_file)")
    return f"TLS: handshake failed ({reason or err})"


def describe_http_error(exc: BaseException) -> str:
    """One phrase for a failed HTTP exchange: DNS, TLS, refused, timed out, or lost."""
    import socket
    import ssl

    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: the server's certificate was not accepted ({cause.verify_message or cause.reason})"
        if isinstance(cause, ssl.SSLError):
            return _describe_tls_alert(cause)
        if isinstance(cause, socket.gaierror):
            return f"DNS: cannot resolve the host name ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return "connect: connection refused (is the server running?)"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect: timed out"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "Name or service not known" in text or "nodename nor servname" in text or "Temporary failure in name" in text:
            return f"DNS: cannot resolve the host name ({text})"
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            return f"TLS: {text}"
        return f"connect: {text or 'cannot connect'}"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time (timed out)"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return f"connection lost ({exc or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def make_credential(auth, client_factory: Callable[[], httpx.Client], clock=time.monotonic):
    """The credential object for a destination's ``auth`` config (None: no credential)."""
    if auth is None:
        return NoAuth()
    if isinstance(auth, BearerAuth):
        return Bearer(auth)
    if isinstance(auth, BasicAuth):
        return Basic(auth)
    return OAuth2(auth, client_factory, clock)
