"""STOW-RS, the pure part: requests planned by size, multipart bodies streamed from disk, and
the server's answer turned into one verdict per instance (PS3.18 10.5).

No sockets here: the DICOMweb transport sends what ``MultipartBody`` yields and hands the
status, headers and body back to ``decide``. The stored Part 10 files go out as they are
(file meta included, never decoded), read in chunks, so a request's memory does not grow
with its size.
"""

from __future__ import annotations

import email.utils
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.forward.outcome import Outcome, Verdict

#: How much of a stored file one read takes; bounds what a request holds in memory.
CHUNK_BYTES = 1024 * 1024
#: The longest response body we read; a STOW-RS answer lists UIDs, not images.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: How much of a server's error text goes into a queue item's reason.
MAX_WORDS = 300
#: Retry-After values are honoured up to this many seconds (a day).
MAX_RETRY_AFTER = 86400.0

#: What STOW-RS responses we ask for: DICOM JSON, which PS3.18 origin servers support. One
#: value: Orthanc logs an error line for every request whose Accept lists several. An XML
#: answer is read all the same.
ACCEPT = "application/dicom+json"

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class Part:
    """One instance of a request: its queue id, SOP Instance UID and stored file."""

    item_id: int
    sop_instance_uid: str
    path: Path
    size: int


class Unparseable(ValueError):
    """The body is not a STOW-RS response we can read."""


# --------------------------------------------------------------------------- planning


def plan_requests(parts: Sequence[Part], max_bytes: int) -> list[list[Part]]:
    """Consecutive instances grouped up to ``max_bytes`` of file data; one larger instance goes alone."""
    requests: list[list[Part]] = []
    current: list[Part] = []
    size = 0
    for part in parts:
        if current and size + part.size > max_bytes:
            requests.append(current)
            current, size = [], 0
        current.append(part)
        size += part.size
    if current:
        requests.append(current)
    return requests


def split(parts: Sequence[Part]) -> list[list[Part]]:
    """Halves of a request the server found too large (413)."""
    half = len(parts) // 2
    return [list(parts[:half]), list(parts[half:])]


# --------------------------------------------------------------------------- the body


class FileChanged(OSError):
    """A stored file's size differs from the one the request announced."""


class MultipartBody:
    """``multipart/related; type="application/dicom"``: each stored file as one part.

    The length is known before the first byte is sent (part headers plus file sizes), for a
    server that wants a Content-Length rather than the chunked encoding sent by default.
    Iterate it once per send: each pass reopens the files.
    """

    def __init__(self, parts: Sequence[Part], boundary: str, chunk_bytes: int = CHUNK_BYTES):
        if not re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary):
            raise ValueError(f"invalid multipart boundary {boundary!r}")
        self.parts = list(parts)
        self.boundary = boundary
        self.chunk_bytes = chunk_bytes
        self._tail = f"\r\n--{boundary}--\r\n".encode("ascii")

    def _head(self, i: int) -> bytes:
        """Part ``i``'s delimiter and headers. Its Content-Length lets a streaming parser
        (Orthanc's) take the part whole instead of searching its bytes for the boundary."""
        delimiter = "--" if i == 0 else "\r\n--"
        return (f"{delimiter}{self.boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {self.parts[i].size}\r\n\r\n").encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        if not self.parts:
            return 0
        return len(self._tail) + sum(len(self._head(i)) + p.size for i, p in enumerate(self.parts))

    def __iter__(self) -> Iterator[bytes]:
        for i, part in enumerate(self.parts):
            yield self._head(i)
            sent = 0
            with open(part.path, "rb") as f:
                while True:
                    chunk = f.read(self.chunk_bytes)
                    if not chunk:
                        break
                    sent += len(chunk)
                    if sent > part.size:
                        break
                    yield chunk
            if sent != part.size:
                raise FileChanged(f"the stored file {part.path} changed size while being sent")
        if self.parts:
            yield self._tail


# --------------------------------------------------------------------------- the answer


def _text(body: bytes) -> str:
    """A server's words, on one line, cut short: for a reason stored in the queue."""
    text = body[: MAX_WORDS * 4].decode("utf-8", errors="replace")
    if "<" in text and ">" in text:
        text = re.sub(r"<[^>]*>", " ", text)  # an HTML error page: its text only
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= MAX_WORDS else text[: MAX_WORDS - 3] + "..."


def _json_value(element) -> list:
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return value if isinstance(value, list) else []


def _parse_json(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unparseable(f"invalid DICOM JSON ({exc})") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise Unparseable("the DICOM JSON is not a data set")

    def entries(tag: str, reason_tag: str) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for item in _json_value(data.get(tag)):
            uid = _json_value(item.get(_REFERENCED_SOP_INSTANCE_UID)) if isinstance(item, dict) else []
            if not uid or not isinstance(uid[0], str):
                raise Unparseable(f"an item of ({tag[:4]},{tag[4:]}) has no Referenced SOP Instance UID")
            code = _json_value(item.get(reason_tag))
            found[uid[0]] = _reason_code(code[0]) if code else None
        return found

    return entries(_REFERENCED_SOP_SEQUENCE, _WARNING_REASON), entries(_FAILED_SOP_SEQUENCE, _FAILURE_REASON)


def _parse_xml(body: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    if b"<!DOCTYPE" in body[:4096] or b"<!ENTITY" in body:
        raise Unparseable("XML with a DTD or entities is not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise Unparseable(f"invalid DICOM XML ({exc})") from None
    for element in root.iter():  # PS3.19's namespace, when a server sets it, is not needed here
        if isinstance(element.tag, str) and element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]

    def entries(tag: str, reason_tag: str) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for seq in root.findall(f"DicomAttribute[@tag='{tag}']"):
            for item in seq.findall("Item"):
                uid = item.findtext(f"DicomAttribute[@tag='{_REFERENCED_SOP_INSTANCE_UID}']/Value")
                if not uid:
                    raise Unparseable(f"an item of ({tag[:4]},{tag[4:]}) has no Referenced SOP Instance UID")
                code = item.findtext(f"DicomAttribute[@tag='{reason_tag}']/Value")
                found[uid.strip()] = _reason_code(code) if code else None
        return found

    return entries(_REFERENCED_SOP_SEQUENCE, _WARNING_REASON), entries(_FAILED_SOP_SEQUENCE, _FAILURE_REASON)


def _reason_code(value) -> int | None:
    """Failure/Warning Reason (US): an int in DICOM JSON, a decimal string in XML."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_store_response(body: bytes, content_type: str) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(referenced, failed): SOP Instance UID -> Warning/Failure Reason (None when absent).

    Raises ``Unparseable`` when the body is neither DICOM JSON nor DICOM XML.
    """
    media = content_type.split(";")[0].strip().lower()
    if not body.strip():
        raise Unparseable("the response has no body")
    if media.endswith("xml") or (not media.endswith("json") and body.lstrip()[:1] == b"<"):
        return _parse_xml(body)
    return _parse_json(body)


#: Failure Reasons (PS3.18 Table 10.5.3-3, PS3.4 C-STORE statuses) and whether a retry may help.
def describe_failure_reason(code: int | None) -> tuple[str, bool]:
    """(words, retry may help) for a Failure Reason."""
    if code is None:
        return "no Failure Reason given", True
    if 0xA700 <= code <= 0xA7FF:
        return f"Failure Reason 0x{code:04X} (refused: out of resources)", True
    if code == 0x0110:
        return "Failure Reason 0x0110 (processing failure)", True
    if 0xA900 <= code <= 0xA9FF:
        return f"Failure Reason 0x{code:04X} (data set does not match SOP class)", False
    if 0xC000 <= code <= 0xCFFF:
        words = "transfer syntax not supported" if code == 0xC122 else "cannot understand"
        return f"Failure Reason 0x{code:04X} ({words})", False
    if code == 0x0122:
        return "Failure Reason 0x0122 (SOP class not supported)", False
    if code == 0x0119:
        return "Failure Reason 0x0119 (class-instance conflict)", False
    if code == 0x0111:
        return "Failure Reason 0x0111 (duplicate SOP instance)", False
    if code == 0x0124:
        return "Failure Reason 0x0124 (not authorized)", False
    return f"Failure Reason 0x{code:04X}", False


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


def _all(uids: Sequence[str], outcome: Outcome) -> dict[str, Outcome]:
    return {uid: outcome for uid in uids}


def decide(
    uids: Sequence[str],
    status: int,
    phrase: str,
    content_type: str,
    body: bytes,
    retry_after: float | None = None,
    server: str = "the server",
) -> dict[str, Outcome]:
    """One outcome per SOP Instance UID sent, from the server's answer to a STOW-RS request.

    200/202/409 mark each instance by its own entry (Referenced: sent; Failed: retry or failed
    by its Failure Reason; in neither: retry). 401 asks for one credential refresh; 403, 404,
    415 and other 4xx fail for good with the server's words; 413 splits; 408, 429 and 5xx
    retry (with Retry-After). A body that cannot be read marks nothing sent.
    """
    words = _text(body)
    said = f"{server} answered HTTP {status} {phrase}".rstrip() + (f": {words}" if words else "")
    if status in (200, 202, 409):
        try:
            referenced, failed = parse_store_response(body, content_type)
        except Unparseable as exc:
            if status == 409:  # the server refused all; its words are the reason
                return _all(uids, Outcome(Verdict.FAILED, said))
            return _all(uids, Outcome(Verdict.RETRY, f"{server} answered HTTP {status} but its "
                                                   f"response cannot be read: {exc}"))
        result = {}
        for uid in uids:
            if uid in failed:
                why, retry = describe_failure_reason(failed[uid])
                reason = f"{server} refused it (HTTP {status}): {why}"
                result[uid] = Outcome(Verdict.RETRY if retry else Verdict.FAILED, reason)
            elif uid in referenced:
                code = referenced[uid]
                result[uid] = Outcome(Verdict.SENT, None if code is None else f"Warning Reason 0x{code:04X}")
            else:
                result[uid] = Outcome(Verdict.RETRY, f"{server} answered HTTP {status} without "
                                                    "mentioning this instance")
        return result
    if status == 401:
        return _all(uids, Outcome(Verdict.REAUTH, said))
    if status == 413:
        return _all(uids, Outcome(Verdict.SPLIT, said))
    if status in (408, 429) or 500 <= status <= 599:
        return _all(uids, Outcome(Verdict.RETRY, said, retry_after))
    if 200 <= status <= 299:
        return _all(uids, Outcome(Verdict.RETRY, f"{said} (not a STOW-RS answer; nothing marked sent)"))
    if 300 <= status <= 399:
        return _all(uids, Outcome(Verdict.FAILED, f"{said} (a redirect: set the destination's url to "
                                                  "where the server points)"))
    return _all(uids, Outcome(Verdict.FAILED, said))
