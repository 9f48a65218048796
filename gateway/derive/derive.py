"""Source series + array + job -> a DICOM Segmentation or Secondary Capture dataset (pure).

The one door inbox and offline use: check the array against the job, pick the kind, hand
over to ``derive.seg`` or ``derive.sc``. Everything arrives as arguments (source headers,
the array, the parsed sidecar, the clock and the UID generator), so tests need no files or
sockets. Pixel data goes only through ``encode.set_pixel_data``. Every problem a user can
fix raises ``errors.JobError`` with one sentence; nothing is written to a dataset until
every check has passed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from gateway.derive.common import (
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
)
from gateway.derive.sc import secondary_capture
from gateway.derive.seg import segmentation
from gateway.errors import JobError
from gateway.inbox.sidecar import Job, Kind, default_kind

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
        return segmentation(sources, arr, job, opts)
    if job.segments is not None and job.kind is Kind.SECONDARY_CAPTURE:
        raise JobError("segments describe a segmentation; drop them or use kind: segmentation")
    return secondary_capture(sources, arr, job, opts)
