"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright).

A gateway whose PACS (DCMTK storescp) is down: the page shows the failed items with their
reason; with the PACS back up, Retry (one item, then the destination) moves them to sent, on
the page and in ``status``. Screenshots are kept under tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import REPO, free_port, require_program, wait_until

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _keep(shot: Path) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / shot.name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {kept}")
    return kept


def test_dashboard_shows_failures_and_retry_delivers(gateway_factory, dcmtk, storescp, ct_series, tmp_path):
    chromium = require_program("/usr/bin/chromium")
    from playwright.sync_api import expect, sync_playwright

    pacs_port = free_port()  # nothing listens yet: the PACS is down
    gw = gateway_factory(
        destinations={"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
        routes={"received": ["pacs"]},
        retry={"max_attempts": 2, "initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
        forward={"poll_interval_seconds": 0.2, "connect_timeout_seconds": 2},
    )
    files = ct_series(3, rows=64, columns=64)
    sent = dcmtk.storescu(gw.port, gw.ae_title, *files, calling="MODALITY")
    assert sent.returncode == 0, sent.stderr

    def status() -> dict:
        result = gw.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["destinations"]["pacs"]

    wait_until(lambda: status()["failed"] == 3, 60, 0.3, "3 items failed while the PACS is down")

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            # without JavaScript the tables are there, rendered by the server
            plain = browser.new_context(java_script_enabled=False)
            page = plain.new_page()
            page.goto(gw.http_url + "/")
            assert page.locator("#failed tbody tr").count() == 3
            assert "cannot connect to STORESCP@127.0.0.1" in page.locator("#failed").inner_text()
            plain.close()

            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(gw.http_url + "/")
            row = page.locator('#destinations tr[data-destination="pacs"]')
            expect(row.locator("td.failed")).to_have_text("3")
            failed_rows = page.locator("#failed tbody tr")
            expect(failed_rows).to_have_count(3)
            for i in range(3):
                expect(failed_rows.nth(i).locator("td.error")).to_contain_text("cannot connect to STORESCP")
            expect(page.locator("#charts svg")).to_have_count(2)
            page.screenshot(path=str(tmp_path / "dashboard-pacs-down.png"), full_page=True)
            _keep(tmp_path / "dashboard-pacs-down.png")

            storescp(port=pacs_port, aet="STORESCP")  # the PACS is back

            # Retry one item: it alone goes to sent; the page refreshes itself, no reload
            first_id = failed_rows.nth(0).get_attribute("data-item")
            page.evaluate("window.__marker = 'same page'")
            failed_rows.nth(0).get_by_role("button", name="Retry").click()
            expect(row.locator("td.sent")).to_have_text("1", timeout=30_000)
            expect(row.locator("td.failed")).to_have_text("2")
            expect(page.locator(f'#failed tr[data-item="{first_id}"]')).to_have_count(0)
            assert status()["sent"] == 1 and status()["failed"] == 2

            # Retry the destination: the other two follow
            row.get_by_role("button", name="Retry 2 failed").click()
            expect(row.locator("td.sent")).to_have_text("3", timeout=30_000)
            expect(row.locator("td.failed")).to_have_text("0")
            expect(page.locator("#failed tbody tr")).to_have_count(0)
            assert page.evaluate("window.__marker") == "same page"  # refreshed in place
            page.screenshot(path=str(tmp_path / "dashboard-after-retry.png"), full_page=True)
            _keep(tmp_path / "dashboard-after-retry.png")
            context.close()
        finally:
            browser.close()

    final = status()
    assert final["sent"] == 3 and final["failed"] == 0 and final["pending"] == 0
    received = list((tmp_path / f"storescp-{pacs_port}").rglob("*"))
    assert len([f for f in received if f.is_file()]) == 3
    # offline: everything the page loaded came from the gateway itself
    assert requests and all(url.startswith(gw.http_url + "/") for url in requests), requests
    assert any(url.endswith("/static/dashboard.js") for url in requests)
    assert any(url.endswith("/dashboard/fragment") for url in requests)
