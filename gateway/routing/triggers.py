"""Series-complete triggers: the state machine and the export manifest, pure (clock as argument).

Per (trigger, series) the database keeps a state, a revision and the last arrival time:

    (no row) --matching instance--> OPEN r1 --stable_seconds quiet--> export + webhook --> FIRED r1
    FIRED rN --any instance of the series--> OPEN rN+1 --quiet--> export (replaces the folder) --> FIRED rN+1

An instance that arrives while revision N is being exported does not stop it: revision N is
announced with what it held, and the series reopens as N+1 at once. The edges (files, the
database, HTTP) live in ``routing/export.py``, ``routing/webhook.py`` and ``storage/series.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from gateway.derive.geometry import source_geometry
from gateway.errors import GiveUp
from gateway.routing.rules import Facts, check, element_text
from gateway.routing.settings import TriggerConfig


class SeriesState(str, enum.Enum):
    OPEN = "open"  # instances arriving; fires once none arrived for series_complete.stable_seconds
    FIRED = "fired"  # this revision is exported and its webhook queued; a new instance reopens it


class WebhookState(str, enum.Enum):
    PENDING = "pending"  # waiting for its next attempt (at next_attempt_at)
    SENT = "sent"  # the receiver answered 2xx
    FAILED = "failed"  # gave up after retry.max_attempts, or its trigger is no longer configured


def matching_triggers(triggers: Iterable[TriggerConfig], header: Dataset, facts: Facts) -> tuple[str, ...]:
    """Names of the triggers whose match holds for this instance."""
    return tuple(t.name for t in triggers if not check(t.match, header, facts))


def on_arrival(state: SeriesState | None, revision: int | None) -> tuple[SeriesState, int]:
    """A matching instance arrived: open (first), keep open, or reopen a fired series as N+1."""
    if state is None or revision is None:
        return SeriesState.OPEN, 1
    if state is SeriesState.FIRED:
        return SeriesState.OPEN, revision + 1
    return SeriesState.OPEN, revision


def is_due(state: SeriesState, last_arrival_at: float, now: float, stable_seconds: float,
           not_before: float | None = None) -> bool:
    """An open series is complete once nothing arrived for ``stable_seconds`` (and no retry wait)."""
    if state is not SeriesState.OPEN:
        return False
    if not_before is not None and now < not_before:
        return False
    return now - last_arrival_at >= stable_seconds


def after_export(revision: int, snapshot_last_arrival: float, last_arrival_now: float) -> tuple[SeriesState, int]:
    """Revision N is exported: fired, or already reopened as N+1 if an instance came meanwhile."""
    if last_arrival_now > snapshot_last_arrival:
        return SeriesState.OPEN, revision + 1
    return SeriesState.FIRED, revision


@dataclass(frozen=True)
class Ordered:
    indices: list[int]  # positions into the headers given, in export order
    order: str  # "slice_normal" or "instance_number"
    note: str = ""  # why the slice normal could not be used


def order_instances(headers: Sequence[Dataset]) -> Ordered:
    """Ascending position along the slice normal (the inbox's frame order), else Instance Number.

    A series that is not one stack of parallel planes (localizers mixed in, no positions,
    several multi-frame instances) falls back to Instance Number, then SOP Instance UID.
    """
    try:
        geometry = source_geometry(list(headers))
        by_uid = {str(h.SOPInstanceUID): i for i, h in enumerate(headers)}
        seen: dict[int, None] = {}
        for frame in geometry.frames:
            seen.setdefault(by_uid[frame.sop_instance_uid], None)
        if len(seen) == len(headers):
            return Ordered(list(seen), "slice_normal")
        note = "some instances hold several frames"
    except (GiveUp, ValueError, TypeError, AttributeError, KeyError) as exc:
        note = str(exc)

    def key(i: int):
        number = headers[i].get("InstanceNumber")
        try:
            number = int(number)
        except (TypeError, ValueError):
            number = None
        return (number is None, number or 0, str(headers[i].get("SOPInstanceUID", "")))

    return Ordered(sorted(range(len(headers)), key=key), "instance_number", note)


def manifest(
    trigger: str,
    revision: int,
    headers: Sequence[Dataset],
    file_names: Sequence[str],
    calling_ae_title: str | None,
    exported_at: str,
) -> dict:
    """The content of ``series.yaml`` (and of the webhook body, plus ``export_path``).

    ``headers`` and ``file_names`` are parallel; the result lists them in export order.
    """
    ordered = order_instances(headers)
    first = headers[ordered.indices[0]]
    body = {
        "trigger": trigger,
        "revision": revision,
        "study_instance_uid": element_text(first, "StudyInstanceUID"),
        "series_instance_uid": element_text(first, "SeriesInstanceUID"),
        "modality": element_text(first, "Modality"),
        "calling_ae_title": calling_ae_title,
        "instance_count": len(headers),
        "order": ordered.order,
        "files": [file_names[i] for i in ordered.indices],
        "sop_instance_uids": [element_text(headers[i], "SOPInstanceUID") for i in ordered.indices],
        "exported_at": exported_at,
    }
    if ordered.note:
        body["order_note"] = ordered.note
    return body
