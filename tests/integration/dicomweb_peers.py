"""Peers for the DICOMweb forwarding tests.

- ``OrthancWeb``: a real Orthanc with its DICOMweb plugin, HTTP Basic auth on, and a Lua filter that logs every instance it receives (duplicates too: "none twice").
- ``StowPeer``: a small HTTP server answering STOW-RS the way the test scripts it (202 with
  failures, 413, 429 with Retry-After, garbage), which Orthanc cannot be made to do, and an
  OAuth2 token endpoint issuing expiring tokens; over HTTPS with a test CA's certificate (Debian's
  Orthanc 1.10.1 crashes on its first HTTPS connection here, so it cannot stand in for that).
- ``make_ca``: a test CA and a server certificate for 127.0.0.1, made with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import email.parser
import email.policy
import io
import json
import re
import ssl
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pydicom
from pynetdicom.dsutils import split_dataset

from tests.conftest import Orthanc, free_port, make_orthanc

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "gateway", "correct horse battery"

_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
   print('GATEWAY-TEST RECEIVED ' .. dicom.SOPInstanceUID)
   return true
end
"""


def dataset_bytes(data: bytes | Path) -> bytes:
    """A Part 10 file's bytes after its file meta: what must arrive unchanged."""
    if isinstance(data, Path):
        path = data
        data = path.read_bytes()
    else:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
            f.write(data)
            f.flush()
            return data[split_dataset(Path(f.name))[1]:]
    return data[split_dataset(path)[1]:]


class OrthancWeb(Orthanc):
    """Orthanc whose REST API wants HTTP Basic auth (the tests' own calls send it)."""

    scheme: str = "http"
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _open(self, req: urllib.request.Request, timeout: float):
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        ctx = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        return urllib.request.urlopen(req, timeout=timeout, context=ctx)

    def get(self, path: str, timeout: float = 30):
        with self._open(urllib.request.Request(self.url + path), timeout) as resp:
            body = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(body)
            return body

    def post(self, path: str, data: bytes | dict, timeout: float = 30):
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        with self._open(urllib.request.Request(self.url + path, data=data, method="POST"), timeout) as resp:
            body = resp.read()
            try:
                return json.loads(body)
            except ValueError:
                return body

    def received(self) -> list[str]:
        """SOP Instance UIDs as Orthanc received them, in order, duplicates included."""
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        return re.findall(r"GATEWAY-TEST RECEIVED ([0-9.]+)", text)

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def make_orthanc_web(folder: Path, *, tls_pem: Path | None = None, ca_file: Path | None = None,
                     **extra) -> OrthancWeb:
    """An Orthanc with the DICOMweb plugin and Basic auth (user ``USER``), not started."""
    folder.mkdir(parents=True, exist_ok=True)
    lua = folder / "received.lua"
    lua.write_text(_LUA)
    settings = {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "LuaScripts": [str(lua)],
        **extra,
    }
    if tls_pem is not None:
        settings.update({"SslEnabled": True, "SslCertificate": str(tls_pem)})
    base = make_orthanc(folder, **settings)
    web = OrthancWeb(**{k: getattr(base, k) for k in
                        ("dicom_port", "http_port", "aet", "folder", "proc", "log", "config_path")})
    if tls_pem is not None:
        web.scheme, web.ca_file = "https", ca_file
    return web


# --------------------------------------------------------------------------- a scripted STOW-RS server


@dataclass
class StowRequest:
    uids: list[str]
    authorization: str | None
    content_type: str
    content_length: int  # the body's length as received (chunked or not)
    transfer_encoding: str | None
    client_port: int = 0


Script = Callable[["StowPeer", StowRequest], tuple[int, dict, bytes]]


def stow_response(referenced=(), failed: dict | None = None) -> bytes:
    """A STOW-RS answer in DICOM JSON: Referenced SOP Sequence and Failed SOP Sequence (uid -> reason)."""
    data: dict = {}
    if referenced:
        data["00081199"] = {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}} for uid in referenced]}
    if failed:
        data["00081198"] = {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}
            for uid, code in failed.items()]}
    return json.dumps(data).encode()


def store_all(peer: "StowPeer", request: StowRequest) -> tuple[int, dict, bytes]:
    peer.stored.extend(request.uids)
    return 200, {"Content-Type": "application/dicom+json"}, stow_response(referenced=request.uids)


@dataclass
class StowPeer:
    """STOW-RS at ``{url}/studies`` answered by ``script``; an OAuth2 token endpoint at ``{base}/token``."""

    script: Script = store_all
    token_lifetime: float = 3600
    server: ThreadingHTTPServer | None = None
    requests: list[StowRequest] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    token_requests: list[dict] = field(default_factory=list)
    client_secret: str = "client-s3cret"
    require_token: bool = False
    rejected_401: int = 0
    refused_411: int = 0
    #: (certificate, key) PEM paths: serve HTTPS
    tls: tuple[Path, Path] | None = None
    #: with ``tls``: require a client certificate signed by this CA (ssl.CERT_REQUIRED)
    client_ca: Path | None = None
    #: answer a chunked STOW-RS request 411 Length Required (after reading it), like old servers
    length_required: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base}/dicom-web"

    def token_ok(self, header: str | None) -> bool:
        import time

        if not header or not header.startswith("Bearer "):
            return False
        expiry = self.tokens.get(header[7:])
        return expiry is not None and time.monotonic() < expiry

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def start(self) -> "StowPeer":
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/dicom-web/studies"):
                    if peer.require_token and not peer.token_ok(self.headers.get("Authorization")):
                        return self._answer(401, {"Content-Type": "text/plain"}, b"token expired or unknown")
                    return self._answer(200, {"Content-Type": "application/dicom+json"}, b"[]")
                self._answer(404, {}, b"")

            def _body(self) -> bytes:
                if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(body)
                    body += self.rfile.read(size)
                    self.rfile.readline()

            def do_POST(self):
                import time

                body = self._body()
                length = len(body)
                if self.path == "/token":
                    form = dict(urllib.parse.parse_qsl(body.decode()))
                    with peer.lock:
                        peer.token_requests.append(form)
                        if form.get("client_secret") != peer.client_secret:
                            return self._answer(401, {"Content-Type": "application/json"},
                                                b'{"error": "invalid_client"}')
                        token = f"token-{len(peer.token_requests)}"
                        peer.tokens[token] = time.monotonic() + peer.token_lifetime
                    return self._answer(200, {"Content-Type": "application/json"}, json.dumps(
                        {"access_token": token, "token_type": "Bearer",
                         "expires_in": peer.token_lifetime}).encode())
                if self.path != "/dicom-web/studies":
                    return self._answer(404, {}, b"")
                if peer.length_required and self.headers.get("Transfer-Encoding"):
                    with peer.lock:
                        peer.refused_411 += 1
                    return self._answer(411, {"Content-Type": "text/plain"}, b"Length Required")
                ctype = self.headers.get("Content-Type", "")
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + body)
                uids = [str(pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)),
                                            stop_before_pixels=True).SOPInstanceUID)
                        for part in message.iter_parts()]
                request = StowRequest(uids, self.headers.get("Authorization"), ctype, length,
                                      self.headers.get("Transfer-Encoding"), self.client_address[1])
                with peer.lock:
                    peer.requests.append(request)
                    if peer.require_token and not peer.token_ok(request.authorization):
                        peer.rejected_401 += 1
                        return self._answer(401, {"Content-Type": "text/plain"}, b"token expired or unknown")
                    status, headers, answer = peer.script(peer, request)
                self._answer(status, headers, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            if self.client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cafile=str(self.client_ca))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# --------------------------------------------------------------------------- a test CA


def make_ca(folder: Path, name: str = "Test CA") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it.

    {ca, cert, key, pem (cert + key), client_cert, client_key}
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # Orthanc's CivetWeb: RSA
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicom-gateway")]))
              .issuer_name(ca_name).public_key(client_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "pem": folder / "server-with-key.pem", "client_cert": folder / "client.pem",
             "client_key": folder / "client.key"}
    paths["client_cert"].write_bytes(client.public_bytes(pem))
    paths["client_key"].write_bytes(client_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key_pem)
    paths["pem"].write_bytes(cert.public_bytes(pem) + key_pem)
    for p in (paths["key"], paths["pem"], paths["client_key"]):
        p.chmod(0o600)
    return paths
