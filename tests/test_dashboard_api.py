"""What the dashboard reads, on both stores: the progress of a running scan (status route
and SSE), the status's condition, bytes and last-scan problems, the newest changes, the
activity per minute, operations by type and status, and duplicates page by page."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_support import SseReader, serve, wait_for
from conftest import make_settings
from dashboard_support import make_tree
from fsledger.activity import Activity, minute_of
from fsledger.api import create_app
from fsledger.ledger import Ledger, offline_reason
from fsledger.manager import SyncManager
from fsledger.model import OperationStatus, OperationType, utcnow
from fsledger.progress import Estimate, Phase, ProgressBoard


def test_tracker_rate_eta_and_phases() -> None:
    now = [100.0]
    board = ProgressBoard(clock=lambda: now[0])
    from uuid import uuid4

    from fsledger.model import ScanStats

    rid = uuid4()
    tracker = board.track(rid, "reconciliation", False, Estimate(1000, None))
    assert board.get(rid) is not None and board.get(rid).phase == Phase.STARTING  # type: ignore[union-attr]
    now[0] += 2.0
    tracker.update(ScanStats(files_scanned=250, bytes_hashed=5000))
    p = board.get(rid)
    assert p is not None and p.phase == Phase.SCANNING
    assert p.files_done == 250 and p.fraction == 0.25
    assert p.files_per_s == pytest.approx(125.0) and p.eta_s == pytest.approx(6.0)
    now[0] += 0.05  # within the publishing interval: held back
    tracker.update(ScanStats(files_scanned=300))
    assert board.get(rid).files_done == 250  # type: ignore[union-attr]
    tracker.finishing(ScanStats(files_scanned=1200))  # more than expected: capped at 1
    assert board.get(rid).fraction == 1.0  # type: ignore[union-attr]
    tracker.update(ScanStats(files_scanned=1200))  # a late tick does not go back
    tracker.done(ScanStats(files_scanned=1200))
    p = board.get(rid)
    assert p is not None and p.phase == Phase.DONE and not p.running
    now[0] += 11.0  # an ended scan is forgotten after a while
    assert board.get(rid) is None


def test_offline_reasons() -> None:
    gone = "repository 'x': root /m is unavailable (No such file or directory); is the disk"
    assert offline_reason(gone) == "root missing"
    assert offline_reason("root /m is empty but the ledger holds files") == (
        "root empty while files are recorded (not mounted?)"
    )


def _scan_with_events(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    n = make_tree(root, 8, 1000)
    settings = make_settings(store_url)
    ledger = Ledger(settings)
    repo = ledger.add_repository(str(root), "big")
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(120)
        app = create_app(ledger, manager, settings, heartbeat_s=5.0)
        with serve(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            seen_in_status: list[dict[str, Any]] = []
            stop = threading.Event()

            def poll_status() -> None:
                while not stop.is_set():
                    body = client.get(f"/api/v1/repositories/{repo.id}/status").json()
                    if body["progress"] and body["progress"]["phase"] == "scanning":
                        seen_in_status.append(body["progress"])
                    time.sleep(0.05)

            with client.stream("GET", "/api/v1/events?progress=true") as response:
                assert response.status_code == 200
                sse = SseReader(response)
                poller = threading.Thread(target=poll_status, daemon=True)
                poller.start()
                manager.trigger_reconciliation(repo.id, verify=True)
                events: list[dict[str, Any]] = []
                while True:
                    ev = sse.next()
                    assert ev.event == "progress" and ev.id is None
                    body = ev.json()
                    if body["operation"] == "startup":
                        continue  # the startup scan's last snapshot, still kept a while
                    events.append(body)
                    if not body["running"]:
                        break
                stop.set()
                poller.join(10)
        phases = [e["phase"] for e in events]
        assert phases[-1] == "done", phases
        assert "scanning" in phases and phases.index("scanning") < len(phases) - 1
        assert all(e["verify"] and e["repository_id"] == str(repo.id) for e in events)
        assert all(e["files_expected"] == n for e in events)  # the last scan's count
        assert events[0]["bytes_expected"] == n * 64  # a verify hashes every record
        done = [e["files_done"] for e in events]
        assert done == sorted(done) and done[-1] == n
        moving = [e for e in events if e["phase"] == "scanning" and 0 < e["files_done"] < n]
        assert moving, events
        assert all(e["files_per_s"] > 0 and e["eta_s"] is not None for e in moving)
        assert events[-1]["fraction"] == 1.0
        assert seen_in_status, "the status route never showed the running scan"
        assert all(0 <= p["fraction"] <= 1 for p in seen_in_status)
    finally:
        manager.stop()
        ledger.close()


@pytest.mark.slow
def test_progress_of_a_running_scan_in_status_and_sse(store_url: str, tmp_path: Path) -> None:
    _scan_with_events(store_url, tmp_path)


def test_status_condition_bytes_and_last_scan(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_bytes(b"12345")
    (root / "b").write_bytes(b"123")
    repo = ledger.add_repository(str(root), "r")
    ledger.scan(repo)
    status = ledger.status(repo).to_json()
    assert status["total_files"] == 2 and status["total_bytes"] == 8
    assert status["condition"] == {"state": "online", "reason": None, "since": None}
    assert status["last_scan"]["files_scanned"] == 2
    assert status["last_scan"]["error_count"] == 0 and status["last_scan"]["corrupt_count"] == 0
    root.rename(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="unavailable"):
        ledger.scan(repo)
    cond = ledger.status(repo).to_json()["condition"]
    assert cond["state"] == "offline" and cond["reason"] == "root missing"
    assert cond["since"] is not None
    assert ledger.scan_estimate(repo, verify=True) == Estimate(2, 8)
    assert ledger.scan_estimate(repo, verify=False) == Estimate(2, 8)  # the first scan hashed 8


def test_recent_changes_activity_and_operations(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(b"x" * i)
    repo = ledger.add_repository(str(root), "r")
    before = utcnow() - timedelta(minutes=1)
    ledger.scan(repo)
    (root / "f1").rename(root / "g1")
    (root / "f2").unlink()
    ledger.scan(repo)
    newest = ledger.recent_changes(repo, (), 3)
    assert [e.kind.value for e in newest] == ["deleted", "moved", "created"]
    assert newest[1].old_path == b"f1" and newest[1].path == b"g1"
    assert [e.seq for e in newest] == sorted((e.seq for e in newest), reverse=True)
    created = ledger.recent_changes(None, ("created",), 100)
    assert len(created) == 5 and all(e.kind.value == "created" for e in created)
    counts = ledger.activity(before, repo)
    by_kind: dict[str, int] = {}
    for minute, kind, n in counts:
        assert minute.second == 0 and before <= minute + timedelta(minutes=1)
        by_kind[kind] = by_kind.get(kind, 0) + n
    assert by_kind.get("created") == 5 and by_kind.get("moved") == 1
    assert by_kind.get("deleted") == 1
    assert ledger.activity(utcnow() + timedelta(minutes=1), repo) == []
    ops = ledger.operations(repo, 10, OperationType.RECONCILIATION, OperationStatus.COMPLETED)
    assert len(ops) == 2
    assert ledger.operations(repo, 10, OperationType.STARTUP) == []
    assert ledger.operations(repo, 10, status=OperationStatus.FAILED) == []


def test_duplicates_page_by_offset(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    for g in range(7):  # group g: 2 copies of g+1 KiB (waste (g+1) KiB)
        for c in range(2):
            (root / f"g{g}_{c}").write_bytes(bytes([g]) * ((g + 1) * 1024))
    repo = ledger.add_repository(str(root), "r")
    ledger.scan(repo)
    first = ledger.duplicates(repo, 3, 1, 2, 0)
    second = ledger.duplicates(repo, 3, 1, 2, 3)
    last = ledger.duplicates(repo, 3, 1, 2, 6)
    wastes = [g.wasted_bytes for g in (*first, *second, *last)]
    assert wastes == [k * 1024 for k in range(7, 0, -1)]
    assert ledger.duplicates(repo, 3, 1, 2, 9) == []


def test_dashboard_routes(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_bytes(b"same")
    (root / "b").write_bytes(b"same")
    repo = ledger.add_repository(str(root), "r")
    ledger.scan(repo)
    app = create_app(ledger, None, ledger.settings)
    with serve(app) as base, httpx.Client(base_url=base) as client:
        recent = client.get("/api/v1/changes/recent", params={"limit": 1}).json()
        assert [c["path"] for c in recent["changes"]] == ["b"]
        # Following the feed from the head given misses nothing and repeats nothing.
        assert (
            client.get("/api/v1/changes", params={"since": recent["cursor"]}).json()["changes"]
            == []
        )
        bad = client.get("/api/v1/changes/recent", params={"kind": "meta"})
        assert bad.status_code == 400 and "unknown kind" in bad.json()["detail"]
        act = client.get("/api/v1/activity", params={"window": "day"}).json()
        assert sum(b.get("created", 0) for b in act["buckets"]) == 2
        assert act["step_s"] == 60
        assert client.get("/api/v1/activity", params={"window": "week"}).status_code == 422
        ops = client.get("/api/v1/operations", params={"type": "reconciliation"}).json()
        assert [o["operation_type"] for o in ops] == ["reconciliation"]
        dups = client.get("/api/v1/duplicates", params={"limit": 1}).json()
        assert dups["wasted_bytes"] == 4 and dups["next_offset"] == 1
        assert client.get("/api/v1/duplicates", params={"offset": 1}).json()["groups"] == []
        status = client.get(f"/api/v1/repositories/{repo.id}/status").json()
        assert status["total_bytes"] == 8 and status["progress"] is None


def test_slow_record_totals_are_reused_for_a_while(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    repo = ledger.add_repository(str(root), "r")
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 1  # cheap: exact every time
    (root / "b").write_bytes(b"b")
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 2
    real = ledger.store.record_totals

    def slow(repo_id: Any) -> tuple[int, int]:  # as a million records make it
        time.sleep(0.06)
        return real(repo_id)

    monkeypatch.setattr(ledger.store, "record_totals", slow)
    assert ledger.status(repo).total_files == 2  # slow, but small: still exact
    (root / "c").write_bytes(b"c")
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 3
    assert ledger.status(repo).total_files == 3  # no change since: not counted again
    monkeypatch.setattr("fsledger.ledger.TOTALS_REUSE_FROM", 2)  # as if it were big
    (root / "d").write_bytes(b"d")
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 4
    (root / "e").write_bytes(b"e")
    ledger.scan(repo)
    assert ledger.status(repo).total_files == 4  # reused: it cost 60 ms
    wait_for("the totals to be read again", lambda: ledger.status(repo).total_files == 5, 5)


class _PartlyWatching:
    """A LiveSource that hit the watch limit (the real one needs a system-wide limit lowered)."""

    def add(self, repo: Any) -> None: ...
    def remove(self, repo_id: Any) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_watching(self, repo_id: Any) -> bool:
        return True

    def degraded(self, repo_id: Any) -> bool:
        return True

    def check(self, repo_id: Any, path: bytes) -> None: ...


def test_condition_degraded_and_polling(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    repo = ledger.add_repository(str(root), "r")
    manager = SyncManager(ledger, ledger.settings, live_factory=lambda *_: _PartlyWatching())
    manager.start()
    try:
        assert manager.wait_idle(60)
        cond = manager.get_sync_status(repo.id).to_json()["condition"]
        assert cond == {
            "state": "degraded",
            "reason": "watch limit reached: polling every 60 min",
            "since": None,
        }
    finally:
        manager.stop()
    monkeypatch.setattr("fsledger.manager._network", lambda root: True)  # an NFS root
    manager = SyncManager(ledger, ledger.settings, live_factory=lambda *_: _PartlyWatching())
    manager.start()
    try:
        assert manager.wait_idle(60)
        cond = manager.get_sync_status(repo.id).to_json()["condition"]
        assert cond["state"] == "polling"
        assert cond["reason"] == "network filesystem: polling every 1 min"
    finally:
        manager.stop()


class _Entries:
    """Feed entries (time, kind) counted like the stores do, recording each question."""

    def __init__(self) -> None:
        self.entries: list[tuple[datetime, str]] = []
        self.asked: list[tuple[datetime, datetime | None]] = []

    def change_counts_by_minute(
        self, since: datetime, repo_id: Any = None, until: datetime | None = None
    ) -> list[tuple[datetime, str, int]]:
        self.asked.append((since, until))
        counts: dict[tuple[datetime, str], int] = {}
        for t, kind in self.entries:
            if t >= since and (until is None or t < until):
                key = (minute_of(t), kind)
                counts[key] = counts.get(key, 0) + 1
        return [(m, k, n) for (m, k), n in sorted(counts.items())]


def test_activity_counts_each_minute_once_it_is_over() -> None:
    t0 = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)
    now = [t0]
    source = _Entries()
    activity = Activity(source, clock=lambda: now[0])
    for i in range(30):  # one entry every 10 s for five minutes
        source.entries.append((t0 - timedelta(minutes=5) + timedelta(seconds=10 * i), "created"))
    hour = t0 - timedelta(hours=1)
    first = activity.counts(hour)
    assert sum(n for _, _, n in first) == 30
    assert source.asked == [(hour, t0 - timedelta(minutes=2)), (t0 - timedelta(minutes=2), None)]
    # A minute later: only the minutes that settled since and the open ones are counted.
    now[0] = t0 + timedelta(minutes=1)
    source.entries.append((now[0], "deleted"))
    source.asked.clear()
    again = activity.counts(now[0] - timedelta(hours=1))
    assert source.asked == [
        (t0 - timedelta(minutes=2), t0 - timedelta(minutes=1)),
        (t0 - timedelta(minutes=1), None),
    ]
    assert sum(n for _, _, n in again) == 31
    assert [(m, k, n) for m, k, n in again if k == "deleted"] == [(now[0], "deleted", 1)]
    assert again == sorted(again)
    # A longer window than the one kept counts it all again, once.
    source.asked.clear()
    day = activity.counts(now[0] - timedelta(days=1))
    assert day == again and len(source.asked) == 2


def test_dashboard_routes_want_the_token(ledger: Ledger) -> None:
    settings = replace(ledger.settings, api_token="a-token-of-16-chars-or-more")
    app = create_app(ledger, None, settings)
    with serve(app) as base, httpx.Client(base_url=base) as client:
        for path in ("/changes/recent", "/activity", "/operations", "/events?progress=true"):
            assert client.get("/api/v1" + path).status_code == 401, path
        ok = client.get(
            "/api/v1/activity", headers={"Authorization": "Bearer a-token-of-16-chars-or-more"}
        )
        assert ok.status_code == 200
