"""A classic BINARY Segmentation on the source series: one frame per (segment, source plane) kept (pure).

Frames run segment-major, then in ascending position along the slice normal (``geometry``),
and each names its source image, so viewers can overlay it without resampling.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from gateway.derive import encode
from gateway.derive.common import (
    SEGMENTATION_STORAGE,
    Derived,
    Options,
    common_modules,
    value_range,
)
from gateway.errors import JobError
from gateway.derive.geometry import source_geometry
from gateway.inbox.sidecar import Job, Kind, Segment


def _code(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _content_label(job_name: str) -> str:
    """Content Label is a CS: upper case, 16 characters, no punctuation but underscore."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", job_name.upper())[:16].strip()
    return label or "AI_RESULT"


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


def segmentation(sources: Sequence[Dataset], arr: np.ndarray, job: Job, opts: Options) -> Derived:
    """Called by ``derive.derive`` once dtype and bits_stored are checked; raises ``JobError``."""
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
