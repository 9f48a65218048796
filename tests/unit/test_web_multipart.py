"""The STOW-RS multipart/related reader: any split of a body gives the same parts; bad bodies one sentence."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.multipart import MalformedBody, RelatedParser, UnsupportedMediaType, related_boundary

BOUNDARY = "b0und-4ry"


def body(parts: list[bytes], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def feed(data: bytes, cuts: list[int], folder, max_part: int = 10**9):
    parser = RelatedParser(BOUNDARY, folder, max_part)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        parser.write(data[a:b])
    return parser


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.binary(max_size=300), min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_gives_the_same_parts(tmp_path, parts, cuts):
    data = body(parts)
    parser = feed(data, cuts, tmp_path)
    got = parser.finish()
    try:
        assert [p.path.read_bytes() for p in got] == parts
        assert all(p.headers == {"content-type": "application/dicom"} for p in got)
        assert all(p.path.stat().st_mode & 0o777 == 0o600 for p in got)
    finally:
        parser.discard_all()
    assert not list(tmp_path.glob("stow-*"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_garbage_is_refused_or_parsed_never_a_crash(tmp_path, data, cuts):
    parser = RelatedParser(BOUNDARY, tmp_path, 10**6)
    try:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for a, b in zip(points, points[1:]):
            parser.write(data[a:b])
        parser.finish()
    except MalformedBody as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        parser.discard_all()
    assert not list(tmp_path.glob("stow-*"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=4), data=st.data())
def test_truncation_anywhere_is_refused(tmp_path, parts, data):
    full = body(parts)
    cut = data.draw(st.integers(0, len(full) - len(b"--\r\n") - 1))
    parser = RelatedParser(BOUNDARY, tmp_path, 10**6)
    try:
        with pytest.raises(MalformedBody):
            parser.write(full[:cut])
            parser.finish()
    finally:
        parser.discard_all()
    assert not list(tmp_path.glob("stow-*"))


def test_oversized_part_is_cut_and_the_rest_still_parsed(tmp_path):
    parser = feed(body([b"x" * 100, b"y" * 10]), [7, 50], tmp_path, max_part=50)
    first, second = parser.finish()
    assert first.path is None and first.out_of_resources and "storage.max_instance_bytes (50 bytes)" in first.problem
    assert second.path.read_bytes() == b"y" * 10
    parser.discard_all()


def test_media_type_checks():
    assert related_boundary('multipart/related; type="application/dicom"; boundary="a b"', ("application/dicom",)) == "a b"
    assert related_boundary("Multipart/Related; boundary=x", ("application/dicom",)) == "x"
    with pytest.raises(UnsupportedMediaType, match="send multipart/related"):
        related_boundary("application/dicom", ("application/dicom",))
    with pytest.raises(UnsupportedMediaType, match="not accepted"):
        related_boundary('multipart/related; type="application/dicom+xml"; boundary=x', ("application/dicom",))
    with pytest.raises(MalformedBody, match="no boundary"):
        related_boundary('multipart/related; type="application/dicom"', ("application/dicom",))
    with pytest.raises(MalformedBody, match="longer than 200"):
        related_boundary("multipart/related; boundary=" + "x" * 201, ("application/dicom",))
    assert os.sep not in BOUNDARY
