"""Streamed ``multipart/related`` bodies: each part spooled to its own temp file, memory bounded.

python-multipart's ``MultipartParser`` (the parser Starlette uses for forms) does the
byte-level work; this module adds what STOW-RS needs around it: the media type check, one
temp file per part on the store's filesystem, a size cap per part, and a clear verdict on
bodies that are malformed or end before their closing boundary. Memory held at any time:
one network chunk plus the parser's boundary look-behind and at most
``MAX_PART_HEADER_BYTES`` of part headers.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

MAX_PART_HEADER_BYTES = 8 * 1024
MAX_PART_HEADERS = 16
MAX_PARTS = 100_000
MAX_BOUNDARY = 200
SPOOL_PREFIX = "stow-"
_QUIET = logging.getLogger("gateway.web.multipart.parser")
_QUIET.setLevel(logging.CRITICAL)


class MalformedBody(ValueError):
    """The body is not a well-formed multipart body for its boundary (HTTP 400)."""


class UnsupportedMediaType(ValueError):
    """The request or a part has a media type we do not accept (HTTP 415)."""


def parse_media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> (main type, params), lower-cased keys."""
    msg = Message()
    msg["content-type"] = value or ""
    main = msg.get_content_type() if value else ""
    params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]}
    return main.lower(), params


def related_boundary(content_type: str | None, accepted_types: tuple[str, ...]) -> str:
    """The boundary of a ``multipart/related`` request whose ``type`` is one of ``accepted_types``."""
    main, params = parse_media_type(content_type)
    if main != "multipart/related":
        raise UnsupportedMediaType(
            f"the request's Content-Type is {content_type or 'missing'!s:.100}; send "
            f"multipart/related; type=\"{accepted_types[0]}\" with one Part 10 file per part")
    kind = params.get("type", accepted_types[0]).lower()
    if kind not in accepted_types:
        raise UnsupportedMediaType(
            f"multipart/related parts of type {kind!r:.80} are not accepted; send type=\"{accepted_types[0]}\" "
            "(Part 10 files)")
    boundary = params.get("boundary")
    if not boundary:
        raise MalformedBody("the Content-Type has no boundary parameter")
    # RFC 2046 says at most 70 characters; Orthanc's DICOMweb plugin sends 74, so allow some slack.
    if len(boundary) > MAX_BOUNDARY or not boundary.isascii() or not boundary.isprintable():
        raise MalformedBody(f"the boundary parameter is longer than {MAX_BOUNDARY} characters or not printable ASCII")
    return boundary


@dataclass
class Part:
    """One spooled part: its headers and file, or the reason it was not kept."""

    index: int
    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    size: int = 0
    problem: str | None = None  # set when the part was cut off (too large, disk full)
    out_of_resources: bool = False

    @property
    def content_type(self) -> str:
        return parse_media_type(self.headers.get("content-type"))[0]

    def discard(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None


class RelatedParser:
    """Feed body chunks with ``write``; ``finish`` returns the parts or raises ``MalformedBody``.

    Each part goes to ``spool_dir/stow-<random>.part`` as it streams; a part larger than
    ``max_part_bytes`` stops being written (its file is dropped, ``problem`` says why) while
    the rest of the body is still parsed. The caller owns the files (``discard_all``).
    """

    def __init__(self, boundary: str, spool_dir: Path, max_part_bytes: int,
                 on_part_done: Callable[[Part], None] | None = None):
        self.spool_dir = Path(spool_dir)
        self.on_part_done = on_part_done
        self.max_part_bytes = max_part_bytes
        self.parts: list[Part] = []
        self._current: Part | None = None
        self._file = None
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._ended = False
        self._error: str | None = None
        self._started = False
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            callbacks={
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_end": self._end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        self._parser.logger = _QUIET  # it logs each parse error as a warning; we raise one sentence

    # ------------------------------------------------------------------ callbacks

    def _part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise MalformedBody(f"the body has more than {MAX_PARTS} parts; send fewer per request")
        self._current = Part(index=len(self.parts))
        self.parts.append(self._current)
        self._header_bytes = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise MalformedBody(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._current.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = self._current
        part.path = self.spool_dir / f"{SPOOL_PREFIX}{secrets.token_hex(8)}.part"
        try:
            self._file = os.fdopen(os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        except OSError as exc:
            part.path = None
            self._fail_part(exc)

    def _fail_part(self, exc: OSError | None, problem: str | None = None) -> None:
        part = self._current
        if self._file is not None:
            self._file.close()
            self._file = None
        part.discard()
        if exc is not None:
            part.out_of_resources = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            part.problem = ("the gateway's disk is full; free space and send it again" if part.out_of_resources
                            else f"the part could not be spooled ({exc.strerror or exc})")
        else:
            part.out_of_resources = True
            part.problem = problem

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        part.size += end - start
        if self._file is None:
            return
        if part.size > self.max_part_bytes:
            self._fail_part(None, f"the instance is larger than storage.max_instance_bytes "
                                  f"({self.max_part_bytes} bytes)")
            return
        try:
            self._file.write(data[start:end])
        except OSError as exc:
            self._fail_part(exc)

    def _part_end(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._file = None
                self._fail_part(exc)
            self._file = None
        if self.on_part_done is not None and self._current.path is not None:
            self.on_part_done(self._current)
        self._current = None

    def _end(self) -> None:
        self._ended = True

    # ------------------------------------------------------------------ feeding

    def write(self, chunk: bytes) -> None:
        """Parse the next chunk of the body; raises ``MalformedBody`` at the first structural error."""
        if self._ended or not chunk:
            return
        if not self._started:
            self._started = True
        try:
            self._parser.write(chunk)
        except MalformedBody:
            raise
        except (MultipartParseError, ValueError) as exc:
            raise MalformedBody(f"the multipart body does not follow its boundary ({_first_line(exc)})") from None

    def finish(self) -> list[Part]:
        """The parts, once the closing boundary was seen; else ``MalformedBody`` (truncated body)."""
        if not self._ended:
            if self._file is not None:
                self._file.close()
                self._file = None
            if not self.parts:
                raise MalformedBody("the body holds no part for its boundary (wrong boundary, or empty)")
            raise MalformedBody("the body ends before its closing boundary (truncated); send it again whole")
        if not self.parts:
            raise MalformedBody("the body holds no parts")
        return self.parts

    def discard_all(self) -> None:
        """Remove every spool file still ours (after ingest moved the stored ones)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        for part in self.parts:
            part.discard()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def clean_spool(spool_dir: Path) -> None:
    """Parts left by a crash were never acknowledged: remove them at start."""
    for leftover in Path(spool_dir).glob(f"{SPOOL_PREFIX}*.part"):
        try:
            os.unlink(leftover)
        except OSError:
            pass
