"""Pixel data encoder (pure): pydicom 3.1's ``set_pixel_data`` contract, bool masks included.

Every derived object's pixels pass through :func:`set_pixel_data`. It checks everything
first and only then touches the dataset, so a refused call leaves ``ds`` exactly as it was.
The encoded bytes are written straight into the final ``bytes`` object (no intermediate
copy of the whole image), so peak extra memory stays close to the encoded size.
"""

from __future__ import annotations

import ctypes
import math
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import VR

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "MAX_PIXEL_DATA_LENGTH",
    "PHOTOMETRIC_SAMPLES",
    "PixelDataTooLarge",
    "encoded_length",
    "set_pixel_data",
]

# A defined-length element holds at most 2**32 - 2 bytes (0xFFFFFFFF means undefined length).
MAX_PIXEL_DATA_LENGTH = 0xFFFFFFFE
# Samples per Pixel for each accepted Photometric Interpretation (retired ones like CMYK and
# compressed-only ones like YBR_RCT are refused, as pydicom does).
PHOTOMETRIC_SAMPLES: dict[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
}
_DTYPES = ("bool", "int8", "int16", "uint8", "uint16")
_MAX_US = 65535  # Rows and Columns are US
_MAX_IS = 2**31 - 1  # Number of Frames is IS
# Input elements per chunk when bit-packing: small enough to stay in cache, large enough
# that the per-chunk Python overhead is noise.
_PACK_CHUNK = 1 << 21


class PixelDataTooLarge(ValueError):
    """The encoded Pixel Data would not fit a defined-length element (over 4294967294 bytes)."""


def set_pixel_data(
    ds: Dataset,
    arr: np.ndarray,
    photometric_interpretation: str,
    bits_stored: int,
    *,
    generate_instance_uid: bool = True,
) -> None:
    """Set ``ds``'s *Pixel Data* and Image Pixel module elements from ``arr``.

    Behaves as pydicom 3.1 documents ``pydicom.pixels.set_pixel_data`` (bool arrays
    included, which the installed pydicom 3.0 refuses); for every input pydicom 3.0 accepts
    and encodes correctly, the resulting dataset is byte for byte the one pydicom produces.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The little-endian dataset to change in place.
    arr : numpy.ndarray
        dtype ``bool``, ``uint8``, ``uint16``, ``int8`` or ``int16`` (any byte order, any
        strides, broadcast views included), shaped ``(rows, columns)`` or
        ``(frames, rows, columns)`` for one sample per pixel, ``(rows, columns, 3)`` or
        ``(frames, rows, columns, 3)`` for three.
    photometric_interpretation : str
        ``"MONOCHROME1"``, ``"MONOCHROME2"`` or ``"PALETTE COLOR"`` (1 sample);
        ``"RGB"``, ``"YBR_FULL"`` or ``"YBR_FULL_422"`` (3 samples).
    bits_stored : int
        1 for bool arrays; otherwise 1 up to the bits of the dtype (8 or 16). Every value
        of ``arr`` must fit: ``0 .. 2**bits_stored - 1`` unsigned,
        ``-2**(bits_stored-1) .. 2**(bits_stored-1) - 1`` signed.
    generate_instance_uid : bool, keyword only
        When true (default) a fresh *SOP Instance UID* is written to the dataset and to the
        file meta's *Media Storage SOP Instance UID*.

    What is set
    -----------
    *Samples per Pixel*, *Photometric Interpretation*, *Planar Configuration* (0 for three
    samples, removed for one), *Number of Frames* (from the shape; removed for a 2-D mono or
    3-D colour array), *Rows*, *Columns*, *Bits Allocated* (1 for bool, else 8 or 16),
    *Bits Stored*, *High Bit* (``bits_stored - 1``), *Pixel Representation* (1 for signed,
    else 0). *Pixel Data* gets VR OB (Bits Allocated 1 or 8) or OW (16), defined length,
    padded with one zero byte to even length. The file meta is created if missing, and its
    *Transfer Syntax UID* set to Explicit VR Little Endian when absent or compressed.

    bool arrays are packed 8 pixels to a byte, least significant bit first, running on across
    row and frame boundaries (no per-frame padding), exactly as ``pydicom.pixels.pack_bits``
    packs ``arr.astype(numpy.uint8)``; pydicom's decoder unpacks them to the input.

    YBR_FULL_422 keeps every Y, and the Cb and Cr of the first pixel of each horizontal
    pair: ``Y1 Y2 Cb1 Cr1 Y3 Y4 Cb3 Cr3 ...`` per row (PS3.3 C.7.6.3.1.2).

    Edge cases
    ----------
    * Documentation versus pydicom: a ``(1, rows, columns)`` mono or
      ``(1, rows, columns, 3)`` colour array keeps *Number of Frames* = 1, although the
      documentation says a single frame removes it; we follow pydicom's output.
    * Refusals happen before any change; pydicom 3.0 adds an empty file meta before some.
    * Non-native byte order arrays (``dtype('>u2')``) are encoded by value, little endian;
      pydicom 3.0 would write their raw big-endian bytes.
    * Refused although pydicom 3.0 goes ahead: YBR_FULL_422 with an odd number of columns
      (the standard pairs pixels within a row; pydicom's flattened pairing straddles rows,
      or fails after changing ``ds``), empty arrays (pydicom fails in ``arr.min()``), Rows
      or Columns over 65535 and more than 2**31 - 1 frames (pydicom fails when writing),
      and a bool arr with YBR_FULL_422 (1-bit samples have no 4:2:2 form).

    Raises
    ------
    AttributeError
        ``ds`` has Float Pixel Data or Double Float Pixel Data (as pydicom).
    NotImplementedError
        The dataset's transfer syntax is big endian (as pydicom).
    PixelDataTooLarge
        (a ``ValueError``) the encoded length would exceed 4294967294 bytes; decided from
        the shape alone, so huge broadcast views are refused without reading them.
    ValueError
        Anything else about ``arr``, ``photometric_interpretation`` or ``bits_stored`` that
        is not allowed; the message names the parameter, the value and what is allowed.
    """
    plan = _check(ds, arr, photometric_interpretation, bits_stored)
    data = _encode(arr, plan)
    _apply(ds, plan, data, generate_instance_uid)


def encoded_length(
    shape: tuple[int, ...], dtype: np.dtype | str, photometric_interpretation: str
) -> int:
    """Length in bytes of the Pixel Data ``set_pixel_data`` writes (even, padding included)."""
    dtype = np.dtype(dtype)
    n_values = math.prod(int(n) for n in shape)
    if dtype.kind == "b":
        length = (n_values + 7) // 8
    else:
        if photometric_interpretation == "YBR_FULL_422":
            n_values = n_values // 3 * 2
        length = n_values * dtype.itemsize
    return length + (length & 1)


# --------------------------------------------------------------------------- checks


class _Plan:
    """What the checks decided; ``_encode`` and ``_apply`` only carry it out."""

    __slots__ = ("bits_allocated", "changes", "is_bool", "length", "tsyntax", "ybr422")

    def __init__(self, changes, length, bits_allocated, is_bool, ybr422, tsyntax):
        self.changes: list[tuple[str, Any]] = changes
        self.length: int = length
        self.bits_allocated: int = bits_allocated
        self.is_bool: bool = is_bool
        self.ybr422: bool = ybr422
        self.tsyntax = tsyntax


def _check(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int) -> _Plan:
    """Every refusal, in pydicom's order, reading nothing but the shape until the last one."""
    for tag, name in ((0x7FE00008, "Float Pixel Data"), (0x7FE00009, "Double Float Pixel Data")):
        if tag in ds:
            raise AttributeError(
                f"ds has a (7FE0,{tag & 0xFFFF:04X}) '{name}' element, so its SOP Class is not "
                "one for integer 'Pixel Data': delete that element and change the "
                "'SOP Class UID' first"
            )

    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    if tsyntax and not tsyntax.is_little_endian:
        raise NotImplementedError(
            f"ds has the big-endian transfer syntax '{tsyntax.name}', only little-endian "
            "transfer syntaxes are supported"
        )

    if not isinstance(arr, np.ndarray):
        # ValueError, not TypeError: every refusal pydicom lacks is a ValueError (issue 4)
        raise ValueError(f"arr must be a numpy.ndarray, got {type(arr).__name__}")  # noqa: TRY004
    dtype, shape, ndim = arr.dtype, arr.shape, arr.ndim
    is_bool = dtype.kind == "b"
    if not (is_bool or (dtype.kind in "ui" and dtype.itemsize in (1, 2))):
        raise ValueError(
            f"arr has the unsupported dtype '{dtype}', allowed are {', '.join(_DTYPES)}"
        )

    if not isinstance(photometric, str) or photometric not in PHOTOMETRIC_SAMPLES:
        raise ValueError(
            f"photometric_interpretation {photometric!r} is not supported, allowed are "
            f"{', '.join(repr(p) for p in PHOTOMETRIC_SAMPLES)}"
        )
    samples = PHOTOMETRIC_SAMPLES[photometric]

    if samples == 1:
        if ndim not in (2, 3):
            raise ValueError(
                f"arr has shape {shape}, but {photometric} data must be (rows, columns) or "
                "(frames, rows, columns)"
            )
        frames = shape[0] if ndim == 3 else None
        rows, columns = shape[-2], shape[-1]
    else:
        if ndim not in (3, 4) or shape[-1] != samples:
            raise ValueError(
                f"arr has shape {shape}, but {photometric} data must be (rows, columns, 3) "
                "or (frames, rows, columns, 3)"
            )
        frames = shape[0] if ndim == 4 else None
        rows, columns = shape[-3], shape[-2]

    if 0 in shape:
        raise ValueError(f"arr has shape {shape}, every dimension must be at least 1")
    if rows > _MAX_US or columns > _MAX_US:
        raise ValueError(
            f"arr has {rows} rows and {columns} columns, at most {_MAX_US} of each are allowed"
        )
    if frames is not None and frames > _MAX_IS:
        raise ValueError(f"arr has {frames} frames, at most {_MAX_IS} are allowed")
    if photometric == "YBR_FULL_422" and columns % 2:
        raise ValueError(
            f"arr has {columns} columns, YBR_FULL_422 needs an even number of columns "
            "(Cb and Cr are shared by horizontal pairs of pixels)"
        )

    if is_bool:
        if photometric == "YBR_FULL_422":
            raise ValueError(
                "photometric_interpretation 'YBR_FULL_422' cannot hold a bool arr: 1-bit "
                "samples have no 4:2:2 encoding, use 'RGB', 'YBR_FULL' or a monochrome one"
            )
        if isinstance(bits_stored, bool) or not _is_int(bits_stored) or bits_stored != 1:
            raise ValueError(f"bits_stored is {bits_stored!r}, a bool arr needs exactly 1")
        bits_allocated = 1
    else:
        bits_allocated = dtype.itemsize * 8
        if (
            isinstance(bits_stored, bool)
            or not _is_int(bits_stored)
            or not 0 < bits_stored <= bits_allocated
        ):
            raise ValueError(
                f"bits_stored is {bits_stored!r}, for a {dtype} arr it must be an int from "
                f"1 to {bits_allocated}"
            )
    bits_stored = operator.index(bits_stored)

    length = encoded_length(shape, dtype, photometric)
    if length > MAX_PIXEL_DATA_LENGTH:
        raise PixelDataTooLarge(
            f"arr of shape {shape} and dtype {dtype} encodes to {length} bytes of Pixel Data, "
            f"at most {MAX_PIXEL_DATA_LENGTH} fit a defined-length element"
        )

    signed = dtype.kind == "i"
    if not is_bool and bits_stored < bits_allocated:
        # Only now read the values; full-width bits_stored allows every value of the dtype.
        low = -(1 << (bits_stored - 1)) if signed else 0
        high = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
        actual_max = int(arr.max())
        actual_min = int(arr.min()) if signed else None
        if (actual_min is not None and actual_min < low) or actual_max > high:
            found = f"[{actual_min}, {actual_max}]" if signed else f"up to {actual_max}"
            raise ValueError(
                f"arr holds values {found}, but bits_stored {bits_stored} allows only "
                f"[{low}, {high}]"
            )

    changes: list[tuple[str, Any]] = [
        ("NumberOfFrames", None if frames is None else int(frames)),
        ("Rows", int(rows)),
        ("Columns", int(columns)),
        ("SamplesPerPixel", samples),
        ("PlanarConfiguration", 0 if samples > 1 else None),
        ("PhotometricInterpretation", photometric),
        ("BitsAllocated", bits_allocated),
        ("BitsStored", bits_stored),
        ("HighBit", bits_stored - 1),
        ("PixelRepresentation", 1 if signed else 0),
    ]
    return _Plan(changes, length, bits_allocated, is_bool, photometric == "YBR_FULL_422", tsyntax)


def _is_int(value: object) -> bool:
    """True for Python and numpy integers (anything ``operator.index`` takes)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------- encoding


def _encode(arr: np.ndarray, plan: _Plan) -> Any:
    """The Pixel Data, written in place into one freshly made buffer (see ``_new_bytes``)."""
    data, out = _new_bytes(plan.length)
    if plan.is_bool:
        _pack_into(arr, out)
        return data
    n_values = math.prod(arr.shape)
    if plan.ybr422:
        n_values = n_values // 3 * 2
    used = n_values * arr.dtype.itemsize
    out[used:] = 0  # the even-length pad byte, if any
    target = out[:used].view(arr.dtype.newbyteorder("<"))
    if plan.ybr422:
        # (..., columns, 3) -> (..., columns / 2, 4): Y1 Y2 Cb1 Cr1 for each horizontal pair
        pairs = target.reshape(arr.shape[:-2] + (arr.shape[-2] // 2, 4))
        np.copyto(pairs[..., 0], arr[..., 0::2, 0])
        np.copyto(pairs[..., 1], arr[..., 1::2, 0])
        np.copyto(pairs[..., 2], arr[..., 0::2, 1])
        np.copyto(pairs[..., 3], arr[..., 0::2, 2])
    else:
        np.copyto(target.reshape(arr.shape), arr)
    return data


def _pack_into(arr: np.ndarray, out: np.ndarray) -> None:
    """Bit-pack ``arr`` in C order into ``out`` (LSB first, zero tail), chunk by chunk."""
    pos = 0
    carry: np.ndarray | None = None
    for chunk in _c_order_chunks(arr):
        if carry is not None:
            chunk = np.concatenate((carry, chunk))
        whole = len(chunk) & ~7
        carry = chunk[whole:] if whole < len(chunk) else None
        if whole:
            packed = np.packbits(chunk[:whole], bitorder="little")
            out[pos : pos + packed.size] = packed
            pos += packed.size
    if carry is not None:
        packed = np.packbits(carry, bitorder="little")
        out[pos : pos + packed.size] = packed
        pos += packed.size
    out[pos:] = 0


def _c_order_chunks(arr: np.ndarray) -> Iterator[np.ndarray]:
    """1-D pieces of ``arr`` in C order, each about ``_PACK_CHUNK`` elements or fewer."""
    if arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        # _PACK_CHUNK is a multiple of 8: only the last piece can end inside a byte
        for start in range(0, flat.size, _PACK_CHUNK):
            yield flat[start : start + _PACK_CHUNK]
        return
    if arr.size <= _PACK_CHUNK or arr.ndim == 1:
        yield np.ascontiguousarray(arr).reshape(-1)
        return
    if arr.shape[0] == 1:
        yield from _c_order_chunks(arr[0])
        return
    k = max(1, _PACK_CHUNK // (arr.size // arr.shape[0]))
    for start in range(0, arr.shape[0], k):
        yield from _c_order_chunks(arr[start : start + k])


def _bytes_from_api(length: int) -> tuple[bytes, np.ndarray]:
    """A new, unshared bytes object of ``length`` and a writable uint8 view of its buffer.

    ``PyBytes_FromStringAndSize(NULL, n)`` is CPython's documented way to make a bytes
    object that its creator fills before anyone else sees it; this saves the whole-image
    copy ``ndarray.tobytes()`` would make (time and peak memory).
    """
    data = _PyBytes_FromStringAndSize(None, length)
    buffer = (ctypes.c_ubyte * length).from_address(id(data) + _BYTES_DATA_OFFSET)
    return data, np.frombuffer(buffer, dtype=np.uint8)


def _probe_bytes_api() -> bool:
    """True when writing through ``_bytes_from_api`` really lands in the bytes object."""
    try:
        data, view = _bytes_from_api(16)
        view[:] = np.arange(16, dtype=np.uint8)
        return type(data) is bytes and data == bytes(range(16))
    except Exception:  # noqa: BLE001 - any failure means: use the copying path
        return False


try:
    _PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
    _PyBytes_FromStringAndSize.restype = ctypes.py_object
    _PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    _BYTES_DATA_OFFSET = bytes.__basicsize__ - 1  # offset of ob_sval in PyBytesObject
    _HAVE_BYTES_API = _probe_bytes_api()
except (AttributeError, OSError):
    _HAVE_BYTES_API = False


class _ArrayHolder:
    """Copying fallback (non-CPython): an array filled first, turned into bytes last."""

    def __init__(self, length: int):
        self.view = np.zeros(length, dtype=np.uint8)


def _new_bytes(length: int) -> tuple[Any, np.ndarray]:
    """The object that becomes Pixel Data, and a writable uint8 view to fill it through."""
    if _HAVE_BYTES_API and length >= 2:  # 0 and 1 byte objects may be shared singletons
        return _bytes_from_api(length)
    holder = _ArrayHolder(length)
    return holder, holder.view


def _finish(data: Any) -> bytes:
    """The filled buffer as ``bytes``."""
    return data.view.tobytes() if isinstance(data, _ArrayHolder) else data


# --------------------------------------------------------------------------- applying


def _apply(ds: Dataset, plan: _Plan, data: Any, generate_instance_uid: bool) -> None:
    """Write the checked changes, in pydicom's order so the datasets compare equal."""
    from pydicom.dataset import FileMetaDataset

    data = _finish(data)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    for keyword, value in plan.changes:
        if value is not None:
            setattr(ds, keyword, value)
        elif keyword in ds:
            del ds[keyword]

    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = VR.OB if plan.bits_allocated <= 8 else VR.OW
    elem.is_undefined_length = False
    ds._pixel_array = None
    ds._pixel_id = {}

    if not plan.tsyntax or plan.tsyntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if generate_instance_uid:
        instance_uid = generate_uid()
        ds.SOPInstanceUID = instance_uid
        ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
