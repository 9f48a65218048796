"""``GET /``: the dashboard, rendered on the server as plain HTML tables and SVG charts.

Everything is readable without JavaScript. ``/static/dashboard.js`` (plain JS, no framework,
no CDN) swaps in ``/dashboard/fragment`` every few seconds and turns the Retry buttons into
``POST /api/...`` calls, so the page refreshes without a reload and works offline.
"""

from __future__ import annotations

import html
import time
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from gateway import __version__
from gateway.web.app import Deps, get_deps
from gateway.web.auth import require_scope

router = APIRouter(include_in_schema=False)
REFRESH_SECONDS = 5
FAILED_ROWS = 50


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def age(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def when(stamp, now: float) -> str:
    return "–" if stamp is None else f"{age(now - float(stamp))} ago"


def line_chart(title: str, series: list[tuple[str, str, list]], unit: str, width: int = 560,
               height: int = 160) -> str:
    """An SVG chart of per-minute values (None = no data), one polyline per series, with a legend."""
    pad_l, pad_b, pad_t = 48, 18, 22
    n = max((len(values) for _, _, values in series), default=0)
    peak = max((v for _, _, values in series for v in values if v is not None), default=0) or 1
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{pad_l}" y="14" class="title">{esc(title)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" class="axis"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 4}" class="tick" text-anchor="end">{_fmt(peak)}{unit}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" class="tick" text-anchor="end">0</text>',
             f'<text x="{pad_l}" y="{height - 4}" class="tick">−{n} min</text>',
             f'<text x="{pad_l + plot_w}" y="{height - 4}" class="tick" text-anchor="end">now</text>']
    for k, (label, color, values) in enumerate(series):
        points = []
        for i, v in enumerate(values):
            if v is None:
                continue
            x = pad_l + (plot_w * i / max(1, n - 1))
            y = pad_t + plot_h - plot_h * (v / peak)
            points.append(f"{x:.1f},{y:.1f}")
        if points:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(points)}"/>')
        lx = width - 8 - 90 * (len(series) - k)
        parts.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="15" class="tick">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"


def collect(deps: Deps, now: float) -> dict:
    """Everything the page shows, read once (status, failed items, triggers, history)."""
    from gateway import status
    from gateway.storage import queue, series

    report = status.collect(deps.config, now=now)
    with deps.reader() as conn:
        failed_total, failed = queue.list_items(conn, None, "failed", FAILED_ROWS, 0)
        try:
            triggers = series.recent_triggers(conn, 10)
        except Exception:  # a database from before the triggers migration, opened read-only
            triggers = []
    metrics = deps.extras.get("metrics")
    return {"status": report, "failed_total": failed_total, "failed": failed, "triggers": triggers,
            "history": metrics.history.snapshot() if metrics is not None else []}


def _listeners(deps: Deps) -> list[tuple[str, str]]:
    from gateway.web.ops import dicom_listeners

    c = deps.config
    found = [(name.replace("_", " ").upper().replace("DICOM TLS", "DICOM TLS"), f"{host}:{port}")
             for name, (host, port) in dicom_listeners(c).items()]
    http = getattr(c, "http", None)
    if http is not None and http.enabled:
        found.append(("HTTP", f"{http.host}:{http.port}"))
    return found


def _target(dest) -> str:
    if getattr(dest, "url", None):
        return str(dest.url)
    return f"{getattr(dest, 'ae_title', '')}@{getattr(dest, 'host', '')}:{getattr(dest, 'port', '')}"


def render_fragment(deps: Deps, data: dict, now: float, can_admin: bool) -> str:
    """The page body: node, destinations, charts, failed items, inbox failures, triggers."""
    s = data["status"]
    n, store, inbox = s["node"], s["store"], s["inbox"]
    out = [f'<section id="node"><h2>Node</h2><p><b>{esc(n["ae_title"])}</b> · data in '
           f'<code>{esc(n["data_dir"])}</code> · {store["studies"]} studies, {store["series"]} series, '
           f'{store["instances"]} instances ({store["derived"]} derived), {store["bytes"] / 1e6:.1f} MB · '
           f'inbox {inbox["waiting"]} waiting, {inbox["done"]} done, {inbox["failed"]} failed</p>',
           '<table id="listeners"><thead><tr><th>listener</th><th>address</th></tr></thead><tbody>']
    for name, addr in _listeners(deps):
        out.append(f"<tr><td>{esc(name)}</td><td><code>{esc(addr)}</code></td></tr>")
    out.append("</tbody></table></section>")

    out.append('<section id="destinations"><h2>Destinations</h2><table><thead><tr><th>destination</th>'
               "<th>target</th><th>pending</th><th>sending</th><th>sent</th><th>failed</th>"
               "<th>oldest pending</th><th>next attempt</th><th>last error</th><th></th></tr></thead><tbody>")
    if not s["destinations"]:
        out.append('<tr><td colspan="10">no destinations configured</td></tr>')
    for name, d in s["destinations"].items():
        dest = deps.config.destinations.get(name)
        button = ""
        if can_admin and d["failed"]:
            button = (f'<form method="post" action="/api/destinations/{esc(name)}/retry" class="retry">'
                      f'<button type="submit" data-retry="destination" data-name="{esc(name)}">Retry {d["failed"]} '
                      "failed</button></form>")
        cls = ' class="bad"' if d["failed"] else ""
        out.append(
            f'<tr data-destination="{esc(name)}"{cls}><td>{esc(name)}</td><td><code>{esc(_target(dest)) if dest else "–"}</code></td>'
            f'<td class="n pending">{d["pending"]}</td><td class="n sending">{d["sending"]}</td>'
            f'<td class="n sent">{d["sent"]}</td><td class="n failed">{d["failed"]}</td>'
            f'<td>{age(d["oldest_pending_age_seconds"])}</td><td>{age(d["next_attempt_in_seconds"])}</td>'
            f'<td class="error">{esc(d["last_error"] or "")}</td><td>{button}</td></tr>')
    out.append("</tbody></table></section>")

    hist = data["history"]
    out.append('<section id="charts"><h2>Last hour</h2>')
    if hist:
        out.append(line_chart("instances per minute", [
            ("received", "#1f77b4", [m["received"] for m in hist]),
            ("sent", "#2ca02c", [m["sent"] for m in hist])], ""))
        out.append(line_chart("latency per minute (mean)", [
            ("store", "#9467bd", [m["store_seconds_avg"] for m in hist]),
            ("send", "#ff7f0e", [m["send_seconds_avg"] for m in hist])], " s"))
    else:
        out.append("<p>no history in this process</p>")
    out.append("</section>")

    out.append(f'<section id="failed"><h2>Failed items ({data["failed_total"]})</h2>')
    if data["failed"]:
        out.append("<table><thead><tr><th>id</th><th>destination</th><th>SOP Instance UID</th><th>attempts</th>"
                   "<th>reason</th><th>failed</th><th></th></tr></thead><tbody>")
        for item in data["failed"]:
            button = ""
            if can_admin:
                button = (f'<form method="post" action="/api/queue/{item["id"]}/retry" class="retry">'
                          f'<button type="submit" data-retry="item" data-id="{item["id"]}">Retry</button></form>')
            out.append(f'<tr data-item="{item["id"]}"><td>{item["id"]}</td><td>{esc(item["destination"])}</td>'
                       f'<td><code>{esc(item["sop_instance_uid"])}</code></td><td class="n">{item["attempts"]}</td>'
                       f'<td class="error">{esc(item["last_error"])}</td><td>{when(item["updated_at"], now)}</td>'
                       f"<td>{button}</td></tr>")
        out.append("</tbody></table>")
        if data["failed_total"] > len(data["failed"]):
            out.append(f'<p>the latest {len(data["failed"])} shown; all of them: <code>GET /api/queue?state=failed</code></p>')
    else:
        out.append("<p>none</p>")
    out.append("</section>")

    out.append('<section id="inbox-failures"><h2>Recent inbox failures</h2>')
    if inbox["recent_failures"]:
        out.append("<table><thead><tr><th>job</th><th>reason</th><th>failed</th></tr></thead><tbody>")
        for f in inbox["recent_failures"]:
            out.append(f'<tr><td>{esc(f["job"])}</td><td class="error">{esc(f["error"])}</td>'
                       f'<td>{when(f["failed_at"], now)}</td></tr>')
        out.append("</tbody></table>")
    else:
        out.append("<p>none</p>")
    out.append("</section>")

    out.append('<section id="triggers"><h2>Series triggers</h2>')
    if data["triggers"]:
        out.append("<table><thead><tr><th>trigger</th><th>series</th><th>state</th><th>revision</th>"
                   "<th>fired</th><th>export</th><th>error</th></tr></thead><tbody>")
        for t in data["triggers"]:
            out.append(f'<tr><td>{esc(t["trigger"])}</td><td><code>{esc(t["series_uid"])}</code></td>'
                       f'<td>{esc(t["state"])}</td><td class="n">{t["revision"]}</td>'
                       f'<td>{when(t["fired_at"], now)}</td><td><code>{esc(t["export_path"] or "")}</code></td>'
                       f'<td class="error">{esc(t["last_error"] or "")}</td></tr>')
        out.append("</tbody></table>")
    else:
        out.append("<p>none</p>")
    out.append("</section>")
    out.append(f'<p id="updated">updated {time.strftime("%H:%M:%S", time.localtime(now))}</p>')
    return "".join(out)


def _can_admin(request: Request) -> bool:
    try:
        require_scope("admin")(request)
        return True
    except Exception:
        return False


@router.get("/", response_class=HTMLResponse, dependencies=[Depends(require_scope("read"))])
def page(request: Request, deps: Deps = Depends(get_deps)) -> HTMLResponse:
    now = time.time()
    body = render_fragment(deps, collect(deps, now), now, _can_admin(request))
    title = f"dicom-gateway {esc(deps.config.node.ae_title)}"
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><link rel=stylesheet href=/static/dashboard.css></head><body>"
        f'<header><h1>{title}</h1><span class="version">v{esc(__version__)}</span>'
        f'<span id="live" data-refresh="{REFRESH_SECONDS}"></span></header>'
        f'<main id="dashboard">{body}</main>'
        '<p id="message" role="status"></p>'
        "<script src=/static/dashboard.js defer></script></body></html>",
        headers={"Cache-Control": "no-store"})


@router.get("/dashboard/fragment", response_class=HTMLResponse, dependencies=[Depends(require_scope("read"))])
def fragment(request: Request, deps: Deps = Depends(get_deps)) -> HTMLResponse:
    now = time.time()
    return HTMLResponse(render_fragment(deps, collect(deps, now), now, _can_admin(request)),
                        headers={"Cache-Control": "no-store"})


_STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in _STATIC:
        return Response(status_code=404)
    data = resources.files("gateway.web").joinpath("static", name).read_bytes()
    return Response(data, media_type=_STATIC[name], headers={"Cache-Control": "max-age=300"})
