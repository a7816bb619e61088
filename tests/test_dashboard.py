"""The dashboard in headless Chromium (Debian's ``chromium``, driven by playwright): the page
loads, lists a repository, and a file created on disk appears in the live list."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_support import serve
from fsledger.api import create_app
from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import Repository

CHROMIUM = "/usr/bin/chromium"
XSS = "<img src=x onerror=window.pwned=1>.txt"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"{CHROMIUM} is missing under CI: install Debian's chromium (make system-deps)",
            pytrace=False,
        )
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium to test the dashboard",
        allow_module_level=True,
    )

from playwright.sync_api import expect, sync_playwright  # noqa: E402


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Ledger, SyncManager, Repository, Path]]:
    root = tmp_path / "photos"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "beach.jpg").write_bytes(b"sand")
    (root / XSS).write_bytes(b"markup in a name stays text")
    settings = Settings(database_url="sqlite://" + str(tmp_path / "ledger.db"), max_concurrency=2)
    ledger = Ledger(settings)
    repo = ledger.add_repository(str(root), "holiday")
    manager = SyncManager(ledger, settings)  # no live watcher: the button reconciles
    manager.start()
    try:
        assert manager.wait_idle(60)
        yield ledger, manager, repo, root
    finally:
        manager.stop()
        ledger.close()


def test_dashboard_lists_repositories_and_streams_changes(
    running: tuple[Ledger, SyncManager, Repository, Path], tmp_path: Path
) -> None:
    ledger, manager, repo, root = running
    app = create_app(ledger, manager, ledger.settings)
    with serve(app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")

            row = page.locator(f"#repos tbody tr[data-repo-id='{repo.id}']")
            expect(row.locator("td.name")).to_have_text("holiday", timeout=20_000)
            expect(row.locator("td.files")).to_have_text("2")
            expect(row).to_contain_text("online")
            expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
            expect(page.locator("#operations tbody tr").first).to_contain_text("startup")

            # A file appears on disk; a reconciliation from the page brings it into the feed.
            (root / "2024" / "sunset.jpg").write_bytes(b"orange")
            row.locator("button.reconcile").click()
            expect(page.locator("#message")).to_contain_text("queued")
            change = page.locator("#changes li", has_text="2024/sunset.jpg")
            expect(change).to_have_count(1, timeout=20_000)
            expect(change.locator(".kind")).to_have_text("created")
            expect(row.locator("td.files")).to_have_text("3", timeout=20_000)

            # File names are text, never markup.
            (root / XSS).unlink()
            row.locator("button.reconcile").click()
            gone = page.locator("#changes li", has_text=XSS)
            expect(gone).to_have_count(1, timeout=20_000)
            expect(gone.locator(".kind")).to_have_text("deleted")
            expect(page.locator("#changes img")).to_have_count(0)
            assert page.evaluate("window.pwned") is None

            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
