"""The SyncManager: startup reconciliation, schedules, repositories picked up from another process,
offline roots, per-repository YAML. Reconciliation-only here; the watcher has its own tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fsledger.config import Settings
from fsledger.errors import ConfigError
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import OperationType, RepoSettings, RepoState
from fsledger.repoconfig import load_repo_yaml
from fsledger.schedule import Pressure, Quiet, ScheduleView
from support import wait_for


def on_disk(root: Path) -> set[bytes]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
        for name in filenames:
            if not name.startswith(b"."):
                out.add(os.path.relpath(os.path.join(dirpath, name), os.fsencode(root)))
    return out


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url="sqlite://" + str(tmp_path / "m.db"), max_concurrency=2)


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    with Ledger(settings) as led:
        yield led


def make_photos(root: Path, n: int = 5) -> Path:
    (root / "album").mkdir(parents=True)
    for i in range(n):
        (root / "album" / f"{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    return root


def test_startup_reconciliation_catches_changes_made_while_stopped(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    ledger.scan(repo)
    (root / "album" / "0.jpg").unlink()
    (root / "album" / "new.jpg").write_bytes(b"new")
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        assert {r.path for r in ledger.files(repo)} == on_disk(root)
        ops = ledger.operations(repo)
        assert ops[0].operation_type is OperationType.STARTUP
        status = manager.get_sync_status(repo.id)
        assert status.total_files == 5 and not status.is_watching
    finally:
        manager.stop()


def test_repository_added_by_another_process_is_picked_up(ledger, settings, tmp_path):
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        root = make_photos(tmp_path / "later")
        with Ledger(settings) as other:  # as the CLI in another process would
            repo = other.add_repository(os.fsencode(root))
        wait_for(
            "the manager to take the repository",
            lambda: any(r.id == repo.id for r in manager.repositories()),
        )
        wait_for("the first index", lambda: ledger.store.count_records(repo.id) == 5)
        with Ledger(settings) as other:
            other.remove_repository(repo)
        wait_for("the manager to drop the repository", lambda: not manager.repositories())
    finally:
        manager.stop()


def test_daily_run_once_per_local_date_even_across_dst(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "p")
    repo = ledger.add_repository(root)
    tz = timezone(timedelta(hours=1))
    clock = Clock(datetime(2026, 10, 24, 1, 0, tzinfo=tz))
    manager = SyncManager(ledger, settings, clock=clock)
    manager.start()
    try:
        assert manager.wait_idle(30)

        def reconciliations() -> int:
            return sum(
                1
                for op in ledger.operations(repo, 100)
                if op.operation_type is OperationType.RECONCILIATION
            )

        manager.tick()
        assert manager.wait_idle(30) and reconciliations() == 0  # 01:00: not yet
        clock.now = datetime(2026, 10, 24, 2, 0, tzinfo=tz)
        manager.tick()
        assert manager.wait_idle(30) and reconciliations() == 1
        manager.tick()
        assert manager.wait_idle(30) and reconciliations() == 1  # not twice
        # Fall back: 02:30 happens twice on the 25th; the run happens once.
        clock.now = datetime(2026, 10, 25, 2, 30, tzinfo=tz)
        manager.tick()
        assert manager.wait_idle(30)
        clock.now = datetime(2026, 10, 25, 2, 30, tzinfo=timezone(timedelta(hours=0)))
        manager.tick()
        assert manager.wait_idle(30) and reconciliations() == 2
    finally:
        manager.stop()


def test_daily_run_not_repeated_when_started_after_run_time(ledger, settings, tmp_path):
    repo = ledger.add_repository(make_photos(tmp_path / "p"))
    clock = Clock(datetime(2026, 3, 1, 10, 0).astimezone())
    manager = SyncManager(ledger, settings, clock=clock)
    manager.start()
    try:
        assert manager.wait_idle(30)
        manager.tick()
        assert manager.wait_idle(30)
        types = [op.operation_type for op in ledger.operations(repo, 10)]
        assert types == [OperationType.STARTUP]  # the startup run counts as today's
    finally:
        manager.stop()


def test_offline_root_keeps_records_and_resumes_when_back(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "mnt")
    repo = ledger.add_repository(root)
    ledger.scan(repo)
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        shutil.move(root, tmp_path / "unmounted")
        manager.trigger_reconciliation(repo.id)
        assert manager.wait_idle(30)
        assert ledger.store.get_repository(repo.id).state is RepoState.OFFLINE
        assert ledger.store.count_records(repo.id) == 5  # nothing deleted
        assert manager.get_sync_status(repo.id).repository.state is RepoState.OFFLINE
        shutil.move(tmp_path / "unmounted", root)
        (root / "album" / "while-away.jpg").write_bytes(b"w")
        # The scan writes the new record, then the repository is marked online: wait for both.
        wait_for(
            "the new record and the repository online",
            lambda: (
                ledger.store.count_records(repo.id) == 6
                and ledger.store.get_repository(repo.id).state is RepoState.ONLINE
            ),
            30,
        )
        assert metrics_offline(manager) == 0
    finally:
        manager.stop()


def metrics_offline(manager: SyncManager) -> int:
    return manager.metrics().offline_repositories


def test_repository_yaml_sync_settings(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "p")
    (root / "album" / "0.xmp").write_bytes(b"sidecar")
    (root / ".fsledger.yaml").write_text(
        "sync_settings:\n"
        '  quick_scan_interval: "5m"\n'
        '  full_scan_interval: "1h"\n'
        '  ignore_patterns: ["*.xmp"]\n'
    )
    loaded = load_repo_yaml(os.fsencode(root))
    assert loaded is not None
    assert loaded.quick_scan_interval_s == 300 and loaded.full_scan_interval_s == 3600
    repo = ledger.add_repository(root, settings=RepoSettings(trust_repo_config=True))
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        paths = {r.path for r in ledger.files(repo)}
        assert b"album/0.xmp" not in paths and len(paths) == 5
    finally:
        manager.stop()
    (root / ".fsledger.yaml").write_text("sync_settings:\n  quick_scan_interval: soon\n")
    with pytest.raises(ConfigError, match="quick_scan_interval"):
        load_repo_yaml(os.fsencode(root))


def test_interrupted_operation_marked_failed_at_start(ledger, settings, tmp_path):
    import socket

    from fsledger.model import OperationStatus, utcnow

    repo = ledger.add_repository(make_photos(tmp_path / "p"))
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    op = ledger.store.start_operation(
        repo.id, OperationType.RECONCILIATION, f"{socket.gethostname()}:{dead}", utcnow()
    )
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        stale = next(o for o in ledger.operations(repo, 10) if o.id == op.id)
        assert stale.status is OperationStatus.FAILED
        assert "interrupted" in (stale.error_message or "")
        assert not ledger.store.running_operations()
    finally:
        manager.stop()


def test_recently_active_directories_are_reconciled_first_after_a_loss(ledger, settings, tmp_path):
    """Priority processing: after lost events, the directories written to lately go first."""
    import heapq

    root = make_photos(tmp_path / "p")
    (root / "quiet").mkdir()
    (root / "quiet" / "q.jpg").write_bytes(b"q")
    repo = ledger.add_repository(root)
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        (root / "album" / "fresh.jpg").write_bytes(b"f")
        manager.trigger_reconciliation(repo.id)  # a write lands in album/
        assert manager.wait_idle(30)
        manager._stop.set()  # freeze the worker to look at the queue it would run
        with manager._cv:
            manager._cv.notify_all()
        for t in manager._threads:
            t.join(10)
        manager._on_resync(repo, b"", "inotify queue overflow")
        order = [heapq.heappop(manager._queue).prefix for _ in range(len(manager._queue))]
        # album/ was written last, quiet/ only by the first index, the whole tree goes last.
        assert order == [b"album", b"quiet", b""]
    finally:
        manager.stop()


class Pressures:
    """The pressure the manager's scheduler sees: the test sets it."""

    def __init__(self, io: float = 0.0) -> None:
        self.io = io

    def __call__(self) -> Pressure:
        return Pressure(io_avg60=self.io, cpu_avg60=0.0)


def periodic(settings: Settings, **kw: Any) -> Settings:
    """A scheduled reconciliation every second (no daily run)."""
    return replace(settings, reconciliation_interval_s=1.0, daily_at=None, **kw)


def test_scheduled_run_waits_under_pressure_then_runs_and_is_recorded(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    pressure = Pressures(io=80.0)
    manager = SyncManager(ledger, periodic(settings), pressure=pressure)
    manager.start()
    try:
        assert manager.wait_idle(30)  # the startup run is never deferred
        # What `fsledger status` of another process shows: read from the store.
        wait_for(
            "the schedule to wait",
            lambda: (ledger.status(repo).schedule or ScheduleView()).waiting_reason,
        )
        view = ledger.status(repo).schedule
        assert view is not None and "I/O pressure 80.0%" in (view.waiting_reason or "")
        assert view.deadline is not None and view.next_run == view.deadline
        assert "I/O pressure" in ledger.status(repo).to_json()["schedule"]["waiting_reason"]
        (root / "album" / "missed.jpg").write_bytes(b"no watcher saw this")
        assert manager.metrics().schedule_waiting == 1
        assert b"album/missed.jpg" not in {r.path for r in ledger.files(repo)}
        pressure.io = 0.0
        wait_for(
            "missed.jpg recorded",
            lambda: b"album/missed.jpg" in {r.path for r in ledger.files(repo)},
        )
        wait_for("a wait recorded", lambda: any(o.error_message for o in _waits(ledger, repo)))
        wait = next(o for o in _waits(ledger, repo) if o.error_message)
        assert "I/O pressure" in wait.error_message and "ran when quiet" in wait.error_message
        runs = [
            o for o in ledger.operations(repo) if o.operation_type is OperationType.RECONCILIATION
        ]
        assert any(o.start_time >= wait.start_time for o in runs)
        assert manager.metrics().schedule_deferrals["io_pressure"] >= 1
        # The deferred run found drift: the interval shortened, and status says why.
        wait_for(
            "the interval to shorten",
            lambda: "missed change" in (ledger.status(repo).schedule.interval.reason or ""),
        )
    finally:
        manager.stop()


def _waits(ledger: Ledger, repo) -> list:
    return [o for o in ledger.operations(repo, 100) if o.operation_type is OperationType.DEFERRAL]


def test_scheduled_run_never_waits_past_the_maximum(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    clock = Clock(datetime(2026, 3, 1, 10, 0, tzinfo=UTC))
    manager = SyncManager(
        ledger,
        periodic(settings, schedule_max_deferral_s=6 * 3600.0),
        clock=clock,
        pressure=Pressures(io=99.0),
    )
    manager.start()
    try:
        assert manager.wait_idle(30)
        wait_for("the schedule to wait", lambda: manager.metrics().schedule_waiting == 1)
        (root / "album" / "late.jpg").write_bytes(b"late")
        clock.now += timedelta(hours=6)  # still busy, but it has waited long enough
        wait_for(
            "late.jpg recorded", lambda: b"album/late.jpg" in {r.path for r in ledger.files(repo)}
        )
        wait_for(
            "a wait ended by the maximum deferral",
            lambda: any("maximum 6h" in (o.error_message or "") for o in _waits(ledger, repo)),
        )
    finally:
        manager.stop()


def test_quiet_request_from_another_process_holds_runs_until_it_expires(ledger, settings, tmp_path):
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    clock = Clock(datetime(2026, 3, 1, 10, 0, tzinfo=UTC))
    manager = SyncManager(ledger, periodic(settings), clock=clock, pressure=Pressures())
    manager.start()
    try:
        assert manager.wait_idle(30)
        # Another process (the CLI) asks for quiet through the database.
        with Ledger(settings) as other:
            other.request_quiet(Quiet(clock.now + timedelta(hours=2), by="thumbnailer"))
        wait_for(
            "the schedule to wait for the thumbnailer",
            lambda: (
                "thumbnailer"
                in ((ledger.status(repo).schedule or ScheduleView()).waiting_reason or "")
            ),
        )
        (root / "album" / "quiet.jpg").write_bytes(b"q")
        assert b"album/quiet.jpg" not in {r.path for r in ledger.files(repo)}
        clock.now += timedelta(hours=2)  # the request expires by itself
        wait_for(
            "quiet.jpg recorded", lambda: b"album/quiet.jpg" in {r.path for r in ledger.files(repo)}
        )
        assert manager.metrics().schedule_deferrals["quiet"] >= 1
    finally:
        manager.stop()


@pytest.mark.slow  # a real cp held for seconds
def test_scheduled_run_waits_while_a_real_cp_runs_then_runs_after(ledger, settings, tmp_path):
    """A real `cp -a` into the watched root (an import) holds the scheduled reconciliation;
    it runs once the copying is over, and the ledger equals the disk.

    Deterministic under load: the copying goes on until the wait is recorded (its
    ``deferral`` row, which a poll cannot miss, unlike the transient status), and the
    activity window (5 s) is far longer than any gap between two passes of the watcher
    while ``cp`` runs. The watcher's writes count as activity even while a scheduled
    reconciliation runs (they once did not: under load, each run of a growing tree took
    longer than the window, the next one found the library "quiet" and ran at once, and
    the schedule never waited)."""
    from fsledger.watch import Watcher

    source = tmp_path / "import"
    for d in range(10):
        (source / f"roll{d}").mkdir(parents=True)
        for i in range(30):
            (source / f"roll{d}" / f"{i}.jpg").write_bytes(b"%d-%d" % (d, i))
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    busy = periodic(settings, schedule_busy_changes=30.0, schedule_activity_window_s=5.0)
    manager = SyncManager(
        ledger,
        busy,
        live_factory=lambda led, s, on_resync: Watcher(led, s, on_resync=on_resync),
        pressure=lambda: None,
    )
    manager.start()
    stop = tmp_path / "stop-copying"
    copying = subprocess.Popen(
        [
            "sh",
            "-c",
            'n=0; while [ ! -e "$1" ]; do n=$((n+1)); cp -a "$2" "$3/import-$n"; done',
            "sh",
            str(stop),
            str(source),
            str(root),
        ]
    )
    try:
        wait_for("the schedule to wait for the changes", lambda: _waits(ledger, repo), 120)
    finally:
        stop.touch()
        assert copying.wait(60) == 0
    copied = datetime.now(UTC)
    try:

        def first_wait():  # the one the copying started
            return min(_waits(ledger, repo), key=lambda o: (o.start_time, o.id))

        wait_for("the wait to end", lambda: first_wait().end_time, 60)
        wait = first_wait()
        assert "changes/min" in (wait.error_message or "")
        assert "ran when quiet" in (wait.error_message or "")
        assert wait.end_time is not None and wait.end_time >= copied
        wait_for(
            "a reconciliation after the wait",
            lambda: any(
                o.operation_type is OperationType.RECONCILIATION and o.start_time >= wait.end_time
                for o in ledger.operations(repo, 100)
            ),
            60,
        )
        assert manager.wait_idle(60)
        wait_for(
            "the ledger to equal the disk",
            lambda: {r.path for r in ledger.files(repo)} == on_disk(root),
            30,
            detail=lambda: on_disk(root) ^ {r.path for r in ledger.files(repo)},
        )
    finally:
        manager.stop()


def test_the_watchers_writes_during_a_reconciliation_count_as_activity(ledger, settings, tmp_path):
    """What the schedule weighs as "the library is busy" is the watcher's writes; those it
    makes while a reconciliation runs count too (the reconciliation's own do not: see
    ``SyncManager._note_applied``)."""
    from fsledger.watch import Watcher

    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    manager = SyncManager(
        ledger,
        replace(settings, reconciliation_interval_s=0.0, daily_at=None),
        live_factory=lambda led, s, on_resync: Watcher(led, s, on_resync=on_resync),
        pressure=lambda: None,
    )
    manager.start()
    try:
        assert manager.wait_idle(30)  # the startup run
        manager._activity(repo.id)  # (drops what is older than the window)
        with manager._cv:
            manager._busy = repo.id  # as while a reconciliation of it runs
        try:
            (root / "album" / "new.jpg").write_bytes(b"imported while it runs")
            wait_for(
                "the watcher to record it", lambda: b"album/new.jpg" in on_ledger(ledger, repo)
            )
            assert manager._activity(repo.id) > 0
        finally:
            with manager._cv:
                manager._busy = None
    finally:
        manager.stop()


def on_ledger(ledger: Ledger, repo) -> set[bytes]:
    return {r.path for r in ledger.files(repo)}


def _interval(ledger: Ledger, repo) -> tuple[float, str]:
    view = ledger.status(repo).schedule
    if view is None or view.interval is None:
        return 0.0, ""
    return view.interval.seconds, view.interval.reason


@pytest.mark.slow  # waits out real intervals of 1, 2 and 4 s
def test_clean_runs_lengthen_the_interval_within_bounds_and_a_restart_keeps_it(
    ledger, settings, tmp_path
):
    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    adaptive = periodic(settings, interval_max_s=4.0)  # 1 s up to 4 s
    manager = SyncManager(ledger, adaptive, pressure=lambda: None)
    manager.start()
    try:
        wait_for("the interval to reach its ceiling", lambda: _interval(ledger, repo)[0] == 4.0, 30)
        assert "ceiling" in _interval(ledger, repo)[1] or "lengthened" in _interval(ledger, repo)[1]
    finally:
        manager.stop()
    again = SyncManager(ledger, adaptive, pressure=lambda: None)
    again.start()
    try:
        view = again.schedule_view(repo.id)
        assert view is not None and view.interval is not None and view.interval.seconds == 4.0
    finally:
        again.stop()


def test_a_polled_network_filesystem_keeps_its_polling_interval(
    ledger, settings, tmp_path, monkeypatch
):
    monkeypatch.setattr("fsledger.manager._network", lambda root: True)
    root = make_photos(tmp_path / "nfs")
    repo = ledger.add_repository(root)
    manager = SyncManager(ledger, periodic(settings, interval_max_s=4.0), pressure=lambda: None)
    manager.start()
    try:
        assert manager.wait_idle(30)
        wait_for(
            "the network poll interval", lambda: "network filesystem" in _interval(ledger, repo)[1]
        )
        assert _interval(ledger, repo)[0] == 60.0  # NETWORK_POLL_S, not adapted
    finally:
        manager.stop()


def test_clean_daily_runs_lengthen_the_interval_and_skip_days(ledger, settings, tmp_path):
    repo = ledger.add_repository(make_photos(tmp_path / "p"))
    tz = timezone(timedelta(hours=1))
    clock = Clock(datetime(2026, 3, 1, 1, 0, tzinfo=tz))
    manager = SyncManager(ledger, settings, clock=clock)
    manager.start()
    try:
        assert manager.wait_idle(30)

        def daily_runs_on(days: list[int]) -> int:
            for day in days:
                clock.now = datetime(2026, 3, day, 2, 0, 5, tzinfo=tz)
                manager.tick()
                assert manager.wait_idle(30)
            return sum(
                1
                for op in ledger.operations(repo, 100)
                if op.operation_type is OperationType.RECONCILIATION
            )

        assert daily_runs_on([1, 2]) == 2  # two clean runs: 24 h -> 48 h
        view = manager.schedule_view(repo.id)
        assert view is not None and view.interval is not None
        assert view.interval.seconds == 48 * 3600 and "lengthened" in view.interval.reason
        assert daily_runs_on([3]) == 2  # skipped: the last run was a day ago
        assert daily_runs_on([4]) == 3  # two days on: due again
    finally:
        manager.stop()


def test_daily_auto_learns_the_quiet_hour_from_the_feed_and_status_shows_it(
    ledger, settings, tmp_path
):
    from test_store import backdate_feed

    tz = timezone(timedelta(hours=-5))
    now = datetime(2026, 3, 20, 12, 0, tzinfo=tz)
    root = make_photos(tmp_path / "p", n=1)
    repo = ledger.add_repository(root)
    auto = replace(settings, daily_auto=True)
    # Without history: the fallback, and status says why.
    manager = SyncManager(ledger, auto, clock=Clock(now))
    manager.start()
    try:
        assert manager.wait_idle(30)
        manager.tick()
        view = manager.schedule_view(repo.id)
        assert view is not None and view.daily is not None
        assert view.daily.at.hour == 2 and "default" in view.daily.reason
    finally:
        manager.stop()
    # Fourteen days of history, busy every local hour but 05:00.
    hours = [
        at for h in range(14 * 24) if (at := now - timedelta(hours=h + 1)).astimezone(tz).hour != 5
    ]
    for i, _ in enumerate(hours):
        (root / "album" / f"h{i}.jpg").write_bytes(b"%d" % i)
    with Ledger(settings) as writer:  # the stopped manager's writer gave its lease up
        writer.scan(repo)
    backdate_feed(ledger.store, [*hours, *([now] * (ledger.store.latest_seq() - len(hours)))])
    manager = SyncManager(ledger, auto, clock=Clock(now))
    manager.start()
    try:
        assert manager.wait_idle(30)
        manager.tick()
        wait_for(
            "the daily time chosen",
            lambda: (ledger.status(repo).schedule or ScheduleView()).daily is not None,
        )
        daily = ledger.status(repo).to_json()["schedule"]
        assert daily["daily_at"] == "05:00" and "quietest" in daily["daily_reason"]
    finally:
        manager.stop()


def test_a_requested_reconciliation_hands_its_outcome_to_every_waiter(ledger, settings, tmp_path):
    """``request_reconciliation`` (what ``fsledger scan`` uses through the control socket):
    the run's stats reach whoever asked, a request while one is queued joins it, an error
    that ends the run reaches the waiters as the error, and a request never run (the
    manager stopped) is told so."""
    from fsledger.errors import FsledgerError, RootUnavailable

    root = make_photos(tmp_path / "photos")
    repo = ledger.add_repository(root)
    manager = SyncManager(ledger, settings)
    manager.start()
    try:
        assert manager.wait_idle(30)
        (root / "album" / "new.jpg").write_bytes(b"new")
        with manager._cv:  # hold the worker: both requests are queued before it runs
            first = manager.request_reconciliation(repo.id, reason="test")
            second = manager.request_reconciliation(repo.id, reason="test")
        assert first.result(30) is second.result(30)
        assert first.result().files_added == 1
        assert {r.path for r in ledger.files(repo)} == on_disk(root)

        shutil.move(root, tmp_path / "away")
        with pytest.raises(RootUnavailable):
            manager.request_reconciliation(repo.id, reason="test").result(30)
        shutil.move(tmp_path / "away", root)
        assert manager.request_reconciliation(repo.id).result(30).files_scanned == 6

        with pytest.raises(FsledgerError, match="not kept"):
            manager.request_reconciliation(__import__("uuid").uuid4())
        manager._stop.set()  # the worker ends first: the next request stays queued
        with manager._cv:
            manager._cv.notify_all()
        for t in manager._threads:
            t.join(10)
        never = manager.request_reconciliation(repo.id)
    finally:
        manager.stop()
    with pytest.raises(FsledgerError, match="stopped before it ran"):
        never.result(5)
