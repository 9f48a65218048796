"""The admin API under ``/api``: status, queue items, retries, inbox jobs, echo, the dashboard's data.

Reads need scope ``read``; anything that changes state or calls out needs ``admin``, and a
browser request from another site (an ``Origin`` that is not this server) is refused, so a
page elsewhere cannot press Retry with an admin's stored Basic credentials. Every response
has a pydantic model, so ``/api/openapi.json`` describes it and schemathesis checks it.
"""

from __future__ import annotations

import time
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from gateway.storage import db, queue
from gateway.storage import jobs as job_rows
from gateway.web.app import Deps, get_deps
from gateway.web.auth import require_scope

QueueState = Literal["pending", "sending", "sent", "failed"]
JobState = Literal["waiting", "done", "failed"]


def same_origin(request: Request) -> None:
    """Refuse a browser's cross-site request (its Origin names another host than this server)."""
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser's cross-site request (curl, scripts, same-origin GET)
    host = request.headers.get("host", "")
    if urlsplit(origin).netloc.lower() != host.lower():
        raise HTTPException(status_code=403,
                            detail=f"cross-site request from {origin[:100]} refused; use the dashboard "
                            "served by this gateway or call the API without an Origin header")


def admin_scope(request: Request) -> None:
    require_scope("admin")(request)
    same_origin(request)


class Problem(BaseModel):
    detail: str = Field(description="one sentence saying what is wrong and what to do")


_ERRORS = {
    400: {"model": Problem, "description": "a parameter is invalid (which one, and why)"},
    401: {"model": Problem, "description": "no or unknown credentials (WWW-Authenticate says which kinds)"},
    403: {"model": Problem, "description": "the credentials lack the scope, or a cross-site request"},
    404: {"model": Problem, "description": "no such destination or item"},
}
router = APIRouter(prefix="/api", tags=["admin"], responses=_ERRORS)
read = [Depends(require_scope("read"))]
admin = [Depends(admin_scope)]


class QueueItem(BaseModel):
    id: int
    destination: str
    sop_instance_uid: str
    state: QueueState
    attempts: int
    last_error: str | None
    enqueued_at: float = Field(description="unix time it was (last) queued")
    updated_at: float
    next_attempt_at: float
    study_uid: str | None
    series_uid: str | None
    sop_class_uid: str | None


class QueuePage(BaseModel):
    total: int = Field(description="items matching the filters")
    limit: int
    offset: int
    items: list[QueueItem]


class RetryResult(BaseModel):
    retried: int = Field(description="items put back to pending (or made due now)")


class ItemRetryResult(BaseModel):
    id: int
    state: QueueState


class Job(BaseModel):
    name: str
    state: JobState
    first_seen_at: float
    finished_at: float | None
    sop_instance_uid: str | None
    series_uid: str | None
    error: str | None


class JobPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[Job]


class EchoResult(BaseModel):
    destination: str
    ok: bool
    milliseconds: float
    detail: str


class HistoryMinute(BaseModel):
    minute: int = Field(description="unix time of the minute's start")
    received: int
    sent: int
    store_seconds_avg: float | None
    store_seconds_max: float | None
    send_seconds_avg: float | None
    send_seconds_max: float | None


class Status(BaseModel):
    """The same object as ``dicom-gateway status --json`` (keys documented in the README)."""

    model_config = {"extra": "allow"}
    node: dict[str, Any]
    store: dict[str, Any]
    inbox: dict[str, Any]
    destinations: dict[str, dict[str, Any]]
    queue_totals: dict[str, int]


def _destination(deps: Deps, name: str) -> str:
    if name not in deps.config.destinations:
        known = ", ".join(sorted(deps.config.destinations)) or "none configured"
        raise HTTPException(status_code=404, detail=f"destination {name!r} is not configured (known: {known})")
    return name


def _write(deps: Deps):
    conn = db.connect(deps.config.db_path)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _wake(deps: Deps, names) -> None:
    try:
        deps.on_queued(list(names))
    except Exception:  # waking is a latency nicety; the sender's poll picks the items up anyway
        pass


@router.get("/status", response_model=Status, dependencies=read,
            summary="What is stored, queued, sent and failed (as `status --json`)")
def get_status(deps: Deps = Depends(get_deps)) -> dict:
    from gateway import status

    return status.collect(deps.config, now=time.time())


@router.get("/queue", response_model=QueuePage, dependencies=read,
            summary="Queue items, newest change first, with their last error (paged)")
def list_queue(
    deps: Deps = Depends(get_deps),
    destination: str | None = Query(None, max_length=64),
    state: QueueState | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10_000_000),
) -> dict:
    if destination is not None:
        _destination(deps, destination)
    with deps.reader() as conn:
        total, items = queue.list_items(conn, destination, state, limit, offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.post("/queue/{item_id}/retry", response_model=ItemRetryResult, dependencies=admin,
             summary="Retry one item now (failed: back to pending with fresh attempts)",
             responses={409: {"model": Problem, "description": "already sent or being sent"}})
def retry_item(item_id: int = Path(ge=1, le=2**62), deps: Deps = Depends(get_deps)) -> dict:
    conn = _write(deps)
    try:
        with db.transaction(conn):
            state = queue.retry_item(conn, item_id, time.time())
            row = conn.execute("SELECT destination FROM queue WHERE id = ?", (item_id,)).fetchone()
    finally:
        conn.close()
    if state is None:
        raise HTTPException(status_code=404, detail=f"queue item {item_id} does not exist")
    if state in (queue.State.SENT, queue.State.SENDING):
        raise HTTPException(status_code=409, detail=f"queue item {item_id} is {state.value}; nothing to retry")
    _wake(deps, [row["destination"]])
    return {"id": item_id, "state": state.value}


@router.post("/destinations/{name}/retry", response_model=RetryResult, dependencies=admin,
             summary="Put every failed item of one destination back to pending")
def retry_destination(name: str = Path(max_length=64), deps: Deps = Depends(get_deps)) -> dict:
    _destination(deps, name)
    return _retry_failed(deps, name)


@router.post("/retry", response_model=RetryResult, dependencies=admin,
             summary="Put every failed item of every destination back to pending")
def retry_all(deps: Deps = Depends(get_deps)) -> dict:
    return _retry_failed(deps, None)


def _retry_failed(deps: Deps, name: str | None) -> dict:
    """Failed items of one destination (None: of every one) back to pending, their senders woken."""
    conn = _write(deps)
    try:
        with db.transaction(conn):
            n = queue.retry_failed(conn, name, time.time())
    finally:
        conn.close()
    _wake(deps, [name] if name is not None else deps.config.destinations)
    return {"retried": n}


@router.get("/inbox/jobs", response_model=JobPage, dependencies=read,
            summary="Inbox jobs (files and HTTP) with their state and reasons, latest first (paged)")
def list_jobs(
    deps: Deps = Depends(get_deps),
    state: JobState | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10_000_000),
) -> dict:
    with deps.reader() as conn:
        total, items = job_rows.page(conn, state, limit, offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.post("/destinations/{name}/echo", response_model=EchoResult, dependencies=admin,
             summary="Verify a destination answers (C-ECHO, or QIDO-RS for DICOMweb); ok false with the reason otherwise")
def echo_destination(name: str = Path(max_length=64), deps: Deps = Depends(get_deps)) -> dict:
    from gateway import errors
    from gateway.forward.echo import echo

    _destination(deps, name)
    start = time.monotonic()
    try:
        ok, detail = True, echo(deps.config, name)
    except errors.GatewayError as exc:
        ok, detail = False, str(exc)
    return {"destination": name, "ok": ok, "milliseconds": round(1000 * (time.monotonic() - start), 1),
            "detail": detail}


@router.get("/history", response_model=list[HistoryMinute], dependencies=read,
            summary="The last hour per minute: instances received and sent, store and send latency")
def history(deps: Deps = Depends(get_deps)) -> list[dict]:
    found = deps.extras.get("metrics")
    return found.history.snapshot() if found is not None else []
