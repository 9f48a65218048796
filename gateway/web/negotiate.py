"""WADO-RS content negotiation (pure): which transfer syntax and media type each stored instance is served in.

The stored bytes go out as they are whenever the client accepts the stored transfer
syntax (or ``transfer-syntax=*``). Uncompressed little endian data may be re-labelled
between Implicit and Explicit VR Little Endian (element headers re-encoded, values
copied). Anything else (decompressing, compressing, big endian) is refused with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.web.multipart import parse_media_type

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
UNCOMPRESSED_LE = (EXPLICIT_LE, IMPLICIT_LE)

#: PS3.18 Table 8.7.3-2..5: media types of compressed frames by transfer syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotAcceptable(ValueError):
    """Nothing the client accepts can be served (HTTP 406 with this sentence)."""


@dataclass(frozen=True)
class MediaRange:
    type: str  # e.g. multipart/related, application/dicom, */*
    part_type: str | None  # the multipart ``type`` parameter
    transfer_syntax: str | None  # the ``transfer-syntax`` parameter (``*`` allowed)
    q: float = 1.0


def parse_accept(accept: str | None) -> list[MediaRange]:
    """An Accept header as media ranges, best first (absent: anything)."""
    if not accept or not accept.strip():
        return [MediaRange("*/*", None, None)]
    ranges = []
    for raw in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', accept):
        raw = raw.strip()
        if not raw:
            continue
        main, params = parse_media_type(raw)
        if not main:
            main = raw.split(";")[0].strip().lower()
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        part = params.get("type")
        ranges.append(MediaRange(main, part.lower() if part else None, params.get("transfer-syntax"), q))
    ranges.sort(key=lambda r: -r.q)
    return [r for r in ranges if r.q > 0] or [MediaRange("*/*", None, None)]


@dataclass(frozen=True)
class Choice:
    transfer_syntax: str  # what the client gets
    as_stored: bool  # the stored bytes unchanged
    multipart: bool  # multipart/related (else one bare application/dicom body)


def _instance_ranges(ranges: list[MediaRange]) -> list[tuple[MediaRange, bool]]:
    """The ranges that can mean a Part 10 instance, with whether each is multipart."""
    out = []
    for r in ranges:
        if r.type == "multipart/related" and r.part_type in (None, "application/dicom", "*/*", "*"):
            out.append((r, True))
        elif r.type in ("*/*", "multipart/*"):
            out.append((r, True))
        elif r.type == "application/dicom":
            out.append((r, False))
    return out


def choose_instance(ranges: list[MediaRange], stored_ts: str, single: bool) -> Choice:
    """How to send one stored instance, or ``NotAcceptable`` with what would work."""
    usable = _instance_ranges(ranges)
    if not usable:
        asked = ", ".join(f"{r.type}" + (f"; type={r.part_type}" if r.part_type else "") for r in ranges)
        raise NotAcceptable(f"WADO-RS sends multipart/related; type=\"application/dicom\"; the Accept header "
                            f"asks for {asked[:200]}")
    if not single and not any(multipart for _, multipart in usable):
        raise NotAcceptable("a bare application/dicom body holds one instance; ask for a study or series with "
                            "Accept: multipart/related; type=\"application/dicom\"")
    for r, multipart in usable:
        if multipart is False and not single:
            continue
        wanted = r.transfer_syntax
        if wanted is None:
            # PS3.18 8.7.3.5.2: no parameter means Explicit VR Little Endian, except for */* .
            wanted = "*" if r.type in ("*/*", "multipart/*") else EXPLICIT_LE
        if wanted == "*" or wanted == stored_ts:
            return Choice(stored_ts, True, multipart)
        if wanted in UNCOMPRESSED_LE and stored_ts in UNCOMPRESSED_LE:
            return Choice(wanted, False, multipart)
    asked = sorted({r.transfer_syntax or EXPLICIT_LE for r, _ in usable})
    raise NotAcceptable(
        f"an instance is stored as {stored_ts} and the gateway sends stored bytes without decompressing or "
        f"compressing; the request asks for {', '.join(asked)}; ask with transfer-syntax=* or "
        f"transfer-syntax={stored_ts}")


@dataclass(frozen=True)
class FrameChoice:
    media_type: str  # part Content-Type
    transfer_syntax: str
    multipart: bool


def choose_frames(ranges: list[MediaRange], stored_ts: str) -> FrameChoice:
    """The media type of frames cut from a stored instance, or ``NotAcceptable``."""
    native = stored_ts in UNCOMPRESSED_LE or stored_ts == EXPLICIT_BE
    media = "application/octet-stream" if native else FRAME_MEDIA_TYPES.get(stored_ts)
    if media is None:
        raise NotAcceptable(f"frames of an instance stored as {stored_ts} cannot be served; retrieve the "
                            "instance instead")
    if stored_ts == EXPLICIT_BE:
        raise NotAcceptable("frames of big endian instances are not served; retrieve the instance instead")
    for r in ranges:
        multipart = r.type in ("multipart/related", "*/*", "multipart/*")
        part = r.part_type if r.type == "multipart/related" else (None if multipart else r.type)
        if part in (None, "*", "*/*", media, media.split("/")[0] + "/*"):
            wanted = r.transfer_syntax
            if wanted in (None, "*", stored_ts) or (native and wanted in UNCOMPRESSED_LE):
                ts = stored_ts if wanted in (None, "*") else wanted
                return FrameChoice(media, ts, multipart)
    raise NotAcceptable(f"frames of this instance are {media} (transfer syntax {stored_ts}); ask with "
                        f"Accept: multipart/related; type=\"{media}\"")
