"""``/metrics`` for Prometheus, ``/healthz`` (alive) and ``/readyz`` (able to take images) for probes.

``/metrics`` needs scope ``read``, except from a loopback address (a local Prometheus or
node exporter need no token). The probes are open: they tell nothing but which check failed.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.web.app import Deps, get_deps
from gateway.web.auth import require_scope

router = APIRouter(include_in_schema=False)


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_or_loopback(request: Request) -> None:
    """Scope ``read``, waived for callers on a loopback address."""
    if not is_loopback(request):
        require_scope("read")(request)


@router.get("/metrics", dependencies=[Depends(read_or_loopback)])
def metrics(deps: Deps = Depends(get_deps)) -> Response:
    found = deps.extras.get("metrics")
    if found is None:
        return JSONResponse({"detail": "metrics are not collected in this process"}, status_code=503)
    return Response(generate_latest(found.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
def healthz() -> dict:
    """The process answers HTTP: alive (restarting it would not help anything else)."""
    return {"status": "ok"}


def _connect_host(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine (wildcards mean loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def dicom_listeners(config) -> dict[str, tuple[str, int]]:
    """The DICOM ports this node listens on, by name (the TLS one when configured)."""
    found = {"dicom": (config.node.host, config.node.port)} if config.node.port is not None else {}
    tls = getattr(config.node, "tls", None)
    if tls is not None and getattr(tls, "port", None):
        found["dicom_tls"] = (getattr(tls, "host", None) or config.node.host, tls.port)
    return found


def check_database(deps: Deps, now: float) -> str | None:
    """None when a committed write succeeds; otherwise why not."""
    import sqlite3

    from gateway.storage import db, health

    try:
        conn = db.connect(deps.config.db_path)
        try:
            conn.execute("PRAGMA busy_timeout=2000")
            health.probe_write(conn, now)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        return f"the database {deps.config.db_path} does not take writes: {exc}"
    return None


def check_free_space(deps: Deps) -> str | None:
    floor = deps.config.storage.min_free_bytes
    try:
        free = shutil.disk_usage(deps.config.node.data_dir).free
    except OSError as exc:
        return f"cannot read free space of {deps.config.node.data_dir}: {exc.strerror or exc}"
    if free < floor:
        return (f"{free} bytes free under {deps.config.node.data_dir}, below storage.min_free_bytes "
                f"({floor}): new instances are refused")
    return None


def check_listener(host: str, port: int, timeout: float = 2.0) -> str | None:
    try:
        with socket.create_connection((_connect_host(host), port), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing accepts on {host}:{port} ({exc.strerror or exc})"


def readiness(deps: Deps, now: float) -> dict[str, str | None]:
    """Each check's failure reason (None: passed), in a fixed order."""
    checks: dict[str, str | None] = {
        "database": check_database(deps, now),
        "free_space": check_free_space(deps),
    }
    for name, (host, port) in dicom_listeners(deps.config).items():
        checks[f"{name}_listener"] = check_listener(host, port)
    return checks


@router.get("/readyz")
def readyz(deps: Deps = Depends(get_deps)) -> JSONResponse:
    """200 when the node can take images now; 503 naming each failing check otherwise."""
    checks = readiness(deps, time.time())
    failed = [name for name, reason in checks.items() if reason]
    body = {
        "status": "not ready" if failed else "ready",
        "failed": failed,
        "checks": {name: {"ok": reason is None, **({"reason": reason} if reason else {})}
                   for name, reason in checks.items()},
    }
    if failed:
        body["detail"] = "; ".join(f"{name}: {checks[name]}" for name in failed)
    return JSONResponse(body, status_code=503 if failed else 200)


class RequestMetrics:
    """Pure-ASGI layer: count each request by its route template (bounded) and status code."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_seen(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            deps = getattr(getattr(scope.get("app"), "state", None), "deps", None)
            found = deps.extras.get("metrics") if deps is not None else None
            if found is not None:
                route = scope.get("route")
                found.http_request(getattr(route, "path", None) or "unmatched", status["code"])
