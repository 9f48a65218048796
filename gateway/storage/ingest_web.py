"""One Part 10 file from a web client into the store, through the one ingest path.

What STOW-RS needs around ``Store.ingest``: the arrival (peer, authenticated identity), the
study UID of the URL enforced, the identifying UIDs of a refused file for its failure item,
while every ``Store`` records the QIDO attributes of what it stores (``qido.indexer``, inside
the ingest transaction).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gateway.storage.store import Arrival, Expected, Outcome, Result, Source, Store


@dataclass(frozen=True)
class Ingested:
    result: Result
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None  # of a stored instance, for the audit trail's Patient object


def read_dataset(path: Path):
    """The data set before Pixel Data, for ``qido.backfill`` (the one header reader)."""
    from gateway.storage.header import read_header

    return read_header(path).dataset


def _ingested(result: Result) -> Ingested:
    header = result.header
    # The header holds up to 1 MiB of the data set: a request of many instances keeps only the UIDs.
    result = replace(result, header=None)
    if header is None:
        return Ingested(result)
    return Ingested(result, header.sop_class_uid, header.sop_instance_uid, header.series_uid,
                    header.study_uid, _patient_id(header) if result.outcome is Outcome.STORED else None)


def _patient_id(header) -> str | None:
    """From the bytes in memory (the header walker); an odd data set just has none."""
    try:
        return header.patient_id
    except Exception:
        return None


def ingest_files(store: Store, paths: list[Path], expected_study: str | None, peer: str,
                 identity: str) -> list[Ingested]:
    """``ingest_file`` for the parts of one request: placed in parallel, indexed in one transaction."""
    arrival = Arrival(Source.STOW, peer=peer, identity=identity)
    expected = Expected(study_uid=expected_study)
    return [_ingested(r) for r in store.ingest_many([(p, arrival, expected) for p in paths])]


def ingest_file(store: Store, path: Path, expected_study: str | None, peer: str, identity: str) -> Ingested:
    """Check and store the file at ``path`` (moved into the store on success, removed otherwise)."""
    arrival = Arrival(Source.STOW, peer=peer, identity=identity)
    return _ingested(store.ingest(path, arrival, Expected(study_uid=expected_study)))
