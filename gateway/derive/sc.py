"""The Secondary Capture family: single-frame SC or the multi-frame SC class the array fits (pure).

For arrays a SEG cannot carry (values, not labels; RGB; no plane geometry), or when the sidecar
asks for one. Per-frame source references only when the frames match the source slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from gateway.derive import encode
from gateway.derive.common import (
    MF_GRAYSCALE_BYTE_SC,
    MF_GRAYSCALE_WORD_SC,
    MF_SINGLE_BIT_SC,
    MF_TRUE_COLOR_SC,
    SECONDARY_CAPTURE,
    SOP_CLASS_NAMES,
    Derived,
    Options,
    check_bits,
    common_modules,
    da,
    tm,
    value_range,
)
from gateway.errors import JobError
from gateway.derive.geometry import source_geometry
from gateway.inbox.sidecar import Job, Kind


def _sc_layout(arr: np.ndarray, job: Job) -> tuple[np.ndarray, str, int, bool]:
    """Normalize to (frames, rows, columns[, 3]); return it, photometric, bits stored, color."""
    photometric = job.photometric_interpretation
    if photometric is None:
        photometric = "RGB" if arr.ndim == 4 and arr.shape[-1] == 3 else "MONOCHROME2"
    color = photometric == "RGB"
    if color:
        if arr.ndim == 3 and arr.shape[-1] == 3:
            arr = arr[np.newaxis]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise JobError(
                f"an RGB secondary capture needs shape (frames, rows, columns, 3) or (rows, "
                f"columns, 3), got {arr.shape}"
            )
        if arr.dtype != np.uint8:
            raise JobError(f"an RGB secondary capture needs a uint8 array, got {arr.dtype}")
        bits = job.bits_stored or 8
        if bits != 8:
            raise JobError(f"an RGB secondary capture stores 8 bits per sample, not bits_stored {bits}")
        return arr, photometric, 8, True
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise JobError(
            f"a grayscale secondary capture needs shape (frames, rows, columns) or (rows, "
            f"columns), got {arr.shape}"
        )
    default_bits = 1 if arr.dtype.kind == "b" else arr.dtype.itemsize * 8
    bits = job.bits_stored or default_bits
    if bits > arr.dtype.itemsize * 8 and arr.dtype.kind != "b":
        raise JobError(f"bits_stored {bits} is more than the array's {arr.dtype} holds")
    return arr, photometric, bits, False


def secondary_capture(sources: Sequence[Dataset], arr: np.ndarray, job: Job, opts: Options) -> Derived:
    """Called by ``derive.derive`` once dtype and bits_stored are checked; raises ``JobError``."""
    if not sources:
        raise JobError("the source study has no images in the gateway's store")
    arr, photometric, bits, color = _sc_layout(arr, job)
    check_bits(arr, bits)
    frames, rows, columns = arr.shape[:3]
    if arr.dtype.kind == "b" and bits != 1:
        raise JobError(f"a bool array is stored with 1 bit, not bits_stored {bits}")
    intercept = 0
    if arr.dtype.kind == "i" and not color:
        low, _ = value_range(arr)
        unsigned = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
        if low < 0 and frames > 1:
            # Multi-frame SCs store unsigned pixels only: shift by 2^(bits-1) and say so in
            # Rescale Intercept, so the modality LUT gives the original values back.
            intercept = -(2 ** (bits - 1))
            arr = (arr.astype(np.int32) - intercept).astype(unsigned)
        elif low >= 0:
            arr = arr.astype(unsigned)
    if frames == 1:
        sop_class = SECONDARY_CAPTURE
    elif color:
        sop_class = MF_TRUE_COLOR_SC
    elif arr.dtype.kind == "b" or bits == 1:
        sop_class = MF_SINGLE_BIT_SC
    elif arr.dtype.itemsize == 1:
        sop_class = MF_GRAYSCALE_BYTE_SC
    else:
        sop_class = MF_GRAYSCALE_WORD_SC
    if sop_class == MF_GRAYSCALE_WORD_SC and bits < 9:
        arr = arr.astype(np.uint8)
        sop_class = MF_GRAYSCALE_BYTE_SC
    if sop_class == MF_SINGLE_BIT_SC:
        arr = arr.astype(bool)
        bits = 1
    if sop_class == MF_GRAYSCALE_BYTE_SC:
        bits = 8  # this SOP class stores 8 bits; values were checked against bits_stored above
    if sop_class != SECONDARY_CAPTURE and photometric == "MONOCHROME1":
        raise JobError(
            "multi-frame secondary captures are MONOCHROME2 only; invert the values and use "
            "photometric_interpretation: MONOCHROME2"
        )

    geo = None
    if job.source.series_instance_uid and sources:
        try:
            geo = source_geometry(sources)
        except JobError:
            geo = None
        if geo is not None and len(geo.frames) != frames:
            geo = None  # not one frame per source slice: no per-frame references
    source = sources[0]
    series_uid, sop_uid = opts.new_uid(), opts.new_uid()
    ds = Dataset()
    common_modules(ds, source, job, opts, sop_class, "OT", series_uid, sop_uid)
    # General Series Laterality is 2C: copy what the source says; without it, Body Part
    # Examined tells checkers whether the part is paired; with neither, present but empty.
    if "BodyPartExamined" in source:
        ds.BodyPartExamined = source.BodyPartExamined
    if "Laterality" in source or "BodyPartExamined" not in source:
        ds.Laterality = source.get("Laterality", "")
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"AI result {opts.job_name}"[:1024]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.DateOfSecondaryCapture = da(opts.now)
    ds.TimeOfSecondaryCapture = tm(opts.now)
    if geo is not None:
        refs = []
        for f in geo.frames:
            item = Dataset()
            item.ReferencedSOPClassUID = f.sop_class_uid
            item.ReferencedSOPInstanceUID = f.sop_instance_uid
            if f.frame_number is not None:
                item.ReferencedFrameNumber = f.frame_number
            refs.append(item)
        ds.SourceImageSequence = refs
    if sop_class != SECONDARY_CAPTURE:
        if geo is not None:
            ds.FrameIncrementPointer = Tag(0x0018, 0x2005)  # Slice Location Vector
            ds.SliceLocationVector = [round(f.distance, 6) for f in geo.frames]
        else:
            ds.FrameIncrementPointer = Tag(0x0018, 0x2001)  # Page Number Vector
            ds.PageNumberVector = list(range(1, frames + 1))
        if not color and bits > 1:
            ds.PresentationLUTShape = "IDENTITY"
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = 1
            ds.RescaleType = "US"

    pixels = arr[0] if frames == 1 else arr
    encode.set_pixel_data(ds, pixels, photometric, bits, generate_instance_uid=False)
    if sop_class != SECONDARY_CAPTURE:
        ds.NumberOfFrames = frames
    ds.SOPInstanceUID = sop_uid
    name = SOP_CLASS_NAMES[sop_class]
    summary = f"{name}, {frames} frame(s) of {rows}x{columns}, {photometric}, {bits} bit(s)"
    if intercept:
        summary += f", values shifted by {-intercept} (Rescale Intercept {intercept})"
    return Derived(ds, Kind.SECONDARY_CAPTURE, sop_class, sop_uid, series_uid,
                   str(source.StudyInstanceUID), frames, 0, summary)
