"""Property-based fuzzing of every parser that takes outside bytes.

Each parser may only answer with its own named error (one sentence for the user), never
with an IndexError, a struct.error or a pydicom exception, whatever the bytes. CI runs a
short, bounded pass (FUZZ_EXAMPLES, default 60 per target); a release check runs
``FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/unit/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.dimse.codec import MalformedCommand, command_fields, file_meta_bytes, pdv_items, store_request_bytes
from gateway.errors import JobError, UnreadableHeader
from gateway.inbox import arrays, sidecar
from gateway.storage import qido
from gateway.storage.header import read_header

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CT = "1.2.840.10008.5.1.4.1.1.2"


def mutated(seed: bytes):
    """Bytes near ``seed``: flipped, cut, spliced, stretched (where parsers break)."""
    return st.one_of(
        st.binary(max_size=len(seed) * 2 + 16),
        st.tuples(st.integers(0, len(seed)), st.binary(max_size=64)).map(
            lambda t: seed[:t[0]] + t[1] + seed[t[0] + len(t[1]):]),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        st.tuples(st.integers(0, max(len(seed) - 1, 0)), st.integers(0, 255)).map(
            lambda t: seed[:t[0]] + bytes([t[1]]) + seed[t[0] + 1:]),
    )


# --------------------------------------------------------------------------- DIMSE command sets

COMMAND = store_request_bytes(1, CT, "1.2.3.4")


@FUZZ
@given(mutated(COMMAND))
def test_command_set_decoder_only_raises_malformed(data):
    try:
        fields = command_fields(data)
    except MalformedCommand:
        return
    assert all(isinstance(v, bytes) for v in fields.values())


PDV = struct.pack(">IBB", len(COMMAND) + 2, 1, 3) + COMMAND


@FUZZ
@given(mutated(PDV + PDV))
def test_pdv_splitter_only_raises_malformed(body):
    try:
        items = list(pdv_items(body))
    except MalformedCommand:
        return
    assert sum(len(fragment) + 6 for _, fragment in items) == len(body)


# --------------------------------------------------------------------------- Part 10 headers


def _part10(transfer_syntax: str) -> bytes:
    body = b"".join(
        struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI" + struct.pack("<H", len(v)) + v
        for tag, v in ((0x00080016, CT.encode() + b"\0"), (0x00080018, b"1.2.3.4\0"),
                       (0x0020000D, b"1.2.3\0"), (0x0020000E, b"1.2.3.9\0")))
    if transfer_syntax == ImplicitVRLittleEndian:
        body = b"".join(struct.pack("<HHI", t >> 16, t & 0xFFFF, len(v)) + v
                        for t, v in ((0x00080016, CT.encode() + b"\0"), (0x00080018, b"1.2.3.4\0")))
    return b"\0" * 128 + b"DICM" + file_meta_bytes(CT, "1.2.3.4", transfer_syntax) + body


@FUZZ
@given(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
       .flatmap(lambda ts: mutated(_part10(ts))))
def test_header_reader_only_raises_unreadable_header(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.dcm"
    path.write_bytes(data)
    try:
        header = read_header(path, data[:65536])
        header.dataset
    except UnreadableHeader:
        return
    assert set(header.uids) == {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
    raw = header.raw_values(qido._RAW_TAGS)  # the walker's own reading of index values: never raises
    assert raw is None or set(raw) <= qido._RAW_TAGS
    assert set(qido.values_of_header(header)) == set(qido.values_of(header.dataset))


# --------------------------------------------------------------------------- sidecars

SIDECAR = b"source:\n  series_instance_uid: '1.2.3'\nsegments:\n  - label: liver\n    type: {scheme: SCT, value: '10200004', meaning: Liver}\n"


@FUZZ
@given(st.one_of(mutated(SIDECAR), st.text(max_size=300).map(str.encode)))
def test_sidecar_parser_only_raises_job_error(data):
    try:
        sidecar.parse(data)
    except JobError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


# --------------------------------------------------------------------------- .npy / .npz headers


def _npy(shape=(2, 4, 4), dtype="|b1") -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize)


@FUZZ
@given(mutated(_npy()))
def test_npy_header_check_only_raises_job_error(data):
    try:
        info = arrays.inspect_npy(io.BytesIO(data), len(data), "x.npy")
    except JobError:
        return
    assert info.nbytes <= len(data)


def _npz(member: bytes) -> bytes:
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mask.npy", member)
    return f.getvalue()


@FUZZ
@given(st.one_of(mutated(_npz(_npy())), mutated(_npy()).map(_npz)))
def test_npz_header_check_only_raises_job_error(data):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            arrays.inspect_npz(zf, "x.npz")
    except JobError:
        return
    except arrays._UNREADABLE:
        return  # opening the archive itself: arrays.inspect words these as a JobError
