"""Where the source images lie: one stack of parallel planes, ordered along the slice normal (pure).

Frame k of a derived array is the k-th plane in ascending position along the normal (row
direction x column direction), the order ITK and SimpleITK read a series, so both the SEG and
the SC builders take their frame order from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from gateway.errors import JobError

#: Positions closer than this (mm) along the normal are the same plane.
_SAME_PLANE_MM = 1e-3
_ORIENTATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class SourceFrame:
    """One image plane of the source series: which instance (and frame) and where it lies."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based, for multi-frame sources
    position: tuple[float, float, float]
    position_value: list = field(compare=False)  # the source's own DS values, written back as-is
    distance: float = 0.0


@dataclass(frozen=True)
class Geometry:
    """The source series' planes in ascending order along the slice normal."""

    frames: list[SourceFrame]
    orientation: list
    pixel_spacing: list | None
    slice_thickness: object | None
    spacing_between_slices: float | None
    rows: int
    columns: int
    frame_of_reference_uid: str | None
    series_instance_uid: str


def _plane_attr(ds: Dataset, frame_item: Dataset | None, sequence: str, attr: str):
    """An attribute from the per-frame item, the shared item, or the top level (classic images)."""
    for holder in (frame_item, _first(ds, "SharedFunctionalGroupsSequence")):
        if holder is not None:
            item = _first(holder, sequence)
            if item is not None and attr in item:
                return item[attr].value
    return ds.get(attr)


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None or keyword not in ds:
        return None
    seq = ds[keyword].value
    return seq[0] if seq else None


def _normal(orientation) -> np.ndarray:
    values = np.asarray([float(v) for v in orientation], dtype=float)
    return np.cross(values[:3], values[3:])


def source_geometry(sources: Sequence[Dataset]) -> Geometry:
    """Check that the source images form one stack of parallel planes and order them.

    Accepts a classic series (one image per instance) or one multi-frame instance whose
    functional groups carry the plane positions.
    """
    if not sources:
        raise JobError("the source series has no images in the gateway's store")
    first = sources[0]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in sources}
    if len(series_uids) != 1:
        raise JobError("the source images belong to more than one series")
    frames: list[SourceFrame] = []
    orientation = None
    spacing = thickness = None
    sizes = set()
    frame_refs = set()
    for ds in sources:
        sizes.add((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))))
        frame_refs.add(ds.get("FrameOfReferenceUID"))
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        n = int(ds.get("NumberOfFrames", 1) or 1)
        items: list[tuple[Dataset | None, int | None]]
        if per_frame is not None and n > 1:
            items = [(per_frame[i] if i < len(per_frame) else None, i + 1) for i in range(n)]
        elif per_frame is not None:
            items = [(per_frame[0] if per_frame else None, None)]
        elif n > 1:
            raise JobError(
                f"source instance {ds.SOPInstanceUID} has {n} frames but no per-frame plane "
                "positions, so its frames cannot be placed; use kind: secondary_capture"
            )
        else:
            items = [(None, None)]
        for item, number in items:
            pos = _plane_attr(ds, item, "PlanePositionSequence", "ImagePositionPatient")
            ori = _plane_attr(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient")
            if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
                raise JobError(
                    f"source image {ds.SOPInstanceUID} has no Image Position/Orientation (Patient), "
                    "so a segmentation cannot be placed on it; use kind: secondary_capture"
                )
            if orientation is None:
                orientation = list(ori)
            elif not np.allclose([float(v) for v in ori], [float(v) for v in orientation],
                                 atol=_ORIENTATION_TOLERANCE):
                raise JobError(
                    "the source series mixes image orientations, so it is not one stack of "
                    "parallel slices; a segmentation needs one"
                )
            if spacing is None:
                spacing = _plane_attr(ds, item, "PixelMeasuresSequence", "PixelSpacing")
                thickness = _plane_attr(ds, item, "PixelMeasuresSequence", "SliceThickness")
            frames.append(SourceFrame(
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_number=number,
                position=tuple(float(v) for v in pos),
                position_value=list(pos),
            ))
    if len(sizes) != 1:
        raise JobError("the source images differ in rows and columns; a segmentation needs one size")
    if len(frame_refs) != 1:
        raise JobError("the source images differ in Frame of Reference UID")
    normal = _normal(orientation)
    frames = [
        SourceFrame(f.sop_class_uid, f.sop_instance_uid, f.frame_number, f.position,
                    f.position_value, float(np.dot(normal, f.position)))
        for f in frames
    ]
    frames.sort(key=lambda f: f.distance)
    gaps = np.diff([f.distance for f in frames])
    if len(gaps) and float(gaps.min()) < _SAME_PLANE_MM:
        raise JobError(
            "two source images lie in the same plane (duplicate positions), so the frame order "
            "is ambiguous; send one image per position"
        )
    between = None
    if len(gaps) and float(gaps.max() - gaps.min()) < 0.01:
        between = round(float(gaps.mean()), 6)
    rows, columns = sizes.pop()
    return Geometry(
        frames=frames, orientation=orientation, pixel_spacing=spacing, slice_thickness=thickness,
        spacing_between_slices=between, rows=rows, columns=columns,
        frame_of_reference_uid=frame_refs.pop(),
        series_instance_uid=str(first.SeriesInstanceUID),
    )
