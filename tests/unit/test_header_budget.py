"""The header reader's budget: hostile data sets cost bounded memory, whatever they hold."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from gateway.dimse.codec import file_meta_bytes
from gateway.storage.header import HEADER_ELEMENT_BUDGET, read_header

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP, STUDY, SERIES = "1.2.3.4.5", "1.2.3", "1.2.3.4"
MB = 1024 * 1024


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def ui(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def uids() -> bytes:
    return (element(0x00080016, b"UI", ui(CT)) + element(0x00080018, b"UI", ui(SOP))
            + element(0x0020000D, b"UI", ui(STUDY)) + element(0x0020000E, b"UI", ui(SERIES)))


def empty_items(n: int) -> bytes:
    """(0008,0006) SQ of undefined length holding ``n`` empty items: 8 bytes each."""
    return (struct.pack("<HH", 0x0008, 0x0006) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * n + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def part10(path: Path, transfer_syntax: str, data: bytes) -> Path:
    path.write_bytes(b"\0" * 128 + b"DICM" + file_meta_bytes(CT, SOP, transfer_syntax) + data)
    return path


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hundred_thousand_empty_items_cost_a_few_mb(tmp_path):
    path = part10(tmp_path / "items.dcm", ExplicitVRLittleEndian, empty_items(100_000) + uids())

    def read():
        header = read_header(path, path.read_bytes()[:65536])
        assert header.uids == {"SOPClassUID": CT, "SOPInstanceUID": SOP, "StudyInstanceUID": STUDY,
                               "SeriesInstanceUID": SERIES}
        header.dataset  # what routing and QIDO parse: within the element budget

    assert peak_bytes(read) < 8 * MB  # pydicom alone took ~70 MB for these items


def test_a_header_within_the_element_budget_is_parsed_whole(tmp_path):
    path = part10(tmp_path / "ok.dcm", ExplicitVRLittleEndian, empty_items(100) + uids())
    ds = read_header(path).dataset
    assert len(ds[0x00080006].value) == 100 and ds.SeriesInstanceUID == SERIES
    past = part10(tmp_path / "past.dcm", ExplicitVRLittleEndian,
                  empty_items(HEADER_ELEMENT_BUDGET + 1) + uids())
    assert 0x00080006 not in read_header(past).dataset  # left out, not a hundred MB of objects


def test_a_deflate_bomb_inflates_only_up_to_the_budget(tmp_path):
    data = uids() + element(0x00091010, b"OB", b"\0" * (500 * MB))
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = packer.compress(data) + packer.flush()
    del data
    assert len(packed) < MB  # a thousandfold
    path = part10(tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian, packed)

    def read():
        header = read_header(path)
        assert header.uids["SOPInstanceUID"] == SOP
        header.dataset

    assert peak_bytes(read) < 8 * MB
