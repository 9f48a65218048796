"""The config models of routing rules and series-complete triggers (typed, frozen, checked once).

``config.py`` embeds these: ``routes.rules``, ``series_complete`` and ``triggers``. Checks that
need the whole file (a rule naming an unknown destination, two rules with one name) are in
``raw_problems`` so they are reported together with every other mistake.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import dictionary_VR, tag_for_keyword

from gateway.storage.uids import check_uid
from gateway.errors import InvalidUID
from gateway.validation import show

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
#: Value representations a glob cannot sensibly match (bulk data and sequences).
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"}
#: Pixel Data and everything after it is never read by matching.
_PIXEL_DATA_TAG = 0x7FE00010


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _one_or_many(value: Any) -> Any:
    """A single value is a one-item list: ``modality: CT`` means ``modality: [CT]``."""
    return [value] if isinstance(value, (str, int, float)) else value


def _not_empty(value: tuple) -> tuple:
    if not value:
        raise ValueError("must list at least one value (leave the key out to match any)")
    return value


def _ae_title(value: str) -> str:
    if not _AE_CHARS.match(value) or not value.strip():
        raise ValueError(
            "must be 1 to 16 printable ASCII characters, not only spaces and without a backslash"
        )
    return value.strip()


def _modality(value: str) -> str:
    if not _MODALITY.match(value):
        raise ValueError("must be a DICOM modality code in upper case, such as CT or MR")
    return value


def _uid(value: str) -> str:
    try:
        return check_uid(value, "SOP Class UID")
    except InvalidUID:
        raise ValueError(
            "must be a UID (digits and dots, no empty component, no leading zero in a component, "
            "at most 64 characters)"
        ) from None


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be letters, digits, '_', '-' or '.' (at most 64, starting with a letter or digit)")
    return value


def _keyword(value: str) -> str:
    tag = tag_for_keyword(value)
    if tag is None:
        raise ValueError(
            "is not a DICOM keyword (write it as in PS3.6, e.g. SeriesDescription or BodyPartExamined)"
        )
    if tag >= _PIXEL_DATA_TAG:
        raise ValueError("is at or after Pixel Data, which matching never reads")
    if dictionary_VR(tag) in _UNMATCHABLE_VRS:
        raise ValueError(f"has VR {dictionary_VR(tag)}, which a text pattern cannot match")
    return value


def _between(low: float, high: float):
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}")
        return value

    return check


def _pattern(value: str) -> str:
    if not value:
        raise ValueError("must not be empty (use '*' to require any value)")
    return value


Many = BeforeValidator(_one_or_many)
AETitles = Annotated[tuple[Annotated[str, Strict(), AfterValidator(_ae_title)], ...], Many,
                     AfterValidator(_not_empty)]
Modalities = Annotated[tuple[Annotated[str, Strict(), AfterValidator(_modality)], ...], Many,
                       AfterValidator(_not_empty)]
UIDs = Annotated[tuple[Annotated[str, Strict(), AfterValidator(_uid)], ...], Many,
                 AfterValidator(_not_empty)]
Patterns = Annotated[tuple[Annotated[str, Strict(), AfterValidator(_pattern)], ...], Many,
                     AfterValidator(_not_empty)]
Name = Annotated[str, Strict(), AfterValidator(_name)]
Keyword = Annotated[str, AfterValidator(_keyword)]


class MatchConfig(_Model):
    """Every key given must hold (AND); a list means any of its values (OR)."""

    calling_ae_title: AETitles | None = None
    called_ae_title: AETitles | None = None
    modality: Modalities | None = None
    sop_class_uid: UIDs | None = None
    #: DICOM keyword -> glob pattern(s), case-insensitive, on the stored header.
    tags: dict[Keyword, Patterns] | None = None

    @model_validator(mode="after")
    def _something(self):
        if not any(v for v in (self.calling_ae_title, self.called_ae_title, self.modality,
                               self.sop_class_uid, self.tags)):
            raise ValueError(
                "must hold at least one condition (calling_ae_title, called_ae_title, modality, "
                "sop_class_uid or tags); an empty match would take every instance: use "
                "routes.received for that"
            )
        return self


class RuleConfig(_Model):
    name: Name
    match: MatchConfig
    destinations: Annotated[tuple[Annotated[str, Strict()], ...], AfterValidator(_not_empty)]


def _resolve(value: Any, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        return value  # pydantic reports the wrong type
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header_name(key: str) -> str:
    if key.lower() in ("authorization", "proxy-authorization", "cookie"):
        raise ValueError(
            "must not be set here: secrets never go into the YAML; put the token in a file and "
            "name it in token_file"
        )
    if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$", key):
        raise ValueError("is not a valid HTTP header name")
    return key


HeaderName = Annotated[str, Strict(), AfterValidator(_header_name)]


class WebhookConfig(_Model):
    """Where to POST one JSON object per fired series revision (durable, retried with backoff)."""

    url: Annotated[str, Strict(), Field(min_length=1, max_length=2000)]
    #: Extra request headers (not secrets: put a token in token_file).
    headers: dict[HeaderName, Annotated[str, Strict()]] = {}
    #: A file holding a bearer token, sent as ``Authorization: Bearer <token>``.
    token_file: Path | None = None
    timeout_seconds: Annotated[float, AfterValidator(_between(0.1, 600))] = 10.0

    _paths = field_validator("token_file", mode="before")(_resolve)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("token_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                with open(value, "rb") as f:
                    if not f.read(4096).strip():
                        raise ValueError("the token file is empty")
            except OSError as exc:
                raise ValueError(f"cannot read the token file ({exc.strerror or exc})") from None
        return value

    @model_validator(mode="after")
    def _token_over_tls(self):
        parts = urlsplit(self.url)
        if self.token_file is not None and parts.scheme == "http" and not _loopback(parts.hostname or ""):
            raise ValueError(
                "a token_file needs an https:// url (or a loopback host): the token would cross "
                "the network in clear text"
            )
        return self


class TriggerConfig(_Model):
    name: Name
    match: MatchConfig
    #: The series folder ``export_dir/<SeriesInstanceUID>/`` appears here, atomically.
    export_dir: Path
    webhook: WebhookConfig | None = None

    _paths = field_validator("export_dir", mode="before")(_resolve)


class SeriesCompleteConfig(_Model):
    #: A series is complete when none of its instances arrived for this long.
    stable_seconds: Annotated[float, AfterValidator(_between(0.01, 86400))] = 30.0


def _names_used_twice(items: list, where: str, what: str) -> list[str]:
    """One problem per item of a config list whose ``name`` an earlier item already has."""
    problems, seen = [], set()
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str):
            if name in seen:
                problems.append(f"{where}[{i}].name: another {what} has this name, got {show(name)}")
            seen.add(name)
    return problems


def raw_problems(raw: dict) -> list[str]:
    """Mistakes across sections: rules naming unknown destinations, names used twice."""
    problems: list[str] = []
    dests = raw.get("destinations") or {}
    routes = raw.get("routes") or {}
    known = ", ".join(sorted(map(str, dests))) if isinstance(dests, dict) else ""
    rules = routes.get("rules") if isinstance(routes, dict) else None
    if isinstance(rules, list):
        problems += _names_used_twice(rules, "routes.rules", "rule")
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                continue
            names = rule.get("destinations")
            if isinstance(names, list) and isinstance(dests, dict):
                for j, dest in enumerate(names):
                    if isinstance(dest, str) and dest not in dests:
                        problems.append(
                            f"routes.rules[{i}].destinations[{j}]: must name a destination under "
                            f"'destinations' ({known or 'none configured'}), got {show(dest)}"
                        )
    triggers = raw.get("triggers")
    if isinstance(triggers, list):
        problems += _names_used_twice(triggers, "triggers", "trigger")
        folders: dict[str, str] = {}
        for i, trigger in enumerate(triggers):
            if not isinstance(trigger, dict):
                continue
            name = trigger.get("name")
            folder = trigger.get("export_dir")
            if isinstance(folder, str):
                key = os.path.normpath(os.path.expanduser(folder))
                if key in folders:
                    problems.append(
                        f"triggers[{i}].export_dir: trigger {folders[key]} exports there too; give each "
                        f"trigger its own folder, got {show(folder)}"
                    )
                folders.setdefault(key, str(name))
    return problems
