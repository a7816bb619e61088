"""Screenshots of the dashboard for docs/dashboard.md, from a real daemon over real trees.

    PYTHONPATH=src .venv/bin/python tests/dashboard_shots.py [docs/img]

Three repositories: "photos" (a few thousand files, some copied twice: duplicates),
"documents", and "music", whose root is renamed away after its first scan (an unplugged
disk: offline, records kept). Changes are
made on disk while the watcher runs (created, modified, moved, deleted). The activity chart
needs a day of history that a script cannot wait for: the demo's feed entries are spread
over the last day by rewriting their ``recorded_at`` in its own SQLite file (and nowhere
else). A verify scan of "photos" is started for the progress bar, and the shots are taken
while it runs.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from api_support import wait_for
from dashboard_support import chromium, make_tree, site
from fsledger.model import utcnow

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

WIDE: ViewportSize = {"width": 1400, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
TOKEN = "demo-token-of-the-screenshots"


def build(tmp: Path) -> dict[str, Path]:
    photos, docs, music = tmp / "Photos", tmp / "Documents", tmp / "Music"
    make_tree(photos, 36, 400, size=2048)
    imports = photos / "Imports"
    imports.mkdir()
    rng = random.Random(7)
    for i in range(40):  # copies of photos: duplicate groups of different sizes
        src = photos / "2001-03" / f"IMG_{i:05d}.jpg"
        blob = rng.randbytes(rng.randint(200_000, 2_000_000))
        src.write_bytes(blob)
        for c in range(1 + i % 3):
            (imports / f"copy{c}_IMG_{i:05d}.jpg").write_bytes(blob)
    for sub in ("Taxes/2023", "Taxes/2024", "Letters", "Manuals"):
        (docs / sub).mkdir(parents=True)
        for j in range(25):
            (docs / sub / f"scan-{j:03d}.pdf").write_bytes(rng.randbytes(3000 + j * 37))
    (docs / "Letters" / "<i>markup stays text.txt").write_bytes(b"names stay text")
    for album in ("Bach - Cello Suites", "Miles Davis - Kind of Blue"):
        (music / album).mkdir(parents=True)
        for t in range(12):
            (music / album / f"{t + 1:02d}.flac").write_bytes(rng.randbytes(5000))
    return {"photos": photos, "documents": docs, "music": music}


def spread_history(db: Path) -> None:
    """Spread the feed's entries over the last day (the chart's demo history)."""
    conn = sqlite3.connect(db)
    try:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM change_log ORDER BY seq")]
        now = utcnow()
        rng = random.Random(3)
        # Most in the last hour, busier lately; the rest over the day, in daytime.
        ages = sorted(
            (
                rng.random() ** 1.7 * 3600
                if rng.random() < 0.7
                else 3600 + rng.triangular(0, 23 * 3600, 9 * 3600)
                for _ in seqs
            ),
            reverse=True,
        )
        for seq, age in zip(seqs, ages, strict=True):
            at = now - timedelta(seconds=age)
            conn.execute(
                "UPDATE change_log SET recorded_at = ? WHERE seq = ?", (at.isoformat(), seq)
            )
        conn.commit()
    finally:
        conn.close()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fsledger-shots-"))
    try:
        roots = build(tmp)
        with site(tmp, roots, token=TOKEN) as s:
            photos, docs = roots["photos"], roots["documents"]
            # Activity while the watcher runs: every kind of change.
            for j in range(30):
                (photos / "2002-01" / f"new_{j:03d}.jpg").write_bytes(b"fresh" * (j + 1))
            (docs / "Taxes/2024" / "scan-000.pdf").write_bytes(b"amended")
            for j in range(150):  # edited photos
                (photos / "2001-06" / f"IMG_{j:05d}.jpg").write_bytes(b"edited %d" % j)
            (photos / "Edited").mkdir()
            for j in range(60):  # moved one by one
                name = f"IMG_{j:05d}.jpg"
                (photos / "2001-07" / name).rename(photos / "Edited" / name)
            for j in range(100, 180):
                (photos / "2001-08" / f"IMG_{j:05d}.jpg").unlink()
            for j in range(8):
                (photos / "2000-01" / f"IMG_{j:05d}.jpg").unlink()
            (photos / "2000-02").rename(photos / "2000-02 Holiday")
            (docs / "Letters" / "scan-001.pdf").rename(docs / "Letters" / "to the bank.pdf")
            time.sleep(4.0)
            spread_history(tmp / "ledger.db")
            (docs / "Manuals" / "scan-002.pdf").rename(docs / "Manuals" / "dishwasher.pdf")
            (photos / "2002-05" / "IMG_00001.jpg").unlink()
            roots["music"].rename(tmp / "Music (unplugged)")  # the offline card
            music = s.repos["music"].id
            wait_for(
                "music to go offline",
                lambda: s.manager.get_sync_status(music).repository.state.value == "offline",
                60,
            )
            with chromium() as browser:

                def open_page(size: ViewportSize, where: str = "/", shot: str = "") -> Page:
                    page = browser.new_page(viewport=size)
                    page.goto(s.base + where)
                    page.wait_for_selector("#token-form:not([hidden])", timeout=30_000)
                    if shot:
                        page.screenshot(
                            path=str(out / shot),
                            clip={"x": 0, "y": 0, "width": 1400, "height": 94},
                        )
                    page.fill("#token", TOKEN)
                    page.click("#token-form button")
                    page.wait_for_selector("#connection.live", timeout=30_000)
                    return page

                for name, size in (("dashboard", WIDE), ("dashboard-phone", PHONE)):
                    page = open_page(size, shot="token.png" if size is WIDE else "")
                    s.manager.trigger_reconciliation(s.repos["photos"].id, verify=True)
                    # Mid-scan, and the bar's width transition (0.3 s) done.
                    page.wait_for_function(
                        """() => {
                          const bar = document.querySelector('.card .progress:not([hidden]) .bar');
                          const v = Number(bar && bar.getAttribute('aria-valuenow'));
                          return v >= 15 && v <= 75;
                        }""",
                        timeout=60_000,
                        polling=50,
                    )
                    page.wait_for_timeout(350)
                    page.screenshot(path=str(out / f"{name}.png"), full_page=name != "dashboard")
                    assert s.manager.wait_idle(120)
                    if size is WIDE:  # the whole page once the scan is done: the operations
                        page.wait_for_function(
                            "() => !document.querySelector('.card .progress:not([hidden])')",
                            timeout=30_000,
                        )
                        page.wait_for_timeout(1600)
                        page.screenshot(path=str(out / "dashboard-full.png"), full_page=True)
                        page.locator(".tabs button[data-window='day']").click()
                        page.wait_for_timeout(800)
                        page.locator("#activity").screenshot(path=str(out / "activity-day.png"))
                    page.close()
                for name, size in (("duplicates", WIDE), ("duplicates-phone", PHONE)):
                    page = open_page(size, "/#duplicates")
                    page.wait_for_selector("#dup-groups .group", timeout=30_000)
                    page.screenshot(path=str(out / f"{name}.png"))
                    page.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img"))
