"""The one Part 10 header reader: file meta, the identifying UIDs and the elements before Pixel Data.

Every way in (receive, ``send``, derived objects, STOW-RS) and every reader of stored files
(forward, offline encode, the inbox's source series) reads headers here, within a budget:
at most ``HEADER_BUDGET`` bytes of data set are ever held, whatever the file's size or what
its element lengths claim, and a deflated data set is inflated only up to that budget.

Fast path: receive hands over the first ``HEAD_BYTES`` of its spool file, already in memory;
the UIDs are read from those bytes by a small walker (no pydicom parse: a pydicom Dataset
costs as much as the rest of a small C-STORE). ``Header.dataset`` (every top-level element
before Pixel Data, as a pydicom Dataset) is parsed by pydicom only when someone asks for it
(routing rules, QIDO), from the same bounded bytes. Files that are not little endian, or
whose UIDs lie beyond the head, are read from disk up to the budget.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway.errors import UnreadableHeader

#: Bytes of a spool file receive keeps in memory for this reader (the head of the file).
HEAD_BYTES = 64 * 1024
#: Most bytes of data set (after the file meta) read for one header; what lies beyond is
#: not part of the header. Every attribute routing and QIDO use is far inside.
HEADER_BUDGET = 1024 * 1024
#: Most elements and sequence items (nested ones included) of one header that pydicom parses
#: (``Header.dataset``); a CT or MR header holds a few hundred.
HEADER_ELEMENT_BUDGET = 10_000
#: Largest File Meta Information group accepted (it holds a few UIDs).
MAX_META_BYTES = 64 * 1024

#: The transfer syntaxes with native (uncompressed) pixel data, preferred first: pydicom
#: converts between them without a codec. (Deflated Explicit VR Little Endian is native too,
#: once inflated.)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)

PIXEL_DATA_TAG = 0x7FE00010
#: Float Pixel Data, Double Float Pixel Data and Pixel Data: where a header ends.
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, PIXEL_DATA_TAG)
UID_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_UID_TAG_SET = frozenset(UID_TAGS)
#: The keywords of the UIDs every header carries (``Header.uids``).
UID_KEYWORDS = tuple(UID_TAGS.values())
_META_TAGS = {
    0x00020002: "MediaStorageSOPClassUID",
    0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _NeedMore(Exception):
    """The bytes at hand end before what is wanted: read more of the file (or give up)."""


class _Odd(Exception):
    """A structure the walker leaves to pydicom (an undefined-length element that is no sequence)."""


# --------------------------------------------------------------------------- the walker


#: (group, element, VR, 2-byte length) and (group, element, 4-byte length), by byte order;
#: ``unpack_from`` reads them without slicing the buffer (this walk runs for every instance).
_EXPLICIT = {True: struct.Struct("<HH2sH"), False: struct.Struct(">HH2sH")}
_IMPLICIT = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}
_LONG_LENGTH = {True: struct.Struct("<I"), False: struct.Struct(">I")}


def _element_at(buf: bytes, pos: int, explicit: bool, little: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR, value length, header length) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _NeedMore
    if explicit:
        group, element, vr, length = _EXPLICIT[little].unpack_from(buf, pos)
        if group != 0xFFFE:
            if vr in _LONG_VRS:
                if pos + 12 > len(buf):
                    raise _NeedMore
                return (group << 16) | element, vr, _LONG_LENGTH[little].unpack_from(buf, pos + 8)[0], 12
            return (group << 16) | element, vr, length, 8
    group, element, length = _IMPLICIT[little].unpack_from(buf, pos)
    return (group << 16) | element, None, length, 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool, little: bool, count: list[int] | None = None) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``.

    ``count``: a one-element counter of items and elements walked; past ``HEADER_ELEMENT_BUDGET``
    the walk raises ``_NeedMore`` (the caller stops before this sequence).
    """
    while True:
        tag, _, length, _ = _element_at(buf, pos, explicit, little)
        pos += 8
        if count is not None:
            count[0] += 1
            if count[0] > HEADER_ELEMENT_BUDGET:
                raise _NeedMore
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Odd
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, up to the item delimiter
            tag, vr, length, header = _element_at(buf, pos, explicit, little)
            if tag == _ITEM_END:
                pos += 8
                break
            pos += header
            if count is not None:
                count[0] += 1
            if length == _UNDEFINED:
                if explicit and vr not in (b"SQ", b"UN"):
                    raise _Odd
                pos = _skip_sequence(buf, pos, explicit, little, count)
            else:
                pos += length


def _uids_from(raw: dict[int, tuple[bytes | None, bytes]]) -> dict[str, str | None]:
    return {keyword: (_text(raw[tag][1]) if tag in raw else None) for tag, keyword in UID_TAGS.items()}


def _raw_values(buf: bytes, explicit: bool, little: bool, whole: bool,
                wanted: frozenset[int]) -> dict[int, tuple[bytes | None, bytes]]:
    """(VR or None when implicit, raw value) of the ``wanted`` top-level tags in the data set
    bytes ``buf``, walking no further than the largest of them (or Pixel Data)."""
    return _Walk(buf, explicit, little, whole).values(wanted)


class _Walk:
    """One walk over the top-level elements of the data set bytes ``buf``, resumed where the last
    request stopped: the UIDs, the search index's values and the audit's Patient ID of one
    received instance cost one pass, not three. Remembers where each element's value lies. Like
    the Header's cached properties, one thread at a time (ingest hands a header on, never shares it)."""

    def __init__(self, buf: bytes, explicit: bool, little: bool, whole: bool):
        self.buf, self.explicit, self.little, self.whole = buf, explicit, little, whole
        self._pos = self._count = 0  # the next element to read; elements and items walked
        self._passed = -1  # the largest tag walked past
        self._next_tag: int | None = None  # the tag at _pos, when read and not walked past
        self._ended = False  # the end of the data set, Pixel Data or the element budget
        self._seen: dict[int, tuple[bytes | None, int, int]] = {}  # tag -> (VR, value start, length)

    def values(self, wanted: frozenset[int]) -> dict[int, tuple[bytes | None, bytes]]:
        """Raises ``_NeedMore`` (``buf`` ends before them) or ``_Odd`` (pydicom must read it)."""
        last = min(max(wanted), PIXEL_DATA_TAG - 1)
        buf = self.buf
        if not self._ended and last > self._passed and (self._next_tag is None or self._next_tag <= last):
            self._walk_to(last)
        found: dict[int, tuple[bytes | None, bytes]] = {}
        for tag in wanted:
            at = self._seen.get(tag)
            if at is not None:
                vr, start, length = at
                if start + length > len(buf):
                    raise _NeedMore
                found[tag] = (vr, bytes(buf[start:start + length]))
        return found

    def _walk_to(self, last: int) -> None:
        buf, explicit, little, seen = self.buf, self.explicit, self.little, self._seen
        while True:
            pos = self._pos
            if pos >= len(buf):
                if not self.whole:
                    raise _NeedMore
                self._ended = True
                return
            tag, vr, length, header = _element_at(buf, pos, explicit, little)
            if tag > last:
                self._next_tag = tag
                return
            self._count += 1
            if self._count > HEADER_ELEMENT_BUDGET:
                self._ended = True  # what lies past the budget is not part of the header
                return
            if length == _UNDEFINED:
                if explicit and vr not in (b"SQ", b"UN"):
                    raise _Odd
                self._pos = _skip_sequence(buf, pos + header, explicit, little)
            else:
                seen[tag] = (vr, pos + header, length)
                self._pos = pos + header + length
            self._passed = max(self._passed, tag)
            self._next_tag = None


def _complete_prefix(buf: bytes, explicit: bool, little: bool) -> int:
    """Length of the run of whole top-level elements at the start of ``buf``, up to Pixel Data.

    At most ``HEADER_ELEMENT_BUDGET`` elements and sequence items (nested ones included):
    pydicom builds an object for each, about a millisecond and a few hundred bytes apiece, so
    a data set of nothing but empty items would otherwise cost a minute of CPU and a hundred
    MB per header. What lies past the budget is not part of the header.
    """
    pos = 0
    count = [0]
    while pos < len(buf):
        try:
            tag, vr, length, header = _element_at(buf, pos, explicit, little)
            if tag >= PIXEL_TAGS[0]:
                return pos
            count[0] += 1
            if count[0] > HEADER_ELEMENT_BUDGET:
                return pos
            if length == _UNDEFINED:
                if explicit and vr not in (b"SQ", b"UN"):
                    return pos
                end = _skip_sequence(buf, pos + header, explicit, little, count)
            else:
                end = pos + header + length
        except (_NeedMore, _Odd):
            return pos
        if end > len(buf):
            return pos
        pos = end
    return pos


def _text(raw: bytes) -> str:
    return bytes(raw).decode("latin-1").rstrip("\x00 ")


def _read_meta(buf: bytes) -> tuple[dict[str, str], int]:
    """The file meta group's UIDs and where the data set starts (explicit VR little endian)."""
    if len(buf) < 132:
        raise _NeedMore
    if buf[128:132] != b"DICM":
        raise UnreadableHeader("not a DICOM Part 10 file (no 'DICM' header)")
    meta: dict[str, str] = {}
    pos = 132
    end = None
    while end is None or pos < end:
        if pos > MAX_META_BYTES:
            raise UnreadableHeader(f"its file meta group is longer than {MAX_META_BYTES} bytes")
        if pos + 8 > len(buf):
            raise _NeedMore
        group = int.from_bytes(buf[pos:pos + 2], "little")
        if group != 0x0002:
            break
        tag, _vr, length, header = _element_at(buf, pos, True, True)
        if length == _UNDEFINED:
            raise UnreadableHeader("its file meta group has an element of undefined length")
        value = pos + header
        if value + length > len(buf):
            raise _NeedMore
        if tag == 0x00020000 and length == 4:
            end = value + 4 + int.from_bytes(buf[value:value + 4], "little")
        elif tag in _META_TAGS:
            meta[_META_TAGS[tag]] = _text(buf[value:value + length])
        pos = value + length
    return meta, pos if end is None else end


# --------------------------------------------------------------------------- the header


_CHARSET_TAG, _PATIENT_ID_TAG = 0x00080005, 0x00100020
_PATIENT_TAGS = frozenset([_CHARSET_TAG, _PATIENT_ID_TAG])
#: Character sets whose text the walker's readers (``Header.patient_id``, the QIDO index)
#: decode themselves; any other goes through pydicom.
TEXT_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


@dataclass(frozen=True)
class Header:
    """What one Part 10 file says about itself, read within ``HEADER_BUDGET``."""

    transfer_syntax: str
    dataset_offset: int  # where the data set starts in the file (after preamble and file meta)
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    uids: dict[str, str | None]  # UID_KEYWORDS -> value as read (None when absent)
    data: bytes = field(repr=False, default=b"")  # the data set's first bytes (inflated if deflated)
    whole: bool = field(repr=False, default=True)  # ``data`` is the whole data set
    path: Path | None = field(repr=False, default=None)  # where the file is, to read past a short head
    walk: _Walk | None = field(repr=False, compare=False, default=None)  # over ``data``, shared by every reader

    @property
    def sop_class_uid(self) -> str | None:
        return self.uids["SOPClassUID"]

    @property
    def sop_instance_uid(self) -> str | None:
        return self.uids["SOPInstanceUID"]

    @property
    def study_uid(self) -> str | None:
        return self.uids["StudyInstanceUID"]

    @property
    def series_uid(self) -> str | None:
        return self.uids["SeriesInstanceUID"]

    def raw_values(self, tags: frozenset[int]) -> dict[int, tuple[bytes | None, bytes]] | None:
        """(VR, raw bytes) of the top-level ``tags`` present, read by the walker without pydicom
        (a pydicom Dataset of a CT header costs a millisecond per instance); ``None`` when the
        structure is one the walker leaves to pydicom: then use ``dataset``."""
        explicit, little = _syntax_flags(self.transfer_syntax)
        data, whole = self.data, self.whole
        walk = self.walk if self.walk is not None else _Walk(data, explicit, little, whole)
        for _ in range(2):
            try:
                return walk.values(tags)
            except _Odd:
                return None
            except _NeedMore:
                if whole or len(data) >= HEADER_BUDGET or self.path is None:
                    return _raw_values_cut(data, explicit, little, tags)
                with open(self.path, "rb") as f:  # a header longer than the head: up to the budget
                    f.seek(self.dataset_offset)
                    data = f.read(HEADER_BUDGET)
                whole = len(data) < HEADER_BUDGET
                walk = _Walk(data, explicit, little, whole)
        return None

    @property
    def patient_id(self) -> str | None:
        """Patient ID for the audit trail: the walker reads it from the head already in memory
        (two early elements, no pydicom Dataset); pydicom only for another character set or
        a structure the walker leaves to it."""
        raw = self.raw_values(_PATIENT_TAGS)
        if raw is not None:
            charset = raw.get(_CHARSET_TAG, (None, b""))[1].decode("latin-1").strip("\x00 ")
            codec = TEXT_CODECS.get(charset)
            if codec is not None:
                value = raw.get(_PATIENT_ID_TAG, (None, b""))[1].decode(codec, "replace").strip("\x00 ")
                return value or None
        value = self.dataset.get("PatientID")
        return (str(value).strip() or None) if value else None

    @cached_property
    def _budget(self) -> bytes:
        """The data set's first HEADER_BUDGET bytes: when the header came from a short head, the
        rest is read from ``path`` (``store.ingest`` keeps it pointing at the file)."""
        if not self.whole and len(self.data) < HEADER_BUDGET and self.path is not None:
            with open(self.path, "rb") as f:
                f.seek(self.dataset_offset)
                return f.read(HEADER_BUDGET)
        return self.data

    @cached_property
    def dataset(self) -> Dataset:
        """Every top-level element before Pixel Data that lies within the budget (pydicom, lazily)."""
        return _parse_dataset(self._budget, self.transfer_syntax)

    @cached_property
    def pixel_data(self) -> "PixelData | None":
        """Where (Float) Pixel Data lies in the file, so its bytes can be served without loading them.

        None when there is none within the budget, and for a deflated file (its offsets are in
        the inflated stream, not the file).
        """
        if self.transfer_syntax == DeflatedExplicitVRLittleEndian:
            return None
        explicit, little = _syntax_flags(self.transfer_syntax)
        data = self._budget
        end = _complete_prefix(data, explicit, little)
        try:
            tag, vr, length, size = _element_at(data, end, explicit, little)
        except _NeedMore:
            return None
        if tag not in PIXEL_TAGS:
            return None
        start = self.dataset_offset + end
        return PixelData(tag, vr.decode("ascii", "replace") if vr else None, start, start + size,
                         None if length == _UNDEFINED else length)

    @cached_property
    def file_meta(self) -> FileMetaDataset:
        """The File Meta Information group as pydicom reads it (from ``path``)."""
        if self.path is None:
            raise UnreadableHeader("the file meta of a header read from memory is not kept")
        with open(self.path, "rb") as f:
            f.seek(132)
            raw = f.read(self.dataset_offset - 132)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return FileMetaDataset(read_dataset(BytesIO(raw), False, True))


@dataclass(frozen=True)
class PixelData:
    """Where a stored file's Pixel Data element and value start (file offsets) and how long it is."""

    tag: int  # PIXEL_TAGS
    vr: str | None  # None in Implicit VR files
    element_offset: int
    value_offset: int
    length: int | None  # None: undefined length (encapsulated)


def _raw_values_cut(data: bytes, explicit: bool, little: bool, tags: frozenset[int]):
    """``_raw_values`` of the whole elements within the budget (what lies past it is no header)."""
    try:
        return _raw_values(data[:_complete_prefix(data, explicit, little)], explicit, little, True, tags)
    except _Odd:
        return None


def _syntax_flags(transfer_syntax: str) -> tuple[bool, bool]:
    """(explicit VR, little endian); every other syntax, compressed ones included, is explicit LE."""
    if transfer_syntax == ImplicitVRLittleEndian:
        return False, True
    if transfer_syntax == ExplicitVRBigEndian:
        return True, False
    return True, True


def _parse_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """pydicom's reading of the whole elements at the start of ``data``, up to Pixel Data."""
    explicit, little = _syntax_flags(transfer_syntax)
    end = _complete_prefix(data, explicit, little)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about values it would not write itself
        return read_dataset(BytesIO(data[:end]), not explicit, little)


def _uids_of(ds: Dataset) -> dict[str, str | None]:
    return {k: (str(ds[k].value).rstrip("\x00 ") or None) if k in ds and ds[k].value else None
            for k in UID_KEYWORDS}


def _from_bytes(buf: bytes, whole: bool, path: Path) -> Header:
    """The header from the first bytes of a file (``whole``: the file ends there). Not deflated."""
    meta, offset = _read_meta(buf)
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        raise UnreadableHeader("its file meta has no Transfer Syntax UID")
    if ts == DeflatedExplicitVRLittleEndian:
        raise _NeedMore  # inflated from the file (bounded), never from a head
    explicit, little = _syntax_flags(ts)
    data = bytes(buf[offset:offset + HEADER_BUDGET])
    data_whole = whole and offset + HEADER_BUDGET >= len(buf)
    walk = _Walk(data, explicit, little, data_whole)
    try:
        uids = _uids_from(walk.values(_UID_TAG_SET))
    except _Odd:
        uids = _uids_of(_parse_dataset(data, ts))
    return Header(ts, offset, meta.get("MediaStorageSOPClassUID"),
                  meta.get("MediaStorageSOPInstanceUID"), uids, data, data_whole, path, walk)


def _inflate(f, offset: int) -> tuple[bytes, bool]:
    """At most HEADER_BUDGET bytes of a deflated data set, and whether that is all of it."""
    f.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    while len(out) < HEADER_BUDGET:
        chunk = inflater.unconsumed_tail or f.read(64 * 1024)
        if not chunk:
            return bytes(out), True
        try:
            out += inflater.decompress(chunk, HEADER_BUDGET - len(out))
        except zlib.error as exc:
            raise UnreadableHeader(f"its deflated data set does not inflate ({exc})") from None
        if inflater.eof:
            return bytes(out), True
    return bytes(out), False


def read_header(path: Path, head: bytes | None = None) -> Header:
    """The header of the Part 10 file at ``path``; ``head``: its first bytes, if already in memory.

    Raises ``errors.UnreadableHeader`` (one sentence) when the file is not a Part 10 file or
    its file meta is unusable, and ``OSError`` when it cannot be read. Missing UIDs are not
    an error here: they are ``None`` in ``Header.uids`` and the caller decides.
    """
    size = os.stat(path).st_size
    if head is not None:
        try:
            return _from_bytes(head, len(head) >= size, path)
        except _NeedMore:
            pass
    with open(path, "rb") as f:
        buf = f.read(MAX_META_BYTES + HEADER_BUDGET)
        whole = len(buf) >= size
        try:
            return _from_bytes(buf, whole, path)
        except _NeedMore:
            pass
        try:
            meta, offset = _read_meta(buf)
        except _NeedMore:
            if len(buf) < 132:
                raise UnreadableHeader(
                    f"not a DICOM Part 10 file (only {len(buf)} bytes, too short for its header)") from None
            raise UnreadableHeader("the file ends inside its file meta group") from None
        ts = meta.get("TransferSyntaxUID", "")
        if ts == DeflatedExplicitVRLittleEndian:
            data, whole = _inflate(f, offset)
        else:  # the UIDs lie beyond the budget, or the data set is cut short
            data = bytes(buf[offset:offset + HEADER_BUDGET])
            whole = whole and len(buf) - offset <= HEADER_BUDGET
    walk = _Walk(data, *_syntax_flags(ts), whole)
    try:
        uids = _uids_from(walk.values(_UID_TAG_SET))
    except (_NeedMore, _Odd):
        uids = _uids_of(_parse_dataset(data, ts))
    return Header(ts, offset, meta.get("MediaStorageSOPClassUID"),
                  meta.get("MediaStorageSOPInstanceUID"), uids, data, whole, path, walk)
