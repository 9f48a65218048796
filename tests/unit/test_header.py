"""storage.header, the one Part 10 header reader, against pydicom on pydicom's bundled sample files:
the fast walk from a spool head, the file fallbacks (big endian, deflate, UIDs beyond the head),
the data set before Pixel Data, and the budget."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, split_dataset

from gateway.errors import UnreadableHeader
from gateway.storage import header as header_mod
from gateway.storage.header import HEAD_BYTES, UID_KEYWORDS, read_header

# Bundled with pydicom (no download): sequences, waveforms, implicit VR and compressed ones.
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm",
           "MR_small_implicit.dcm", "waveform_ecg.dcm", "SC_rgb_rle.dcm"]
# Read from the file: deflated and big endian data sets.
FILE_ONLY = ["image_dfl.dcm", "MR_small_bigendian.dcm"]


def spooled(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """What pynetdicom writes to the spool for this data set: preamble, its file meta, the data set."""
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=transfer_syntax))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, transfer_syntax == ImplicitVRLittleEndian
    write_dataset(body, ds)
    out.write(body.getvalue())
    return out.getvalue()


def assert_same_uids(header, ds) -> None:
    for key in UID_KEYWORDS:
        assert header.uids[key] == ds.get(key), key


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("implicit", [False, True])
def test_the_head_walk_agrees_with_pydicom(tmp_path, name, implicit):
    ds = pydicom.dcmread(get_testdata_file(name))
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if not implicit and ds.file_meta.TransferSyntaxUID.is_compressed:
        ts = ds.file_meta.TransferSyntaxUID
    data = spooled(ds, ts)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    header = read_header(path, head=data[:HEAD_BYTES])
    assert_same_uids(header, ds)
    assert header.transfer_syntax == ts
    assert header.dataset_offset == split_dataset(path)[1]
    assert header.media_sop_instance_uid == ds.SOPInstanceUID
    # the data set before Pixel Data, as pydicom reads it
    expected = pydicom.dcmread(path, stop_before_pixels=True)
    got = header.dataset
    assert "PixelData" not in got
    assert [e.tag for e in got] == [e.tag for e in expected]
    for keyword in ("PatientID", "PatientName", "StudyDate", "Modality", "Rows", "Columns"):
        assert got.get(keyword) == expected.get(keyword), keyword


@pytest.mark.parametrize("name", FILE_ONLY + SAMPLES)
def test_a_file_without_a_head_reads_the_same(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    header = read_header(path)
    assert_same_uids(header, ds)
    assert header.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert header.dataset.get("PatientName") == ds.get("PatientName")
    assert "PixelData" not in header.dataset


def test_undefined_length_sequences_are_walked(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    nested = Dataset()
    nested.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = [nested]
    ds.ReferencedImageSequence = [item, item]
    ds.ReferencedImageSequence.is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
    for ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        data = spooled(ds, ts)
        path = tmp_path / "seq.dcm"
        path.write_bytes(data)
        header = read_header(path, head=data)
        assert header.series_uid == ds.SeriesInstanceUID
        assert len(header.dataset.ReferencedImageSequence) == 2


def test_uids_beyond_the_head_are_read_from_the_file(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    data = spooled(ds, ExplicitVRLittleEndian)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    assert read_header(path, head=data[:600]).series_uid == ds.SeriesInstanceUID


def test_the_dataset_stops_at_the_budget(tmp_path, monkeypatch):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageComments = "x" * 5000  # (0020,4000): after the UIDs, beyond a 4 KiB budget
    data = spooled(ds, ExplicitVRLittleEndian)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    monkeypatch.setattr(header_mod, "HEADER_BUDGET", 4096)
    header = read_header(path)
    assert header.series_uid == ds.SeriesInstanceUID and not header.whole
    assert len(header.data) == 4096
    assert "ImageComments" not in header.dataset and "PatientName" in header.dataset


def test_not_part_10_is_one_sentence(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not DICOM at all" * 20)
    with pytest.raises(UnreadableHeader, match="not a DICOM Part 10 file"):
        read_header(path)
    short = tmp_path / "short.dcm"
    short.write_bytes(b"\0" * 10)
    with pytest.raises(UnreadableHeader, match="too short for its header"):
        read_header(short)


def test_a_file_meta_without_transfer_syntax_is_refused(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.SOPInstanceUID = "1.2.3"
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=False)
    path = tmp_path / "nots.dcm"
    path.write_bytes(out.getvalue() + b"\x08\x00\x18\x00UI\x06\x001.2.3\0")
    with pytest.raises(UnreadableHeader, match="Transfer Syntax UID"):
        read_header(path)


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("head", [HEAD_BYTES, 600])
def test_one_shared_walk_answers_as_a_fresh_walk_per_request(tmp_path, name, head):
    """The UIDs, the search index's values and the Patient ID share one resumed walk: in any order of
    requests (later tags first, earlier ones after) each answer equals a walk of its own."""
    from gateway.storage import qido

    ds = pydicom.dcmread(get_testdata_file(name))
    data = spooled(ds, ExplicitVRLittleEndian)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    requests = [qido._RAW_TAGS, header_mod._PATIENT_TAGS, frozenset([0x00080016]),
                frozenset([0x00200013, 0x00100010]), frozenset([0x7FE00010, 0x00280010])]
    for order in (requests, requests[::-1]):
        shared = read_header(path, head=data[:head])
        for tags in order:
            fresh = read_header(path, head=data[:head])
            fresh = header_mod.Header(**{**fresh.__dict__, "walk": None})  # its own walk, from scratch
            assert shared.raw_values(tags) == fresh.raw_values(tags), sorted(tags)
        assert shared.patient_id == ds.get("PatientID", None) or None
