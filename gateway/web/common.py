"""What the DICOMweb handlers share: URLs, Accept checks, UID path checks, stored-file headers as JSON.

``read_header`` reads a stored Part 10 file up to its Pixel Data through the one Part 10
reader (storage/header.py: at most its HEADER_BUDGET of data set is held) and says where
Pixel Data lies in the file, so WADO-RS can stream pixels and frames from their byte offsets
without loading them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import HTTPException, Request
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from gateway.errors import UnreadableHeader
from gateway.storage import header as stored_header
from gateway.storage.uids import is_valid_uid

#: Binary values longer than this are given as BulkDataURI in metadata.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def base_url(request: Request, deps) -> str:
    """Where clients reach us: ``http.base_url`` behind a proxy, else this request's own origin."""
    if deps.config.http.base_url:
        return deps.config.http.base_url
    base = str(request.base_url).rstrip("/")
    server = request.scope.get("server")
    host = request.headers.get("host", "")
    # Some clients (dicomweb-client) send Host without the port: add the one we listen on.
    if server and host and ":" not in host.rsplit("]", 1)[-1] and server[1] not in (80, 443):
        base = f"{request.url.scheme}://{host}:{server[1]}"
    return base


def accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    accept = accept.lower()
    return any(t in accept for t in ("application/dicom+json", "application/json", "*/*", "application/*"))


def check_uid_param(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise HTTPException(400, f"the {what} in the URL is not a valid UID, got {value!r:.80}")
    return value


@dataclass
class StoredHeader:
    """A stored file's data set before Pixel Data, and where Pixel Data lies."""

    dataset: Dataset
    transfer_syntax: UID
    pixel_tag: int | None  # 7FE00010 (or float/double pixel data), None when absent
    pixel_vr: str | None
    pixel_element_offset: int  # file offset of the Pixel Data element (its tag); file size when absent
    pixel_value_offset: int  # file offset of its value
    pixel_length: int | None  # None: encapsulated (undefined length)
    file_size: int

    @property
    def encapsulated(self) -> bool:
        return self.pixel_tag is not None and self.pixel_length is None


def read_header(path: Path | str) -> StoredHeader:
    """Read ``path`` up to Pixel Data with the one Part 10 reader (storage/header.py, bounded by its
    budget); raises ``ValueError`` (one sentence) or ``OSError``."""
    path = Path(path)
    try:
        header = stored_header.read_header(path)
        ds = header.dataset
        ds.file_meta = header.file_meta
        pixel = header.pixel_data
    except UnreadableHeader as exc:
        raise ValueError(f"{path.name} is not a readable DICOM file: {exc}") from None
    except OSError:
        raise
    except Exception as exc:  # pydicom on a damaged data set
        raise ValueError(f"{path.name} is not a readable DICOM file ({type(exc).__name__})") from None
    size = os.stat(path).st_size
    if pixel is None:
        return StoredHeader(ds, UID(header.transfer_syntax), None, None, size, size, None, size)
    vr = pixel.vr or ("OW" if pixel.tag == 0x7FE00010 else ("OF" if pixel.tag == 0x7FE00008 else "OD"))
    return StoredHeader(ds, UID(header.transfer_syntax), pixel.tag, vr, pixel.element_offset,
                        pixel.value_offset, pixel.length, size)


def _raw_vr_length(ds: Dataset, tag) -> tuple[str | None, int]:
    """VR and value length of an element without loading a deferred value."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    length = getattr(raw, "length", None)
    if length is None:
        value = getattr(raw, "value", None)
        length = len(value) if isinstance(value, (bytes, bytearray)) else 0
    return vr, length


def dataset_json(ds: Dataset, bulk_uri: Callable[[str], str] | None, path: list[str] | None = None) -> dict:
    """A data set as DICOM JSON; binary values over BULK_THRESHOLD become BulkDataURIs (``bulk_uri(tag path)``).

    Without ``bulk_uri`` such values are left out. Deferred (large) values are never loaded.
    """
    out: dict[str, dict] = {}
    path = path or []
    for tag in ds.keys():
        if tag.group == 0x0002:
            continue
        key = f"{tag:08X}"
        try:
            vr, length = _raw_vr_length(ds, tag)
            if vr in _BINARY_VRS or " or " in vr:
                if length > BULK_THRESHOLD:
                    if bulk_uri is not None:
                        out[key] = {"vr": vr.split(" or ")[0], "BulkDataURI": bulk_uri("/".join([*path, key]))}
                    continue
            elem = ds[tag]
            if elem.VR == "SQ":
                items = [dataset_json(item, bulk_uri, [*path, key, str(i)]) for i, item in enumerate(elem.value)]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            else:
                out[key] = elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=math.inf)
        except Exception:  # a value pydicom cannot put in JSON: leave it out, never fail the answer
            continue
    return out


def header_json(header: StoredHeader, bulk_uri: Callable[[str], str] | None) -> dict:
    """The stored instance as DICOM JSON metadata, Pixel Data as a BulkDataURI when ``bulk_uri``."""
    out = dataset_json(header.dataset, bulk_uri)
    if header.pixel_tag is not None and bulk_uri is not None:
        out[f"{header.pixel_tag:08X}"] = {"vr": header.pixel_vr or "OW",
                                         "BulkDataURI": bulk_uri(f"{header.pixel_tag:08X}")}
    return dict(sorted(out.items()))
