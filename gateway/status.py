"""What ``dicom-gateway status`` reports: read-only, safe while ``run`` is writing.

The JSON keys are a public interface for monitoring scripts (documented in the README):
add keys freely, never rename or remove one.
"""

from __future__ import annotations

from gateway.storage import db, index, jobs, queue
from gateway.storage import series as series_rows
from gateway.config import Config


def security_warnings(config: Config) -> list[str]:
    """What ``run`` logs at start and ``status`` shows: certificates near expiry, an open listener."""
    from gateway.dimse import peers, tls

    found = tls.expiry_warnings(config, tls.utcnow())
    open_listener = peers.open_listener_warning(config)
    if open_listener:
        found.append(open_listener)
    return found


def collect(config: Config, now: float) -> dict:
    conn = db.connect_readonly(config.db_path)
    empty_store = {"studies": 0, "series": 0, "instances": 0, "bytes": 0, "derived": 0}
    if conn is None:
        store, inbox_jobs, failures = empty_store, {"waiting": 0, "done": 0, "failed": 0}, []
        dests = {
            name: {**{s.value: 0 for s in queue.State}, "oldest_pending_age_seconds": None,
                   "next_attempt_in_seconds": None, "last_error": None}
            for name in config.destinations
        }
        rules = series_rows.rule_match_counts(None, [r.name for r in config.routes.rules])
        triggers = series_rows.trigger_status(None, [t.name for t in config.triggers], now)
    else:
        try:
            store = index.store_counts(conn)
            inbox_jobs = jobs.counts(conn)
            failures = jobs.recent_failed(conn)
            dests = queue.destination_status(conn, config.destinations, now)
            rules = series_rows.rule_match_counts(conn, [r.name for r in config.routes.rules])
            triggers = series_rows.trigger_status(conn, [t.name for t in config.triggers], now)
        finally:
            conn.close()
    for name, dest in config.destinations.items():
        if name in dests:
            dests[name]["type"] = dest.type
            dests[name]["address"] = (
                dest.url if dest.type == "dicomweb" else f"{dest.ae_title}@{dest.host}:{dest.port}"
            )
    totals = {s.value: sum(d[s.value] for d in dests.values()) for s in queue.State}
    return {
        "node": {"ae_title": config.node.ae_title, "host": config.node.host, "port": config.node.port,
                 "tls_port": config.node.tls.port if config.node.tls is not None else None,
                 "data_dir": str(config.node.data_dir)},
        "warnings": security_warnings(config),
        "store": store,
        "inbox": {**inbox_jobs, "recent_failures": failures},
        "destinations": dests,
        "queue_totals": totals,
        "rules": rules,
        "triggers": triggers,
    }


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(report: dict) -> str:
    s, j, n = report["store"], report["inbox"], report["node"]
    ports = [str(n["port"])] if n["port"] is not None else []
    if n.get("tls_port") is not None:
        ports.append(f"{n['tls_port']} (TLS)")
    lines = [
        f"node     {n['ae_title']} on {n['host']}:{', '.join(ports)}, data in {n['data_dir']}",
        f"store    {s['studies']} studies, {s['series']} series, {s['instances']} instances "
        f"({s['derived']} derived), {s['bytes'] / 1e6:.1f} MB",
        f"inbox    {j['waiting']} waiting, {j['done']} done, {j['failed']} failed",
    ]
    for warning in report.get("warnings", []):
        lines.append(f"WARNING  {warning}")
    for failure in j["recent_failures"]:
        lines.append(f"  failed job {failure['job']}: {failure['error']}")
    if not report["destinations"]:
        lines.append("queue    no destinations configured")
    for name, d in report["destinations"].items():
        line = (
            f"dest {name}: {d['pending']} pending, {d['sending']} sending, {d['sent']} sent, "
            f"{d['failed']} failed; oldest pending {_age(d['oldest_pending_age_seconds'])}"
        )
        if d["pending"] and d["next_attempt_in_seconds"]:
            line += f"; next attempt in {_age(d['next_attempt_in_seconds'])}"
        if d["last_error"]:
            line += f"; last error: {d['last_error']}"
        lines.append(line)
    for name, r in report["rules"].items():
        lines.append(f"rule {name}: {r['matches']} matches")
    for name, t in report["triggers"].items():
        w = t["webhooks"]
        line = (f"trigger {name}: {t['series_open']} series open, {t['series_fired']} fired; webhooks "
                f"{w['pending']} pending, {w['sent']} sent, {w['failed']} failed")
        if w["last_error"]:
            line += f"; last webhook error: {w['last_error']}"
        if t["last_export_error"]:
            line += f"; last export error: {t['last_export_error']}"
        lines.append(line)
    return "\n".join(lines)
