"""storage.header's Pixel Data position and file meta (what WADO-RS serves pixels and frames from),
against pydicom's reading of its bundled sample files."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.storage.header import read_header
from gateway.web.common import read_header as web_read_header

NATIVE = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtdose.dcm"]
ENCAPSULATED = ["JPEG2000.dcm", "SC_rgb_rle.dcm"]


@pytest.mark.parametrize("name", NATIVE)
def test_native_pixel_data_lies_where_pydicom_finds_it(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    pixel = read_header(path).pixel_data
    assert pixel is not None and pixel.tag == 0x7FE00010 and pixel.length == len(ds.PixelData)
    with open(path, "rb") as f:
        f.seek(pixel.value_offset)
        assert f.read(pixel.length) == ds.PixelData
        f.seek(pixel.element_offset)
        tag = f.read(4)
    order = "big" if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2" else "little"
    assert (int.from_bytes(tag[:2], order), int.from_bytes(tag[2:], order)) == (0x7FE0, 0x0010)
    assert pixel.vr == (None if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2" else ds["PixelData"].VR)


@pytest.mark.parametrize("name", ENCAPSULATED)
def test_encapsulated_pixel_data_has_undefined_length_and_starts_with_an_item(name):
    path = get_testdata_file(name)
    pixel = read_header(path).pixel_data
    assert pixel is not None and pixel.length is None and pixel.vr == "OB"
    with open(path, "rb") as f:
        f.seek(pixel.value_offset)
        assert f.read(4) == b"\xfe\xff\x00\xe0"  # the Basic Offset Table item


def test_no_pixel_data_and_deflated_files_give_none():
    assert read_header(get_testdata_file("rtplan.dcm")).pixel_data is None
    assert read_header(get_testdata_file("image_dfl.dcm")).pixel_data is None  # offsets of the inflated stream


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm"])
def test_the_file_meta_is_pydicoms(name):
    path = get_testdata_file(name)
    assert read_header(path).file_meta == pydicom.dcmread(path, stop_before_pixels=True).file_meta


def test_float_pixel_data_ends_the_header(tmp_path):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.30", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 2
    ds.FloatPixelData = b"\0" * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = tmp_path / "float.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = read_header(path)
    assert "FloatPixelData" not in header.dataset and header.dataset.Rows == 2
    assert header.pixel_data.tag == 0x7FE00008 and header.pixel_data.length == 16


@pytest.mark.parametrize("name", NATIVE + ENCAPSULATED + ["rtplan.dcm"])
def test_the_web_header_is_built_on_the_one_reader(name):
    path = get_testdata_file(name)
    web = web_read_header(path)
    pixel = read_header(path).pixel_data
    assert web.pixel_value_offset == (pixel.value_offset if pixel else web.file_size)
    assert web.pixel_tag == (pixel.tag if pixel else None)
    assert web.dataset.file_meta.TransferSyntaxUID == web.transfer_syntax
    assert web.dataset.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_an_unreadable_file_is_one_sentence(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(ValueError, match="junk.dcm is not a readable DICOM file: not a DICOM Part 10 file"):
        web_read_header(path)
