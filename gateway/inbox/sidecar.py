"""The inbox sidecar: ``NAME.yaml`` text -> a typed, checked job description (pure).

The sidecar is the job's commit marker: an AI tool writes ``NAME.npy`` (or ``NAME.npz``)
first and ``NAME.yaml`` last, by rename. Its keys::

    source:                         # where the result belongs
      series_instance_uid: 1.2.3    # required for segmentations
      study_instance_uid: 1.2.3     # secondary captures may give only the study
    kind: segmentation              # or secondary_capture; default from the array (see below)
    photometric_interpretation: MONOCHROME2   # MONOCHROME2, MONOCHROME1 or RGB
    bits_stored: 12                 # default: 1 for bool, the dtype's bits otherwise
    series_description: AI liver    # default names the gateway and the job
    series_number: 901              # default 900
    segments:                       # pixel value k of a label map is segments[k-1]
      - label: liver
        category: {scheme: SCT, value: "123037004", meaning: Anatomical Structure}
        type: {scheme: SCT, value: "10200004", meaning: Liver}
        algorithm_name: liver-net 2.1
        algorithm_type: AUTOMATIC   # AUTOMATIC (default), SEMIAUTOMATIC or MANUAL

``kind`` defaults to ``segmentation`` for a bool array and for an integer label map that
comes with ``segments``, and to ``secondary_capture`` otherwise (``default_kind``).

``parse`` raises ``errors.JobError`` with one sentence naming the key, the value and what
is allowed; unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
)

from gateway.storage import uids
from gateway.errors import JobError
from gateway.validation import key_path, show

MAX_SIDECAR_BYTES = 64 * 1024



class Kind(str, enum.Enum):
    SEGMENTATION = "segmentation"  # DICOM Segmentation Storage (BINARY), one segment per label
    SECONDARY_CAPTURE = "secondary_capture"  # (multi-frame) Secondary Capture, pixels as given


def _uid(value: str) -> str:
    value = value.strip()
    if not uids.is_valid_uid(value):
        raise ValueError("must be a DICOM UID (digits and dots, at most 64 characters)")
    return value


def _text(limit: int):
    def check(value: str) -> str:
        value = value.strip()
        if "\\" in value or any(ord(c) < 32 for c in value):
            raise ValueError("must not contain backslashes or control characters")
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value

    return AfterValidator(check)


UID = Annotated[str, Strict(), AfterValidator(_uid)]
LongText = Annotated[str, Strict(), Field(min_length=1), _text(64)]  # DICOM LO
ShortCode = Annotated[str, Strict(), Field(min_length=1), _text(16)]  # DICOM SH


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Model):
    """A coded concept: ``{scheme: SCT, value: "10200004", meaning: Liver}``."""

    scheme: ShortCode
    value: ShortCode
    meaning: LongText


#: Default segmented property category and type (SNOMED CT "Tissue"): valid for any finding.
DEFAULT_CATEGORY = Code(scheme="SCT", value="85756007", meaning="Tissue")
DEFAULT_TYPE = Code(scheme="SCT", value="85756007", meaning="Tissue")


class Segment(_Model):
    label: LongText
    category: Code = DEFAULT_CATEGORY
    type: Code = DEFAULT_TYPE
    algorithm_name: LongText = "AI"
    algorithm_type: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC"


class Source(_Model):
    series_instance_uid: UID | None = None
    study_instance_uid: UID | None = None


class Job(_Model):
    """A parsed sidecar; ``None`` means "use the default for this array"."""

    source: Source
    kind: Kind | None = None
    photometric_interpretation: Literal["MONOCHROME2", "MONOCHROME1", "RGB"] | None = None
    bits_stored: Annotated[int, Strict(), Field(ge=1, le=16)] | None = None
    series_description: LongText | None = None
    series_number: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)] | None = None
    segments: Annotated[list[Segment], Field(min_length=1, max_length=255)] | None = None


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: 64 KiB of aliases can expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, "YAML aliases (*name) are not allowed in a sidecar", event.start_mark
            )
        return super().compose_node(parent, index)


_ALLOWED_KEYS = {
    (): sorted(Job.model_fields),
    ("source",): sorted(Source.model_fields),
    ("segments",): sorted(Segment.model_fields),
    ("category",): sorted(Code.model_fields),
    ("type",): sorted(Code.model_fields),
}


_MESSAGES = {
    "int_type": "must be a whole number",
    "string_type": "must be text (quote it)",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
}


def _reason(err: dict) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if not isinstance(p, int))[-1:]
        allowed = _ALLOWED_KEYS.get(parent, ())
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"sidecar key '{key_path(loc)}' is not known{hint}"
    if kind == "missing":
        return f"sidecar key '{key_path(loc)}' is required"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"sidecar key '{key_path(loc)}' must be one of {expected}, got {show(err['input'], 60)}"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    elif kind in _MESSAGES:
        msg = _MESSAGES[kind]
    else:
        msg = err["msg"].replace("Input should be", "must be")
    return f"sidecar key '{key_path(loc)}' {msg}, got {show(err['input'], 60)}"


def parse(data: bytes) -> Job:
    """Parse a sidecar's bytes into a ``Job``; raise ``JobError`` (one sentence) when invalid."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise JobError(
            f"the sidecar is {len(data)} bytes, more than the 64 KiB limit; it should hold only "
            "the job's keys"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError("the sidecar is not UTF-8 text; save it as UTF-8 YAML") from None
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: no Python tags
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise JobError(f"the sidecar is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise JobError(
            f"the sidecar must be a YAML mapping of keys (source, kind, segments, ...), "
            f"got {type(raw).__name__ if raw is not None else 'an empty file'}"
        )
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = _reason(errors[0])
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise JobError(first + more) from None
    if job.source.series_instance_uid is None and job.source.study_instance_uid is None:
        raise JobError(
            "sidecar key 'source' must give series_instance_uid (or, for a secondary capture, "
            "study_instance_uid)"
        )
    return job


def default_kind(job: Job, dtype_kind: str) -> Kind:
    """The kind a job asks for, or the default for an array of numpy dtype kind ``dtype_kind``."""
    if job.kind is not None:
        return job.kind
    if dtype_kind == "b" or (dtype_kind in "iu" and job.segments):
        return Kind.SEGMENTATION
    return Kind.SECONDARY_CAPTURE
