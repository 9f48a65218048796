"""dciodvfy accepts multi-frame Secondary Capture objects whose pixels come from encode.set_pixel_data.

The builder here is a test helper only (the derive issue builds the real objects); what is
under test is that the encoder's Image Pixel elements and Pixel Data are what the IODs need.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.derive.encode import set_pixel_data

SINGLE_BIT = "1.2.840.10008.5.1.4.1.1.7.1"
GRAYSCALE_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
GRAYSCALE_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"


def secondary_capture(sop_class: str, arr: np.ndarray, photometric: str, bits_stored: int) -> Dataset:
    """A minimal multi-frame Secondary Capture around ``arr`` (test helper)."""
    now = datetime(2026, 1, 2, 3, 4, 5)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    # Patient, General Study
    ds.PatientName = "Encode^Check"
    ds.PatientID = "ENC-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    # General Series, SC Equipment
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Laterality = ""
    ds.ConversionType = "WSD"
    # General Image, SC Image
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    # Multi-frame: frames are just a sequence of pages
    ds.FrameIncrementPointer = 0x00182001  # Page Number Vector
    ds.PageNumberVector = list(range(1, arr.shape[0] + 1))

    set_pixel_data(ds, arr, photometric, bits_stored)

    if photometric == "MONOCHROME2" and ds.BitsAllocated > 1:
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    return ds


def write_and_check(ds: Dataset, path: Path, dciodvfy, arr: np.ndarray) -> None:
    ds.save_as(path, enforce_file_format=True)
    errors = dciodvfy(path)
    assert errors == [], "\n".join(errors)
    reread = pydicom.dcmread(path)
    assert reread.SOPInstanceUID == reread.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    decoded = pixel_array(reread, as_rgb=False)
    want = arr.astype(np.uint8) if arr.dtype == bool else arr
    np.testing.assert_array_equal(decoded.reshape(arr.shape), want)


def test_single_bit_multiframe_sc(tmp_path, dciodvfy):
    # 3 frames of 5 x 7 = 105 bits: frames end mid-byte, packing must run on across them
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 2, size=(3, 5, 7)).astype(bool)
    ds = secondary_capture(SINGLE_BIT, arr, "MONOCHROME2", 1)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames) == (1, 1, 0, 3)
    assert len(ds.PixelData) == 14
    write_and_check(ds, tmp_path / "single-bit.dcm", dciodvfy, arr)


def test_grayscale_byte_multiframe_sc(tmp_path, dciodvfy):
    arr = np.random.default_rng(2).integers(0, 256, size=(4, 16, 9), dtype=np.uint8)
    ds = secondary_capture(GRAYSCALE_BYTE, arr, "MONOCHROME2", 8)
    write_and_check(ds, tmp_path / "byte.dcm", dciodvfy, arr)


@pytest.mark.parametrize("bits_stored", [12, 16])
def test_grayscale_word_multiframe_sc(tmp_path, dciodvfy, bits_stored):
    arr = np.random.default_rng(3).integers(0, 2**bits_stored, size=(3, 10, 12), dtype=np.uint16)
    ds = secondary_capture(GRAYSCALE_WORD, arr, "MONOCHROME2", bits_stored)
    assert ds["PixelData"].VR == "OW"
    write_and_check(ds, tmp_path / f"word-{bits_stored}.dcm", dciodvfy, arr)


def test_true_color_multiframe_sc(tmp_path, dciodvfy):
    # the True Color SC IOD allows only RGB for native (uncompressed) pixel data
    arr = np.random.default_rng(4).integers(0, 256, size=(2, 8, 6, 3), dtype=np.uint8)
    ds = secondary_capture(TRUE_COLOR, arr, "RGB", 8)
    assert ds.PlanarConfiguration == 0 and ds.SamplesPerPixel == 3
    write_and_check(ds, tmp_path / "color.dcm", dciodvfy, arr)
