"""DICOMweb credentials: secret files re-read on change, OAuth2 tokens cached and renewed before expiry.

The token endpoint here is an ``httpx.MockTransport`` (a function): the integration tests run
the same code against a real HTTP token endpoint.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse

import httpx
import pytest

from gateway import config
from gateway.errors import AuthRefused, RetryLater
from gateway.forward import dicomweb_auth as auth


def secret(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_bearer_token_is_read_again_when_its_file_changes(tmp_path):
    path = secret(tmp_path, "token", "first-token\n")
    cred = auth.Bearer(config.BearerAuth(type="bearer", token_file=path))
    assert cred.headers() == {"Authorization": "Bearer first-token"}
    assert cred.refresh() is False  # a 401 with the same file: nothing new to try
    path.write_text("second-token-longer")
    assert cred.refresh() is True
    assert cred.headers() == {"Authorization": "Bearer second-token-longer"}
    path.unlink()  # mid-rotation: a retry, not a refusal
    with pytest.raises(RetryLater, match="cannot read the secret file"):
        cred.headers()


def test_basic_header_encodes_user_and_password_from_the_file(tmp_path):
    path = secret(tmp_path, "pw", "pä ss\n")
    cred = auth.Basic(config.BasicAuth(type="basic", username="alice", password_file=path))
    header = cred.headers()["Authorization"]
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]).decode() == "alice:pä ss"


class TokenEndpoint:
    """Issues numbered tokens that live ``lifetime`` seconds; ``refuse`` answers invalid_client."""

    def __init__(self, lifetime=100, refuse=False, status=200):
        self.lifetime, self.refuse, self.status = lifetime, refuse, status
        self.calls = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(urllib.parse.parse_qsl(request.read().decode()))
        self.calls.append(form)
        if self.refuse:
            return httpx.Response(401, json={"error": "invalid_client", "error_description": "bad secret"})
        if self.status != 200:
            return httpx.Response(self.status, text="maintenance")
        body = {"access_token": f"tok-{len(self.calls)}", "token_type": "Bearer"}
        if self.lifetime:
            body["expires_in"] = self.lifetime
        return httpx.Response(200, json=body)


def oauth(tmp_path, endpoint, clock, scope="dicom.write"):
    cfg = config.OAuth2Auth(type="oauth2", token_url="https://login.example.org/token", client_id="gw",
                            client_secret_file=secret(tmp_path, "cs", "s3cret"), scope=scope)
    return auth.OAuth2(cfg, lambda: httpx.Client(transport=httpx.MockTransport(endpoint)), clock)


def test_oauth2_token_is_cached_renewed_before_expiry_and_on_401(tmp_path):
    endpoint, clock = TokenEndpoint(lifetime=100), Clock()
    cred = oauth(tmp_path, endpoint, clock)
    assert cred.headers() == {"Authorization": "Bearer tok-1"}
    assert endpoint.calls == [{"grant_type": "client_credentials", "client_id": "gw",
                               "client_secret": "s3cret", "scope": "dicom.write"}]
    clock.now += 79  # 100 s lifetime: renewed 20 s (a fifth) before expiry
    assert cred.headers() == {"Authorization": "Bearer tok-1"}
    clock.now += 2
    assert cred.headers() == {"Authorization": "Bearer tok-2"}
    assert cred.refresh() is True  # a 401: one new token
    assert cred.headers() == {"Authorization": "Bearer tok-3"}
    assert cred.headers() == {"Authorization": "Bearer tok-3"}
    assert len(endpoint.calls) == 3


def test_oauth2_without_expires_in_keeps_the_token_until_refused(tmp_path):
    endpoint, clock = TokenEndpoint(lifetime=0), Clock()
    cred = oauth(tmp_path, endpoint, clock, scope=None)
    cred.headers()
    clock.now += 10**6
    assert cred.headers() == {"Authorization": "Bearer tok-1"}
    assert "scope" not in endpoint.calls[0]


def test_oauth2_refused_credentials_give_up_and_an_unreachable_endpoint_retries(tmp_path):
    cred = oauth(tmp_path, TokenEndpoint(refuse=True), Clock())
    with pytest.raises(AuthRefused, match=r"refused the client credentials \(HTTP 401\): invalid_client \(bad secret\)"):
        cred.headers()
    cred = oauth(tmp_path, TokenEndpoint(status=503), Clock())
    with pytest.raises(RetryLater, match="answered HTTP 503: maintenance"):
        cred.headers()

    def down(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    cred = oauth(tmp_path, down, Clock())
    with pytest.raises(RetryLater, match="did not answer: connect"):
        cred.headers()


def test_no_secret_reaches_the_log(tmp_path, caplog):
    endpoint, clock = TokenEndpoint(), Clock()
    cred = oauth(tmp_path, endpoint, clock)
    with caplog.at_level("DEBUG"):
        cred.headers()
        cred.refresh()
        cred.headers()
    assert "s3cret" not in caplog.text and "tok-" not in caplog.text
    assert "got an OAuth2 token" in caplog.text


def test_describe_http_error_names_what_failed():
    import socket
    import ssl

    def wrapped(cause, cls=httpx.ConnectError):
        try:
            try:
                raise cause
            except Exception as inner:
                raise cls(str(inner)) from inner
        except httpx.HTTPError as exc:
            return auth.describe_http_error(exc)

    assert wrapped(socket.gaierror(-2, "Name or service not known")).startswith("DNS:")
    assert wrapped(ConnectionRefusedError(111, "refused")).startswith("connect: connection refused")
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    assert wrapped(verify) == ("TLS: the server's certificate was not accepted "
                               "(unable to get local issuer certificate)")
    assert auth.describe_http_error(httpx.ReadTimeout("x")) == "no answer in time (timed out)"
    assert auth.describe_http_error(httpx.ConnectTimeout("x")) == "connect: timed out"
    assert auth.describe_http_error(httpx.RemoteProtocolError("Server disconnected")).startswith("connection lost")


def test_describe_http_error_says_when_the_server_wants_or_refuses_our_client_certificate():
    import ssl

    def alert(reason: str) -> str:
        err = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
        err.reason = reason
        try:
            try:
                raise err
            except ssl.SSLError as inner:
                raise httpx.ReadError(str(inner)) from inner
        except httpx.HTTPError as exc:
            return auth.describe_http_error(exc)

    assert alert("TLSV13_ALERT_CERTIFICATE_REQUIRED") == (
        "TLS: the server requires a client certificate and we sent none (tlsv13 alert certificate "
        "required): set tls.client_cert_file and tls.client_key_file")
    for reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED"):
        assert alert(reason).startswith(
            f"TLS: the server refused our client certificate ({reason.lower().replace('_', ' ')}): ")
    # TLS 1.2 servers answer a missing certificate with a bare handshake failure
    assert "requires a client certificate (tls.client_cert_file)" in alert("SSLV3_ALERT_HANDSHAKE_FAILURE")
    assert alert("WRONG_VERSION_NUMBER") == "TLS: handshake failed (WRONG_VERSION_NUMBER)"
