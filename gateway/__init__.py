"""dicom-gateway: receive DICOM, derive AI results as DICOM, forward to PACS."""

__version__ = "0.1.0"
