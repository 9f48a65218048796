"""The router ingest asks: routes and rules by source, and the in-transaction bookkeeping."""

from types import SimpleNamespace

from pydicom.dataset import Dataset

from gateway import config
from gateway.routing.router import Router
from gateway.storage import db, series
from gateway.storage.store import Arrival, Source

RAW = {
    "destinations": {n: {"ae_title": n.upper(), "host": "127.0.0.1", "port": 104}
                     for n in ("ai", "archive", "pacs", "extra")},
    "routes": {"received": ["archive"], "results": ["pacs"], "rules": [
        {"name": "ct-to-ai", "match": {"modality": "CT"}, "destinations": ["ai"]},
        {"name": "from-ct01", "match": {"calling_ae_title": "CT01"}, "destinations": ["ai", "archive"]},
    ]},
}


def header(modality="CT"):
    ds = Dataset()
    ds.Modality = modality
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return SimpleNamespace(dataset=ds, sop_instance_uid="1.2.3.4", series_uid="1.2.3", study_uid="1.2")


def test_received_instances_get_routes_received_plus_matching_rules():
    router = Router(config.parse(RAW), clock=lambda: 5.0)
    decision = router(header(), Arrival(Source.DIMSE, calling_ae="CT01", called_ae="GW"))
    assert decision.destinations == ("ai", "archive")
    assert decision.rules == ("ct-to-ai", "from-ct01")
    assert decision.log_line == "routed SOP 1.2.3.4 to ai, archive by rules ct-to-ai, from-ct01, received"
    stow = router(header("MR"), Arrival(Source.STOW))
    assert stow.destinations == ("archive",)
    assert stow.log_line == "routed SOP 1.2.3.4 to archive by received"


def test_send_adds_its_destination_and_rules_apply_derived_objects_go_to_results():
    router = Router(config.parse(RAW))
    sent = router(header(), Arrival(Source.SEND, destinations=("extra",)))
    assert sent.destinations == ("ai", "extra")
    assert sent.log_line == "routed SOP 1.2.3.4 to ai, extra by rules ct-to-ai, explicit"
    derived = router(header(), Arrival(Source.DERIVED, job="j"))
    assert derived.destinations == ("pacs",)
    assert derived.in_transaction is None and derived.log_line == ""


def test_without_rules_or_triggers_the_header_is_never_parsed():
    router = Router(config.parse({**RAW, "routes": {"received": ["archive"]}}))

    class NoParse:
        sop_instance_uid, series_uid, study_uid = "1.2.3.4", "1.2.3", "1.2"

        @property
        def dataset(self):
            raise AssertionError("parsed")

    decision = router(NoParse(), Arrival(Source.DIMSE, calling_ae="X"))
    assert decision.destinations == ("archive",) and decision.in_transaction is None


def test_in_transaction_counts_rule_matches_and_opens_the_series_for_triggers(tmp_path):
    raw = {**RAW, "triggers": [{"name": "t", "match": {"modality": "CT"}, "export_dir": str(tmp_path / "x")}]}
    router = Router(config.parse(raw), clock=lambda: 7.0)
    conn = db.connect(tmp_path / "db.sqlite3")
    for modality in ("CT", "CT", "MR"):
        decision = router(header(modality), Arrival(Source.DIMSE, calling_ae="CT02"))
        with db.transaction(conn):
            decision.in_transaction(conn)
    counts = series.rule_match_counts(conn, ["ct-to-ai", "from-ct01"])
    assert counts == {"ct-to-ai": {"matches": 2, "last_match_at": 7.0},
                      "from-ct01": {"matches": 0, "last_match_at": None}}
    [row] = conn.execute("SELECT * FROM series_triggers").fetchall()
    assert (row["trigger"], row["series_uid"], row["state"], row["revision"], row["last_arrival_at"]) == \
        ("t", "1.2.3", "open", 1, 7.0)
