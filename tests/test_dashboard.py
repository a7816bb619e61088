"""The dashboard in headless Chromium (Debian's ``chromium``, driven by playwright) against a
real daemon: the manager with the inotify watcher, the HTTP server, real trees on disk.

The cards, the recent changes shown on load and then live (a change on disk within a
second), the filters, the progress bar moving during a real scan, the offline banner when a
root disappears, the duplicates page, the token asked once, and the phone width."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from api_support import wait_for
from dashboard_support import CHROMIUM, chromium, make_tree, site

XSS = "<img src=x onerror=window.pwned=1>.txt"

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

from playwright.sync_api import Page, expect  # noqa: E402


def _errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


@pytest.mark.slow  # Chromium end to end: 5-9 s
def test_cards_and_changes_on_load_then_live(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "beach.jpg").write_bytes(b"sand")
    (root / "2024" / "dune.jpg").write_bytes(b"dune")
    (root / XSS).write_bytes(b"markup in a name stays text")
    with site(tmp_path, {"holiday": root}) as s, chromium() as browser:
        repo = s.repos["holiday"]
        # Before the page opens: a move, applied by the watcher.
        (root / "2024" / "dune.jpg").rename(root / "2024" / "dunes.jpg")
        wait_for(
            "the move in the feed",
            lambda: any(e.kind.value == "moved" for e in s.ledger.recent_changes(repo, (), 5)),
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = _errors(page)
        page.goto(s.base + "/")
        card = page.locator(f".card[data-repo-id='{repo.id}']")
        expect(card.locator("h3")).to_have_text("holiday", timeout=20_000)
        expect(card.locator(".badge.state")).to_have_text("online")
        expect(card.locator(".root")).to_have_text(str(root))
        expect(card.locator(".stat.files .value")).to_have_text("3")
        expect(card.locator(".stat.bytes .value")).to_have_text("35 B")
        expect(card.locator(".stat.watching .value")).to_have_text("yes")
        expect(card.locator(".stat.last-scan .value")).to_have_text("just now")
        expect(card.locator(".stat.next-scan .value")).not_to_have_text("none")
        expect(card.locator(".stat.problems .value")).to_have_text("0 / 0")
        expect(card.locator(".reason")).to_be_hidden()
        expect(page.locator("#banner")).to_be_hidden()

        # Changes made before the page opened are listed on load; a move reads old → new.
        moved = page.locator("#changes tbody tr[data-kind='moved']")
        expect(moved).to_have_count(1)
        expect(moved.locator("td.path")).to_have_text("2024/dune.jpg → 2024/dunes.jpg")
        expect(page.locator("#changes tbody tr[data-kind='created']")).to_have_count(3)
        expect(page.locator("#connection")).to_have_text("live", timeout=20_000)

        # A change made on disk appears within a second.
        t0 = time.monotonic()
        (root / "2024" / "sunset.jpg").write_bytes(b"orange")
        row = page.locator("#changes tbody tr", has_text="2024/sunset.jpg")
        expect(row).to_have_count(1, timeout=10_000)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"the change took {elapsed:.2f} s to show"
        expect(row.locator(".kind")).to_have_text("created")
        expect(row).to_have_class("fresh")
        expect(card.locator(".stat.files .value")).to_have_text("4", timeout=10_000)

        # File names are text, never markup.
        (root / XSS).unlink()
        gone = page.locator("#changes tbody tr[data-kind='deleted']", has_text=XSS)
        expect(gone).to_have_count(1, timeout=10_000)
        expect(gone.locator("td.path")).to_have_text(XSS)
        expect(page.locator("#changes img")).to_have_count(0)
        assert page.evaluate("window.pwned") is None

        # Filter by kind, then by repository (reloaded from the server, then live).
        page.select_option("#changes-kind", "deleted")
        expect(page.locator("#changes tbody tr")).to_have_count(1)
        (root / "2024" / "beach.jpg").write_bytes(b"more sand")  # modified: filtered out
        (root / "2024" / "sunset.jpg").unlink()
        expect(page.locator("#changes tbody tr")).to_have_count(2, timeout=10_000)
        kinds = page.locator("#changes tbody tr").evaluate_all("rs => rs.map(r => r.dataset.kind)")
        assert kinds == ["deleted", "deleted"]
        page.select_option("#changes-kind", "")
        page.select_option("#changes-repo", str(repo.id))
        expect(page.locator("#changes tbody tr[data-kind='modified']")).to_have_count(1)

        # Operations, filtered; the activity chart drew this hour's changes.
        expect(page.locator("#operations tbody tr").first).to_be_visible()
        page.select_option("#ops-type", "startup")
        expect(page.locator("#operations tbody tr")).to_have_count(1)
        expect(page.locator("#operations tbody tr td").nth(3)).to_have_text("completed")
        page.select_option("#ops-type", "realtime")
        expect(page.locator("#operations tbody tr[data-type='realtime']").first).to_be_visible()
        assert page.locator("#operations tbody tr:not([data-type='realtime'])").count() == 0
        assert int(page.locator("#chart").get_attribute("data-bars") or 0) >= 1
        assert page.locator("#chart rect.k-created").count() >= 1
        page.locator(".tabs button[data-window='day']").click()
        expect(page.locator(".tabs button.active")).to_have_text("Last day")
        expect(page.locator("#chart-axis")).to_contain_text("peak")
        assert errors == []


@pytest.mark.slow
def test_progress_bar_moves_during_a_real_scan(tmp_path: Path) -> None:
    root = tmp_path / "big"
    n = make_tree(root, 12, 1000)
    with site(tmp_path, {"big": root}, watch=False) as s, chromium() as browser:
        repo = s.repos["big"]
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = _errors(page)
        page.goto(s.base + "/")
        card = page.locator(f".card[data-repo-id='{repo.id}']")
        expect(card.locator(".stat.files .value")).to_have_text(f"{n:,}", timeout=20_000)
        expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
        expect(card.locator(".progress")).to_be_hidden()
        # Every value the bar takes, as the page sets it (cards are redrawn meanwhile).
        page.evaluate(
            """() => {
              window.seen = [];
              new MutationObserver(() => {
                const bar = document.querySelector('.card .progress:not([hidden]) .bar');
                const v = bar && bar.getAttribute('aria-valuenow');
                const text = bar && bar.parentNode.querySelector('.progress-text').textContent;
                if (v !== null && v !== undefined) window.seen.push([Number(v), text]);
              }).observe(document.body, {subtree: true, childList: true, attributes: true,
                                         characterData: true});
            }"""
        )
        card.locator("button.verify").click()
        expect(card.locator(".progress")).to_be_visible(timeout=10_000)
        expect(card.locator(".progress-phase")).to_contain_text("Verifying")
        assert s.manager.wait_idle(120)
        expect(card.locator(".progress")).to_be_hidden(timeout=20_000)
        seen: list[tuple[float, str]] = page.evaluate("window.seen")
        values = [v for v, _ in seen]
        middle = sorted({v for v in values if 0 < v < 100})
        assert len(middle) >= 2, f"the bar did not move: {seen}"
        assert values == sorted(values), values  # it only goes forward
        assert any(f"of {n:,} files" in text for _, text in seen), seen
        assert any("files/s" in text for _, text in seen), seen
        assert errors == []


@pytest.mark.slow  # Chromium end to end: 5-9 s
def test_offline_banner_when_the_root_disappears(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    with site(tmp_path, {"holiday": root}) as s, chromium() as browser:
        repo = s.repos["holiday"]
        page = browser.new_page()
        errors = _errors(page)
        page.goto(s.base + "/")
        card = page.locator(f".card[data-repo-id='{repo.id}']")
        expect(card.locator(".badge.state")).to_have_text("online", timeout=20_000)
        banner = page.locator("#banner")
        expect(banner).to_be_hidden()

        root.rename(tmp_path / "unplugged")  # the disk went away
        expect(banner).to_be_visible(timeout=20_000)
        expect(banner).to_contain_text("holiday is offline: root missing since")
        expect(banner).to_contain_text("records are kept")
        expect(card.locator(".badge.state")).to_have_text("offline")
        expect(card).to_have_class("card state-offline")
        expect(card.locator(".reason")).to_contain_text("root missing since")
        expect(card.locator(".stat.files .value")).to_have_text("1")  # records kept
        expect(card.locator(".stat.watching .value")).to_have_text("no")

        (tmp_path / "unplugged").rename(root)  # and came back
        expect(banner).to_be_hidden(timeout=30_000)
        expect(card.locator(".badge.state")).to_have_text("online")
        assert errors == []


@pytest.mark.slow  # Chromium end to end: 5-9 s
def test_duplicates_page(tmp_path: Path) -> None:
    root = tmp_path / "dups"
    root.mkdir()
    for g in range(25):  # group g: g+2 copies of (g+1) KiB
        for c in range(g % 3 + 2):
            (root / f"g{g:02d}_copy{c}.bin").write_bytes(bytes([g]) * ((g + 1) * 1000))
    (root / "unique.bin").write_bytes(b"only one")
    with site(tmp_path, {"library": root}, watch=False) as s, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = _errors(page)
        page.goto(s.base + "/#duplicates")
        expect(page.locator("#overview")).to_be_hidden()
        groups = page.locator("#dup-groups > li")
        expect(groups).to_have_count(20, timeout=20_000)
        page.locator("#nav-overview").click()
        expect(page.locator("#duplicates")).to_be_hidden()
        page.locator("#nav-duplicates").click()
        expect(page.locator("#overview")).to_be_hidden()
        expect(groups).to_have_count(20)
        wastes = [(g + 1) * 1000 * (g % 3 + 1) for g in range(25)]
        expected = sorted(wastes, reverse=True)
        first = groups.first
        expect(first.locator(".wasted")).to_have_text(f"{expected[0] / 1000:.0f} kB wasted")
        top = max(range(25), key=lambda g: wastes[g])
        expect(first.locator(".copies")).to_have_text(
            f"{top % 3 + 2} copies of {(top + 1) * 1000 / 1000:.0f} kB"
        )
        expect(first.locator(".files li.path")).to_have_count(top % 3 + 2)
        expect(first).to_contain_text(f"library: g{top:02d}_copy0.bin")
        expect(page.locator("#dups-summary")).to_contain_text("Groups 1–20")
        expect(page.locator("#dups-prev")).to_be_disabled()
        page.locator("#dups-next").click()
        expect(groups).to_have_count(5)
        expect(page.locator("#dups-summary")).to_contain_text("Groups 21–25")
        expect(page.locator("#dups-next")).to_be_disabled()
        assert page.locator("#dup-groups").get_attribute("start") == "21"
        last = groups.last.locator(".wasted").text_content() or ""
        assert expected[-1] == 1000 and last == "1.0 kB wasted", last
        assert "unique.bin" not in (page.locator("#dup-groups").text_content() or "")

        # No watcher here: a copy made on disk comes in with the card's "Scan now".
        (root / "another_copy.bin").write_bytes(b"only one")
        page.locator("#nav-overview").click()
        card = page.locator(".card")
        files_before = sum(g % 3 + 2 for g in range(25)) + 1
        expect(card.locator(".stat.files .value")).to_have_text(str(files_before))
        card.locator("button.reconcile").click()
        expect(page.locator("#message")).to_contain_text("Scan of library queued")
        expect(card.locator(".stat.files .value")).to_have_text(
            str(files_before + 1), timeout=20_000
        )
        page.locator("#nav-duplicates").click()
        expect(groups.last.locator(".copies")).to_have_text("2 copies of 8 B")
        assert errors == []


@pytest.mark.slow  # Chromium end to end: ~5 s
def test_token_asked_once_and_phone_width(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "x").write_bytes(b"x")
    with site(tmp_path, {"phone": root}, token="s3cret-token") as s, chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        errors = _errors(page)
        page.goto(s.base + "/")
        form = page.locator("#token-form")
        expect(form).to_be_visible(timeout=20_000)
        expect(page.locator("#connection")).to_have_text("token needed")
        page.fill("#token", "s3cret-token")
        page.locator("#token-form button").click()
        expect(form).to_be_hidden()
        expect(page.locator(".card h3")).to_have_text("phone", timeout=20_000)
        expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
        page.reload()  # kept for the tab: not asked again
        expect(page.locator(".card h3")).to_have_text("phone", timeout=20_000)
        expect(form).to_be_hidden()
        # Phone width: one column, nothing wider than the screen.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        box = page.locator(".card").bounding_box()
        assert box is not None and box["width"] > 330
        assert errors == []


@pytest.mark.slow  # Chromium end to end: 5-9 s
def test_mirrors_table(
    tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each mirror of the ledger (real SeaweedFS): its bucket, state and reason, cursor lag,
    counters and last error, names shown as text; the table appears with the first mirror
    and follows the mirror as it catches up."""
    from fsledger.model import MirrorCounters, MirrorState
    from fsledger.s3.mirrors import Mirrors

    env = s3_server.env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = tmp_path / "photos"
    make_tree(root, 2, 3)
    (root / XSS).write_bytes(b"markup in a name stays text")
    with site(tmp_path, {"holiday": root}, watch=False) as s, chromium() as browser:
        repo = s.repos["holiday"]
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = _errors(page)
        page.goto(s.base + "/")
        expect(page.locator("#connection")).to_have_text("live", timeout=20_000)
        expect(page.locator("#mirrors-section")).to_be_hidden()  # no mirror yet

        mirrors = Mirrors(s.ledger)
        synced = mirrors.add("holiday", f"s3://{s3_bucket}/backup", s3_server.endpoint)
        assert mirrors.sync(str(synced.id)).counters.uploaded == 7
        (root / "2000-01" / "late.jpg").write_bytes(b"after the sync")
        s.ledger.scan(repo)
        lag = s.ledger.store.latest_seq() - (mirrors.get(str(synced.id)).cursor_seq or 0)
        assert lag > 0
        # A paused mirror whose reason and error carry markup: they stay text.
        stuck = mirrors.add("holiday", f"s3://{s3_bucket}/other", s3_server.endpoint, check=False)
        s.ledger.store.set_mirror_state(stuck.id, MirrorState.PAUSED, "paused by " + XSS)
        s.ledger.store.advance_mirror(stuck.id, None, MirrorCounters(errors=1), "reading " + XSS)

        expect(page.locator("#mirrors-section")).to_be_visible(timeout=15_000)  # next refresh
        rows = page.locator("#mirrors tbody tr")
        expect(rows).to_have_count(2)
        first = page.locator(f"#mirrors tr[data-mirror-id='{synced.id}']")
        expect(first.locator("td.repo")).to_have_text("holiday")
        expect(first.locator("td.bucket")).to_have_text(f"s3://{s3_bucket}/backup")
        expect(first.locator(".badge.state")).to_have_text("active")
        expect(first.locator(".reason")).to_be_hidden()
        expect(first.locator("td.lag")).to_have_text(str(lag))
        expect(first.locator("td.uploaded")).to_have_text("7")
        expect(first.locator("td.copied")).to_have_text("0")
        expect(first.locator("td.deleted")).to_have_text("0")
        expect(first.locator("td.errors")).to_have_text("0")
        expect(first.locator("td.last-error")).to_have_text("")

        second = page.locator(f"#mirrors tr[data-mirror-id='{stuck.id}']")
        expect(second.locator(".badge.state")).to_have_text("paused")
        expect(second.locator(".reason")).to_have_text("paused by " + XSS)
        expect(second.locator("td.lag")).to_have_text("not synced")
        expect(second.locator("td.errors")).to_have_text("1")
        expect(second.locator("td.last-error")).to_have_text("reading " + XSS)
        assert page.locator("#mirrors img").count() == 0

        # The mirror catches up: the page follows at its next refresh.
        assert mirrors.sync(str(synced.id)).counters.uploaded == 8
        expect(first.locator("td.lag")).to_have_text("0", timeout=15_000)
        expect(first.locator("td.uploaded")).to_have_text("8")
        assert page.evaluate("window.pwned") is None
        assert errors == []
