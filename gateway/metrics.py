"""The metric objects every room updates, declared once per ``Metrics`` (one per running gateway).

A ``Metrics`` owns its own ``CollectorRegistry`` and is passed through the door (``run`` builds
one and hands it to receive, inbox, forward and the web app), so tests build as many as they
like and nothing is a module global. Each room calls one method per event (``received``,
``sent``, ...); the method updates the Prometheus objects and the in-memory ``History`` the
dashboard draws its last-hour charts from. Counts that must match the database (queue items
per state, oldest pending age, free disk) are read at scrape time by ``StateCollector``.

Label values are bounded: calling AE titles only from the config (allowed callers, peers,
destinations), anything else is ``other``; destinations, rules and triggers come from the
config too.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "dicom_gateway"
OTHER = "other"
#: The ``calling_ae`` label of instances stored over STOW-RS (no AE title there).
DICOMWEB = "(dicomweb)"

#: Latency buckets from a fast local store (ms) to a slow WAN send (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DERIVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: Every metric name the gateway exposes (without the _total/_bucket/... suffixes the client
#: adds); the Grafana dashboard's test and the README are checked against this list.
NAMES = (
    "dicom_gateway_build_info",
    "dicom_gateway_associations_total",
    "dicom_gateway_instances_received_total",
    "dicom_gateway_received_bytes_total",
    "dicom_gateway_cstore_responses_total",
    "dicom_gateway_store_duration_seconds",
    "dicom_gateway_inbox_jobs_total",
    "dicom_gateway_derive_duration_seconds",
    "dicom_gateway_instances_sent_total",
    "dicom_gateway_send_duration_seconds",
    "dicom_gateway_send_retries_total",
    "dicom_gateway_send_failures_total",
    "dicom_gateway_http_requests_total",
    "dicom_gateway_rule_matches_total",
    "dicom_gateway_trigger_fires_total",
    "dicom_gateway_queue_items",
    "dicom_gateway_queue_oldest_pending_age_seconds",
    "dicom_gateway_free_disk_bytes",
    "dicom_gateway_min_free_bytes",
    "dicom_gateway_certificate_expiry_seconds",
    "dicom_gateway_database_up",
)


class Bounded:
    """Maps a free-text label value onto a fixed set (anything else is ``other``)."""

    def __init__(self, allowed: Iterable[str]):
        self.allowed = frozenset(a.strip() for a in allowed if a)

    def __call__(self, value: str | None) -> str:
        value = (value or "").strip()
        return value if value in self.allowed else OTHER


@dataclass
class _Minute:
    """What happened in one wall-clock minute (for the dashboard's charts)."""

    start: int
    received: int = 0
    sent: int = 0
    store_sum: float = 0.0
    store_n: int = 0
    store_max: float = 0.0
    send_sum: float = 0.0
    send_n: int = 0
    send_max: float = 0.0


@dataclass
class History:
    """The last hour per minute, in memory: instances received and sent, store and send latency."""

    minutes: int = 60
    clock: Callable[[], float] = time.time
    _buckets: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _bucket(self, now: float) -> _Minute:
        start = int(now // 60) * 60
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Minute(start))
            while len(self._buckets) > self.minutes or (
                self._buckets and self._buckets[0].start <= start - self.minutes * 60
            ):
                self._buckets.popleft()
        return self._buckets[-1]

    def received(self, seconds: float | None) -> None:
        with self._lock:
            b = self._bucket(self.clock())
            b.received += 1
            if seconds is not None:
                b.store_sum += seconds
                b.store_n += 1
                b.store_max = max(b.store_max, seconds)

    def sent(self, seconds: float | None) -> None:
        with self._lock:
            b = self._bucket(self.clock())
            b.sent += 1
            if seconds is not None:
                b.send_sum += seconds
                b.send_n += 1
                b.send_max = max(b.send_max, seconds)

    def snapshot(self) -> list[dict]:
        """One entry per minute of the last hour, oldest first, minutes without events as zeros."""
        now = self.clock()
        last = int(now // 60) * 60
        with self._lock:
            by_start = {b.start: b for b in self._buckets}
        out = []
        for start in range(last - (self.minutes - 1) * 60, last + 60, 60):
            b = by_start.get(start) or _Minute(start)
            out.append({
                "minute": start,
                "received": b.received,
                "sent": b.sent,
                "store_seconds_avg": round(b.store_sum / b.store_n, 6) if b.store_n else None,
                "store_seconds_max": round(b.store_max, 6) if b.store_n else None,
                "send_seconds_avg": round(b.send_sum / b.send_n, 6) if b.send_n else None,
                "send_seconds_max": round(b.send_max, 6) if b.send_n else None,
            })
        return out


class Metrics:
    """The gateway's metric objects, registered in ``self.registry``; one method per event."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        known_aes: Iterable[str] = (),
        destinations: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ):
        from gateway import __version__

        self.registry = registry if registry is not None else CollectorRegistry()
        self.ae = Bounded([*known_aes, DICOMWEB])
        self.dest = Bounded(destinations)
        self.history = History(clock=clock)
        r = self.registry
        p = PREFIX
        Info(f"{p}_build", "The gateway's version.", registry=r).info({"version": __version__})
        self.associations = Counter(
            f"{p}_associations", "DICOM associations accepted or rejected, by reason.",
            ["result", "reason"], registry=r)
        self.instances_received = Counter(
            f"{p}_instances_received", "Instances stored (acknowledged), by calling AE title.",
            ["calling_ae"], registry=r)
        self.received_bytes = Counter(
            f"{p}_received_bytes", "Bytes of instances stored, by calling AE title.",
            ["calling_ae"], registry=r)
        self.cstore_responses = Counter(
            f"{p}_cstore_responses", "C-STORE responses we returned, by status (hex).",
            ["status"], registry=r)
        self.store_duration = Histogram(
            f"{p}_store_duration_seconds",
            "From the whole instance received to Success (check, write, fsync, index).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inbox_jobs = Counter(
            f"{p}_inbox_jobs", "Inbox jobs finished, by outcome (done or failed).",
            ["outcome"], registry=r)
        self.derive_duration = Histogram(
            f"{p}_derive_duration_seconds", "Time to derive and store one inbox job's object.",
            buckets=DERIVE_BUCKETS, registry=r)
        self.instances_sent = Counter(
            f"{p}_instances_sent", "Queue items the destination accepted.", ["destination"], registry=r)
        self.send_duration = Histogram(
            f"{p}_send_duration_seconds", "One instance's send to its destination, request to response.",
            ["destination"], buckets=LATENCY_BUCKETS, registry=r)
        self.send_retries = Counter(
            f"{p}_send_retries", "Failed attempts that will be retried later.", ["destination"], registry=r)
        self.send_failures = Counter(
            f"{p}_send_failures", "Queue items that went to 'failed' (needs an admin's retry).",
            ["destination"], registry=r)
        self.http_requests = Counter(
            f"{p}_http_requests", "HTTP requests by endpoint (route template) and status code.",
            ["endpoint", "status"], registry=r)
        for name in self.dest.allowed:  # every destination visible from the first scrape
            for c in (self.instances_sent, self.send_retries, self.send_failures):
                c.labels(name)

    @classmethod
    def for_config(cls, config, registry: CollectorRegistry | None = None) -> "Metrics":
        """A Metrics whose label sets are the configured AE titles (callers, peers, destinations) and destinations."""
        aes = set(config.security.allowed_calling_aets)
        aes.update(getattr(config.security, "peers", None) or {})  # keyed by calling AE title
        aes.update(getattr(d, "ae_title", None) or "" for d in config.destinations.values())
        return cls(registry, known_aes=[a for a in aes if isinstance(a, str)],
                   destinations=config.destinations)

    # ---- one method per event: the rooms call these, a line each

    def association(self, accepted: bool, reason: str = "ok") -> None:
        self.associations.labels("accepted" if accepted else "rejected", reason).inc()

    def received(self, calling_ae: str | None, nbytes: int, seconds: float | None) -> None:
        """An instance is stored and indexed (counted before Success goes out)."""
        ae = self.ae(calling_ae)
        self.instances_received.labels(ae).inc()
        self.received_bytes.labels(ae).inc(max(0, nbytes))
        if seconds is not None:
            self.store_duration.observe(seconds)
        self.history.received(seconds)

    def cstore_status(self, status: int) -> None:
        self.cstore_responses.labels(f"0x{status:04X}").inc()

    def inbox_job(self, outcome: str, seconds: float | None = None) -> None:
        self.inbox_jobs.labels(outcome if outcome in ("done", "failed") else OTHER).inc()
        if seconds is not None and outcome == "done":
            self.derive_duration.observe(seconds)

    def sent(self, destination: str, seconds: float | None) -> None:
        d = self.dest(destination)
        self.instances_sent.labels(d).inc()
        if seconds is not None:
            self.send_duration.labels(d).observe(seconds)
        self.history.sent(seconds)

    def send_failed(self, destination: str, for_good: bool) -> None:
        d = self.dest(destination)
        (self.send_failures if for_good else self.send_retries).labels(d).inc()

    def http_request(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()



def certificate_expiry_seconds(path: Path, now: float) -> float | None:
    """Seconds until the PEM certificate at ``path`` expires (negative: expired); None if unreadable."""
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp() - now


class StateCollector(Collector):
    """Gauges read at scrape time from the database and the disk, so they always match ``status``."""

    def __init__(self, config, clock: Callable[[], float] = time.time,
                 certificates: Callable[[], dict[str, Path]] | None = None):
        self.config = config
        self.clock = clock
        self.certificates = certificates or (lambda: tls_certificates(config))

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        from gateway.storage import db, queue

        p = PREFIX
        now = self.clock()
        items = GaugeMetricFamily(f"{p}_queue_items", "Queue items by destination and state.",
                                  labels=["destination", "state"])
        oldest = GaugeMetricFamily(
            f"{p}_queue_oldest_pending_age_seconds",
            "Age of the oldest item not yet sent (0 when none), per destination.", labels=["destination"])
        up = GaugeMetricFamily(f"{p}_database_up", "1 when the database could be read at this scrape.")
        rules = CounterMetricFamily(f"{p}_rule_matches", "Instances each routing rule routed (kept in the database).",
                                    labels=["rule"])
        fires = CounterMetricFamily(f"{p}_trigger_fires",
                                    "Series-complete trigger firings, revisions included (kept in the database).",
                                    labels=["trigger"])
        rule_names = [r.name for r in getattr(self.config.routes, "rules", ())]
        trigger_names = [t.name for t in getattr(self.config, "triggers", ())]
        try:
            conn = db.connect_readonly(self.config.db_path)
            dests, matched, fired = {}, {}, {}
            if conn is not None:
                try:
                    dests = queue.destination_status(conn, self.config.destinations, now)
                    matched, fired = _rules_and_triggers(conn, rule_names, trigger_names)
                finally:
                    conn.close()
            for name in rule_names:
                rules.add_metric([name], matched.get(name, 0))
            for name in trigger_names:
                fires.add_metric([name], fired.get(name, 0))
            for name in self.config.destinations:  # only configured names: bounded labels
                d = dests.get(name)
                for state in queue.State:
                    items.add_metric([name, state.value], (d or {}).get(state.value, 0))
                age = (d or {}).get("oldest_pending_age_seconds")
                oldest.add_metric([name], age or 0.0)
            up.add_metric([], 1)
        except Exception:
            up.add_metric([], 0)
        yield items
        yield oldest
        yield up
        yield rules
        yield fires
        free = GaugeMetricFamily(f"{p}_free_disk_bytes", "Free bytes on the disk holding data_dir.")
        try:
            free.add_metric([], shutil.disk_usage(self.config.node.data_dir).free)
            yield free
        except OSError:
            pass
        floor = GaugeMetricFamily(
            f"{p}_min_free_bytes", "storage.min_free_bytes: below it new instances are refused.")
        floor.add_metric([], self.config.storage.min_free_bytes)
        yield floor
        certs = self.certificates()
        if certs:
            expiry = GaugeMetricFamily(
                f"{p}_certificate_expiry_seconds",
                "Seconds until a configured TLS certificate expires (negative: expired).",
                labels=["certificate"])
            for name, path in certs.items():
                left = certificate_expiry_seconds(Path(path), now)
                if left is not None:
                    expiry.add_metric([name], left)
            yield expiry


def _rules_and_triggers(conn, rules: list[str], triggers: list[str]) -> tuple[dict, dict]:
    """Matches per rule and firings per trigger, from the rows routing keeps (none before its migration)."""
    import sqlite3

    from gateway.storage import series

    try:
        matched = {k: v["matches"] for k, v in series.rule_match_counts(conn, rules).items()}
        fired = series.trigger_fire_counts(conn, triggers)
    except sqlite3.OperationalError:  # a database from before routing's migration
        return {}, {}
    return matched, fired


def tls_certificates(config) -> dict[str, Path]:
    """The certificate files the config names (node TLS listener, HTTP TLS), by a short name."""
    found = {}
    node_tls = getattr(config.node, "tls", None)
    if node_tls is not None and getattr(node_tls, "cert_file", None):
        found["dicom"] = Path(node_tls.cert_file)
    http = getattr(config, "http", None)
    http_tls = getattr(http, "tls", None) if http is not None else None
    if http_tls is not None and getattr(http_tls, "cert_file", None):
        found["http"] = Path(http_tls.cert_file)
    return found


def build(config, clock: Callable[[], float] = time.time) -> Metrics:
    """The running gateway's metrics: event metrics plus the scrape-time state collector."""
    metrics = Metrics.for_config(config)
    metrics.registry.register(StateCollector(config, clock=clock))
    return metrics
