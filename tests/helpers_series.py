"""Small synthetic series for routing and trigger tests: any modality, oblique planes, shuffled order."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


def oblique_orientation(degrees: float) -> list[float]:
    """Rows along x tilted about y, columns tilted about x: a double-oblique plane."""
    a, b = math.radians(degrees), math.radians(degrees / 2)
    row = [math.cos(a), 0.0, math.sin(a)]
    col = [math.sin(a) * math.sin(b), math.cos(b), -math.cos(a) * math.sin(b)]
    return [round(v, 6) for v in row + col]


def make_series(
    folder: Path,
    n: int,
    modality: str = "CT",
    *,
    series_description: str = "Synthetic axial",
    body_part: str = "CHEST",
    oblique_degrees: float = 0.0,
    shuffle_numbers: bool = False,
    size: int = 8,
    seed: int = 0,
    study_uid: str | None = None,
) -> list[Path]:
    """Write ``n`` slices of one series; returned in ascending position along the slice normal.

    With ``shuffle_numbers`` Instance Numbers and file names do not follow position, so a tool
    sorting by either gets the order wrong.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    study, series, frame_of_ref = study_uid or generate_uid(), generate_uid(), generate_uid()
    orientation = oblique_orientation(oblique_degrees)
    normal = np.cross(orientation[:3], orientation[3:])
    numbers = list(range(1, n + 1))
    names = [f"img{k:04d}.dcm" for k in range(n)]
    if shuffle_numbers:
        rng.shuffle(numbers)
        rng.shuffle(names)
    origin = np.array([-20.0, -20.0, -10.0])
    paths = []
    for k in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = modality
        ds.PatientName = "Test^Routing"
        ds.PatientID = "ROUTE01"
        ds.StudyDate = "20260101"
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = body_part
        ds.SeriesNumber = 1
        ds.InstanceNumber = numbers[k]
        position = origin + normal * (3.0 * k)
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 3.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.full((size, size), k, dtype=np.uint16).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
