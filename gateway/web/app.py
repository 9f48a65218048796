"""The gateway's FastAPI application: one app, routers added per room, dependencies through the door.

``create_app(config, deps)`` builds the app; every room adds its pages with
``app.include_router(router)`` (DICOMweb, ``/api``, metrics, dashboard). Handlers reach the
node through ``Depends(get_deps)`` (config, the store's ingest, read-only database
connections) and protect themselves with ``Depends(require_scope(...))``.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.config import Config
from gateway.storage import db
from gateway.web.auth import Authenticator
from gateway.web.middleware import LimitsAndLog


@dataclass
class Deps:
    """What handlers may use: passed in by ``service.run`` (or a test), never module globals."""

    config: Config
    #: The one ingest door (``storage.store.Store``); None only in apps that never write.
    store: Any = None
    #: Called with destination names when new work was queued (wakes their senders).
    on_queued: Callable[[Iterable[str]], None] = lambda names: None
    #: Extra objects other rooms hang here by name (e.g. "metrics", "inbox").
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection for one request (WAL: reads never block the writers)."""
        conn = db.connect_readonly(self.config.db_path)
        if conn is None:
            conn = db.connect(self.config.db_path)  # first start: create the schema
        try:
            yield conn
        finally:
            conn.close()


def get_deps(request: Request) -> Deps:
    """FastAPI dependency: ``deps: Deps = Depends(get_deps)``."""
    return request.app.state.deps


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(config: Config, deps: Deps | None = None, routers: bool = True) -> FastAPI:
    """The app with its middleware, auth and (``routers=True``) the built-in routers."""
    deps = deps or Deps(config)
    app = FastAPI(
        title="dicom-gateway",
        version=__version__,
        description="DICOMweb (STOW-RS, QIDO-RS, WADO-RS) on the gateway's store, AI jobs, status.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.deps = deps
    app.state.authenticator = Authenticator(config.http.auth)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(400, "bad request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        import logging

        logging.getLogger("gateway.web").error("%s %s: unexpected error %r", request.method,
                                               request.url.path, exc, exc_info=logging.DEBUG >= logging.getLogger().level)
        return _error(500, f"internal error ({type(exc).__name__}); the gateway log has the details")

    from gateway.web.ops import RequestMetrics

    from gateway.web.audit_requests import AuditRequests

    app.add_middleware(AuditRequests, deps=deps)  # DICOMweb requests into the audit trail, if any
    app.add_middleware(RequestMetrics)  # inside LimitsAndLog: its 413/408 answers are logged, not counted
    app.add_middleware(LimitsAndLog, max_request_bytes=config.http.max_request_bytes,
                       read_timeout=config.http.read_timeout_seconds)
    if routers:
        from gateway.web import routers as builtin

        for router in builtin.all_routers():
            app.include_router(router)
    return app
