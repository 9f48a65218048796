"""The QIDO attributes read by the header walker equal pydicom's reading of the same header."""

from __future__ import annotations

import pydicom
import pytest
from hypothesis import given, settings, strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.storage import qido
from gateway.storage.header import HEAD_BYTES, read_header
from tests.unit.test_header import FILE_ONLY, SAMPLES, spooled


def both(header) -> tuple[dict, dict]:
    """(the walker's values, pydicom's values) of one header."""
    return qido.values_of_header(header), qido.values_of(header.dataset)


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("implicit", [False, True])
def test_spooled_samples_agree(tmp_path, name, implicit):
    ds = pydicom.dcmread(get_testdata_file(name))
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if not implicit and ds.file_meta.TransferSyntaxUID.is_compressed:
        ts = ds.file_meta.TransferSyntaxUID
    data = spooled(ds, ts)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    header = read_header(path, head=data[:HEAD_BYTES])
    assert header.raw_values(qido._RAW_TAGS) is not None  # the walker, not pydicom, read these
    fast, slow = both(header)
    assert fast == slow
    assert fast["patient_name"] == (str(ds.PatientName) if ds.get("PatientName") else None)


@pytest.mark.parametrize("name", FILE_ONLY + SAMPLES)
def test_files_agree_deflated_and_big_endian_included(name):
    fast, slow = both(read_header(get_testdata_file(name)))
    assert fast == slow


def test_values_beyond_a_short_head_are_read_from_the_file(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    data = spooled(ds, ExplicitVRLittleEndian)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    fast, slow = both(read_header(path, head=data[:700]))
    assert fast == slow
    assert fast["rows"] == ds.Rows and fast["columns"] == ds.Columns


def _dataset(**values) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    ("ISO_IR 100", "Müller^Jürgen"),
    ("GB18030", "Wang^XiaoDong=王^小东"),        # decoded by pydicom: the walker gives way
    ("\\ISO 2022 IR 87", "Yamada^Tarou"),      # two values: pydicom's decoding
])
def test_character_sets_agree(tmp_path, charset, name):
    ds = _dataset(SpecificCharacterSet=charset.split("\\") if "\\" in charset else charset,
                  PatientName=name)
    data = spooled(ds, ExplicitVRLittleEndian)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    fast, slow = both(read_header(path, head=data))
    assert fast == slow
    assert "^" in fast["patient_name"]


def test_multi_values_spaces_and_empty_values_agree(tmp_path):
    ds = _dataset(PatientName="Doe^John\\Roe^Jane", AccessionNumber="", StudyDescription="  lead and trail  ",
                  Modality="CT ", SeriesNumber=" 7 ", BodyPartExamined="HEAD ")
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = spooled(ds, ts)
        path = tmp_path / "x.dcm"
        path.write_bytes(data)
        fast, slow = both(read_header(path, head=data))
        assert fast == slow
        assert fast["accession_number"] is None and fast["patient_name"] == "Doe^John\\Roe^Jane"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\\"),
               max_size=60),
       st.text(alphabet="ABCXYZ0123 ^", max_size=16))
def test_latin1_text_agrees(description, patient_id):
    ds = _dataset(SpecificCharacterSet="ISO_IR 100", StudyDescription=description, PatientID=patient_id)
    data = spooled(ds, ExplicitVRLittleEndian)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.dcm"
        path.write_bytes(data)
        fast, slow = both(read_header(path, head=data))
    assert fast == slow
