"""QIDO-RS (PS3.18 10.6): the six search endpoints, answered from the index (``storage.qido``).

Query parameters are turned into ``storage.qido.Match`` values here (pure parsing with
one-sentence errors); the SQL lives in storage. Results are DICOM JSON arrays.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.concurrency import run_in_threadpool

from gateway.storage import qido
from gateway.storage.uids import is_valid_uid
from gateway.web.app import Deps, get_deps
from gateway.web.auth import Identity, require_scope
from gateway.web.common import accepts_json, base_url, check_uid_param, header_json, read_header
from gateway.web.dicomjson import DicomJSONResponse, element

log = logging.getLogger("gateway.qido")
router = APIRouter(tags=["DICOMweb"])

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LEVEL_NAMES = {"study": "studies", "series": "series", "instance": "instances"}


class BadQuery(ValueError):
    """A query parameter that cannot be used (HTTP 400 with this sentence)."""


def _keyword(key: str) -> str:
    """A query key (keyword or 8-hex-digit tag) as its keyword; raises BadQuery when unknown."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        kw = keyword_for_tag(int(key, 16))
        if not kw:
            raise BadQuery(f"query key {key} is not a tag of the DICOM dictionary")
        return kw
    if tag_for_keyword(key) is None:
        raise BadQuery(f"unknown query parameter {key!r:.64}: use a DICOM keyword or tag, or limit, offset, "
                       "includefield, fuzzymatching")
    return key


def _split(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def _range(keyword: str, value: str, pattern: re.Pattern) -> qido.Match:
    low, _, high = value.partition("-")
    for part in (low, high):
        if part and not pattern.match(part):
            raise BadQuery(f"{keyword}: {part!r:.40} is not a valid {'date (YYYYMMDD)' if pattern is _DATE else 'time (HHMMSS)'}")
    if "-" in value:
        if not low and not high:
            raise BadQuery(f"{keyword}: a range needs at least one end, got '-'")
        return qido.Match(keyword, "range", (low, high))
    return qido.Match(keyword, "exact", (value,))


def parse_match(keyword: str, value: str, fuzzy: bool) -> qido.Match | None:
    """One matching key -> Match (None: universal matching, i.e. an empty value)."""
    value = value.strip()
    if keyword == qido.MODALITIES_IN_STUDY:
        values = _split(value)
        return qido.Match(keyword, "list", tuple(values)) if values else None
    attr = qido.ATTRS.get(keyword)
    if attr is None:
        supported = ", ".join([*qido.ATTRS, qido.MODALITIES_IN_STUDY])
        raise BadQuery(f"matching on {keyword} is not supported; supported keys: {supported}")
    if not value or value == "*":
        return None
    if attr.vr == "UI":
        values = _split(value)
        bad = [v for v in values if not is_valid_uid(v)]
        if bad:
            raise BadQuery(f"{keyword}: {bad[0]!r:.70} is not a valid UID")
        return qido.Match(keyword, "list" if len(values) > 1 else "exact", tuple(values))
    if attr.vr == "DA":
        return _range(keyword, value, _DATE)
    if attr.vr == "TM":
        return _range(keyword, value, _TIME)
    if attr.vr == "PN" and fuzzy:
        return qido.Match(keyword, "fuzzy", (value,))
    if "*" in value or "?" in value:
        return qido.Match(keyword, "wildcard", (value,))
    return qido.Match(keyword, "exact", (value,))


def parse_query(items: list[tuple[str, str]], level: str, study: str | None = None,
                series: str | None = None) -> tuple[qido.Search, list[str], bool]:
    """Query string items -> (Search, includefield keywords or ['all'], fuzzymatching); raises BadQuery."""
    limit, offset, fuzzy = DEFAULT_LIMIT, 0, False
    include: list[str] = []
    for key, value in items:
        if key == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise BadQuery(f"fuzzymatching must be true or false, got {value!r:.20}")
            fuzzy = value.lower() == "true"
    matches: list[qido.Match] = []
    for key, value in items:
        if key == "limit" or key == "offset":
            if not value.isdigit():
                raise BadQuery(f"{key} must be a whole number, got {value!r:.20}")
            if key == "limit":
                limit = min(int(value), MAX_LIMIT)
            else:
                offset = int(value)
        elif key == "includefield":
            for field in _split(value):
                include.append("all" if field.lower() == "all" else _keyword(field))
        elif key == "fuzzymatching":
            continue
        else:
            keyword = _keyword(key)
            match = parse_match(keyword, value, fuzzy)
            if match is not None:
                matches.append(match)
    spec = qido.Search(level=level, matches=tuple(matches), study_uid=study, series_uid=series,
                       limit=limit, offset=offset)
    return spec, include, fuzzy


# --------------------------------------------------------------------------- answers


def _retrieve_url(base: str, row: dict, level: str) -> str:
    url = f"{base}/dicom-web/studies/{row['StudyInstanceUID']}"
    if level in ("series", "instance"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "instance":
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def render(row: dict, level: str, include: list[str], base: str, data_dir: Path) -> dict:
    """One result row as a DICOM JSON object (keys sorted by tag)."""
    out: dict[str, dict] = {}
    for keyword, attr in qido.ATTRS.items():
        if keyword in row:
            out[f"{tag_for_keyword(keyword):08X}"] = element(attr.vr, row[keyword])
    if level == "study":
        mods = sorted(set((row.get("_modalities") or "").split(",")) - {""})
        out["00080061"] = element("CS", *mods)
        out["00201206"] = element("IS", row["_series"])
        out["00201208"] = element("IS", row["_instances"])
    elif level == "series":
        out["00201209"] = element("IS", row["_instances"])
    else:
        out["00083002"] = element("UI", row.get("_transfer_syntax"))
    out["00081190"] = element("UR", _retrieve_url(base, row, level))
    extra = [k for k in include if k != "all" and k not in qido.ATTRS]
    if extra or ("all" in include and level == "instance"):
        try:
            header = read_header(data_dir / row["_path"])
        except (OSError, ValueError) as exc:
            log.warning("includefield: cannot read %s: %s", row["_path"], exc)
            header = None
        if header is not None:
            full = header_json(header, bulk_uri=None)
            wanted = full if "all" in include and level == "instance" else {
                f"{tag_for_keyword(k):08X}": None for k in extra}
            for tag in wanted:
                if tag in full and tag not in out:
                    out[tag] = full[tag]
    return dict(sorted(out.items()))


async def _search(request: Request, level: str, deps: Deps, study: str | None = None,
                  series: str | None = None):
    if not accepts_json(request.headers.get("accept")):
        raise HTTPException(406, "QIDO-RS answers application/dicom+json (or application/json); "
                                 f"the Accept header asks for {request.headers.get('accept')!r:.100}")
    if study is not None:
        check_uid_param(study, "Study Instance UID")
    if series is not None:
        check_uid_param(series, "Series Instance UID")
    try:
        spec, include, _ = parse_query(list(request.query_params.multi_items()), level, study, series)
    except BadQuery as exc:
        raise HTTPException(400, str(exc)) from None
    base = base_url(request, deps)

    def run() -> tuple[list[dict], bool]:
        with deps.reader() as conn:
            rows, more = qido.search(conn, spec)
        return [render(r, level, include, base, deps.data_dir) for r in rows], more

    results, more = await run_in_threadpool(run)
    headers = {}
    if more:
        headers["Warning"] = ('299 dicom-gateway: "There are more matching results than the limit; '
                              f'ask again with offset={spec.offset + spec.limit}"')
    return DicomJSONResponse(results, headers=headers)


_SUMMARY = "QIDO-RS: search for {}"


@router.get("/dicom-web/studies", summary=_SUMMARY.format("studies"), response_class=DicomJSONResponse)
async def search_studies(request: Request, identity: Identity = Depends(require_scope("read")),
                         deps: Deps = Depends(get_deps)):
    return await _search(request, "study", deps)


@router.get("/dicom-web/series", summary=_SUMMARY.format("series"), response_class=DicomJSONResponse)
async def search_series(request: Request, identity: Identity = Depends(require_scope("read")),
                        deps: Deps = Depends(get_deps)):
    return await _search(request, "series", deps)


@router.get("/dicom-web/instances", summary=_SUMMARY.format("instances"), response_class=DicomJSONResponse)
async def search_instances(request: Request, identity: Identity = Depends(require_scope("read")),
                           deps: Deps = Depends(get_deps)):
    return await _search(request, "instance", deps)


@router.get("/dicom-web/studies/{study}/series", summary=_SUMMARY.format("series of a study"),
            response_class=DicomJSONResponse)
async def search_study_series(study: str, request: Request, identity: Identity = Depends(require_scope("read")),
                              deps: Deps = Depends(get_deps)):
    return await _search(request, "series", deps, study)


@router.get("/dicom-web/studies/{study}/instances", summary=_SUMMARY.format("instances of a study"),
            response_class=DicomJSONResponse)
async def search_study_instances(study: str, request: Request,
                                 identity: Identity = Depends(require_scope("read")),
                                 deps: Deps = Depends(get_deps)):
    return await _search(request, "instance", deps, study)


@router.get("/dicom-web/studies/{study}/series/{series}/instances",
            summary=_SUMMARY.format("instances of a series"), response_class=DicomJSONResponse)
async def search_series_instances(study: str, series: str, request: Request,
                                  identity: Identity = Depends(require_scope("read")),
                                  deps: Deps = Depends(get_deps)):
    return await _search(request, "instance", deps, study, series)

