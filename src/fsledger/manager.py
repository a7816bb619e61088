"""The SyncManager: runs both tiers for every repository, on one schedule.

Threads it owns:

* the *reconcile worker*: takes reconciliation requests from a priority queue
  (startup, schedule, recovery after a watcher overflow, manual triggers) and runs
  them one at a time; requests for a repository with recent events go first;
* the *scheduler*: once a second decides what is due (periodic and daily runs,
  per-repository quick/full intervals, polling of network filesystems, roots that
  came back, repositories added or removed by another process); a due *scheduled* run
  waits while the system or the library is busy (``fsledger.schedule`` decides), and
  each repository's interval adapts to the drift its reconciliations find;
* the live source (the inotify watcher), when one is plugged in.

Every write still goes through the one ``RepoWriter`` of each repository.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from fsledger.config import Settings
from fsledger.errors import FsledgerError, LeaseLost, RootUnavailable, StoreError
from fsledger.ledger import Ledger, offline_reason
from fsledger.model import (
    Condition,
    ConditionKind,
    OperationType,
    RelPath,
    RepoSettings,
    Repository,
    RepoState,
    ScanStats,
    SyncStatus,
    utcnow,
)
from fsledger.mounts import changed_mounts
from fsledger.progress import Estimate, ProgressBoard, ProgressTracker
from fsledger.roots import root_present
from fsledger.schedule import (
    HISTORY_DAYS,
    Adaptive,
    Gate,
    HourChoice,
    Interval,
    Policy,
    Pressure,
    PressureSource,
    Quiet,
    ScheduleView,
    Verdict,
    quiet_hour,
    read_pressure,
)
from fsledger.store.lease import Lease
from fsledger.writer import Applied

if TYPE_CHECKING:
    from fsledger.distscan import ScanHelper

log = logging.getLogger(__name__)

REPO_POLL_S = 2.0
"""How often the repository list is re-read (repositories added by another process)."""
PICK_UP_S = 10.0
"""How long ``request_reconciliations`` waits for the scheduler's next read of the
repository list (a tick runs a second apart; a slow database may hold one up)."""
OFFLINE_POLL_S = 5.0
"""How often an offline root is checked for its return."""
NETWORK_POLL_S = 60.0
BUCKET_POLL_S = 15.0
"""Default quick-scan interval of a bucket repository (no inotify; one listing a poll:
a no-change poll downloads nothing). S3 event notifications (``POST /api/v1/s3/events``)
bring single changes in at once; ``repo add --quick-interval`` sets another interval."""
BUCKET_OFFLINE_POLL_S = 15.0
"""How often an offline bucket is tried again (a reconciliation, whose guard decides)."""
RECENT_DIRS = 16
"""Directories per repository remembered as recently active (reconciled first after a loss)."""
"""Default rescan interval of a repository on a network filesystem (inotify is blind there)."""


class LiveSource(Protocol):
    """What the manager needs of a tier-1 watcher."""

    def add(self, repo: Repository) -> None: ...
    def remove(self, repo_id: UUID) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_watching(self, repo_id: UUID) -> bool: ...
    def degraded(self, repo_id: UUID) -> bool: ...
    def check(self, repo_id: UUID, path: RelPath) -> None: ...


ResyncCallback = Callable[[Repository, RelPath, str], None]
LiveFactory = Callable[[Ledger, Settings, ResyncCallback], LiveSource]


@dataclass(frozen=True, slots=True)
class SyncMetrics:
    """The seed's SyncMetrics, over every repository this manager runs."""

    watched_repositories: int
    watched_directories: int
    events_processed: int
    events_ignored: int
    event_latency_ms: float
    last_reconciliation: datetime | None
    reconciliation_duration_s: float
    files_scanned: int
    files_added: int
    files_updated: int
    files_removed: int
    reconciliation_errors: int
    reconciliations_queued: int
    degraded_repositories: int
    offline_repositories: int
    files_moved: int = 0
    schedule_deferrals: Mapping[str, int] = field(default_factory=dict)
    """Scheduled reconciliations that waited, by the reason they first waited for."""
    schedule_waiting: int = 0
    """Scheduled reconciliations waiting now."""


@dataclass(order=True)
class _Request:
    priority: float
    seq: int
    repo_id: UUID = field(compare=False)
    prefix: RelPath = field(compare=False)
    op_type: OperationType = field(compare=False)
    reason: str = field(compare=False)
    verify: bool = field(compare=False, default=False)
    scheduled: bool = field(compare=False, default=False)
    """A scheduled run: gentle while it runs, and its drift adapts the interval."""
    waiters: list[Future[ScanStats]] = field(compare=False, default_factory=list)
    """Who waits for this run's outcome (``request_reconciliation``): its stats, or the
    error that ended it."""
    outcome: ScanStats | BaseException | None = field(compare=False, default=None)


@dataclass
class _Due:
    """A scheduled run that fell due and has not been queued yet (it may be waiting)."""

    since: datetime
    reason: str
    verify: bool
    op_id: int | None = None
    """The ``deferral`` operation row, once it waits."""
    kind: str | None = None
    """Why it first waited (the label of ``fsledger_schedule_deferrals_total``)."""
    first_reason: str | None = None
    waiting: Verdict | None = None
    """The latest verdict while it waits."""


@dataclass
class _RepoRuntime:
    repo: Repository
    lease: Lease | None = None
    network: bool = False
    last_event: float = 0.0
    last_quick: float = 0.0
    last_full: float = 0.0
    last_offline_check: float = 0.0
    recent_dirs: dict[RelPath, float] = field(default_factory=dict)
    """Directories written to lately, most recent last (bounded): reconciled first."""
    due: dict[bool, _Due] = field(default_factory=dict)
    """Scheduled runs due, by their verify flag."""
    activity: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic time, changes) the watcher applied: the activity the scheduler weighs."""
    interval: Interval | None = None
    last_scheduled: float = 0.0
    """Monotonic time the last scheduled run fell due (periodic schedules)."""
    last_daily_run: datetime | None = None
    """Wall-clock time the last daily run fell due: a lengthened interval skips days."""
    deferrals: int = 0
    offline: Condition | None = None
    """Why and since when the root is refused (None while online)."""
    view: str = ""
    """The schedule view last stored for ``status``."""
    view_key: tuple[object, ...] = ()
    view_stored: float = 0.0


class SyncManager:
    """Orchestrates the watcher and the reconciliation scanner for every repository.

    Args:
        ledger: the library API over the store.
        settings: the configuration.
        live_factory: builds the tier-1 watcher; ``None`` runs reconciliation only.
        clock: local wall-clock time (tests pass their own).
        pressure: the system's pressure-stall information (tests pass their own); by
            default ``/proc/pressure``.
    """

    def __init__(
        self,
        ledger: Ledger,
        settings: Settings,
        live_factory: LiveFactory | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now().astimezone(),
        pressure: PressureSource | None = None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.clock = clock
        self.live: LiveSource | None = (
            live_factory(ledger, settings, self._on_resync) if live_factory else None
        )
        self._repos: dict[UUID, _RepoRuntime] = {}
        self._standby: dict[UUID, Repository] = {}
        """Repositories another agent owns: this one takes over when their lease frees."""
        self._queue: list[_Request] = []
        self._queued: dict[tuple[UUID, RelPath, bool], _Request] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy: UUID | None = None
        self._last_daily: date | None = None
        self._last_repo_poll = 0.0
        self._polls_begun = 0
        self._polls_done = 0
        """Reads of the repository list begun and finished (``_sync_repo_list``), for
        ``request_reconciliations``."""
        self._first_waiters: dict[UUID, Future[ScanStats]] = {}
        """Who waits for the first index of a repository not kept yet: handed to the startup
        scan queued when it is attached (``request_reconciliations``)."""
        self._last_stats: ScanStats | None = None
        self._last_reconciliation: datetime | None = None
        self._reconciliation_errors = 0
        self._totals = ScanStats()
        self._helper: ScanHelper | None = None
        self.progress = ProgressBoard()
        self._tracker: ProgressTracker | None = None
        """The running scan of each repository, for the status route and the SSE stream."""
        self.mirrors: Any = None
        """The ``MirrorSupervisor`` of ``fsledger run`` (fsledger.s3.mirrors), if started."""
        self.gate = Gate(
            Policy(
                busy_changes_per_min=settings.schedule_busy_changes,
                busy_io_pressure=settings.schedule_busy_io_pressure,
                busy_cpu_pressure=settings.schedule_busy_cpu_pressure,
                max_deferral_s=settings.schedule_max_deferral_s,
            ),
            clock,
            pressure or default_pressure,
            self._activity,
        )
        base = settings.reconciliation_interval_s
        # The bounds lie around the configured interval, whatever it is.
        self.adaptive = Adaptive(
            min(settings.interval_min_s, base or settings.interval_min_s),
            max(settings.interval_max_s, base),
        )
        self._deferrals: Counter[str] = Counter()
        self._daily = (
            HourChoice(settings.daily_at, "configured", False) if settings.daily_at else None
        )
        self._daily_learned: float | None = None
        self._pressure_hours: dict[int, tuple[float, int]] = {}
        self._last_pressure_sample = 0.0

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Recover interrupted operations, queue a startup reconciliation of every repository,
        start watching, and start the worker and scheduler threads."""
        self.ledger.recover_interrupted()
        self.gate.request_quiet(self._read_quiet())
        daily = self._daily_time()
        if daily is not None and self.clock().time() < daily:
            # Started before today's run time: today's run is still due (a later start
            # counts the startup reconciliation as today's).
            self._last_daily = date.min
        if self.live is not None:
            self.live.start()
        for repo in self.ledger.list_repositories():
            self._attach(repo, OperationType.STARTUP)
        self._spawn(self._worker, "fsledger-reconcile")
        self._spawn(self._scheduler, "fsledger-scheduler")
        if self.settings.distributed and self.ledger.store.shares_scans:
            from fsledger.distscan import ScanHelper
            from fsledger.reconcile import owner_tag

            # Work items of other agents' reconciliations (this agent's own are worked on by
            # the reconciliation that created them).
            self._helper = ScanHelper(
                self.ledger.store.url,
                self.settings.max_concurrency,
                owner_tag(),
                owned=lambda rid: rid in self._repos,
            )
            self._helper.start()
        log.info("Sync manager started successfully")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Flush pending events, finish the running reconciliation's batch, stop every thread."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self.live is not None:
            self.live.stop()
        if self._helper is not None:
            self._helper.stop()
        for t in self._threads:
            t.join(timeout)
        with self._cv:
            for req in self._queue:  # never run: whoever waits is told
                _settle(req)
        for runtime in self._repos.values():
            for due in runtime.due.values():
                self._end_wait(runtime, due, "not run: fsledger stopped while it waited")
            if runtime.lease is not None:
                runtime.lease.release()
        log.info("Sync manager stopped")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no reconciliation is queued or running (tests, ``run --once``)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    # --- repositories -------------------------------------------------------------------
    def add_repository(
        self, path: str | bytes, name: str | None = None, settings: RepoSettings | None = None
    ) -> Repository:
        """Register a directory, queue its initial scan and start watching it."""
        repo = self.ledger.add_repository(path, name, settings)
        self._attach(repo, OperationType.STARTUP)
        return repo

    def remove_repository(self, repo_id: UUID, purge: bool = False) -> None:
        runtime = self._repos.get(repo_id)
        if runtime is None:
            raise FsledgerError(f"repository {repo_id} not found")
        self._detach(repo_id)
        self.ledger.remove_repository(runtime.repo, purge)

    def trigger_reconciliation(
        self, repo_id: UUID, *, verify: bool = False, reason: str = "manual"
    ) -> None:
        """Queue a reconciliation of a repository, ahead of scheduled ones."""
        runtime = self._repos.get(repo_id)
        if runtime is None:
            raise FsledgerError(f"repository {repo_id} not found")
        self._enqueue(runtime.repo, b"", OperationType.RECONCILIATION, reason, 0.0, verify)

    def request_reconciliation(
        self, repo_id: UUID, *, verify: bool = False, reason: str = "manual"
    ) -> Future[ScanStats]:
        """Queue a reconciliation of a repository this manager owns, ahead of scheduled
        ones, and return its outcome to come: the run's stats, or the error that ended it
        (``RootUnavailable``, ``LeaseLost``, ...). A run of the same repository already
        queued (not yet started) serves the request too; a running one does not (it may
        have walked past a change made before the request).

        Raises:
            FsledgerError: this manager does not own the repository.
        """
        runtime = self._repos.get(repo_id)
        if runtime is None:
            raise FsledgerError(f"repository {repo_id} is not kept by this process")
        done: Future[ScanStats] = Future()
        self._enqueue(
            runtime.repo, b"", OperationType.RECONCILIATION, reason, 0.0, verify, waiter=done
        )
        return done

    def get_sync_status(self, repo_id: UUID) -> SyncStatus:
        runtime = self._repos.get(repo_id)
        repo = runtime.repo if runtime else self.ledger.store.get_repository(repo_id)
        if repo is None:
            raise FsledgerError(f"repository {repo_id} not found")
        watching = self.live is not None and self.live.is_watching(repo_id)
        # This process's own view of the schedule is current; the stored one may be seconds old.
        status = self.ledger.status(
            repo, is_watching=watching, schedule=self.schedule_view(repo_id)
        )
        condition = self._condition(runtime) if runtime is not None else None
        return replace(
            status,
            condition=condition or status.condition,
            progress=self.progress.get(repo_id),
        )

    def _condition(self, runtime: _RepoRuntime) -> Condition | None:
        """What this process knows of the repository's condition beyond the database:
        when and why it went offline, a watch limit, a network filesystem."""
        if runtime.repo.state is RepoState.OFFLINE:
            return runtime.offline
        if runtime.network:
            minutes = self._network_interval(runtime.repo) / 60
            return Condition(
                ConditionKind.POLLING.value,
                f"network filesystem: polling every {minutes:g} min",
            )
        if self.live is not None and self.live.degraded(runtime.repo.id):
            quick = runtime.repo.settings.quick_interval_s or max(
                60.0, min(self.settings.reconciliation_interval_s, 3600.0)
            )
            return Condition(
                ConditionKind.DEGRADED.value,
                f"watch limit reached: polling every {quick / 60:g} min",
            )
        if self.live is None:
            return Condition(ConditionKind.ONLINE.value, "not watched: scheduled scans only")
        return Condition(ConditionKind.ONLINE.value)

    def repositories(self) -> list[Repository]:
        return [r.repo for r in self._repos.values()]

    def owns(self, repo_id: UUID) -> bool:
        """Whether this manager keeps the repository (holds its lease): its mirrors run here."""
        return repo_id in self._repos

    def request_reconciliations(
        self,
        repo_ids: Collection[UUID],
        *,
        verify: bool = False,
        reason: str = "manual",
        timeout: float = PICK_UP_S,
    ) -> list[Future[ScanStats]] | None:
        """``request_reconciliation`` of each of ``repo_ids``, with the repositories another
        process has just added (``fsledger repo add``) kept from now on rather than from
        the next poll of the list: the scheduler reads the list again at its next tick
        (within a second) and attaches them, and the startup scan it queues for one, its
        first index, serves the request. None, and nothing asked, if this manager does not
        keep every one then: another agent owns one (answered at once), one is not in the
        store, the list cannot be read or the manager stops (within ``timeout``)."""
        new = [rid for rid in repo_ids if rid not in self._repos]
        if any(rid in self._standby for rid in new):
            return None
        firsts: dict[UUID, Future[ScanStats]] = {rid: Future() for rid in new}
        if new:
            self._first_waiters.update(firsts)
            # A read of the list begun before the waiters were there may attach a
            # repository without its waiter: then a request of its own serves it.
            wanted = self._polls_begun + 1
            self._last_repo_poll = -math.inf
            deadline = time.monotonic() + timeout
            while self._polls_done < wanted:
                if self._stop.wait(0.02) or time.monotonic() >= deadline:
                    break
            for rid in new:
                if self._first_waiters.pop(rid, None) is not None:
                    del firsts[rid]  # not handed to a startup scan
            if not all(rid in self._repos for rid in new):
                return None
        return [
            firsts[rid]
            if rid in firsts
            else self.request_reconciliation(rid, verify=verify, reason=reason)
            for rid in repo_ids
        ]

    def metrics(self) -> SyncMetrics:
        live = getattr(self.live, "metrics", None)
        last = self._last_stats or ScanStats()
        latency = getattr(live, "latency_p50", None)
        return SyncMetrics(
            watched_repositories=getattr(live, "watched_repositories", 0),
            watched_directories=getattr(live, "watched_directories", 0),
            events_processed=getattr(live, "events_processed", 0),
            events_ignored=getattr(live, "events_ignored", 0),
            event_latency_ms=float(latency() if callable(latency) else 0.0),
            last_reconciliation=self._last_reconciliation,
            reconciliation_duration_s=last.duration_ms / 1000,
            files_scanned=self._totals.files_scanned,
            files_added=self._totals.files_added,
            files_updated=self._totals.files_updated,
            files_removed=self._totals.files_removed,
            files_moved=self._totals.files_moved,
            reconciliation_errors=self._reconciliation_errors,
            reconciliations_queued=len(self._queue),
            degraded_repositories=sum(
                1 for rid in self._repos if self.live is not None and self.live.degraded(rid)
            ),
            offline_repositories=sum(
                1 for r in self._repos.values() if r.repo.state is RepoState.OFFLINE
            ),
            schedule_deferrals=dict(self._deferrals),
            # Snapshots (list() runs in C, under the GIL): the scheduler thread changes these.
            schedule_waiting=sum(
                1 for r in list(self._repos.values()) for d in list(r.due.values()) if d.kind
            ),
        )

    # --- the schedule -------------------------------------------------------------------
    def request_quiet(self, until: datetime | None, by: str = "") -> Quiet | None:
        """A consumer asks that no scheduled reconciliation start before ``until`` (``None``
        withdraws the request). Stored, so that other processes' requests reach the running
        manager and this one reaches every agent on the database."""
        quiet = Quiet(until, by) if until is not None else None
        self.ledger.request_quiet(quiet)
        self.gate.request_quiet(quiet)
        return quiet

    def schedule_view(self, repo_id: UUID) -> ScheduleView | None:
        """What ``status`` shows of a repository's schedule, as this manager sees it now."""
        runtime = self._repos.get(repo_id)
        return self._view(runtime, time.monotonic()) if runtime is not None else None

    def _read_quiet(self) -> Quiet | None:
        try:
            return self.ledger.quiet()
        except StoreError as exc:
            log.warning("Cannot read the quiet request: %s", exc)
            return self.gate.quiet()

    def _activity(self, repo_id: UUID) -> float:
        """Changes per minute the watcher applied to ``repo_id`` over the activity window."""
        runtime = self._repos.get(repo_id)
        if runtime is None:
            return 0.0
        window = max(self.settings.schedule_activity_window_s, 1e-3)
        cutoff = time.monotonic() - window
        samples = runtime.activity
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        return sum(n for _, n in list(samples)) * 60.0 / window

    def _interval(self, runtime: _RepoRuntime) -> float:
        """The repository's scheduled-reconciliation interval now (adapted or configured)."""
        base = self.settings.reconciliation_interval_s
        if runtime.network or not self.settings.adaptive_interval or runtime.interval is None:
            return base
        return runtime.interval.seconds

    def _daily_time(self) -> time_of_day | None:
        """The local time of the daily run; with ``auto``, learned from the feed's history
        (again every hour: the history moves on)."""
        if self._daily is None:
            return None
        if self.settings.daily_auto and (
            self._daily_learned is None or time.monotonic() - self._daily_learned >= 3600
        ):
            self._daily_learned = time.monotonic()
            now = self.clock()
            try:
                buckets = self.ledger.change_counts_by_hour(now - timedelta(days=HISTORY_DAYS))
            except StoreError as exc:
                log.warning("Cannot read the feed's history for the quiet hour: %s", exc)
                return self._daily.at
            pressure = {h: total / n for h, (total, n) in self._pressure_hours.items() if n}
            choice = quiet_hour(buckets, now, now.tzinfo or UTC, pressure)
            if choice.at != self._daily.at or choice.reason != self._daily.reason:
                log.info(
                    "Daily reconciliation at %s: %s", choice.at.strftime("%H:%M"), choice.reason
                )
            self._daily = choice
        return self._daily.at

    def _sample_pressure(self, now: float) -> None:
        """Once a minute, the I/O pressure of this local hour (the quiet hour weighs it)."""
        if not self.settings.daily_auto or now - self._last_pressure_sample < 60.0:
            return
        self._last_pressure_sample = now
        pressure = self.gate.pressure()
        if pressure is None:
            return
        hour = self.clock().hour
        total, n = self._pressure_hours.get(hour, (0.0, 0))
        self._pressure_hours[hour] = (total + pressure.io_avg60, n + 1)

    def _make_due(self, runtime: _RepoRuntime, reason: str, verify: bool = False) -> None:
        """A scheduled run fell due: the scheduler queues it when the system is quiet."""
        if verify not in runtime.due:
            runtime.due[verify] = _Due(self.clock(), reason, verify)

    def _tick_due(self, runtime: _RepoRuntime) -> None:
        repo = runtime.repo
        for verify, due in list(runtime.due.items()):
            verdict = self.gate.check(repo.id, due.since)
            if not verdict.run:
                if due.kind is None:
                    due.kind, due.first_reason = verdict.kind, verdict.reason
                    self._deferrals[verdict.kind or "busy"] += 1
                    runtime.deferrals += 1
                    log.info(
                        "Repository %s: %s waits: %s (at the latest until %s)",
                        repo.id,
                        due.reason,
                        verdict.reason,
                        verdict.deadline.isoformat(timespec="minutes"),
                    )
                    try:
                        due.op_id = self.ledger.start_wait(repo.id)
                    except StoreError as exc:
                        log.warning("Repository %s: the wait is not recorded: %s", repo.id, exc)
                due.waiting = verdict
                continue
            del runtime.due[verify]
            if due.kind is not None:
                if verdict.kind == "max_deferral":
                    log.warning("Repository %s: %s runs: %s", repo.id, due.reason, verdict.reason)
                    end = f"ran: {verdict.reason}"
                else:
                    end = "ran when quiet again"
                self._end_wait(runtime, due, end)
            self._enqueue(
                repo,
                b"",
                OperationType.RECONCILIATION,
                due.reason,
                3.0 if verify else 2.0,
                verify,
                scheduled=True,
            )

    def _end_wait(self, runtime: _RepoRuntime, due: _Due, end: str) -> None:
        """Close the ``deferral`` row of a run that waited: how long, why, how it ended."""
        if due.op_id is None:
            return
        waited = (self.clock() - due.since).total_seconds()
        message = f"{due.reason} waited {waited / 60:.0f}m for: {due.first_reason}; {end}"
        try:
            self.ledger.end_wait(due.op_id, message)
        except StoreError as exc:
            log.warning("Repository %s: the wait's end is not recorded: %s", runtime.repo.id, exc)
        due.op_id = None

    def _next_run(self, runtime: _RepoRuntime, now: float) -> datetime | None:
        local = self.clock()
        interval = self._interval(runtime)
        if interval <= 0:
            return None
        daily = self._daily.at if self._daily is not None else None
        if daily is not None and self.settings.reconciliation_interval_s == 24 * 3600:
            day = local.date() if self._last_daily != local.date() else local.date() + timedelta(1)
            at = datetime.combine(day, daily, tzinfo=local.tzinfo)
            if interval < 24 * 3600:
                at = min(at, local + timedelta(seconds=runtime.last_scheduled + interval - now))
            return at
        return local + timedelta(seconds=max(0.0, runtime.last_scheduled + interval - now))

    def _view(self, runtime: _RepoRuntime, now: float) -> ScheduleView:
        # A snapshot: the HTTP API calls this while the scheduler thread changes ``due``.
        waiting = next((d for d in list(runtime.due.values()) if d.kind), None)
        interval = None
        if self.settings.reconciliation_interval_s > 0:
            if runtime.network:
                interval = Interval(
                    self._network_interval(runtime.repo),
                    "network filesystem: polled at its fixed interval",
                )
            elif runtime.interval is not None and self.settings.adaptive_interval:
                interval = runtime.interval
            else:
                interval = Interval(self.settings.reconciliation_interval_s, "configured interval")
        verdict = waiting.waiting if waiting else None
        return ScheduleView(
            next_run=verdict.deadline if verdict else self._next_run(runtime, now),
            waiting_since=waiting.since if waiting else None,
            waiting_reason=verdict.reason if verdict else None,
            deadline=verdict.deadline if verdict else None,
            interval=interval,
            daily=self._daily if self.settings.reconciliation_interval_s == 24 * 3600 else None,
            deferrals=runtime.deferrals,
        )

    def _store_view(self, runtime: _RepoRuntime, now: float) -> None:
        """Keep the view ``status`` reads from other processes current: at once when what it
        says changes, at most every 10 s when only its figures move."""
        view = self._view(runtime, now)
        key = (view.waiting_since, view.interval, view.daily, view.deferrals)
        if key == runtime.view_key and now - runtime.view_stored < 10.0:
            return
        text = json.dumps(view.to_json(), sort_keys=True)
        if text == runtime.view:
            return
        try:
            self.ledger.set_schedule_view(runtime.repo.id, view)
        except StoreError as exc:
            log.debug("Repository %s: schedule view not stored: %s", runtime.repo.id, exc)
            return
        runtime.view, runtime.view_key, runtime.view_stored = text, key, now

    def _attach(self, repo: Repository, op_type: OperationType) -> None:
        lease = self.ledger.store.acquire_lease(repo.id)
        if lease is None:
            if repo.id not in self._standby:
                log.info("Repository %s is owned by another agent: standing by", repo.id)
            self._standby[repo.id] = repo
            return
        if self._standby.pop(repo.id, None) is not None:
            log.warning("Repository %s: taking over from the agent that owned it", repo.id)
        try:
            repo = self.ledger.follow_config(repo)
        except StoreError as exc:
            log.warning("Repository %s: settings not refreshed: %s", repo.id, exc)
        writer = self.ledger.writer(repo)
        writer.lease = lease
        runtime = _RepoRuntime(repo, lease=lease, network=_network(repo.root))
        if self._note_applied not in writer.listeners:
            writer.listeners = [*writer.listeners, self._note_applied]
        now = time.monotonic()
        runtime.last_quick = runtime.last_full = runtime.last_scheduled = now
        if self.settings.adaptive_interval and self.settings.reconciliation_interval_s > 0:
            runtime.interval = self._stored_interval(repo.id)
        self._repos[repo.id] = runtime
        if self.live is not None and not runtime.network:
            try:
                self.live.add(repo)
            except FsledgerError as exc:
                log.warning("Repository %s is not watched live: %s", repo.id, exc)
        elif repo.is_bucket:
            log.info(
                "Repository %s is a bucket: polled every %.0fs, and S3 event notifications "
                "POSTed to /api/v1/s3/events are applied at once",
                repo.id,
                self._network_interval(repo),
            )
        elif runtime.network:
            log.warning(
                "Repository %s is on a network filesystem, where inotify sees no changes made by "
                "other machines: polling it every %.0fs instead",
                repo.id,
                self._network_interval(repo),
            )
        log.info("Repository %s added to sync manager", repo.id)
        self._enqueue(
            repo, b"", op_type, "startup", 1.0, waiter=self._first_waiters.pop(repo.id, None)
        )

    def _detach(self, repo_id: UUID) -> None:
        runtime = self._repos.pop(repo_id, None)
        self._standby.pop(repo_id, None)
        if self.live is not None:
            self.live.remove(repo_id)
        if runtime is not None and runtime.lease is not None:
            runtime.lease.release()
        with self._cv:
            self._queue = [r for r in self._queue if r.repo_id != repo_id]
            heapq.heapify(self._queue)
            self._queued = {k: v for k, v in self._queued.items() if k[0] != repo_id}
        log.info("Repository %s removed from sync manager", repo_id)

    def _stored_interval(self, repo_id: UUID) -> Interval:
        """The adapted interval the last run left (a restart keeps what drift taught)."""
        try:
            view = self.ledger.schedule_view(repo_id)
        except StoreError:
            view = None
        if view is not None and view.interval is not None:
            bounded = self.adaptive.bound(view.interval.seconds)
            return replace(view.interval, seconds=bounded)
        return self.adaptive.initial(self.settings.reconciliation_interval_s)

    def _network_interval(self, repo: Repository) -> float:
        default = BUCKET_POLL_S if repo.is_bucket else NETWORK_POLL_S
        return repo.settings.quick_interval_s or default

    # --- requests -----------------------------------------------------------------------
    def _on_resync(self, repo: Repository, prefix: RelPath, reason: str) -> None:
        """Called by the watcher (any thread): events were lost or the root went away.

        Priority processing: the directories written to lately are reconciled first, each
        on its own, then the whole repository.
        """
        runtime = self._repos.get(repo.id)
        log.warning("Repository %s needs a reconciliation: %s", repo.id, reason)
        if runtime is not None:
            runtime.last_event = time.monotonic()
            if not prefix:
                for directory in reversed(list(runtime.recent_dirs)):
                    self._enqueue(repo, directory, OperationType.RECONCILIATION, reason, 0.2)
        self._enqueue(repo, prefix, OperationType.RECONCILIATION, reason, 0.5)

    def _live_writing(self) -> bool:
        """Whether the calling thread is the watcher writing (see ``Watcher.writing``)."""
        writing = getattr(self.live, "writing", None)
        return bool(writing()) if callable(writing) else False

    def _note_applied(self, repo: Repository, applied: Applied) -> None:
        """Writer listener: remember where changes land, for priority processing."""
        runtime = self._repos.get(repo.id)
        # Metadata-only refreshes (racy files rechecked) are bookkeeping, not activity.
        news = [c for c in applied.changes[-64:] if c.in_feed]
        if runtime is None or not news:
            return
        now = time.monotonic()
        runtime.last_event = now
        if self._busy != repo.id or self._live_writing():
            # The watcher's work, not a reconciliation's: what "the library is busy" means.
            # While a reconciliation runs, the watcher goes on writing what is changing
            # (an import under way): that is activity too, or a run right after a long
            # one would find the library "quiet" only because its changes went uncounted.
            runtime.activity.append((now, sum(1 for c in applied.changes if c.in_feed)))
        recent = runtime.recent_dirs
        for change in news:
            directory = change.path.rpartition(b"/")[0]
            if directory:
                recent.pop(directory, None)
                recent[directory] = now
        while len(recent) > RECENT_DIRS:
            del recent[next(iter(recent))]

    def note_event(self, repo_id: UUID) -> None:
        """Remember that a repository just had live events (priority processing)."""
        if (runtime := self._repos.get(repo_id)) is not None:
            runtime.last_event = time.monotonic()

    def _enqueue(
        self,
        repo: Repository,
        prefix: RelPath,
        op_type: OperationType,
        reason: str,
        base_priority: float,
        verify: bool = False,
        scheduled: bool = False,
        waiter: Future[ScanStats] | None = None,
    ) -> None:
        runtime = self._repos.get(repo.id)
        # Repositories with recent events come first: lower is sooner.
        recency = time.monotonic() - runtime.last_event if runtime and runtime.last_event else 1e9
        priority = base_priority + min(recency, 1e9) / 1e10
        key = (repo.id, prefix, verify)
        with self._cv:
            if (queued := self._queued.get(key)) is not None:
                if waiter is not None:
                    queued.waiters.append(waiter)
                return
            req = _Request(
                priority, next(self._seq), repo.id, prefix, op_type, reason, verify, scheduled
            )
            if waiter is not None:
                req.waiters.append(waiter)
            heapq.heappush(self._queue, req)
            self._queued[key] = req
            self._cv.notify_all()

    # --- threads ------------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait(1.0)
                if self._stop.is_set():
                    return
                req = heapq.heappop(self._queue)
                self._queued.pop((req.repo_id, req.prefix, req.verify), None)
                self._busy = req.repo_id
            try:
                self._run_request(req)
            except Exception as exc:
                # This thread runs every reconciliation of the process: it must outlive any
                # one of them (a dead worker would leave every later request queued forever).
                log.exception("Reconciliation request for repository %s failed", req.repo_id)
                req.outcome = exc
            finally:
                _settle(req)
                tracker, self._tracker = self._tracker, None
                if tracker is not None and tracker.current.running:
                    tracker.failed("stopped before it finished")  # stopping, lease lost
                with self._cv:
                    self._busy = None
                    self._cv.notify_all()

    def _run_request(self, req: _Request) -> None:
        runtime = self._repos.get(req.repo_id)
        if runtime is None:
            req.outcome = LeaseLost(f"repository {req.repo_id} is no longer kept by this process")
            return
        try:
            stored = self.ledger.store.get_repository(req.repo_id)
        except StoreError as exc:
            # The database is away: the scan below waits for it, with backoff.
            log.warning(
                "Repository %s: cannot re-read it (%s); using the copy held", req.repo_id, exc
            )
            stored = None
        repo = replace(stored or runtime.repo, settings=runtime.repo.settings)
        rewatched = self._rewatch(runtime)
        attempt = 0
        tracker = None
        if not req.prefix:  # a whole-tree scan: its progress is shown
            try:
                estimate = self.ledger.scan_estimate(repo, req.verify)
            except StoreError:
                estimate = Estimate(None, None)
            tracker = self.progress.track(repo.id, req.op_type.value, req.verify, estimate)
            self._tracker = tracker
        while not self._stop.is_set():
            try:
                stats = self.ledger.scan(
                    repo,
                    op_type=req.op_type,
                    verify=req.verify,
                    prefix=req.prefix,
                    gentle=req.scheduled and self.settings.gentle_scans,
                    progress=tracker.update if tracker else None,
                    walked=tracker.finishing if tracker else None,
                )
            except RootUnavailable as exc:
                self._reconciliation_errors += 1
                if runtime.repo.state is not RepoState.OFFLINE or runtime.offline is None:
                    runtime.offline = Condition(
                        ConditionKind.OFFLINE.value, offline_reason(str(exc)), utcnow()
                    )
                runtime.repo = replace(runtime.repo, state=RepoState.OFFLINE)
                log.error("Repository %s is offline, records kept: %s", repo.id, exc)
                if tracker:
                    tracker.failed(offline_reason(str(exc)))
                req.outcome = exc
                return
            except LeaseLost as exc:
                log.warning("%s: standing by", exc)
                self._lose(runtime.repo)
                req.outcome = exc
                return
            except StoreError as exc:
                # The database went away: wait and retry, the files will still be there.
                attempt += 1
                self._reconciliation_errors += 1
                delay = min(60.0, 0.5 * 2**attempt)
                log.error(
                    "Reconciliation failed for %s: %s (retrying in %.0fs)", repo.id, exc, delay
                )
                if self._stop.wait(delay):
                    return
                continue
            except Exception as exc:
                self._reconciliation_errors += 1
                log.exception("Reconciliation failed for repository %s", repo.id)
                if tracker:
                    tracker.failed(str(exc)[:200])
                req.outcome = exc
                return
            req.outcome = stats
            if tracker:
                tracker.done(stats)
            # The scan re-read the settings (the root's file may have changed them).
            settings = self.ledger.writer(repo).repo.settings
            was_online = runtime.repo.state is RepoState.ONLINE
            late = not was_online and not rewatched and self._rewatch(runtime)
            runtime.offline = None
            runtime.repo = replace(runtime.repo, settings=settings, state=RepoState.ONLINE)
            self._record(stats)
            if late:
                # The root came back during this request: watched only after the walk, what
                # was written in between is in neither; one more walk sees it.
                reason = "watched again after the root returned"
                self._enqueue(repo, b"", OperationType.RECONCILIATION, reason, 0.5)
            if req.scheduled and not req.prefix:
                self._adapt(runtime, stats)
            return

    def _rewatch(self, runtime: _RepoRuntime) -> bool:
        """A repository that is offline is watched afresh (its root came back, maybe another
        filesystem on the same path) *before* the reconciliation that brings it online, as
        at start-up: a file written between that walk and the watch would otherwise be
        seen by neither. Returns whether it is watched now."""
        if runtime.repo.state is RepoState.ONLINE or self.live is None or runtime.network:
            return False
        self.live.remove(runtime.repo.id)
        try:
            self.live.add(runtime.repo)
        except FsledgerError as exc:
            log.info("Repository %s: not watched yet: %s", runtime.repo.id, exc)
            return False
        return True

    def _adapt(self, runtime: _RepoRuntime, stats: ScanStats) -> None:
        """A scheduled reconciliation's drift (changes the watcher had missed) shortens the
        repository's interval; clean runs in a row lengthen it."""
        if runtime.network or runtime.interval is None or not self.settings.adaptive_interval:
            return
        drift = stats.files_added + stats.files_updated + stats.files_removed + stats.files_moved
        before = runtime.interval
        runtime.interval = self.adaptive.after(before, drift)
        if runtime.interval.seconds != before.seconds:
            log.info(
                "Repository %s: reconciliation interval %.0fs -> %.0fs (%s)",
                runtime.repo.id,
                before.seconds,
                runtime.interval.seconds,
                runtime.interval.reason,
            )

    def _record(self, stats: ScanStats) -> None:
        self._last_stats = stats
        self._last_reconciliation = datetime.now().astimezone()
        t = self._totals
        t.files_scanned += stats.files_scanned
        t.files_added += stats.files_added
        t.files_updated += stats.files_updated
        t.files_removed += stats.files_removed
        t.files_moved += stats.files_moved

    def _scheduler(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.tick()
            except Exception:
                log.exception("Scheduler tick failed")

    def tick(self) -> None:
        """Queue whatever is due now. Called once a second by the scheduler thread."""
        now = time.monotonic()
        if now - self._last_repo_poll >= REPO_POLL_S:
            self._last_repo_poll = now
            self._sync_repo_list()
            self.gate.request_quiet(self._read_quiet())
        self._sample_pressure(now)
        interval = self.settings.reconciliation_interval_s
        daily = self._daily_time()
        if interval > 0:
            if daily is not None and interval == 24 * 3600:
                local = self.clock()
                # Once per local date, at or after the time of day: a DST jump can neither
                # skip the run nor make it run twice.
                if local.time() >= daily and self._last_daily != local.date():
                    if self._last_daily is not None:
                        self._daily_due(now)
                    self._last_daily = local.date()
                # Drift shortened some intervals below a day: those run between daily runs.
                for runtime in list(self._repos.values()):
                    short = self._interval(runtime)
                    if short < interval and now - runtime.last_scheduled >= short:
                        runtime.last_scheduled = now
                        self._make_due(runtime, "scheduled reconciliation (drift found)")
            else:
                for runtime in list(self._repos.values()):
                    if now - runtime.last_scheduled >= self._interval(runtime):
                        runtime.last_scheduled = now
                        self._make_due(runtime, "scheduled reconciliation")
        for runtime in list(self._repos.values()):
            self._tick_repo(runtime, now)
            if runtime.repo.id in self._repos:
                self._tick_due(runtime)
                self._store_view(runtime, now)

    def _daily_due(self, now: float) -> None:
        """The daily run: every repository, except one whose clean runs lengthened its
        interval past a day and whose last scheduled run is recent enough."""
        local = self.clock()
        for runtime in list(self._repos.values()):
            interval = self._interval(runtime)
            last = runtime.last_daily_run
            # An hour of slack: the daily run comes a second or so later each day. A 48 h
            # interval runs every other day; one between whole days rounds up to the next.
            if last is not None and (local - last).total_seconds() < interval - 3600:
                log.info(
                    "Repository %s: daily reconciliation skipped (interval %.0fh: %s)",
                    runtime.repo.id,
                    interval / 3600,
                    runtime.interval.reason if runtime.interval else "configured",
                )
                continue
            runtime.last_scheduled, runtime.last_daily_run = now, local
            self._make_due(runtime, "daily reconciliation")

    def _lose(self, repo: Repository) -> None:
        """Another agent owns this repository now: stop writing it and stand by."""
        self._detach(repo.id)
        self._standby[repo.id] = repo

    def _tick_repo(self, runtime: _RepoRuntime, now: float) -> None:
        repo = runtime.repo
        if runtime.lease is not None and not runtime.lease.held():
            log.warning("Repository %s: lease lost (database session ended?)", repo.id)
            self._lose(repo)
            return
        if repo.state is RepoState.OFFLINE and repo.is_bucket:
            # A bucket's return is only seen by asking it: the reconciliation's guard does.
            if now - runtime.last_offline_check >= BUCKET_OFFLINE_POLL_S:
                runtime.last_offline_check = now
                self._enqueue(repo, b"", OperationType.RECONCILIATION, "bucket retried", 0.5)
            return
        if repo.state is RepoState.OFFLINE:
            if now - runtime.last_offline_check >= OFFLINE_POLL_S:
                runtime.last_offline_check = now
                if root_present(repo.root, None):
                    log.info("Repository %s: root is back, reconciling", repo.id)
                    self._enqueue(repo, b"", OperationType.RECONCILIATION, "root returned", 0.5)
            return
        if now - runtime.last_offline_check >= OFFLINE_POLL_S and not repo.is_bucket:
            runtime.last_offline_check = now
            # The watcher sees a root deleted or moved, but not always an unmount: a bind
            # mount detached, or a lazy unmount, sends no event until a file changes. The
            # reconciliation refuses such a root and marks the repository offline.
            if not self._root_present(repo):
                log.warning("Repository %s: root %s is gone or not mounted", repo.id, repo.root_str)
                self._enqueue(repo, b"", OperationType.RECONCILIATION, "root unavailable", 0.5)
            else:
                self._check_mounts(runtime)
        quick = repo.settings.quick_interval_s
        if runtime.network:
            quick = self._network_interval(repo)
        elif self.live is not None and self.live.degraded(repo.id):
            quick = quick or max(60.0, min(self.settings.reconciliation_interval_s, 3600.0))
        if quick and now - runtime.last_quick >= quick:
            runtime.last_quick = now
            self._make_due(runtime, "quick scan")
        full = repo.settings.full_interval_s
        if full and now - runtime.last_full >= full:
            runtime.last_full = now
            self._make_due(runtime, "full scan", verify=True)

    def _check_mounts(self, runtime: _RepoRuntime) -> None:
        """Filesystems mounted below the root that came or went since the last scan looked
        (mounting sends no inotify event, nor does detaching a bind mount): one mounted
        again is watched again and reconciled; one that went away is reconciled, which
        keeps its records and reports it."""
        repo = runtime.repo
        try:
            changes = changed_mounts(self.ledger.store, repo)
        except StoreError as exc:
            log.debug("Repository %s: mount points not checked: %s", repo.id, exc)
            return
        for point, mounted in changes:
            if not mounted:
                log.warning(
                    "Repository %s: %s is not mounted any more; its records are kept",
                    repo.id,
                    point.describe(),
                )
                reason = "a filesystem below the root was unmounted"
                self._enqueue(repo, point.path, OperationType.RECONCILIATION, reason, 0.5)
                continue
            log.info(
                "Repository %s: %s is mounted again; reconciling it", repo.id, point.describe()
            )
            if self.live is not None and not runtime.network and self.live.is_watching(repo.id):
                self.live.check(repo.id, point.path)
            else:
                reason = "a filesystem below the root was mounted again"
                self._enqueue(repo, point.path, OperationType.RECONCILIATION, reason, 0.5)

    def _root_present(self, repo: Repository) -> bool:
        """The root is a directory on the device its last scan saw (one stat)."""
        return root_present(repo.root, self.ledger.writer(repo).repo.root_dev)

    def _sync_repo_list(self) -> None:
        """Pick up repositories added or removed by another process (the CLI)."""
        self._polls_begun += 1
        begun = self._polls_begun
        try:
            stored = {r.id: r for r in self.ledger.list_repositories()}
        except StoreError as exc:
            log.warning("Cannot re-read the repository list: %s", exc)
            return
        for rid in [rid for rid in (*self._repos, *self._standby) if rid not in stored]:
            self._detach(rid)
        for rid, repo in stored.items():
            if rid not in self._repos:
                # New here, or a standby whose owner may have gone: try to own it.
                self._attach(repo, OperationType.STARTUP)
        self._polls_done = begun


def _settle(req: _Request) -> None:
    """Hand a finished request's outcome to whoever waits for it."""
    outcome = req.outcome
    for waiter in req.waiters:
        if waiter.done():
            continue
        if isinstance(outcome, ScanStats):
            waiter.set_result(outcome)
        elif isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_exception(FsledgerError("the reconciliation was stopped before it ran"))


def default_pressure() -> Pressure | None:
    """The kernel's pressure-stall information (a module-level seam: tests of other
    behaviour replace it, so that a busy test machine does not hold their scheduled runs)."""
    return read_pressure()


def _network(root: bytes) -> bool:
    if root.startswith(b"s3://"):
        return True  # a bucket: polled (and told by S3 event notifications), never watched
    try:
        from fsledger.watch import is_network_fs
    except ImportError:  # pragma: no cover - the watcher package is part of the distribution
        return False
    try:
        return bool(is_network_fs(root))
    except OSError:
        return False
