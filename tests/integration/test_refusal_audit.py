"""Connections the guard refuses are in the audit trail, aggregated so a flood cannot fill the disk.

A real gateway process with node.max_associations 2, both slots held by established
associations; a flood of raw connects from 127.0.0.1 and 127.0.0.2 and a DCMTK echoscu are
refused. After SIGTERM the audit file holds refusal messages whose counts add up to exactly
the refused connections, at most about one per address per second.
"""

from __future__ import annotations

import re
import socket
import time

from gateway import audit as audit_trail
from tests.integration.test_hostile_peers import associated, closed_by_peer, var

FLOOD_SECONDS = 2.5


def refused_once(gw, source: str) -> None:
    """Connect from ``source`` and wait until the gateway closes the connection."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", gw.port))
        reply = s.recv(10)  # A-ASSOCIATE-RJ (PDU type 3), then the close
        assert reply[:1] in (b"\x03", b""), reply
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def refusal_counts(events: list[dict]) -> dict[str, list[int]]:
    """Address -> the count of each refusal message (in order)."""
    counts: dict[str, list[int]] = {}
    for e in events:
        text = e["EventIdentification"].get("EventOutcomeDescription", "")
        found = re.fullmatch(r"refused (\d+) connection\(s\) before association: (.*)", text)
        if not found:
            continue
        assert e["EventIdentification"]["EventID"]["csd-code"] == "110114"
        assert e["EventIdentification"]["EventOutcomeIndicator"] == 4
        assert "node.max_associations (2) reached" in found.group(2)
        address = e["ActiveParticipant"][0]["NetworkAccessPointID"]
        counts.setdefault(address, []).append(int(found.group(1)))
    return counts


def test_a_flood_of_refused_connections_is_audited_with_counts_and_bounded(dcmtk, gateway_factory):
    gw = gateway_factory(node={"max_associations": 2, "network_timeout_seconds": 60,
                               "acse_timeout_seconds": 600})
    held = [associated(gw) for _ in range(2)]  # every slot: an established association
    refused = {"127.0.0.1": 0, "127.0.0.2": 0}
    echo = dcmtk.echoscu(gw.port, gw.ae_title, timeout=10)
    assert echo.returncode != 0  # the real modality is told the node is busy
    refused["127.0.0.1"] += 1
    start = time.monotonic()
    while time.monotonic() - start < FLOOD_SECONDS:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
            refused_once(gw, source)
            refused[source] += 1
    elapsed = time.monotonic() - start
    for s in held:
        s.close()
    assert gw.stop() == 0  # SIGTERM: counts still waiting are written before the trail closes

    events = audit_trail.read(var(gw) / "audit.jsonl")  # every line parses
    counts = refusal_counts(events)
    print(f"\nrefused {refused} connections in {elapsed:.1f} s; audit messages per address: "
          f"{ {a: len(c) for a, c in counts.items()} }")
    assert set(counts) == set(refused)
    for address, n in refused.items():
        assert sum(counts[address]) == n, (address, counts[address])  # nothing lost, nothing doubled
        # one message per address per second at most (the first at once, then one per window)
        assert len(counts[address]) <= int(elapsed) + 3, counts[address]
    assert refused["127.0.0.1"] > 10 * len(counts["127.0.0.1"])  # aggregated, not one line each
