"""uvicorn inside ``dicom-gateway run``: one server thread, a socket we bind ourselves, a bounded stop.

We bind the listening socket before starting the thread so "address in use" is one
sentence at start, not a ``sys.exit`` deep inside uvicorn; uvicorn's own signal handlers
stay off (the main thread owns SIGTERM/SIGINT and calls ``shutdown``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.web.app import Deps, create_app
from gateway.web.zerocopy import http_protocol

log = logging.getLogger("gateway.http")


class HttpStartError(GatewayError):
    """The HTTP listener could not start (port in use, bad address)."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HttpStartError(
            f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc}); change http.port or "
            "stop what uses it"
        ) from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # older uvicorn; newer ones skip off the main thread
        pass


class HttpServer:
    """A running uvicorn server in a daemon thread; ``shutdown`` stops it within ``grace`` seconds."""

    def __init__(self, config: Config, deps: Deps, app=None):
        http = config.http
        self.sock = _bind(http.host, http.port)
        self.port = self.sock.getsockname()[1]
        self.app = app if app is not None else create_app(config, deps)
        self.server = _Server(uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,  # ours: one line per request with identity, bytes, ms
            limit_concurrency=http.max_connections,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=10,
            h11_max_incomplete_event_size=64 * 1024,  # bounds header bytes per request
            server_header=False,
            lifespan="off",
            http=http_protocol(),  # h11 plus the zero-copy send extension (WADO-RS file bodies)
        ))
        self.deps = deps
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # SystemExit from uvicorn included: the main thread reports it
            self.error = exc

    def start(self, timeout: float = 10.0) -> "HttpServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.shutdown()
                raise HttpStartError(f"the HTTP server did not start ({self.error!r})")
            time.sleep(0.01)
        return self

    def shutdown(self, grace: float = 15.0) -> None:
        """Stop accepting, let running requests finish (bounded), then close the socket."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(grace)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.deps.store is not None and not self.thread.is_alive():
            self.deps.store.close()


def start(config: Config, deps: Deps) -> HttpServer:
    """Bind and serve ``http.host:http.port``; raise ``HttpStartError`` with a sentence."""
    server = HttpServer(config, deps).start()
    log.info("HTTP on http://%s:%d (auth: %s)", config.http.host, server.port,
             "tokens/users" if config.http.auth.enabled else "none, loopback only")
    return server


def deps_for(config: Config, on_queued=lambda names: None) -> Deps:
    """The handlers' dependencies for ``run``: a Store with its own connection (WAL: one writer at a time)."""
    from gateway.storage.store import Store

    store = Store.open(config)
    backfill_qido(store.conn, config)
    return Deps(config=config, store=store, on_queued=on_queued)


def backfill_qido(conn, config: Config) -> int:
    """Instances stored before QIDO existed (an earlier release) get their searchable attributes."""
    from gateway.storage import qido
    from gateway.storage.ingest_web import read_dataset

    n = qido.backfill(conn, config.node.data_dir, read_dataset)
    if n:
        log.info("QIDO: indexed the attributes of %d instance(s) stored by an earlier release", n)
    return n
