"""Source series + array + job -> a DICOM Segmentation or Secondary Capture dataset (pure).

Everything arrives as arguments (source headers, the array, the parsed sidecar, the clock and
the UID generator), so tests need no files or sockets. Pixel data goes only through
``encode.set_pixel_data``. Every problem a user can fix raises ``errors.JobError`` with one
sentence; nothing is written to a dataset until every check has passed.

Frame order: frame k of the array is the k-th source plane as ``geometry`` orders them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from gateway import encode
from gateway.derive_common import (
    DEFAULT_SERIES_NUMBER,
    MF_GRAYSCALE_BYTE_SC,
    MF_GRAYSCALE_WORD_SC,
    MF_SINGLE_BIT_SC,
    MF_TRUE_COLOR_SC,
    SECONDARY_CAPTURE,
    SEGMENTATION_STORAGE,
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
from gateway.geometry import source_geometry
from gateway.sidecar import Job, Kind, Segment, default_kind

# The names callers reach through ``derive`` (inbox, offline, tests).
__all__ = [
    "DEFAULT_SERIES_NUMBER", "MF_GRAYSCALE_BYTE_SC", "MF_GRAYSCALE_WORD_SC", "MF_SINGLE_BIT_SC",
    "MF_TRUE_COLOR_SC", "SECONDARY_CAPTURE", "SEGMENTATION_STORAGE", "SOP_CLASS_NAMES",
    "Derived", "Options", "derive",
]

_SC_DTYPES = {"bool", "uint8", "int8", "uint16", "int16"}


def _check_dtype(arr: np.ndarray, kind: Kind) -> None:
    dt = arr.dtype
    if dt.kind == "f":
        raise JobError(
            f"the array is {dt} (floating point); DICOM SEG and Secondary Capture need integers "
            "or bool, so threshold or round it (bool mask, uint8/uint16 labels or values) first"
        )
    if dt.kind not in "biu":
        raise JobError(
            f"the array's dtype {dt} is not supported; use bool, uint8, int8, uint16 or int16"
        )
    if kind is Kind.SECONDARY_CAPTURE and dt.name not in _SC_DTYPES:
        raise JobError(
            f"the array's dtype {dt} is too wide for a secondary capture; use bool, uint8, int8, "
            "uint16 or int16"
        )


# --------------------------------------------------------------------------- shared modules


def _code(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item



def _content_label(job_name: str) -> str:
    label = re.sub(r"[^A-Z0-9_ ]", "_", job_name.upper())[:16].strip()
    return label or "AI_RESULT"



# --------------------------------------------------------------------------- segmentation


def _segment_item(number: int, seg: Segment) -> Dataset:
    item = Dataset()
    item.SegmentNumber = number
    item.SegmentLabel = seg.label
    item.SegmentedPropertyCategoryCodeSequence = [
        _code(seg.category.scheme, seg.category.value, seg.category.meaning)
    ]
    item.SegmentedPropertyTypeCodeSequence = [
        _code(seg.type.scheme, seg.type.value, seg.type.meaning)
    ]
    item.SegmentAlgorithmType = seg.algorithm_type
    if seg.algorithm_type != "MANUAL":
        item.SegmentAlgorithmName = seg.algorithm_name
    return item


def _segments(arr: np.ndarray, job: Job) -> list[Segment]:
    """The segment descriptions: one for a bool mask, one per label value of a label map."""
    if arr.dtype.kind == "b":
        if job.segments is not None and len(job.segments) != 1:
            raise JobError(
                f"a bool mask is one segment, but the sidecar describes {len(job.segments)}; "
                "give one segment or send an integer label map"
            )
        return list(job.segments or [Segment(label="Segment 1")])
    low, high = value_range(arr)
    if low < 0:
        raise JobError(
            f"the label map holds the negative value {low}; labels are 0 (background) and "
            "1 to N for the N segments"
        )
    if job.segments is not None:
        if high > len(job.segments):
            raise JobError(
                f"the label map holds the value {high} but the sidecar describes "
                f"{len(job.segments)} segment(s) (values 1 to {len(job.segments)}); add the "
                "missing segments"
            )
        return list(job.segments)
    if high > 255:
        raise JobError(
            f"the label map holds the value {high}; describe its segments in the sidecar "
            "(at most 255)"
        )
    return [Segment(label=f"Segment {k}") for k in range(1, max(high, 1) + 1)]


def _occupancy(arr: np.ndarray, n_segments: int) -> np.ndarray:
    """(segments, frames) bool: does segment s have a pixel in frame k (one pass, no copies)."""
    if arr.dtype.kind == "b":
        return arr.reshape(arr.shape[0], -1).any(axis=1)[np.newaxis]
    occupied = np.zeros((n_segments + 1, arr.shape[0]), dtype=bool)
    for k in range(arr.shape[0]):
        counts = np.bincount(arr[k].ravel().astype(np.intp, copy=False), minlength=n_segments + 1)
        occupied[:, k] = counts[: n_segments + 1] > 0
    return occupied[1:]


def _segmentation(sources: Sequence[Dataset], arr: np.ndarray, job: Job, opts: Options) -> Derived:
    if not job.source.series_instance_uid:
        raise JobError(
            "a segmentation needs source.series_instance_uid in the sidecar (the series the "
            "mask was computed on)"
        )
    geo = source_geometry(sources)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise JobError(
            f"a segmentation array must be (frames, rows, columns), got shape {arr.shape}"
        )
    want = (len(geo.frames), geo.rows, geo.columns)
    if arr.shape != want:
        raise JobError(
            f"the array's shape {arr.shape} does not match the source series' (frames, rows, "
            f"columns) {want}; frame k must be the k-th slice in ascending position"
        )
    segments = _segments(arr, job)

    # Which (segment, source plane) pairs become frames: segment-major, then position.
    occupied = _occupancy(arr, len(segments))
    chosen = [
        (number, k)
        for number in range(1, len(segments) + 1)
        for k in range(arr.shape[0])
        if opts.keep_empty_frames or occupied[number - 1, k]
    ]
    if not chosen:
        chosen = [(1, 0)]  # nothing segmented: one empty frame keeps the object valid
    # Only the frames kept are materialized: memory is the output, whatever the label count.
    pixels = np.empty((len(chosen), arr.shape[1], arr.shape[2]), dtype=bool)
    for i, (number, k) in enumerate(chosen):
        if arr.dtype.kind == "b":
            pixels[i] = arr[k]
        else:
            np.equal(arr[k], number, out=pixels[i])

    source = sources[0]
    series_uid, sop_uid, dim_uid = opts.new_uid(), opts.new_uid(), opts.new_uid()
    ds = Dataset()
    common_modules(ds, source, job, opts, SEGMENTATION_STORAGE, "SEG", series_uid, sop_uid)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    if geo.frame_of_reference_uid:
        ds.FrameOfReferenceUID = geo.frame_of_reference_uid
        ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.ContentLabel = _content_label(opts.job_name)
    ds.ContentDescription = f"AI result {opts.job_name}"[:64]
    ds.ContentCreatorName = ""
    ds.LossyImageCompression = "00"
    ds.SegmentationType = "BINARY"
    ds.SegmentSequence = [_segment_item(k, seg) for k, seg in enumerate(segments, start=1)]
    ds.SegmentsOverlap = "NO" if len(segments) == 1 or arr.dtype.kind != "b" else "UNDEFINED"

    # Common Instance Reference: every source instance of the series.
    seen: dict[str, str] = {}
    for f in geo.frames:
        seen.setdefault(f.sop_instance_uid, f.sop_class_uid)
    refs = []
    for uid, cls in seen.items():
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    series_item = Dataset()
    series_item.ReferencedInstanceSequence = refs
    series_item.SeriesInstanceUID = geo.series_instance_uid
    ds.ReferencedSeriesSequence = [series_item]

    # Multi-frame Dimension: segment number, then position.
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [org]
    ds.DimensionOrganizationType = "3D"
    dims = []
    for pointer, group, label in (
        (Tag(0x0062, 0x000B), Tag(0x0062, 0x000A), "Referenced Segment Number"),
        (Tag(0x0020, 0x0032), Tag(0x0020, 0x9113), "Image Position Patient"),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        item.DimensionDescriptionLabel = label
        dims.append(item)
    ds.DimensionIndexSequence = dims

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = geo.orientation
    shared.PlaneOrientationSequence = [orient]
    measures = Dataset()
    if geo.pixel_spacing is not None:
        measures.PixelSpacing = geo.pixel_spacing
    if geo.slice_thickness is not None:
        measures.SliceThickness = geo.slice_thickness
    if geo.spacing_between_slices is not None:
        measures.SpacingBetweenSlices = geo.spacing_between_slices
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    for number, k in chosen:
        f = geo.frames[k]
        item = Dataset()
        src = Dataset()
        src.ReferencedSOPClassUID = f.sop_class_uid
        src.ReferencedSOPInstanceUID = f.sop_instance_uid
        if f.frame_number is not None:
            src.ReferencedFrameNumber = f.frame_number
        src.SpatialLocationsPreserved = "YES"
        src.PurposeOfReferenceCodeSequence = [
            _code("DCM", "121322", "Source image for image processing operation")
        ]
        derivation = Dataset()
        derivation.SourceImageSequence = [src]
        derivation.DerivationCodeSequence = [_code("DCM", "113076", "Segmentation")]
        item.DerivationImageSequence = [derivation]
        content = Dataset()
        content.DimensionIndexValues = [number, k + 1]
        item.FrameContentSequence = [content]
        position = Dataset()
        position.ImagePositionPatient = f.position_value
        item.PlanePositionSequence = [position]
        ident = Dataset()
        ident.ReferencedSegmentNumber = number
        item.SegmentIdentificationSequence = [ident]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)

    encode.set_pixel_data(ds, pixels, "MONOCHROME2", 1, generate_instance_uid=False)
    ds.NumberOfFrames = len(chosen)
    ds.SOPInstanceUID = sop_uid
    summary = (
        f"Segmentation, {len(segments)} segment(s), {len(chosen)} frame(s) of "
        f"{geo.rows}x{geo.columns} on series {geo.series_instance_uid}"
    )
    return Derived(ds, Kind.SEGMENTATION, SEGMENTATION_STORAGE, sop_uid, series_uid,
                   str(source.StudyInstanceUID), len(chosen), len(segments), summary)


# --------------------------------------------------------------------------- secondary capture


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


def _secondary_capture(sources: Sequence[Dataset], arr: np.ndarray, job: Job, opts: Options) -> Derived:
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


# --------------------------------------------------------------------------- entry point


def derive(sources: Sequence[Dataset], arr: np.ndarray, job: Job, opts: Options) -> Derived:
    """Build the derived dataset for one job.

    ``sources``: the source series' instances (headers are enough; pixel data is never read),
    or for a secondary capture with only ``source.study_instance_uid``, any instance of the
    study. Raises ``JobError`` when the array, sidecar and sources do not fit together.
    """
    kind = default_kind(job, arr.dtype.kind)
    _check_dtype(arr, kind)
    if job.bits_stored is not None:
        check_bits(arr, job.bits_stored)
    if arr.size == 0:
        raise JobError(f"the array is empty (shape {arr.shape})")
    if kind is Kind.SEGMENTATION:
        if job.photometric_interpretation not in (None, "MONOCHROME2"):
            raise JobError(
                "a segmentation is always MONOCHROME2; drop photometric_interpretation or use "
                "kind: secondary_capture"
            )
        return _segmentation(sources, arr, job, opts)
    if job.segments is not None and job.kind is Kind.SECONDARY_CAPTURE:
        raise JobError("segments describe a segmentation; drop them or use kind: segmentation")
    return _secondary_capture(sources, arr, job, opts)
