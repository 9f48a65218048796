"""receive's pieces that need no network: the spool file's limits and the outcome -> status map."""

from __future__ import annotations

import errno

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta

from gateway.receive import (
    STATUS,
    Spooler,
    _NeedFile,
    _read_uids,
    _status,
    _uids_from_head,
    file_meta_bytes,
    store_response_bytes,
)
from gateway.store import Outcome, Result


class FullDisk:
    """Stands in for the spool's file object on a disk that is full after ``room`` bytes."""

    def __init__(self, room: int):
        self.room, self.written, self.truncated = room, 0, False

    def write(self, data):
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return len(data)

    def truncate(self):
        self.truncated = True

    def close(self):
        pass


def test_every_outcome_has_a_status():
    assert set(STATUS) == set(Outcome)
    assert STATUS[Outcome.STORED] == 0x0000
    assert STATUS[Outcome.NO_SPACE] == 0xA700
    rsp = _status(Result(Outcome.INVALID, "x" * 100))
    assert rsp.Status == 0xC000 and len(rsp.ErrorComment) == 64


def test_spool_writes_through_and_names_itself(tmp_path):
    spooler = Spooler(tmp_path, max_bytes=1000, min_free_bytes=0)
    spool = spooler.open()
    spool.write(b"a" * 10)
    spool.file.flush()  # what pynetdicom calls per fragment: must not cost a syscall
    spool.write(b"b" * 10)
    spool.finish()
    spool.close()
    assert spool.problem is None and spool.size == 20
    assert open(spool.name, "rb").read() == b"a" * 10 + b"b" * 10
    assert spooler.take(spool.name) is spool and spooler.take(spool.name) is None


def test_spools_left_untaken_are_removed_when_the_connection_closes(tmp_path):
    spooler = Spooler(tmp_path, max_bytes=1000, min_free_bytes=0)
    spooler.open().write(b"x")
    spooler.open()
    spooler.discard_all()
    assert list(tmp_path.iterdir()) == [] and spooler.files == {}


def test_spool_refuses_more_than_max_instance_bytes_and_frees_the_space(tmp_path):
    spool = Spooler(tmp_path, max_bytes=100, min_free_bytes=0).open()
    for _ in range(5):
        assert spool.write(b"x" * 30) == 30  # never raises into pynetdicom's thread
    spool.finish()
    spool.close()
    assert "max_instance_bytes" in spool.problem
    assert open(spool.name, "rb").read() == b""


def test_spool_on_a_full_disk_records_the_problem_without_raising(tmp_path):
    spool = Spooler(tmp_path, max_bytes=10**9, min_free_bytes=0).open()
    disk = FullDisk(room=50)
    spool._sink.close()
    spool._sink = disk
    spool.write(b"x" * 40)
    spool.write(b"x" * 40)
    spool.write(b"x" * 40)
    spool.finish()  # the buffered bytes hit the full disk here
    assert spool.problem == "the disk is full" and disk.truncated


def test_spool_checks_the_free_space_floor_while_streaming(tmp_path):
    spool = Spooler(tmp_path, max_bytes=10**12, min_free_bytes=10**18).open()
    chunk = b"\0" * (1024 * 1024)
    for _ in range(70):  # the floor is checked every 64 MiB
        spool.write(chunk)
        if spool.problem:
            break
    spool.finish()
    spool.close()
    assert "min_free_bytes" in spool.problem


# --------------------------------------------------------------------------- UIDs from the head


def spooled_head(ds: pydicom.Dataset, transfer_syntax: str, limit: int = 64 * 1024) -> bytes:
    """What pynetdicom writes to the spool for this data set: preamble, its file meta, the data set."""
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=transfer_syntax))
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, transfer_syntax == ImplicitVRLittleEndian
    write_dataset(body, ds)
    out.write(body.getvalue())
    return out.getvalue()[:limit]


# Bundled with pydicom (no download): sequences, waveforms, implicit VR and compressed ones.
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm",
           "MR_small_implicit.dcm", "waveform_ecg.dcm", "SC_rgb_rle.dcm"]


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("implicit", [False, True])
def test_head_parser_agrees_with_pydicom(name, implicit):
    ds = pydicom.dcmread(get_testdata_file(name))
    ts = ImplicitVRLittleEndian if implicit else "1.2.840.10008.1.2.1"
    if not implicit and ds.file_meta.TransferSyntaxUID.is_compressed:
        ts = ds.file_meta.TransferSyntaxUID
    head = spooled_head(ds, ts)
    uids = _uids_from_head(head, ts)
    for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert uids[key] == ds.get(key), key


def test_head_parser_walks_undefined_length_sequences():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    nested = pydicom.Dataset()
    nested.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = [nested]
    ds.ReferencedImageSequence = [item, item]
    ds.ReferencedImageSequence.is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
    for implicit in (False, True):
        ts = ImplicitVRLittleEndian if implicit else "1.2.840.10008.1.2.1"
        uids = _uids_from_head(spooled_head(ds, ts), ts)
        assert uids["SeriesInstanceUID"] == ds.SeriesInstanceUID


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_bigendian.dcm", "CT_small.dcm"])
def test_the_pydicom_fallback_reads_the_same_uids(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    head = _read_uids(path)
    for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert head.get(key) == ds.get(key)
    assert "PixelData" not in head


def test_head_parser_defers_when_it_cannot_see_the_uids():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ts = "1.2.840.10008.1.2.1"
    with pytest.raises(_NeedFile):
        _uids_from_head(spooled_head(ds, ts, limit=600), ts)
    with pytest.raises(_NeedFile):
        _uids_from_head(spooled_head(ds, ts), "1.2.840.10008.1.2.2")


# --------------------------------------------------------------------------- hand-encoded messages

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ODD_AND_EVEN = ["1.2.3", "1.2.34", "1.2.840.113619.2.55.3.604688119.868.1249343483.504", "1." + "2" * 62]


@pytest.mark.parametrize("sop", ODD_AND_EVEN)
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_file_meta_matches_what_pynetdicom_writes(sop, ts):
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CT_CLASS, sop_instance_uid=sop,
                                                    transfer_syntax=ts))
    assert file_meta_bytes(CT_CLASS, sop, ts) == expected.getvalue()


@pytest.mark.parametrize("sop", ODD_AND_EVEN)
@pytest.mark.parametrize("status,message_id", [(0x0000, 1), (0xA700, 65535), (0xC000, 300)])
def test_store_response_matches_what_pynetdicom_sends(sop, status, message_id):
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_CLASS
    primitive.AffectedSOPInstanceUID = sop
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16384))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03"
    assert pdv[1:] == store_response_bytes(CT_CLASS, message_id, status, sop)
