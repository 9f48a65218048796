"""gateway.derive.encode.set_pixel_data: round trips, equality with pydicom, and every refusal."""

from __future__ import annotations

import copy
import io
import tracemalloc

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import pack_bits
from pydicom.pixels.utils import set_pixel_data as pydicom_set_pixel_data
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from gateway.derive import encode
from gateway.derive.encode import (
    MAX_PIXEL_DATA_LENGTH,
    PixelDataTooLarge,
    encoded_length,
    set_pixel_data,
)
from gateway.storage.uids import is_valid_uid

SC = "1.2.840.10008.5.1.4.1.1.7"
MONO = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422")


def base_dataset(transfer_syntax=ExplicitVRLittleEndian, file_meta=True, stale=False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientName = "Encode^Test"
    if stale:  # elements a previous image left behind, which the encoder must update or remove
        ds.NumberOfFrames = 7
        ds.PlanarConfiguration = 1
        ds.Rows = ds.Columns = 1
        ds.BitsAllocated = 32
        ds.PixelData = b"\x00" * 8
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SC
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if transfer_syntax is not None:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def decode(ds: Dataset) -> np.ndarray:
    """pydicom's own decoder, without its YCbCr -> RGB conversion."""
    return pixel_array(ds, as_rgb=False)


def expected_pixels(arr: np.ndarray, photometric: str) -> np.ndarray:
    """What a lossless decode returns: 4:2:2 keeps the chroma of each pair's first pixel."""
    out = arr.astype(np.uint8) if arr.dtype == bool else arr.copy()
    if photometric == "YBR_FULL_422":
        out[..., 1::2, 1:] = out[..., 0::2, 1:]
    return out


# --------------------------------------------------------------------------- properties


@st.composite
def encodable(draw):
    """(arr, photometric, bits_stored) that set_pixel_data accepts."""
    dtype = np.dtype(draw(st.sampled_from(["bool", "uint8", "uint16", "int8", "int16"])))
    photometrics = MONO + (COLOR[:2] if dtype.kind == "b" else COLOR)
    photometric = draw(st.sampled_from(photometrics))
    frames = draw(st.sampled_from([None, 1, 2, 3]))
    rows = draw(st.integers(1, 6))
    columns = draw(st.integers(1, 6))
    if photometric == "YBR_FULL_422":
        columns += columns % 2
    shape = (rows, columns) if frames is None else (frames, rows, columns)
    if photometric in COLOR:
        shape += (3,)
    if dtype.kind == "b":
        bits_stored, elements = 1, st.booleans()
    else:
        bits_stored = draw(st.integers(1, dtype.itemsize * 8))
        if dtype.kind == "u":
            low, high = 0, 2**bits_stored - 1
        else:
            low, high = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
        elements = st.integers(low, high)
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    layout = draw(st.sampled_from(["C", "F", "reversed"]))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "reversed":  # negative strides: a view, not contiguous
        arr = np.ascontiguousarray(arr[::-1])[::-1]
    return arr, photometric, bits_stored


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=encodable(),
    transfer_syntax=st.sampled_from([None, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]),
    has_file_meta=st.booleans(),
    stale=st.booleans(),
)
def test_round_trip_and_pydicom_equality(case, transfer_syntax, has_file_meta, stale):
    arr, photometric, bits_stored = case
    original = arr.copy()
    ds = base_dataset(transfer_syntax, has_file_meta, stale)
    reference = copy.deepcopy(ds)

    set_pixel_data(ds, arr, photometric, bits_stored, generate_instance_uid=False)

    np.testing.assert_array_equal(arr, original)  # the input is never changed
    want = expected_pixels(arr, photometric)
    assert len(ds.PixelData) % 2 == 0
    assert not ds["PixelData"].is_undefined_length
    assert ds["PixelData"].VR == ("OW" if ds.BitsAllocated == 16 else "OB")
    assert len(ds.PixelData) == encoded_length(arr.shape, arr.dtype, photometric)
    np.testing.assert_array_equal(decode(ds).reshape(arr.shape), want)

    reread = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    np.testing.assert_array_equal(decode(reread).reshape(arr.shape), want)
    assert reread.file_meta.TransferSyntaxUID == (
        transfer_syntax if has_file_meta and transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        else ExplicitVRLittleEndian
    )

    if arr.dtype == bool:
        assert ds.BitsAllocated == ds.BitsStored == 1 and ds.HighBit == 0
        assert ds.PixelRepresentation == 0
        assert ds.PixelData == pack_bits(np.ascontiguousarray(arr, dtype=np.uint8))
    else:
        pydicom_set_pixel_data(reference, arr, photometric, bits_stored, generate_instance_uid=False)
        assert to_bytes(ds) == to_bytes(reference)


def test_bool_packing_runs_on_across_frames_without_padding():
    arr = np.zeros((3, 3, 3), dtype=bool)  # 27 pixels: frames end mid-byte
    arr[1, 0, 0] = True  # pixel 9: byte 1, bit 1
    arr[2, 2, 2] = True  # pixel 26: byte 3, bit 2
    ds = base_dataset()
    set_pixel_data(ds, arr, "MONOCHROME2", 1)
    assert ds.PixelData == bytes([0x00, 0x02, 0x00, 0x04])
    assert ds.NumberOfFrames == 3 and ds.Rows == 3 and ds.Columns == 3
    assert "PlanarConfiguration" not in ds


def test_bool_odd_byte_count_is_padded_with_one_zero_byte():
    arr = np.ones((3, 3), dtype=bool)  # 9 bits -> 2 bytes, 1 x 8 bits -> 1 byte + pad
    ds = base_dataset()
    set_pixel_data(ds, np.ones((1, 8), dtype=bool), "MONOCHROME2", 1)
    assert ds.PixelData == b"\xff\x00"
    set_pixel_data(ds, arr, "MONOCHROME2", 1)
    assert ds.PixelData == b"\xff\x01"


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "broadcast", "sliced"])
@pytest.mark.parametrize("chunk", [8, 24, 1 << 21])
def test_bool_chunked_packing_matches_pack_bits(monkeypatch, layout, chunk):
    """Chunk boundaries (and their carried partial bytes) never show in the output."""
    monkeypatch.setattr(encode, "_PACK_CHUNK", chunk)
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2, size=(5, 7, 11)).astype(bool)
    arr = {
        "C": base,
        "F": np.asfortranarray(base),
        "transposed": base.transpose(0, 2, 1),
        "broadcast": np.broadcast_to(base[:1], (5, 7, 11)),
        "sliced": rng.integers(0, 2, size=(5, 14, 13)).astype(bool)[:, ::2, 1:12],
    }[layout]
    ds = base_dataset()
    set_pixel_data(ds, arr, "MONOCHROME2", 1)
    assert ds.PixelData == pack_bits(np.ascontiguousarray(arr, dtype=np.uint8))
    np.testing.assert_array_equal(decode(ds), arr)


def test_copying_fallback_gives_the_same_bytes(monkeypatch):
    rng = np.random.default_rng(5)
    arrays = [
        (rng.integers(0, 2, size=(2, 5, 5)).astype(bool), "MONOCHROME2", 1),
        (rng.integers(0, 256, size=(3, 5)).astype(np.uint8), "MONOCHROME2", 8),
        (rng.integers(0, 4096, size=(2, 4, 4, 3)).astype(np.uint16), "YBR_FULL_422", 12),
    ]
    fast = []
    for arr, pi, bits in arrays:
        ds = base_dataset()
        set_pixel_data(ds, arr, pi, bits, generate_instance_uid=False)
        fast.append(to_bytes(ds))
    monkeypatch.setattr(encode, "_HAVE_BYTES_API", False)
    for (arr, pi, bits), want in zip(arrays, fast):
        ds = base_dataset()
        set_pixel_data(ds, arr, pi, bits, generate_instance_uid=False)
        assert type(ds.PixelData) is bytes
        assert to_bytes(ds) == want


def test_pixel_data_is_plain_bytes_and_the_input_is_not_shared():
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4)
    ds = base_dataset()
    set_pixel_data(ds, arr, "MONOCHROME2", 8)
    assert type(ds.PixelData) is bytes
    arr[:] = 0
    assert ds.PixelData == bytes(range(16))


def test_non_native_byte_order_is_encoded_by_value():
    values = np.array([[1, 2], [3, 0x0FFF]], dtype=np.uint16)
    ds = base_dataset()
    set_pixel_data(ds, values.astype(">u2"), "MONOCHROME2", 12)
    assert ds.PixelData == values.astype("<u2").tobytes()


def test_ybr_full_422_layout():
    # one row, four pixels: (Y, Cb, Cr)
    arr = np.array([[[10, 20, 30], [11, 21, 31], [12, 22, 32], [13, 23, 33]]], dtype=np.uint8)
    ds = base_dataset()
    set_pixel_data(ds, arr, "YBR_FULL_422", 8)
    assert ds.PixelData == bytes([10, 11, 20, 30, 12, 13, 22, 32])
    assert ds.SamplesPerPixel == 3 and ds.PlanarConfiguration == 0


def test_single_frame_number_of_frames_follows_pydicom():
    """Documented: a (1, rows, columns) array keeps Number of Frames = 1, as pydicom does."""
    arr = np.zeros((1, 4, 4), dtype=np.uint8)
    ours, theirs = base_dataset(), base_dataset()
    set_pixel_data(ours, arr, "MONOCHROME2", 8)
    pydicom_set_pixel_data(theirs, arr, "MONOCHROME2", 8)
    assert ours.NumberOfFrames == theirs.NumberOfFrames == 1
    set_pixel_data(ours, arr[0], "MONOCHROME2", 8)
    assert "NumberOfFrames" not in ours


def test_elements_for_signed_multiframe_rgb():
    arr = np.full((2, 3, 4, 3), -5, dtype=np.int16)
    ds = base_dataset(stale=True)
    set_pixel_data(ds, arr, "RGB", 10)
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns, ds.SamplesPerPixel) == (2, 3, 4, 3)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 10, 9, 1)
    assert ds.PlanarConfiguration == 0 and ds.PhotometricInterpretation == "RGB"


def test_instance_uid_generated_into_dataset_and_file_meta():
    arr = np.zeros((2, 2), dtype=np.uint8)
    ds = base_dataset()
    set_pixel_data(ds, arr, "MONOCHROME2", 8)
    first = ds.SOPInstanceUID
    assert is_valid_uid(first) and first != "1.2.826.0.1.3680043.8.498.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == first
    set_pixel_data(ds, arr, "MONOCHROME2", 8)
    assert ds.SOPInstanceUID != first
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    kept = base_dataset()
    set_pixel_data(kept, arr, "MONOCHROME2", 8, generate_instance_uid=False)
    assert kept.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"


def test_dataset_without_file_meta_gets_one():
    ds = base_dataset(file_meta=False)
    set_pixel_data(ds, np.zeros((2, 2), dtype=bool), "MONOCHROME2", 1)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_compressed_transfer_syntax_becomes_explicit_little_endian():
    ds = base_dataset(JPEGBaseline8Bit, stale=True)
    ds["PixelData"].is_undefined_length = True
    set_pixel_data(ds, np.zeros((2, 2), dtype=np.uint8), "MONOCHROME2", 8)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not ds["PixelData"].is_undefined_length


# --------------------------------------------------------------------------- refusals


def _with(**elements):
    def make():
        ds = base_dataset()
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        return ds

    return make


def _big_endian():
    return base_dataset(ExplicitVRBigEndian)


u1 = np.zeros((4, 4), dtype=np.uint8)
RGB_U1 = np.zeros((4, 4, 3), dtype=np.uint8)

# (id, make dataset, arr, photometric, bits_stored, exception, pydicom raises the same type)
REFUSALS = [
    ("float pixel data", _with(FloatPixelData=b"\x00" * 4), u1, "MONOCHROME2", 8, AttributeError, True),
    ("double float pixel data", _with(DoubleFloatPixelData=b"\x00" * 8), u1, "MONOCHROME2", 8, AttributeError, True),
    ("big-endian transfer syntax", _big_endian, u1, "MONOCHROME2", 8, NotImplementedError, True),
    ("float32", base_dataset, u1.astype(np.float32), "MONOCHROME2", 8, ValueError, True),
    ("int32", base_dataset, u1.astype(np.int32), "MONOCHROME2", 8, ValueError, True),
    ("uint64", base_dataset, u1.astype(np.uint64), "MONOCHROME2", 8, ValueError, True),
    ("complex", base_dataset, u1.astype(np.complex64), "MONOCHROME2", 8, ValueError, True),
    ("object", base_dataset, u1.astype(object), "MONOCHROME2", 8, ValueError, True),
    ("not an array", base_dataset, [[0, 1], [1, 0]], "MONOCHROME2", 8, ValueError, False),
    ("CMYK", base_dataset, RGB_U1, "CMYK", 8, ValueError, True),
    ("YBR_RCT", base_dataset, RGB_U1, "YBR_RCT", 8, ValueError, True),
    ("lower case", base_dataset, u1, "monochrome2", 8, ValueError, True),
    ("empty photometric", base_dataset, u1, "", 8, ValueError, True),
    ("photometric None", base_dataset, u1, None, 8, ValueError, True),
    ("1-D mono", base_dataset, np.zeros(16, np.uint8), "MONOCHROME2", 8, ValueError, True),
    ("4-D mono", base_dataset, np.zeros((1, 2, 2, 2), np.uint8), "MONOCHROME2", 8, ValueError, True),
    ("2-D RGB", base_dataset, u1, "RGB", 8, ValueError, True),
    ("5-D RGB", base_dataset, np.zeros((1, 1, 2, 2, 3), np.uint8), "RGB", 8, ValueError, True),
    ("4 samples", base_dataset, np.zeros((4, 4, 4), np.uint8), "RGB", 8, ValueError, True),
    ("1 sample RGB", base_dataset, np.zeros((2, 4, 4, 1), np.uint8), "YBR_FULL", 8, ValueError, True),
    ("bits_stored 0", base_dataset, u1, "MONOCHROME2", 0, ValueError, True),
    ("bits_stored -1", base_dataset, u1, "MONOCHROME2", -1, ValueError, True),
    ("bits_stored 9 for uint8", base_dataset, u1, "MONOCHROME2", 9, ValueError, True),
    ("bits_stored 17 for int16", base_dataset, u1.astype(np.int16), "MONOCHROME2", 17, ValueError, True),
    ("bits_stored float", base_dataset, u1, "MONOCHROME2", 8.0, ValueError, False),
    ("bits_stored str", base_dataset, u1, "MONOCHROME2", "8", ValueError, False),
    ("bits_stored True", base_dataset, u1, "MONOCHROME2", True, ValueError, False),
    ("bool bits_stored 8", base_dataset, np.zeros((4, 4), bool), "MONOCHROME2", 8, ValueError, False),
    ("bool bits_stored 0", base_dataset, np.zeros((4, 4), bool), "MONOCHROME2", 0, ValueError, False),
    ("bool YBR_FULL_422", base_dataset, np.zeros((4, 4, 3), bool), "YBR_FULL_422", 1, ValueError, False),
    ("uint16 above 12 bits", base_dataset, np.array([[0, 4096]], np.uint16), "MONOCHROME2", 12, ValueError, True),
    ("int16 below 12 bits", base_dataset, np.array([[-2049, 0]], np.int16), "MONOCHROME2", 12, ValueError, True),
    ("int16 above 12 bits", base_dataset, np.array([[2048, 0]], np.int16), "MONOCHROME2", 12, ValueError, True),
    ("int8 above 7 bits", base_dataset, np.array([[64, 0]], np.int8), "MONOCHROME2", 7, ValueError, True),
    ("uint8 above 1 bit", base_dataset, np.array([[2, 0]], np.uint8), "MONOCHROME2", 1, ValueError, True),
    ("empty frames", base_dataset, np.zeros((0, 4, 4), np.uint8), "MONOCHROME2", 8, ValueError, True),
    ("empty rows", base_dataset, np.zeros((0, 4), np.uint8), "MONOCHROME2", 8, ValueError, True),
    ("empty bool", base_dataset, np.zeros((4, 0), bool), "MONOCHROME2", 1, ValueError, False),
    ("odd columns 422", base_dataset, np.zeros((2, 3, 3), np.uint8), "YBR_FULL_422", 8, ValueError, False),
    ("columns over 65535", base_dataset, np.broadcast_to(np.uint8(0), (1, 65536)), "MONOCHROME2", 8, ValueError, False),
    ("rows over 65535", base_dataset, np.broadcast_to(np.uint8(0), (65536, 1)), "MONOCHROME2", 8, ValueError, False),
    ("frames over 2**31-1", base_dataset, np.broadcast_to(np.uint8(0), (2**31, 1, 1)), "MONOCHROME2", 8, ValueError, False),
]


def snapshot(ds: Dataset):
    meta = getattr(ds, "file_meta", None)
    return (
        hasattr(ds, "file_meta"),
        copy.deepcopy(ds),
        None if meta is None else copy.deepcopy(meta),
        {elem.tag: (elem.VR, elem.value, elem.is_undefined_length) for elem in ds},
    )


def assert_untouched(ds: Dataset, before) -> None:
    had_meta, ds_copy, meta_copy, elements = before
    assert hasattr(ds, "file_meta") == had_meta
    assert ds == ds_copy
    if had_meta:
        assert ds.file_meta == meta_copy
    assert {elem.tag: (elem.VR, elem.value, elem.is_undefined_length) for elem in ds} == elements


@pytest.mark.parametrize(
    "make, arr, photometric, bits_stored, error, pydicom_same",
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_refusals_leave_the_dataset_untouched(make, arr, photometric, bits_stored, error, pydicom_same, stale):
    ds = make()
    if stale:  # leftovers of an earlier image, and (unless the case needs it) no file meta
        ds.NumberOfFrames = 7
        ds.PixelData = b"\x01\x02"
        if ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian:
            del ds.file_meta
    before = snapshot(ds)
    with pytest.raises(error) as info:
        set_pixel_data(ds, arr, photometric, bits_stored)
    assert_untouched(ds, before)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    if pydicom_same:
        with pytest.raises(error):
            pydicom_set_pixel_data(make(), arr, photometric, bits_stored)


def test_refusal_messages_name_parameter_value_and_allowed():
    ds = base_dataset()
    with pytest.raises(ValueError, match=r"bits_stored is 9, for a uint8 arr it must be an int from 1 to 8"):
        set_pixel_data(ds, u1, "MONOCHROME2", 9)
    with pytest.raises(ValueError, match=r"photometric_interpretation 'CMYK' is not supported, allowed are"):
        set_pixel_data(ds, RGB_U1, "CMYK", 8)
    with pytest.raises(ValueError, match=r"arr has the unsupported dtype 'float64', allowed are bool"):
        set_pixel_data(ds, u1.astype(float), "MONOCHROME2", 8)
    with pytest.raises(ValueError, match=r"arr holds values up to 4096, but bits_stored 12 allows only \[0, 4095\]"):
        set_pixel_data(ds, np.array([[4096]], np.uint16), "MONOCHROME2", 12)


@pytest.mark.parametrize(
    "shape, dtype, photometric",
    [
        ((20_000, 512, 512), np.uint8, "MONOCHROME2"),  # 5.2 GB
        ((10_000, 512, 512), np.uint16, "MONOCHROME2"),  # 5.2 GB
        ((7_000, 512, 512, 3), np.uint8, "RGB"),  # 5.5 GB
        ((10_000, 512, 512, 3), np.uint8, "YBR_FULL_422"),  # 5.2 GB after subsampling
        ((160_000, 512, 512), bool, "MONOCHROME2"),  # 5.2 GB packed
    ],
)
def test_too_large_is_refused_from_the_shape_without_allocating(shape, dtype, photometric):
    arr = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    ds = base_dataset()
    before = snapshot(ds)
    bits_stored = 1 if dtype is bool else 8
    tracemalloc.start()
    try:
        with pytest.raises(PixelDataTooLarge, match="at most 4294967294"):
            set_pixel_data(ds, arr, photometric, bits_stored)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert issubclass(PixelDataTooLarge, ValueError)
    assert_untouched(ds, before)


def test_length_limit_boundary():
    assert encoded_length((65535, 65535), np.uint8, "MONOCHROME2") <= MAX_PIXEL_DATA_LENGTH
    fits = (1, 65535, 65535)
    assert encoded_length(fits, np.uint8, "MONOCHROME2") == 65535 * 65535 + 1
    # the largest bool frame count that fits: 8 * 4294967294 pixels
    assert encoded_length((8 * 4294967294,), bool, "MONOCHROME2") == MAX_PIXEL_DATA_LENGTH
    assert encoded_length((8 * 4294967294 + 1,), bool, "MONOCHROME2") == MAX_PIXEL_DATA_LENGTH + 2
