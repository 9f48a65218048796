"""WADO-RS (PS3.18 10.4): instances, series and studies as multipart/related streamed from disk.

The stored bytes go out unchanged: by ``sendfile`` from a worker thread when the server offers
zero-copy bodies (web/zerocopy.py: no buffer at all), otherwise read into buffers of ``BATCH``
bytes (many small instances per write, a large one in several; one buffer read ahead in a
worker thread while the other is sent, so at most two per request); uncompressed little endian instances may be re-labelled between Implicit and
Explicit VR (``relabel_head``: the header is re-encoded, the pixel bytes are copied). Also
metadata (DICOM JSON with BulkDataURIs), the bulk data behind those URIs, and frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from io import BytesIO
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from starlette.concurrency import run_in_threadpool

from gateway.storage import qido
from gateway.web.app import Deps, get_deps
from gateway.web.auth import Identity, require_scope
from gateway.web.common import StoredHeader, base_url, check_uid_param, header_json, read_header
from gateway.web.dicomjson import DICOM_JSON
from gateway.web.negotiate import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    Choice,
    NotAcceptable,
    choose_frames,
    choose_instance,
    parse_accept,
)
from gateway.web.zerocopy import EXTENSION

log = logging.getLogger("gateway.wado")
router = APIRouter(tags=["DICOMweb"])
#: WADO-RS instance bodies go out in buffers of this size; with one read ahead, a request holds
#: at most two of them.
BATCH = 1024 * 1024


def _boundary() -> str:
    return "gw" + secrets.token_hex(16)


def relabel_head(header: StoredHeader, target: str) -> bytes:
    """Preamble, file meta and data set before Pixel Data, encoded in ``target`` (IVR/EVR LE), plus the
    Pixel Data element's own header: the pixel bytes that follow are the stored ones."""
    ds = header.dataset
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = target
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    body_ds = ds.copy()
    body_ds.file_meta = meta
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = target == IMPLICIT_LE
    write_dataset(fp, body_ds)
    out.write(fp.getvalue())
    if header.pixel_tag is not None:
        tag = header.pixel_tag.to_bytes(4, "big")
        tag_le = tag[0:2][::-1] + tag[2:4][::-1]
        length = (header.pixel_length or 0).to_bytes(4, "little")
        if target == IMPLICIT_LE:
            out.write(tag_le + length)
        else:
            vr = header.pixel_vr or ("OB" if int(ds.get("BitsAllocated", 16) or 16) <= 8 else "OW")
            out.write(tag_le + vr.encode() + b"\0\0" + length)
    return out.getvalue()


def _instance_pieces(path: str, choice: Choice, size: int) -> list:
    """What one instance's part body is made of: file ranges, and for a relabelled one its new head."""
    if choice.as_stored:
        return [(path, 0, size)]

    def head_and_pixels() -> list:
        header = read_header(path)
        pieces: list = [relabel_head(header, choice.transfer_syntax)]
        if header.pixel_tag is not None:
            pieces.append((path, header.pixel_value_offset, header.pixel_length))
        return pieces

    return [head_and_pixels]


def _chunks(pieces: list) -> Iterator[memoryview]:
    """Bytes, callables returning more pieces, and (path, start, length) file ranges, as buffers of
    about BATCH bytes: many small instances go out in one write, a large one in several."""
    buf, pos = bytearray(BATCH), 0
    stack = list(reversed(pieces))
    while stack:
        piece = stack.pop()
        if callable(piece):
            stack.extend(reversed(piece()))
            continue
        if isinstance(piece, (bytes, bytearray)):
            if pos + len(piece) > len(buf):
                buf.extend(bytes(pos + len(piece) - len(buf)))
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        else:
            path, start, length = piece
            with open(path, "rb") as f:
                f.seek(start)
                left = length if length is not None else os.fstat(f.fileno()).st_size - start
                while left > 0:
                    if pos == len(buf):
                        yield memoryview(buf)
                        buf, pos = bytearray(BATCH), 0
                    n = f.readinto(memoryview(buf)[pos:pos + min(left, len(buf) - pos)])
                    if not n:
                        raise OSError(f"{os.path.basename(path)} is shorter than its index says")
                    pos += n
                    left -= n
        if pos >= len(buf):
            yield memoryview(buf)[:pos]
            buf, pos = bytearray(BATCH), 0
    if pos:
        yield memoryview(buf)[:pos]


async def _prefetched(chunks: Iterator[memoryview]) -> AsyncIterator[memoryview]:
    """Read the next buffer in a worker thread while the current one is being sent."""
    loop = asyncio.get_running_loop()
    done = object()
    pending = loop.run_in_executor(None, next, chunks, done)
    while True:
        chunk = await pending
        if chunk is done:
            return
        pending = loop.run_in_executor(None, next, chunks, done)
        yield chunk


class PiecesResponse(StreamingResponse):
    """A body of bytes and (path, start, length) file ranges (and callables making more pieces).

    When the server offers ``gateway.response.pieces`` (web/zerocopy.py) and every piece is
    known, the file ranges go to the socket by ``sendfile`` (no copy through Python, no
    buffers); otherwise they are read into buffers of BATCH bytes, one read ahead in a worker.
    """

    def __init__(self, pieces: list, headers: dict[str, str], media_type: str):
        super().__init__(_prefetched(_chunks(pieces)), headers=headers, media_type=media_type)
        self.pieces = pieces

    async def __call__(self, scope, receive, send) -> None:
        if EXTENSION not in scope.get("extensions", {}) or any(callable(p) for p in self.pieces):
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pieces = [] if scope.get("method") == "HEAD" else self.pieces
        await send({"type": EXTENSION, "pieces": pieces, "more_body": False})


def _rows_and_files(deps: Deps, study: str, series: str | None, instance: str | None) -> tuple[list, list, list]:
    """The index rows, their files' paths, and the SOP Instance UIDs whose file is missing."""
    rows = _rows(deps, study, series, instance)
    folder = str(deps.data_dir)
    paths = [os.path.join(folder, row["path"]) for row in rows]
    missing = [row["sop_instance_uid"] for row, path in zip(rows, paths) if not os.path.isfile(path)]
    return rows, paths, missing


def _rows(deps: Deps, study: str, series: str | None, instance: str | None) -> list:
    with deps.reader() as conn:
        return qido.instances_of(conn, study, series, instance)


def _what(study: str, series: str | None, instance: str | None) -> str:
    if instance:
        return f"instance {instance}"
    return f"series {series}" if series else f"study {study}"


async def _retrieve(request: Request, deps: Deps, study: str, series: str | None = None,
                    instance: str | None = None) -> StreamingResponse:
    check_uid_param(study, "Study Instance UID")
    for value, what in ((series, "Series Instance UID"), (instance, "SOP Instance UID")):
        if value is not None:
            check_uid_param(value, what)
    rows, paths, missing = await run_in_threadpool(_rows_and_files, deps, study, series, instance)
    if not rows:
        raise HTTPException(404, f"no {_what(study, series, instance)} is stored here")
    ranges = parse_accept(request.headers.get("accept"))
    plan = []
    try:
        for row in rows:
            plan.append((row, choose_instance(ranges, row["transfer_syntax"], single=len(rows) == 1)))
    except NotAcceptable as exc:
        raise HTTPException(406, str(exc)) from None
    if missing:
        raise HTTPException(404, f"the file of instance {missing[0]} is missing from the store; "
                                 "check the data folder")
    if not plan[0][1].multipart:
        row, choice = plan[0]
        path = paths[0]
        headers = {"Content-Length": str(row["size"])} if choice.as_stored else {}
        return PiecesResponse(_instance_pieces(path, choice, row["size"]), headers,
                              f"application/dicom; transfer-syntax={choice.transfer_syntax}")
    boundary = _boundary()
    base = base_url(request, deps)
    heads = []
    for row, choice in plan:
        url = (f"{base}/dicom-web/studies/{row['study_uid']}/series/{row['series_uid']}"
               f"/instances/{row['sop_instance_uid']}")
        heads.append((f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax="
                      f"{choice.transfer_syntax}\r\nContent-Location: {url}\r\n\r\n").encode())
    tail = f"--{boundary}--\r\n".encode()
    headers = {}
    if all(c.as_stored for _, c in plan):
        total = sum(len(h) + row["size"] + 2 for h, (row, _) in zip(heads, plan)) + len(tail)
        headers["Content-Length"] = str(total)

    pieces: list = []
    end = b""  # the previous part's CRLF goes out with the next head: one write between files
    for head, (row, choice), path in zip(heads, plan, paths):
        pieces += [end + head, *_instance_pieces(path, choice, row["size"])]
        end = b"\r\n"
    pieces.append(end + tail)

    return PiecesResponse(pieces, headers, f'multipart/related; type="application/dicom"; boundary={boundary}')


# --------------------------------------------------------------------------- metadata and bulk data


def _bulk_prefix(base: str, row) -> str:
    return (f"{base}/dicom-web/studies/{row['study_uid']}/series/{row['series_uid']}"
            f"/instances/{row['sop_instance_uid']}/bulk/")


async def _metadata(request: Request, deps: Deps, study: str, series: str | None = None,
                    instance: str | None = None) -> StreamingResponse:
    check_uid_param(study, "Study Instance UID")
    for value, what in ((series, "Series Instance UID"), (instance, "SOP Instance UID")):
        if value is not None:
            check_uid_param(value, what)
    accept = request.headers.get("accept")
    if accept and not any(t in accept.lower() for t in (DICOM_JSON, "application/json", "*/*", "application/*")):
        raise HTTPException(406, f"metadata is sent as {DICOM_JSON}; the Accept header asks for {accept!r:.100}")
    rows = await run_in_threadpool(_rows, deps, study, series, instance)
    if not rows:
        raise HTTPException(404, f"no {_what(study, series, instance)} is stored here")
    base = base_url(request, deps)
    data_dir = deps.data_dir

    def body() -> Iterator[bytes]:
        yield b"["
        for i, row in enumerate(rows):
            prefix = _bulk_prefix(base, row)
            try:
                header = read_header(data_dir / row["path"])
                item = header_json(header, lambda tagpath: prefix + tagpath)
            except (OSError, ValueError) as exc:
                log.warning("metadata of %s: %s", row["sop_instance_uid"], exc)
                continue
            yield (b"," if i else b"") + json.dumps(item, separators=(",", ":")).encode()
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


def _one_row(deps: Deps, study: str, series: str, instance: str):
    for value, what in ((study, "Study Instance UID"), (series, "Series Instance UID"),
                        (instance, "SOP Instance UID")):
        check_uid_param(value, what)
    rows = _rows(deps, study, series, instance)
    if not rows:
        raise HTTPException(404, f"no instance {instance} is stored in series {series} of study {study}")
    return rows[0]


def _octet_parts(request: Request, parts: list[tuple[str, list, int | None]], media: str,
                 transfer_syntax: str | None, multipart: bool) -> PiecesResponse:
    """Frames or bulk data: ``parts`` are (Content-Location, pieces, size or None when unknown)."""
    if not multipart:
        _, pieces, size = parts[0]
        return PiecesResponse(pieces, {"Content-Length": str(size)} if size is not None else {}, media)
    boundary = _boundary()
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    body: list = []
    end = b""
    for location, pieces, size in parts:
        body.append(end + (f"--{boundary}\r\nContent-Type: {media}{ts}\r\nContent-Location: {location}\r\n"
                           + (f"Content-Length: {size}\r\n" if size is not None else "") + "\r\n").encode())
        body += pieces
        end = b"\r\n"
    body.append(end + f"--{boundary}--\r\n".encode())
    headers = {}
    if all(size is not None for _, _, size in parts):
        total = sum(len(p) if isinstance(p, bytes) else p[2] for p in body)
        headers["Content-Length"] = str(total)
    return PiecesResponse(body, headers, f'multipart/related; type="{media}"; boundary={boundary}')


def _wants_multipart(request: Request, media: str) -> bool:
    ranges = parse_accept(request.headers.get("accept"))
    for r in ranges:
        if r.type in ("multipart/related", "*/*", "multipart/*"):
            return True
        if r.type in (media, "application/octet-stream", media.split("/")[0] + "/*"):
            return False
    raise HTTPException(406, f"this resource is {media} (multipart/related or bare); the Accept header asks "
                             f"for {request.headers.get('accept')!r:.100}")


@router.get("/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulk/{tagpath:path}",
            summary="WADO-RS: bulk data behind a BulkDataURI")
async def bulk(study: str, series: str, instance: str, tagpath: str, request: Request,
               identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    row = await run_in_threadpool(_one_row, deps, study, series, instance)
    path = deps.data_dir / row["path"]
    header = await run_in_threadpool(read_header, path)
    steps = tagpath.strip("/").split("/")
    if any(not s for s in steps) or len(steps) % 2 == 0:
        raise HTTPException(400, f"the bulk data path {tagpath!r:.100} is not TAG[/INDEX/TAG...]")
    location = str(request.url)
    if len(steps) == 1 and header.pixel_tag is not None and steps[0].upper() == f"{header.pixel_tag:08X}":
        if header.encapsulated:
            return await frames(study, series, instance, "all", request, identity, deps)
        multipart = _wants_multipart(request, "application/octet-stream")
        return _octet_parts(request, [(location, [(path, header.pixel_value_offset, header.pixel_length)],
                                       header.pixel_length)], "application/octet-stream", None, multipart)
    ds = header.dataset
    try:
        for i in range(0, len(steps) - 1, 2):
            ds = ds[int(steps[i], 16)].value[int(steps[i + 1])]
        value = ds[int(steps[-1], 16)].value
    except (KeyError, IndexError, ValueError, TypeError):
        raise HTTPException(404, f"instance {instance} has no bulk data at {tagpath!r:.100}") from None
    if not isinstance(value, (bytes, bytearray)):
        raise HTTPException(404, f"the element at {tagpath!r:.100} is not bulk data")
    multipart = _wants_multipart(request, "application/octet-stream")
    return _octet_parts(request, [(location, [bytes(value)], len(value))], "application/octet-stream",
                        None, multipart)


def _frame_numbers(text: str, count: int) -> list[int]:
    if text == "all":
        return list(range(1, count + 1))
    try:
        numbers = [int(x) for x in text.split(",")]
    except ValueError:
        raise HTTPException(400, f"frame list {text!r:.60} must be comma-separated numbers from 1") from None
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise HTTPException(404, f"frame {bad[0]} does not exist: the instance has {count} frame(s)")
    if len(numbers) > 10000:
        raise HTTPException(400, "ask for at most 10000 frames per request")
    return numbers


@router.get("/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{framelist}",
            summary="WADO-RS: frames (uncompressed as application/octet-stream, compressed as stored)")
async def frames(study: str, series: str, instance: str, framelist: str, request: Request,
                 identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    row = await run_in_threadpool(_one_row, deps, study, series, instance)
    path = deps.data_dir / row["path"]
    header = await run_in_threadpool(read_header, path)
    if header.pixel_tag is None:
        raise HTTPException(404, f"instance {instance} has no pixel data")
    ds = header.dataset
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        count = 1
    numbers = _frame_numbers(framelist, count)
    try:
        choice = choose_frames(parse_accept(request.headers.get("accept")), str(header.transfer_syntax))
    except NotAcceptable as exc:
        raise HTTPException(406, str(exc)) from None
    base = str(request.url).split("/frames/")[0] + "/frames/"
    parts = []
    if not header.encapsulated:
        bits = int(ds.get("BitsAllocated", 0) or 0)
        if bits % 8 or not bits:
            raise HTTPException(406, f"frames with BitsAllocated {bits} are not cut out; retrieve the instance")
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
        if size * count > (header.pixel_length or 0):
            raise HTTPException(500, f"instance {instance}: its pixel data is shorter than its frames")
        for n in numbers:
            parts.append((f"{base}{n}", [(path, header.pixel_value_offset + (n - 1) * size, size)], size))
    else:
        for n in numbers:
            parts.append((f"{base}{n}", [_encapsulated_frame(path, header, n - 1, count)], None))
    return _octet_parts(request, parts, choice.media_type, choice.transfer_syntax, choice.multipart or len(parts) > 1)


def _encapsulated_frame(path: Path, header: StoredHeader, index: int, count: int) -> Callable[[], list]:
    """A piece that reads one compressed frame when the body is written (in a worker thread)."""

    def read() -> list:
        from pydicom.encaps import get_frame

        with open(path, "rb") as f:
            f.seek(header.pixel_value_offset)
            return [get_frame(f, index, number_of_frames=count)]

    return read


# --------------------------------------------------------------------------- routes


@router.get("/dicom-web/studies/{study}", summary="WADO-RS: a study")
async def retrieve_study(study: str, request: Request, identity: Identity = Depends(require_scope("read")),
                         deps: Deps = Depends(get_deps)):
    return await _retrieve(request, deps, study)


@router.get("/dicom-web/studies/{study}/series/{series}", summary="WADO-RS: a series")
async def retrieve_series(study: str, series: str, request: Request,
                          identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    return await _retrieve(request, deps, study, series)


@router.get("/dicom-web/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: an instance")
async def retrieve_instance(study: str, series: str, instance: str, request: Request,
                            identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    return await _retrieve(request, deps, study, series, instance)


@router.get("/dicom-web/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
async def study_metadata(study: str, request: Request, identity: Identity = Depends(require_scope("read")),
                         deps: Deps = Depends(get_deps)):
    return await _metadata(request, deps, study)


@router.get("/dicom-web/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
async def series_metadata(study: str, series: str, request: Request,
                          identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    return await _metadata(request, deps, study, series)


@router.get("/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata",
            summary="WADO-RS: metadata of an instance")
async def instance_metadata(study: str, series: str, instance: str, request: Request,
                            identity: Identity = Depends(require_scope("read")), deps: Deps = Depends(get_deps)):
    return await _metadata(request, deps, study, series, instance)


