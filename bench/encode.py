"""Benchmark gateway.encode.set_pixel_data against its limit and against pydicom's own path.

Run: python bench/encode.py [--repeats N]

For each case it prints the median wall time of N runs, throughput in GB/s of *input* array
bytes, the ratio to the limit measured in the same run (``numpy.packbits(arr,
bitorder="little").tobytes()`` for bool, ``arr.tobytes()`` otherwise), the ratio to
pydicom's path (``pydicom.pixels.pack_bits`` plus setting the elements for bool, pydicom's
``set_pixel_data`` for the rest), and peak extra memory during one call (tracemalloc: numpy
and Python allocations) as a multiple of the encoded size. Targets (issue 4): bool <= 1.3x
its limit and >= 3x faster than pydicom; other dtypes <= 1.25x tobytes; peak extra memory
<= 1.5x the encoded size. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.utils import pack_bits
from pydicom.pixels.utils import set_pixel_data as pydicom_set_pixel_data
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import VR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.derive.encode import encoded_length, set_pixel_data


def fresh_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def pydicom_bool_path(ds: Dataset, arr: np.ndarray) -> None:
    """What a pydicom 3.0 user does for a mask: pack_bits, then set the elements by hand."""
    frames, rows, columns = arr.shape
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.PixelData = pack_bits(arr)
    ds["PixelData"].VR = VR.OB
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def median_seconds(run: Callable[[Dataset], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        ds = fresh_dataset()
        gc.collect()
        start = time.perf_counter()
        run(ds)
        times.append(time.perf_counter() - start)
        del ds
    return statistics.median(times)


def peak_extra(run: Callable[[Dataset], object]) -> int:
    ds = fresh_dataset()
    gc.collect()
    tracemalloc.start()
    try:
        run(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=300, help="frames of the 512x512 arrays")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    f = args.frames
    cases = [
        ("bool", rng.integers(0, 2, size=(f, 512, 512), dtype=np.uint8).astype(bool), "MONOCHROME2", 1),
        ("uint8", rng.integers(0, 256, size=(f, 512, 512), dtype=np.uint8), "MONOCHROME2", 8),
        ("uint16", rng.integers(0, 65536, size=(f, 512, 512), dtype=np.uint16), "MONOCHROME2", 16),
        ("int16", rng.integers(-32768, 32768, size=(f, 512, 512), dtype=np.int16), "MONOCHROME2", 16),
        ("uint16/12", rng.integers(0, 4096, size=(f, 512, 512), dtype=np.uint16), "MONOCHROME2", 12),
        ("RGB uint8", rng.integers(0, 256, size=(f // 3, 512, 512, 3), dtype=np.uint8), "RGB", 8),
    ]

    header = (
        f"{'case':<10} {'shape':<18} {'median':>9} {'GB/s':>6} {'limit':>9} {'x limit':>8} "
        f"{'pydicom':>9} {'pydicom/ours':>12} {'peak/encoded':>12} {'pydicom peak':>12}"
    )
    print(f"numpy {np.__version__}, {args.repeats} runs each, GB/s of input bytes")
    print(header)
    print("-" * len(header))
    for name, arr, photometric, bits in cases:
        encoded = encoded_length(arr.shape, arr.dtype, photometric)

        def ours(ds, arr=arr, photometric=photometric, bits=bits):
            set_pixel_data(ds, arr, photometric, bits)

        if arr.dtype == bool:
            def limit(ds, arr=arr):
                return np.packbits(arr, bitorder="little").tobytes()

            def theirs(ds, arr=arr):
                pydicom_bool_path(ds, arr)
        else:
            def limit(ds, arr=arr):
                return arr.tobytes()

            def theirs(ds, arr=arr, photometric=photometric, bits=bits):
                pydicom_set_pixel_data(ds, arr, photometric, bits)

        # interleave so that load on the shared machine hits all three alike
        t_ours, t_limit, t_theirs = [], [], []
        for _ in range(args.repeats):
            t_limit.append(median_seconds(limit, 1))
            t_ours.append(median_seconds(ours, 1))
            t_theirs.append(median_seconds(theirs, 1))
        m_ours, m_limit, m_theirs = (statistics.median(t) for t in (t_ours, t_limit, t_theirs))
        peak_ours = peak_extra(ours)
        peak_theirs = peak_extra(theirs)
        print(
            f"{name:<10} {arr.shape!s:<18} {m_ours * 1e3:7.1f}ms {arr.nbytes / m_ours / 1e9:6.2f} "
            f"{m_limit * 1e3:7.1f}ms {m_ours / m_limit:7.2f}x {m_theirs * 1e3:7.1f}ms "
            f"{m_theirs / m_ours:11.2f}x {peak_ours / encoded:11.2f}x {peak_theirs / encoded:11.2f}x"
        )


if __name__ == "__main__":
    main()
