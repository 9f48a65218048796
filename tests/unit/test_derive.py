"""derive: source headers + array + sidecar -> SEG / SC datasets (pure; no sockets, no daemon)."""

from __future__ import annotations

import copy
import io
import itertools
from datetime import UTC, datetime

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from gateway.derive import derive
from gateway.inbox import sidecar
from gateway.errors import JobError
from tests.conftest import make_ct_series

N, R, C = 8, 32, 24


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Headers of an 8-slice series, instance numbers shuffled, in scrambled order."""
    paths = make_ct_series(tmp_path_factory.mktemp("ct"), N, R, C, shuffle_instance_numbers=True, seed=3)
    ascending = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    scrambled = [ascending[i] for i in (5, 0, 7, 2, 6, 1, 4, 3)]
    return ascending, scrambled


def options(**kw) -> derive.Options:
    counter = itertools.count(1)
    kw.setdefault("job_name", "job-1")
    return derive.Options(
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        new_uid=lambda: f"2.25.{next(counter)}", **kw,
    )


def job(series_uid: str, **keys) -> sidecar.Job:
    return sidecar.Job.model_validate({"source": {"series_instance_uid": series_uid}, **keys})


def roundtrip(ds) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def seg_masks(ds, ascending, segments) -> np.ndarray:
    seg = hd.seg.Segmentation.from_dataset(roundtrip(ds))
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in ascending],
        segment_numbers=list(segments),
        assert_missing_frames_are_empty=True,
    )


def test_bool_mask_is_a_one_segment_seg_in_slice_order(series):
    ascending, scrambled = series
    rng = np.random.default_rng(1)
    mask = rng.random((N, R, C)) > 0.8
    mask[3] = False  # an empty frame, left out by default
    out = derive.derive(scrambled, mask, job(ascending[0].SeriesInstanceUID), options())
    ds = out.dataset
    assert out.sop_class_uid == derive.SEGMENTATION_STORAGE
    assert ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1 and ds.Modality == "SEG"
    assert int(ds.NumberOfFrames) == N - 1 == out.frames
    zs = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
          for f in ds.PerFrameFunctionalGroupsSequence]
    assert zs == sorted(zs)
    refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in ds.PerFrameFunctionalGroupsSequence]
    assert refs == [s.SOPInstanceUID for k, s in enumerate(ascending) if k != 3]
    got = seg_masks(ds, ascending, [1])[..., 0]
    np.testing.assert_array_equal(got.astype(bool), mask)


def test_seg_copies_patient_study_and_references(series):
    ascending, scrambled = series
    mask = np.ones((N, R, C), bool)
    ds = derive.derive(scrambled, mask, job(ascending[0].SeriesInstanceUID, series_number=7,
                                             series_description="AI lungs"), options()).dataset
    src = ascending[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in ascending}
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SeriesNumber == 7 and ds.SeriesDescription == "AI lungs"
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in ascending}
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(src.ImageOrientationPatient)
    assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(src.PixelSpacing)
    assert float(shared.PixelMeasuresSequence[0].SpacingBetweenSlices) == pytest.approx(2.5)
    assert [list(f.FrameContentSequence[0].DimensionIndexValues)
            for f in ds.PerFrameFunctionalGroupsSequence] == [[1, k] for k in range(1, N + 1)]


def test_label_map_becomes_n_segments(series):
    ascending, scrambled = series
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, (N, R, C)).astype(np.uint8)
    segments = [{"label": name} for name in ("liver", "spleen", "kidney")]
    out = derive.derive(scrambled, labels, job(ascending[0].SeriesInstanceUID, segments=segments), options())
    ds = out.dataset
    assert out.segments == 3 and [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "spleen", "kidney"]
    got = seg_masks(ds, ascending, [1, 2, 3])
    for k in (1, 2, 3):
        np.testing.assert_array_equal(got[..., k - 1].astype(bool), labels == k)


def test_int16_label_map_without_segments_needs_kind(series):
    ascending, scrambled = series
    labels = np.zeros((N, R, C), np.int16)
    labels[2, 3:6, 4:9] = 2
    out = derive.derive(scrambled, labels, job(ascending[0].SeriesInstanceUID, kind="segmentation"), options())
    assert out.segments == 2 and out.frames == 1  # segment 1 has no pixels, segment 2 one frame


def test_keep_empty_frames(series):
    ascending, scrambled = series
    labels = np.zeros((N, R, C), np.uint8)
    labels[1, 2, 2] = 1
    spec = job(ascending[0].SeriesInstanceUID, segments=[{"label": "a"}, {"label": "b"}])
    assert derive.derive(scrambled, labels, spec, options()).frames == 1
    assert derive.derive(scrambled, labels, spec, options(keep_empty_frames=True)).frames == 2 * N


def test_all_empty_mask_keeps_one_frame(series):
    ascending, scrambled = series
    out = derive.derive(scrambled, np.zeros((N, R, C), bool), job(ascending[0].SeriesInstanceUID), options())
    assert out.frames == 1 and not out.dataset.pixel_array.any()


def test_sagittal_stack_orders_along_the_normal(series):
    ascending, _ = series
    sagittal = []
    for k, src in enumerate(ascending):
        ds = copy.deepcopy(src)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # normal = (-1, 0, 0)
        ds.ImagePositionPatient = [10.0 * k, -100, 100]
        sagittal.append(ds)
    mask = np.ones((N, R, C), bool)
    ds = derive.derive(sagittal, mask, job(src.SeriesInstanceUID), options()).dataset
    xs = [float(f.PlanePositionSequence[0].ImagePositionPatient[0]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert xs == sorted(xs, reverse=True)  # ascending along the normal is descending x


def test_multiframe_source_frames_are_referenced(series):
    ascending, _ = series
    src = copy.deepcopy(ascending[0])
    src.SOPInstanceUID = "2.25.999"
    src.NumberOfFrames = N
    shared = pydicom.Dataset()
    orient = pydicom.Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orient]
    measures = pydicom.Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = 2
    shared.PixelMeasuresSequence = [measures]
    src.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(N):  # frames stored in descending z
        item, pos = pydicom.Dataset(), pydicom.Dataset()
        pos.ImagePositionPatient = [0, 0, 100 - 2 * k]
        item.PlanePositionSequence = [pos]
        frames.append(item)
    src.PerFrameFunctionalGroupsSequence = frames
    del src.ImagePositionPatient, src.ImageOrientationPatient
    mask = np.ones((N, R, C), bool)
    ds = derive.derive([src], mask, job(src.SeriesInstanceUID), options()).dataset
    numbers = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
               for f in ds.PerFrameFunctionalGroupsSequence]
    assert numbers == list(range(N, 0, -1))


@pytest.mark.parametrize("make, keys, words", [
    (lambda: np.zeros((N - 1, R, C), bool), {}, ["shape", "(7, 32, 24)", "(8, 32, 24)"]),
    (lambda: np.zeros((N, C, R), bool), {}, ["does not match"]),
    (lambda: np.zeros((N, R, C), np.float32), {}, ["float32", "integers"]),
    (lambda: np.zeros((N, R, C), np.complex64), {}, ["complex64", "not supported"]),
    (lambda: np.full((N, R, C), 5, np.uint8), {"segments": [{"label": "a"}, {"label": "b"}]},
     ["value 5", "2 segment(s)"]),
    (lambda: np.full((N, R, C), -1, np.int16), {"kind": "segmentation"}, ["negative"]),
    (lambda: np.zeros((N, R, C), bool), {"segments": [{"label": "a"}, {"label": "b"}]}, ["one segment"]),
    (lambda: np.full((N, R, C), 300, np.uint16), {"bits_stored": 8}, ["300", "bits_stored 8"]),
    (lambda: np.zeros((N, R, C), bool), {"photometric_interpretation": "RGB"}, ["MONOCHROME2"]),
    (lambda: np.zeros((0, R, C), np.uint8), {"kind": "secondary_capture"}, ["empty"]),
    (lambda: np.zeros((N, R, C, 3), np.uint16), {}, ["uint8"]),
    (lambda: np.zeros((N, R, C), np.int64), {"kind": "secondary_capture"}, ["int64", "too wide"]),
])
def test_bad_inputs_raise_one_sentence(series, make, keys, words):
    ascending, scrambled = series
    with pytest.raises(JobError) as info:
        derive.derive(scrambled, make(), job(ascending[0].SeriesInstanceUID, **keys), options())
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_duplicate_positions_are_refused(series):
    ascending, _ = series
    dup = [ascending[0], copy.deepcopy(ascending[1])]
    dup[1].ImagePositionPatient = ascending[0].ImagePositionPatient
    with pytest.raises(JobError, match="same plane"):
        derive.derive(dup, np.ones((2, R, C), bool), job(ascending[0].SeriesInstanceUID), options())


def test_source_without_geometry_suggests_secondary_capture(series):
    ascending, _ = series
    flat = [copy.deepcopy(s) for s in ascending]
    for ds in flat:
        del ds.ImagePositionPatient
    with pytest.raises(JobError, match="secondary_capture"):
        derive.derive(flat, np.ones((N, R, C), bool), job(ascending[0].SeriesInstanceUID), options())


@pytest.mark.parametrize("arr, keys, sop_class", [
    (np.arange(N * R * C).reshape(N, R, C) % 2 == 0, {"kind": "secondary_capture"}, derive.MF_SINGLE_BIT_SC),
    (np.arange(N * R * C, dtype=np.uint32).reshape(N, R, C).astype(np.uint8), {}, derive.MF_GRAYSCALE_BYTE_SC),
    (np.arange(N * R * C, dtype=np.uint16).reshape(N, R, C), {"bits_stored": 13}, derive.MF_GRAYSCALE_WORD_SC),
    (np.arange(N * R * C, dtype=np.int16).reshape(N, R, C), {}, derive.MF_GRAYSCALE_WORD_SC),
    (np.arange(N * R * C * 3, dtype=np.uint32).reshape(N, R, C, 3).astype(np.uint8), {}, derive.MF_TRUE_COLOR_SC),
    (np.arange(R * C, dtype=np.int16).reshape(1, R, C) - 300, {}, derive.SECONDARY_CAPTURE),
    (np.arange(R * C * 3, dtype=np.uint32).reshape(R, C, 3).astype(np.uint8),
     {"photometric_interpretation": "RGB"}, derive.SECONDARY_CAPTURE),
])
def test_secondary_capture_family_by_dtype(series, arr, keys, sop_class):
    ascending, scrambled = series
    out = derive.derive(scrambled, arr, job(ascending[0].SeriesInstanceUID, **keys), options())
    assert out.sop_class_uid == sop_class
    ds = roundtrip(out.dataset)
    assert ds.SOPClassUID == sop_class and ds.Modality == "OT"
    assert ds.PatientID == ascending[0].PatientID and ds.StudyInstanceUID == ascending[0].StudyInstanceUID
    want = arr[0] if sop_class == derive.SECONDARY_CAPTURE and arr.ndim == 3 and arr.shape[0] == 1 else arr
    np.testing.assert_array_equal(ds.pixel_array, want)


def test_negative_multiframe_values_go_through_rescale_intercept(series):
    ascending, scrambled = series
    arr = (np.arange(N * R * C, dtype=np.int32).reshape(N, R, C) - 1000).astype(np.int16)
    out = derive.derive(scrambled, arr, job(ascending[0].SeriesInstanceUID), options())
    ds = roundtrip(out.dataset)
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -32768
    np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), arr)


def test_sc_with_matching_frames_references_sources_in_order(series):
    ascending, scrambled = series
    arr = np.zeros((N, R, C), np.uint8)
    ds = derive.derive(scrambled, arr, job(ascending[0].SeriesInstanceUID), options()).dataset
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence] == [s.SOPInstanceUID for s in ascending]
    assert list(ds.SliceLocationVector) == sorted(ds.SliceLocationVector)


def test_uids_come_from_the_generator(series):
    ascending, scrambled = series
    out = derive.derive(scrambled, np.ones((N, R, C), bool), job(ascending[0].SeriesInstanceUID), options())
    assert (out.series_instance_uid, out.sop_instance_uid) == ("2.25.1", "2.25.2")


def test_odd_frame_sizes_pack_bits_across_frame_boundaries(tmp_path):
    """7x5 = 35 bits per frame: frame 2 starts mid-byte, as the standard requires."""
    paths = make_ct_series(tmp_path, 3, 7, 5)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    rng = np.random.default_rng(4)
    mask = rng.random((3, 7, 5)) > 0.5
    mask[:, 0, 0] = True  # no empty frame
    ds = derive.derive(sources, mask, job(sources[0].SeriesInstanceUID), options()).dataset
    assert len(ds.PixelData) == 14  # ceil(105 / 8) = 14, already even
    got = seg_masks(ds, sources, [1])[..., 0]
    np.testing.assert_array_equal(got.astype(bool), mask)
