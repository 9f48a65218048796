"""Write a synthetic CT series: N slices of 512x512 int16 with full image-plane geometry.

Used by the tests, the benchmarks and the README walkthrough:

    python3 scripts/make_ct_series.py OUT_DIR [N] [--size 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct_series(
    folder: Path,
    n: int,
    rows: int = 512,
    columns: int = 512,
    *,
    shuffle_instance_numbers: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` CT slices (int16, full image-plane geometry) of one study and series.

    Slices are stacked along +z with 2.5 mm spacing; returned in ascending z order. With
    ``shuffle_instance_numbers`` the Instance Numbers do not follow position (as modalities do).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    numbers = list(range(1, n + 1))
    if shuffle_instance_numbers:
        rng.shuffle(numbers)
    yy, xx = np.mgrid[0:rows, 0:columns]
    base = ((xx - columns / 2) ** 2 + (yy - rows / 2) ** 2 < (min(rows, columns) / 3) ** 2)
    paths = []
    for k in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic CT"
        ds.SeriesDescription = "Synthetic axial series"
        ds.PatientName = "Test^Patient"
        ds.PatientID = "PID0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = numbers[k]
        ds.FrameOfReferenceUID = frame_of_ref
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-125.0, -125.0, -50.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.48828125, 0.48828125]
        ds.SliceThickness = 2.5
        ds.SliceLocation = -50.0 + 2.5 * k
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        pixels = (base * 1000 - 1000 + rng.integers(-20, 20, size=(rows, columns))).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"ct_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT series (one study, one series).")
    parser.add_argument("out", type=Path, help="folder to write ct_NNNN.dcm files into")
    parser.add_argument("n", type=int, nargs="?", default=60, help="number of slices (default 60)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    args = parser.parse_args()
    paths = make_ct_series(args.out, args.n, args.size, args.size)
    print(f"wrote {len(paths)} slices to {args.out}")


if __name__ == "__main__":
    main()
