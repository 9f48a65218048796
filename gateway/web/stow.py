"""STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]``, each part through the one ingest.

The body is streamed into one spool file per part (``web.multipart``) on the store's
filesystem; only when the closing boundary has arrived are the parts ingested, one by one,
in a worker thread: a truncated or malformed body stores nothing. The answer is sent only
after every stored instance is on disk and indexed (``Store`` fsyncs and commits before it
returns). Status: 200 all stored, 202 some failed, 409 none stored, 400 malformed body,
415 another media type.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gateway import audit as audit_trail
from gateway.metrics import DICOMWEB
from gateway.storage import ingest_web
from gateway.storage.store import Outcome, Result
from gateway.storage.uids import is_valid_uid
from gateway.web.app import Deps, get_deps
from gateway.web.auth import Identity, require_scope
from gateway.web.common import base_url
from gateway.web.dicomjson import DICOM_JSON, DicomJSONResponse, element, reason_elements
from gateway.web.multipart import MalformedBody, Part, RelatedParser, UnsupportedMediaType, related_boundary

log = logging.getLogger("gateway.stow")
router = APIRouter(tags=["DICOMweb"])

#: PS3.18 Table 10.5.3-3 failure reasons by store outcome.
FAILURE_REASONS = {
    Outcome.NO_SPACE: 0xA700,  # Refused: out of resources
    Outcome.INVALID: 0xA900,  # Error: data set does not match (UIDs missing/invalid/mismatched)
    Outcome.WRONG_STUDY: 0xA900,  # Error: data set does not match (another study than the URL's)
    Outcome.UNREADABLE: 0xC000,  # Error: cannot understand
    Outcome.FAILED: 0x0110,  # Processing failure
}


def _flush(path: Path | None) -> None:
    """fsync a spooled part (best effort: the ingest fsyncs it again before it counts)."""
    if path is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def spool_dir(deps: Deps) -> Path:
    folder = deps.config.node.data_dir / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class PartOutcome:
    part: Part
    result: Result
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None


def audit_objects(outcomes: list[PartOutcome]) -> list[dict]:
    """What the request stored, for its audit message: studies with series counts and bytes,
    and the Patient object of each Patient ID (audit_requests reads it from the request state)."""
    tally = audit_trail.Tally()
    for o in outcomes:
        if o.result.outcome is Outcome.STORED and o.study_uid and o.series_uid:
            tally.add(o.study_uid, o.series_uid, o.result.size or 0, o.patient_id)
    return tally.objects()


def _ingest_parts(deps: Deps, parts: list[Part], study: str | None, peer: str, identity: str) -> list[PartOutcome]:
    """Ingest every spooled part (worker threads: files placed in parallel, indexed in one transaction);
    a part's problem never stops the others."""
    outcomes: list[PartOutcome | None] = [None] * len(parts)
    todo = []
    for i, part in enumerate(parts):
        ctype = part.content_type
        if part.problem:
            kind = Outcome.NO_SPACE if part.out_of_resources else Outcome.FAILED
            outcomes[i] = PartOutcome(part, Result(kind, part.problem))
        elif ctype and ctype != "application/dicom":
            part.discard()
            outcomes[i] = PartOutcome(part, Result(Outcome.UNREADABLE,
                                                   f"part {part.index + 1} is {ctype}, not application/dicom"))
        else:
            todo.append(i)
    started = time.monotonic()
    got = ingest_web.ingest_files(deps.store, [parts[i].path for i in todo], study, peer, identity)
    metrics = deps.extras.get("metrics")
    each = (time.monotonic() - started) / max(1, len(todo))  # the batch's time, shared by its instances
    for i, g in zip(todo, got):
        parts[i].path = None  # moved into the store or removed by the ingest
        if metrics is not None and g.result.outcome is Outcome.STORED:
            metrics.received(DICOMWEB, g.result.size or 0, each)
        outcomes[i] = PartOutcome(parts[i], g.result, g.sop_class_uid, g.sop_instance_uid, g.series_uid,
                                  g.study_uid, g.patient_id)
    queued = {name for o in outcomes for name in o.result.queued_for}
    if queued:
        try:
            deps.on_queued(sorted(queued))
        except Exception as exc:  # waking senders early is an optimisation; they poll anyway
            log.warning("waking senders failed: %r", exc)
    return outcomes


def _response(outcomes: list[PartOutcome], base: str, study: str | None) -> DicomJSONResponse:
    stored = [o for o in outcomes if o.result.outcome is Outcome.STORED]
    failed = [o for o in outcomes if o.result.outcome is not Outcome.STORED]
    body: dict = {}
    studies = {o.study_uid for o in stored}
    retrieve_study = study or (studies.pop() if len(studies) == 1 else None)
    if retrieve_study:
        body["00081190"] = element("UR", f"{base}/dicom-web/studies/{retrieve_study}")
    if failed:
        items = []
        for o in failed:
            item = {
                "00081150": element("UI", o.sop_class_uid if is_valid_uid(o.sop_class_uid) else None),
                "00081155": element("UI", o.sop_instance_uid if is_valid_uid(o.sop_instance_uid) else None),
                "00081197": element("US", FAILURE_REASONS[o.result.outcome]),
            }
            item.update(reason_elements(f"part {o.part.index + 1}: {o.result.reason}"))
            items.append(item)
        body["00081198"] = element("SQ", *items)
    if stored:
        body["00081199"] = element("SQ", *[{
            "00081150": element("UI", o.sop_class_uid),
            "00081155": element("UI", o.sop_instance_uid),
            "00081190": element("UR", f"{base}/dicom-web/studies/{o.study_uid}/series/{o.series_uid}"
                                      f"/instances/{o.sop_instance_uid}"),
        } for o in stored])
    status = 200 if not failed else (202 if stored else 409)
    headers = {}
    if failed:
        first = failed[0].result.reason.replace('"', "'")[:200]
        headers["Warning"] = f'299 dicom-gateway: "{len(failed)} of {len(outcomes)} instance(s) failed; first: {first}"'
    return DicomJSONResponse(body, status_code=status, headers=headers)


async def _stow(request: Request, study: str | None, identity: Identity, deps: Deps) -> DicomJSONResponse:
    if study is not None and not is_valid_uid(study):
        raise HTTPException(400, f"the Study Instance UID in the URL is not a valid UID, got {study!r:.80}")
    accept = request.headers.get("accept", "")
    if accept and not any(t in accept for t in (DICOM_JSON, "application/json", "*/*", "application/*")):
        raise HTTPException(406, f"STOW-RS answers {DICOM_JSON} only; the Accept header asks for {accept!r:.100}")
    try:
        boundary = related_boundary(request.headers.get("content-type"), ("application/dicom",))
    except UnsupportedMediaType as exc:
        raise HTTPException(415, str(exc)) from None
    except MalformedBody as exc:
        raise HTTPException(400, str(exc)) from None
    if deps.store is None:
        raise HTTPException(503, "this server has no store to write to")
    loop = asyncio.get_running_loop()
    flushing: list[asyncio.Future] = []
    # Each finished part is fsynced in a worker thread while the next ones arrive, so the
    # ingest's own fsync of the file finds nothing left to write.
    parser = RelatedParser(boundary, spool_dir(deps), deps.config.storage.max_instance_bytes,
                           on_part_done=lambda part: flushing.append(loop.run_in_executor(None, _flush, part.path)))
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parts = parser.finish()
            await asyncio.gather(*flushing)
        except MalformedBody as exc:
            raise HTTPException(400, f"{exc}; nothing was stored") from None
        except ClientDisconnect:
            raise HTTPException(400, "the client closed the connection before the body ended; nothing was stored") from None
        client = request.client
        peer = f"{client.host}:{client.port}" if client else "-"
        outcomes = await run_in_threadpool(_ingest_parts, deps, parts, study, peer, str(identity))
    finally:
        parser.discard_all()
    request.state.audit_objects = audit_objects(outcomes)
    n_ok = sum(o.result.outcome is Outcome.STORED for o in outcomes)
    log.info("STOW-RS from %s: %d of %d instance(s) stored%s", identity, n_ok, len(outcomes),
             "" if n_ok == len(outcomes) else "; " + "; ".join(
                 f"part {o.part.index + 1}: {o.result.reason}" for o in outcomes
                 if o.result.outcome is not Outcome.STORED)[:500])
    return _response(outcomes, base_url(request, deps), study)


@router.post("/dicom-web/studies", response_class=DicomJSONResponse,
             summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")")
async def store_instances(request: Request, identity: Identity = Depends(require_scope("write")),
                          deps: Deps = Depends(get_deps)):
    return await _stow(request, None, identity, deps)


@router.post("/dicom-web/studies/{study}", response_class=DicomJSONResponse,
             summary="STOW-RS: store instances of one study")
async def store_study_instances(study: str, request: Request,
                                identity: Identity = Depends(require_scope("write")),
                                deps: Deps = Depends(get_deps)):
    return await _stow(request, study, identity, deps)
