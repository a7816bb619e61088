"""The dashboard in a real browser: Debian's Chromium driven by playwright, against a real
server over a real ledger and a real tree (used by test_dashboard.py and dashboard_shots.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from api_support import serve
from fsledger.api import create_app
from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.manager import LiveSource, ResyncCallback, SyncManager
from fsledger.model import Repository

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watcher(ledger: Ledger, settings: Settings, on_resync: ResyncCallback) -> LiveSource:
    """The real inotify watcher, as ``fsledger run`` builds it."""
    from fsledger.watch import Watcher

    return Watcher(ledger, settings, on_resync=on_resync)


@dataclass
class Site:
    """A running daemon (manager + HTTP server) over a ledger."""

    ledger: Ledger
    manager: SyncManager
    base: str
    repos: dict[str, Repository] = field(default_factory=dict)


@contextmanager
def site(
    tmp: Path,
    roots: dict[str, Path],
    *,
    watch: bool = True,
    token: str | None = None,
    before_start: Callable[[Ledger], None] | None = None,
) -> Iterator[Site]:
    """A ledger in ``tmp`` with one repository per root, its manager started (startup
    scans done) and the HTTP API served on loopback."""
    settings = Settings(
        database_url="sqlite://" + str(tmp / "ledger.db"), max_concurrency=2, api_token=token
    )
    ledger = Ledger(settings)
    repos = {name: ledger.add_repository(os.fsencode(root), name) for name, root in roots.items()}
    if before_start is not None:
        before_start(ledger)
    manager = SyncManager(ledger, settings, live_factory=watcher if watch else None)
    manager.start()
    try:
        assert manager.wait_idle(120), "the startup scans did not finish"
        app = create_app(ledger, manager, settings)
        with serve(app) as base:
            yield Site(ledger, manager, base, repos)
    finally:
        manager.stop()
        ledger.close()


def make_tree(root: Path, dirs: int, files_per_dir: int, size: int = 64) -> int:
    """``dirs`` folders of ``files_per_dir`` small files of distinct content; returns how
    many files."""
    n = 0
    for d in range(dirs):
        folder = root / f"{2000 + d // 12}-{d % 12 + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(files_per_dir):
            (folder / f"IMG_{f:05d}.jpg").write_bytes(f"{d}/{f}:".encode().ljust(size, b"x"))
            n += 1
    return n
