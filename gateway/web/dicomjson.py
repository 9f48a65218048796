"""DICOM JSON (PS3.18 F.2) pieces the DICOMweb handlers build by hand, and the response type."""

from __future__ import annotations

import json

from fastapi.responses import Response

DICOM_JSON = "application/dicom+json"
#: Our private block for one human sentence per failed instance (PS3.5 7.8: creator + element).
PRIVATE_CREATOR_TAG = "00090010"
PRIVATE_CREATOR = "DICOM-GATEWAY"
PRIVATE_REASON_TAG = "00091001"


def element(vr: str, *values) -> dict:
    """One DICOM JSON attribute; no values gives an empty (present, zero-length) one."""
    vals = [v for v in values if v is not None and v != ""]
    if not vals:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in vals]}
    if vr in ("US", "UL", "SS", "SL"):
        return {"vr": vr, "Value": [int(v) for v in vals]}
    if vr == "IS":
        out = []
        for v in vals:
            try:
                out.append(int(str(v).strip()))
            except ValueError:
                pass
        return {"vr": vr, "Value": out} if out else {"vr": vr}
    if vr == "SQ":
        return {"vr": vr, "Value": list(vals)}
    return {"vr": vr, "Value": [str(v) for v in vals]}


def reason_elements(reason: str) -> dict:
    """The private creator and the reason text (LT, at most 10240 characters)."""
    return {
        PRIVATE_CREATOR_TAG: {"vr": "LO", "Value": [PRIVATE_CREATOR]},
        PRIVATE_REASON_TAG: {"vr": "LT", "Value": [reason[:10240]]},
    }


class DicomJSONResponse(Response):
    media_type = DICOM_JSON

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
