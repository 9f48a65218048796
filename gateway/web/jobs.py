"""AI jobs over HTTP: ``POST /api/inbox/jobs`` drops a job into the inbox folder, ``GET`` tells its state.

A posted job becomes exactly what a dropped one is: ``NAME.npy``/``NAME.npz`` then
``NAME.yaml`` in ``inbox.path``, each written to a hidden upload folder on the same
filesystem, fsynced and renamed in — the array first, the sidecar last — so the inbox never
sees half a job, and the same checks, names and exactly-once promise apply. The sidecar and
the array header are checked before anything is renamed in, so a bad job gets 400 with the
sentence the inbox would have written to ``failed/NAME.error.txt``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path

import yaml
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from gateway.errors import GatewayError
from gateway.inbox.inbox import result_summary
from gateway.storage import jobs as job_rows
from gateway.storage.files import fsync_dir
from gateway.web.app import Deps, get_deps
from gateway.web.auth import Identity, require_scope

router = APIRouter(prefix="/api/inbox", tags=["inbox"])

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
UPLOAD_PREFIX = ".upload-"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class JobAnswer(BaseModel):
    name: str
    state: str  # queued | waiting | done | failed
    error: str | None = None
    result: dict | None = None


def _new_name(clock=time.time) -> str:
    return time.strftime("job-%Y%m%d-%H%M%S", time.gmtime(clock())) + "-" + secrets.token_hex(4)


def _copy_upload(upload: UploadFile, dest: Path) -> bytes:
    """Copy an uploaded file (already spooled by the form parser) to ``dest`` and fsync; its first bytes."""
    upload.file.seek(0)
    head = upload.file.read(8)
    upload.file.seek(0)
    with open(dest, "xb") as out:
        os.fchmod(out.fileno(), 0o600)
        shutil.copyfileobj(upload.file, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    return head


def _existing(inbox: Path, name: str) -> list[Path]:
    found = []
    for folder in (inbox, inbox / "done", inbox / "failed"):
        for suffix in (".npy", ".npz", ".yaml"):
            if (folder / f"{name}{suffix}").exists():
                found.append(folder / f"{name}{suffix}")
    return found


def submit(deps: Deps, name: str, array: UploadFile, sidecar: UploadFile) -> JobAnswer:
    """Check the job's files, then rename them into the inbox: array first, sidecar last."""
    from gateway.inbox import jobfiles

    inbox = deps.config.inbox.path
    inbox.mkdir(parents=True, exist_ok=True)
    with deps.reader() as conn:
        if job_rows.get(conn, name) is not None or _existing(inbox, name):
            raise HTTPException(409, f"a job named {name} already exists; give every job a unique name "
                                     f"(GET /api/inbox/jobs/{name} tells its state)")
    upload_dir = inbox / f"{UPLOAD_PREFIX}{secrets.token_hex(6)}"
    upload_dir.mkdir(mode=0o700)
    try:
        head = _copy_upload(array, upload_dir / "array.bin")
        if head.startswith(_NPY_MAGIC):
            suffix = ".npy"
        elif head.startswith(_ZIP_MAGIC):
            suffix = ".npz"
        else:
            raise HTTPException(400, "the 'array' field is neither a .npy nor a .npz file (no NumPy or zip "
                                     "header); send numpy.save / numpy.savez output")
        array_path = upload_dir / f"{name}{suffix}"
        os.replace(upload_dir / "array.bin", array_path)
        sidecar_path = upload_dir / f"{name}.yaml"
        _copy_upload(sidecar, sidecar_path)
        try:
            jobfiles.read_sidecar(sidecar_path)
            jobfiles.load_array(array_path)
        except GatewayError as exc:
            raise HTTPException(400, f"job {name}: {exc}") from None
        # Re-check under the rename: a concurrent request may have taken the name meanwhile.
        if _existing(inbox, name):
            raise HTTPException(409, f"a job named {name} already exists; give every job a unique name")
        os.replace(array_path, inbox / array_path.name)
        fsync_dir(inbox)
        os.replace(sidecar_path, inbox / sidecar_path.name)
        fsync_dir(inbox)
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)
    return JobAnswer(name=name, state="queued")


def state_of(deps: Deps, name: str) -> JobAnswer | None:
    """The job's state from the database and the inbox folders (None: no such job)."""
    inbox = deps.config.inbox.path
    with deps.reader() as conn:
        row = job_rows.get(conn, name)
        if row is not None and row["state"] == "done":
            path = inbox / "done" / f"{name}.result.yaml"
            try:
                result = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):  # committed, its files not yet moved: the same summary
                result = result_summary(conn, row, list(deps.config.routes.results))
            return JobAnswer(name=name, state="done", result=result)
    if row is not None and row["state"] == "failed":
        return JobAnswer(name=name, state="failed", error=row["error"])
    if row is not None:
        return JobAnswer(name=name, state=row["state"])
    if (inbox / f"{name}.yaml").exists():
        return JobAnswer(name=name, state="queued")
    error_file = inbox / "failed" / f"{name}.error.txt"
    if error_file.exists():
        return JobAnswer(name=name, state="failed", error=error_file.read_text(errors="replace").strip())
    return None


_ERRORS = {code: {"description": text} for code, text in (
    (400, "a field is missing or the job is refused (the inbox's sentence)"), (401, "no valid credentials"),
    (403, "the identity lacks the 'write' scope"), (409, "a job with this name exists"),
    (413, "larger than http.max_request_bytes"), (415, "not multipart/form-data"))}
_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["array", "sidecar"],
    "properties": {"array": {"type": "string", "format": "binary", "description": ".npy or .npz bytes"},
                   "sidecar": {"type": "string", "format": "binary", "description": "the sidecar YAML"},
                   "name": {"type": "string", "pattern": NAME.pattern}}}}}}}


@router.post("/jobs", response_model=JobAnswer, status_code=202, responses=_ERRORS, openapi_extra=_FORM,
             summary="Submit an AI job: multipart form with 'array' (.npy/.npz), 'sidecar' (YAML), optional 'name'")
async def post_job(request: Request, identity: Identity = Depends(require_scope("write")),
                   deps: Deps = Depends(get_deps)):
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send the job as multipart/form-data with fields 'array', 'sidecar' and "
                                 "optionally 'name'")
    try:
        form = await request.form(max_files=2, max_fields=1, max_part_size=64 * 1024)
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(400, f"the form could not be read ({exc}); send fields 'array', 'sidecar', 'name'") from None
    try:
        array, sidecar, name = form.get("array"), form.get("sidecar"), form.get("name")
        missing = [k for k, v in (("array", array), ("sidecar", sidecar)) if not isinstance(v, UploadFile)]
        if missing:
            raise HTTPException(400, f"the form lacks the file field(s) {', '.join(missing)}; send 'array' "
                                     "(.npy/.npz) and 'sidecar' (YAML) as files")
        if name is not None and not isinstance(name, str):
            raise HTTPException(400, "the 'name' field must be text")
        name = name or _new_name()
        if not NAME.match(name):
            raise HTTPException(400, f"job name {name!r:.80} must be 1 to 64 letters, digits, '_' or '-', "
                                     "starting with a letter or digit")
        answer = await run_in_threadpool(submit, deps, name, array, sidecar)
    finally:
        await form.close()
    return JSONResponse(answer.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/api/inbox/jobs/{answer.name}"})


@router.get("/jobs/{name}", response_model=JobAnswer, summary="A job's state; its result when done, reason when failed")
async def get_job(name: str, identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    if not NAME.match(name):
        raise HTTPException(400, f"job name {name!r:.80} must be letters, digits, '_' or '-'")
    answer = await run_in_threadpool(state_of, deps, name)
    if answer is None:
        raise HTTPException(404, f"no job named {name} is known")
    return JSONResponse(answer.model_dump(exclude_none=True))
