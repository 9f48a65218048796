"""The router ingest asks for every instance: routes, rules and the triggers' series bookkeeping.

``Router(config)`` is the ``router`` of ``storage.store.Store``. It decides from the header
and the arrival alone (pure, through ``rules.decide``) and hands the store a callable that
runs inside the ingest transaction: it counts the rules' matches and touches the series'
trigger rows, so nothing is counted or fired for an instance that was not stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import Config
from gateway.routing import rules
from gateway.routing.triggers import matching_triggers
from gateway.storage import series
from gateway.storage.store import Arrival, RouteDecision, Source


class Router:
    """``routes.results`` for derived objects; ``routes.received`` (or ``send``'s DEST) plus rules otherwise."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self.rules = config.routes.rules
        self.received = tuple(config.routes.received)
        self.results = tuple(config.routes.results)
        self.triggers = config.triggers
        self.clock = clock

    def __call__(self, header, arrival: Arrival) -> RouteDecision:
        derived = arrival.source is Source.DERIVED
        use_rules = bool(self.rules) and not derived
        dataset = header.dataset if (use_rules or self.triggers) else None
        facts = rules.Facts(calling_ae_title=arrival.calling_ae, called_ae_title=arrival.called_ae)
        if arrival.destinations is not None:
            base, base_name = tuple(arrival.destinations), "explicit"
        elif derived:
            base, base_name = self.results, "routes.results"
        else:
            base, base_name = self.received, "routes.received"
        if use_rules:
            decision = rules.decide(self.rules, base, dataset, facts)
        else:
            decision = rules.Decision(tuple(dict.fromkeys(base)), (), (), bool(base))
        fired = matching_triggers(self.triggers, dataset, facts) if self.triggers else ()
        matched = decision.rules
        series_uid, study_uid = header.series_uid, header.study_uid
        track = bool(self.triggers)
        clock = self.clock

        def in_transaction(conn) -> None:
            now = clock()
            if matched:
                series.count_rule_matches(conn, matched, now)
            if track:
                series.record_arrival(conn, series_uid, study_uid, fired, now)

        log_line = ""
        if use_rules:  # one line per routing decision when rules take part
            log_line = decision.describe(header.sop_instance_uid, base_name.removeprefix("routes."))
        return RouteDecision(
            decision.destinations, tuple(matched) or (base_name,),
            in_transaction=in_transaction if (matched or track) else None,
            log_line=log_line,
        )
