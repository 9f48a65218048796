"""Forwarding to a DICOMweb destination: STOW-RS requests over one kept-alive HTTP connection.

The transport (``send``: queue items in, one ``outcome.Outcome`` per item out, the interface
``forward.sender`` drives) sends a list of stored instances as as few requests as ``max_request_bytes``
allows and returns one ``outcome.Outcome`` per instance: it splits a request the server finds
too large (413), refreshes a credential once after a 401, and turns every network failure
into a retry with the reason. ``echo`` checks a destination with one QIDO-RS query.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.config import DicomwebDestinationConfig, HttpTlsConfig
from gateway.errors import AuthRefused, RetryLater
from gateway.forward import outcome, stowrs
from gateway.forward.dicomweb_auth import describe_http_error, make_credential
from gateway.forward.outcome import Outcome, Verdict
from gateway.forward.stowrs import Part

log = logging.getLogger("gateway.forward")

USER_AGENT = "dicom-gateway"


def ssl_context(tls: HttpTlsConfig) -> ssl.SSLContext:
    """Verified TLS 1.2+ by default: the system CAs, or ``ca_file``; a client certificate when set."""
    if tls.verify:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.client_cert_file is not None:
        ctx.load_cert_chain(str(tls.client_cert_file), str(tls.client_key_file))
    return ctx


def make_client(dest: DicomwebDestinationConfig, connect_timeout: float, url: str | None = None) -> httpx.Client:
    """One connection, kept alive between requests and passes, to ``url`` (default: the destination's)."""
    return httpx.Client(
        # Nagle would hold each request's small closing boundary until the server's delayed
        # ACK (~40 ms per request here): small writes go out at once.
        transport=httpx.HTTPTransport(
            # plain http never uses it: no CA store loaded for nothing
            verify=ssl_context(dest.tls) if (url or dest.url).startswith("https:") else False, retries=0,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        ),
        timeout=httpx.Timeout(dest.timeout_seconds, connect=min(connect_timeout, dest.timeout_seconds)),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
        trust_env=False,
    )


class DicomwebTransport:
    """STOW-RS to one destination; ``send`` never raises for what the network or server does."""

    def __init__(
        self,
        name: str,
        dest: DicomwebDestinationConfig,
        *,
        connect_timeout: float = 10.0,
        data_dir: Path = Path("."),
        clock: Callable[[], float] = time.time,
        boundary: Callable[[], str] = lambda: f"dicom-gateway-{uuid.uuid4().hex}",
    ):
        self.name = name
        self.dest = dest
        self.connect_timeout = connect_timeout
        self.data_dir = Path(data_dir)  # stored paths in queue items are relative to it
        self._clock = clock
        self._boundary = boundary
        self._client: httpx.Client | None = None
        token_url = getattr(dest.auth, "token_url", None)
        self.credential = make_credential(dest.auth, lambda: make_client(dest, connect_timeout, token_url))
        self.requests = 0  # STOW-RS requests made (tests and benches read it)
        self.chunked = dest.chunked  # until the server answers 411 Length Required

    @property
    def stow_url(self) -> str:
        return f"{self.dest.url}/studies"

    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = make_client(self.dest, self.connect_timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.credential.close()

    # ---------------------------------------------------------------- one request

    def _post_once(self, parts: list[Part]) -> dict[str, Outcome]:
        outcomes = self._exchange(parts)
        if outcomes is None:  # 411 to a chunked body: the same request with a Content-Length
            outcomes = self._exchange(parts)
        assert outcomes is not None  # not chunked any more: no second 411 turn
        return outcomes

    def _exchange(self, parts: list[Part]) -> dict[str, Outcome] | None:
        """One request and its answer; None when a chunked body met 411 Length Required."""
        uids = [p.sop_instance_uid for p in parts]
        try:
            auth_headers = self.credential.headers()
        except AuthRefused as exc:
            return stowrs._all(uids, Outcome(Verdict.FAILED, str(exc)))
        except RetryLater as exc:
            return stowrs._all(uids, Outcome(Verdict.RETRY, str(exc)))
        body = stowrs.MultipartBody(parts, self._boundary())
        headers = {"Content-Type": body.content_type, "Accept": stowrs.ACCEPT, **auth_headers}
        if not self.chunked:
            headers["Content-Length"] = str(len(body))
        self.requests += 1
        try:
            # An iterator without Content-Length goes out chunked: a server that stores each
            # part as it arrives (Orthanc does) works while the rest is still on its way,
            # instead of buffering the whole request first.
            with self.client().stream("POST", self.stow_url, content=iter(body), headers=headers) as resp:
                if resp.status_code == 411 and self.chunked:
                    log.info("%s wants a Content-Length (411): sending it from now on, not chunked", self.name)
                    self.chunked = False
                    return None
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > stowrs.MAX_RESPONSE_BYTES:
                        return stowrs._all(uids, Outcome(
                            Verdict.RETRY, f"{self.name} answered HTTP {resp.status_code} with a body "
                            f"over {stowrs.MAX_RESPONSE_BYTES} bytes; nothing marked sent"))
                retry_after = stowrs.retry_after_seconds(resp.headers.get("Retry-After"), self._clock())
                return stowrs.decide(
                    uids, resp.status_code, resp.reason_phrase, resp.headers.get("Content-Type", ""),
                    bytes(data), retry_after, server=self.name,
                )
        except httpx.HTTPError as exc:
            self._reset()
            why = describe_http_error(exc)
            if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
                why = f"no answer within timeout_seconds ({self.dest.timeout_seconds:g} s)"
            return stowrs._all(uids, Outcome(Verdict.RETRY, f"STOW-RS to {self.stow_url} failed: {why}"))
        except OSError as exc:  # a stored file unreadable or changed while it was being sent
            self._reset()
            return stowrs._all(uids, Outcome(Verdict.RETRY, f"cannot send the stored files: {exc}"))

    def _reset(self) -> None:
        """After a failed exchange the connection's state is unknown: the next request opens a new one."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _post(self, parts: list[Part]) -> dict[str, Outcome]:
        """One request; after a 401, once more with a refreshed credential if there is one."""
        outcomes = self._post_once(parts)
        first = next(iter(outcomes.values()))
        if first.verdict is Verdict.REAUTH:
            if self.credential.refresh():
                log.info("%s answered 401; trying once more with a fresh %s credential",
                         self.name, self.credential.kind)
                outcomes = self._post_once(parts)
                first = next(iter(outcomes.values()))
            if first.verdict is Verdict.REAUTH:
                again = " (a refreshed credential too)" if self.credential.kind == "oauth2" else ""
                reason = f"{first.reason}; the credentials were refused{again}: check auth"
                outcomes = stowrs._all(list(outcomes), Outcome(Verdict.FAILED, reason))
        return outcomes

    # ---------------------------------------------------------------- many instances

    def send(self, items: list, stopping: Callable[[], bool] = lambda: False):
        """The transport interface (``forward.sender``): yield (item, outcome) lists, request by request."""
        by_id = {item.id: item for item in items}
        parts, missing = parts_for(items, self.data_dir)
        if missing:
            yield [(item, outcome.missing(item.path)) for item in missing]
        for results in self.send_parts(parts, stopping):
            yield [(by_id[part.item_id], result) for part, result in results]

    def send_parts(self, parts: list[Part], stopping: Callable[[], bool] = lambda: False):
        """Yield, request by request, the list of (part, outcome) for its parts.

        A request whose instances all got the same retry (server down, 5xx, 429, timeout) ends
        the run: the parts not yet sent get that outcome too, without a request each.
        """
        todo = deque(stowrs.plan_requests(parts, int(self.dest.max_request_bytes)))
        while todo:
            if stopping():
                return
            request = todo.popleft()
            outcomes = self._post(request)
            first = outcomes[request[0].sop_instance_uid]
            if first.verdict is Verdict.SPLIT:
                if len(request) > 1:
                    log.info("%s found a request of %d instances too large (413); sending it in halves",
                             self.name, len(request))
                    todo.extendleft(reversed(stowrs.split(request)))
                    continue
                reason = (f"{first.reason} (one instance of {request[0].size} bytes is too large "
                          "for the server)")
                outcomes = {request[0].sop_instance_uid: Outcome(Verdict.FAILED, reason)}
            yield [(part, outcomes[part.sop_instance_uid]) for part in request]
            verdicts = {o.verdict for o in outcomes.values()}
            if verdicts == {Verdict.RETRY} and len({o.reason for o in outcomes.values()}) == 1 and todo:
                rest = [p for r in todo for p in r]
                log.warning("%s: %s; the other %d instance(s) of this pass wait too",
                            self.name, first.reason, len(rest))
                yield [(part, first) for part in rest]
                return

    # ---------------------------------------------------------------- echo

    def echo(self) -> tuple[int, float]:
        """QIDO-RS ``GET {url}/studies?limit=1``: (HTTP status, seconds), or RetryLater saying what failed."""
        url = f"{self.dest.url}/studies"
        start = time.monotonic()
        try:
            headers = {"Accept": "application/dicom+json", **self.credential.headers()}
        except AuthRefused as exc:
            raise RetryLater(f"auth: {exc}") from None
        except RetryLater as exc:
            raise RetryLater(f"auth: {exc}") from None
        try:
            resp = self.client().get(url, params={"limit": "1"}, headers=headers)
            if resp.status_code == 401 and self.credential.refresh():
                headers = {**headers, **self.credential.headers()}
                resp = self.client().get(url, params={"limit": "1"}, headers=headers)
        except httpx.HTTPError as exc:
            raise RetryLater(f"{describe_http_error(exc)} ({url})") from None
        except (AuthRefused, RetryLater) as exc:
            raise RetryLater(f"auth: {exc}") from None
        elapsed = time.monotonic() - start
        words = stowrs._text(resp.content)
        said = f"HTTP {resp.status_code} {resp.reason_phrase}".rstrip() + (f": {words}" if words else "")
        if resp.status_code in (401, 403):
            raise RetryLater(f"auth: {self.name} refused our credentials ({said})")
        if resp.status_code not in (200, 204):
            raise RetryLater(f"server: {self.name} answered QIDO-RS {url}?limit=1 with {said}")
        return resp.status_code, elapsed


def parts_for(items, data_dir: Path) -> tuple[list[Part], list]:
    """(parts to send, items whose stored file is missing)."""
    parts, missing = [], []
    for item in items:
        path = data_dir / item.path
        try:
            size = path.stat().st_size
        except OSError:
            missing.append(item)
            continue
        parts.append(Part(item.id, item.sop_instance_uid, path, size))
    return parts, missing
