"""What the SEG and SC builders share: SOP classes, Options/Derived, value checks, common modules.

Apart from ``derive`` so that ``derive`` imports the builders and the builders import this,
without an import cycle. Pure, like the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway import __version__
from gateway.errors import JobError
from gateway.inbox.sidecar import Job, Kind

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MF_SINGLE_BIT_SC = "1.2.840.10008.5.1.4.1.1.7.1"
MF_GRAYSCALE_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
MF_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"

SOP_CLASS_NAMES = {
    SEGMENTATION_STORAGE: "Segmentation",
    SECONDARY_CAPTURE: "Secondary Capture",
    MF_SINGLE_BIT_SC: "Multi-frame Single Bit Secondary Capture",
    MF_GRAYSCALE_BYTE_SC: "Multi-frame Grayscale Byte Secondary Capture",
    MF_GRAYSCALE_WORD_SC: "Multi-frame Grayscale Word Secondary Capture",
    MF_TRUE_COLOR_SC: "Multi-frame True Color Secondary Capture",
}

DEFAULT_SERIES_NUMBER = 900

# Patient and study attributes copied from the source (type 2 ones written empty when absent).
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_OPTIONAL_COPIED = (
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
    "PatientBirthTime", "PatientComments", "EthnicGroup", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyDescription", "IssuerOfAccessionNumberSequence", "ProcedureCodeSequence",
    "PatientAge", "PatientSize", "PatientWeight",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)


@dataclass(frozen=True)
class Options:
    """What a derivation needs besides its inputs: names, clock, UIDs and switches."""

    job_name: str
    now: datetime
    new_uid: Callable[[], str]
    keep_empty_frames: bool = False
    manufacturer: str = "dicom-gateway"
    model_name: str = "dicom-gateway"
    device_serial_number: str = "1"
    software_version: str = __version__


@dataclass(frozen=True)
class Derived:
    dataset: Dataset
    kind: Kind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frames: int
    segments: int = 0
    summary: str = ""


def value_range(arr: np.ndarray) -> tuple[int, int]:
    """(min, max) as ints; (0, 0) for an empty array, which numpy would refuse."""
    if arr.size == 0:
        return 0, 0
    return int(arr.min()), int(arr.max())


def check_bits(arr: np.ndarray, bits_stored: int) -> None:
    """Refuse values that bits_stored cannot hold, before anything is written."""
    if arr.dtype.kind == "b":
        return
    low, high = value_range(arr)
    if arr.dtype.kind == "i" and low < 0:
        lo_ok, hi_ok = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo_ok, hi_ok = 0, 2**bits_stored - 1
    if low < lo_ok or high > hi_ok:
        raise JobError(
            f"the array's values run from {low} to {high}, outside the {lo_ok} to {hi_ok} that "
            f"bits_stored {bits_stored} allows; raise bits_stored or rescale the values"
        )


def da(now: datetime) -> str:
    return now.strftime("%Y%m%d")


def tm(now: datetime) -> str:
    return now.strftime("%H%M%S.%f")


def _patient_and_study(ds: Dataset, source: Dataset) -> None:
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in _TYPE2_COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
        else:
            setattr(ds, keyword, "")
    for keyword in _OPTIONAL_COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
    ds.StudyInstanceUID = source.StudyInstanceUID


def common_modules(ds: Dataset, source: Dataset, job: Job, opts: Options, sop_class: str,
                   modality: str, series_uid: str, sop_uid: str) -> None:
    """SOP Common, Patient, General Study, General Series, General Equipment."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = da(opts.now)
    ds.InstanceCreationTime = tm(opts.now)
    _patient_and_study(ds, source)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = job.series_number if job.series_number is not None else DEFAULT_SERIES_NUMBER
    ds.SeriesDate = da(opts.now)
    ds.SeriesTime = tm(opts.now)
    ds.SeriesDescription = job.series_description or f"dicom-gateway {opts.job_name}"[:64]
    ds.InstanceNumber = 1
    ds.ContentDate = da(opts.now)
    ds.ContentTime = tm(opts.now)
    ds.Manufacturer = opts.manufacturer
    ds.ManufacturerModelName = opts.model_name
    ds.DeviceSerialNumber = opts.device_serial_number
    ds.SoftwareVersions = opts.software_version
