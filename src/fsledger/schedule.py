"""When a scheduled reconciliation runs: pure decisions over a clock, pressure and activity.

A photo server's pipeline is busiest right after an import (thumbnails, ML jobs), which is
exactly when a full rescan would hurt it most. So a *scheduled* reconciliation that falls
due waits while:

* the watcher is applying many changes per minute to that repository (an import runs),
* the kernel's pressure-stall information for I/O or CPU (``avg60``) is high, or
* a consumer has asked for quiet until some time (``fsledger quiet``, the HTTP API),

but never past a maximum: a deferral is a courtesy, the ledger's exactness is the point.
Startup, recovery and manual reconciliations are never judged here.

Everything in this module is a pure function of what it is given, or a small object over
a clock, a pressure source and an activity source that the caller (and tests) control;
the ``SyncManager`` does the I/O and the queueing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

FALLBACK_HOUR = 2
"""The daily run's hour while too little history exists to learn a quieter one."""
HISTORY_DAYS = 14
"""How far back the feed's history is read to learn the quiet hour."""
MIN_HISTORY_DAYS = 7
"""The feed must reach this far back before its history is trusted over the fallback."""


@dataclass(frozen=True, slots=True)
class Pressure:
    """Linux pressure-stall information: percent of the last minute some task stalled."""

    io_avg60: float
    cpu_avg60: float


PressureSource = Callable[[], Pressure | None]
"""Returns the current pressure, or ``None`` where the kernel does not report it."""
ActivitySource = Callable[[UUID], float]
"""Changes per minute the watcher applied to a repository lately."""
Clock = Callable[[], datetime]
"""Aware local wall-clock time."""


def read_pressure(base: str = "/proc/pressure") -> Pressure | None:
    """The ``some avg60`` of ``io`` and ``cpu`` under ``base``; ``None`` without PSI.

    Kernels without ``CONFIG_PSI`` (or with ``psi=0``) have no such files, or files that
    refuse to be read: then pressure simply never defers anything.
    """
    values: list[float] = []
    for name in ("io", "cpu"):
        try:
            with open(os.path.join(base, name), encoding="ascii") as fh:
                text = fh.read()
        except OSError:
            return None
        values.append(_some_avg60(text))
    return Pressure(io_avg60=values[0], cpu_avg60=values[1])


def _some_avg60(text: str) -> float:
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind != "some":
            continue
        for part in rest.split():
            key, _, value = part.partition("=")
            if key == "avg60":
                return float(value)
    return 0.0


@dataclass(frozen=True, slots=True)
class Policy:
    """When the system or a library counts as busy, and how long a run may wait for it."""

    busy_changes_per_min: float = 600.0
    busy_io_pressure: float = 20.0
    busy_cpu_pressure: float = 60.0
    max_deferral_s: float = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class Quiet:
    """A consumer's request: no scheduled reconciliation before ``until``."""

    until: datetime
    by: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"until": self.until.isoformat(), "by": self.by}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quiet:
        return cls(datetime.fromisoformat(str(data["until"])), str(data.get("by", "")))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The scheduler's answer for one due run.

    Attributes:
        run: queue it now.
        kind: why it waits (``activity``, ``io_pressure``, ``cpu_pressure``, ``quiet``), or
            ``max_deferral`` when it runs although the system is still busy; ``None`` when
            nothing held it.
        reason: the same, for people.
        deadline: when it runs whatever happens (due time + the maximum deferral).
    """

    run: bool
    kind: str | None
    reason: str | None
    deadline: datetime


def judge(
    due_since: datetime,
    now: datetime,
    policy: Policy,
    *,
    changes_per_min: float,
    pressure: Pressure | None,
    quiet: Quiet | None,
) -> Verdict:
    """Decide whether a scheduled reconciliation due since ``due_since`` runs at ``now``."""
    deadline = due_since + timedelta(seconds=policy.max_deferral_s)
    kind, reason = _busy(now, policy, changes_per_min, pressure, quiet)
    if kind is None:
        return Verdict(True, None, None, deadline)
    if now >= deadline:
        return Verdict(
            True,
            "max_deferral",
            f"waited the maximum {_span(policy.max_deferral_s)} (still busy: {reason})",
            deadline,
        )
    return Verdict(False, kind, reason, deadline)


def _busy(
    now: datetime,
    policy: Policy,
    changes_per_min: float,
    pressure: Pressure | None,
    quiet: Quiet | None,
) -> tuple[str | None, str | None]:
    if quiet is not None and now < quiet.until:
        who = f" by {quiet.by}" if quiet.by else ""
        return "quiet", f"quiet requested{who} until {quiet.until.isoformat(timespec='minutes')}"
    if changes_per_min > policy.busy_changes_per_min:
        return "activity", (
            f"{changes_per_min:.0f} changes/min in the library "
            f"(busy above {policy.busy_changes_per_min:.0f})"
        )
    if pressure is not None:
        if pressure.io_avg60 > policy.busy_io_pressure:
            return "io_pressure", (
                f"I/O pressure {pressure.io_avg60:.1f}% (busy above {policy.busy_io_pressure:.0f}%)"
            )
        if pressure.cpu_avg60 > policy.busy_cpu_pressure:
            return "cpu_pressure", (
                f"CPU pressure {pressure.cpu_avg60:.1f}% "
                f"(busy above {policy.busy_cpu_pressure:.0f}%)"
            )
    return None, None


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


class Gate:
    """Judges due runs over a clock, a pressure source and an activity source.

    Holds the one piece of state the decisions need beyond their inputs: the latest quiet
    request, which expires by itself.
    """

    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        pressure: PressureSource,
        activity: ActivitySource,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.pressure = pressure
        self.activity = activity
        self._quiet: Quiet | None = None

    def request_quiet(self, quiet: Quiet | None) -> None:
        """Set (or with ``None`` withdraw) the consumer's quiet request."""
        self._quiet = quiet

    def quiet(self) -> Quiet | None:
        """The quiet request in force now; an expired one is forgotten."""
        if self._quiet is not None and self.clock() >= self._quiet.until:
            self._quiet = None
        return self._quiet

    def check(self, repo_id: UUID, due_since: datetime) -> Verdict:
        """Judge a run of ``repo_id`` due since ``due_since``, now."""
        return judge(
            due_since,
            self.clock(),
            self.policy,
            changes_per_min=self.activity(repo_id),
            pressure=self.pressure(),
            quiet=self.quiet(),
        )


# --- adaptive interval ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Interval:
    """A repository's current scheduled-reconciliation interval and why it is that."""

    seconds: float
    reason: str
    clean_streak: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "reason": self.reason, "clean_streak": self.clean_streak}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Interval:
        return cls(float(data["seconds"]), str(data["reason"]), int(data.get("clean_streak", 0)))


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Bounds of the adaptive interval: a drift halves it, ``clean_runs`` clean runs in a row
    double it; it stays within ``[floor_s, ceiling_s]``."""

    floor_s: float = 3600.0
    ceiling_s: float = 7 * 86400.0
    clean_runs: int = 2

    def initial(self, base_s: float) -> Interval:
        return Interval(self._bound(base_s), "configured interval")

    def after(self, current: Interval, drift: int) -> Interval:
        """The interval after a scheduled reconciliation that found ``drift`` changes the
        watcher had missed."""
        if drift > 0:
            seconds = self._bound(current.seconds / 2)
            why = f"shortened: the last reconciliation found {drift} missed change(s)"
            if seconds == current.seconds:
                why = f"at its floor: the last reconciliation found {drift} missed change(s)"
            return Interval(seconds, why, 0)
        streak = current.clean_streak + 1
        if streak < self.clean_runs:
            return Interval(current.seconds, f"{streak} clean reconciliation(s) in a row", streak)
        seconds = self._bound(current.seconds * 2)
        if seconds == current.seconds:
            return Interval(seconds, f"at its ceiling: {streak} clean reconciliations", streak)
        return Interval(seconds, f"lengthened: {streak} clean reconciliations in a row", 0)

    def bound(self, seconds: float) -> float:
        """``seconds`` within the bounds."""
        return self._bound(seconds)

    def _bound(self, seconds: float) -> float:
        return min(self.ceiling_s, max(self.floor_s, seconds))


# --- the quiet hour ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HourChoice:
    """The local time of the daily run and why."""

    at: time
    reason: str
    learned: bool

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.strftime("%H:%M"), "reason": self.reason, "learned": self.learned}


def quiet_hour(
    buckets: Iterable[tuple[datetime, int]],
    now: datetime,
    tz: tzinfo,
    pressure_by_hour: Mapping[int, float] | None = None,
) -> HourChoice:
    """The local hour with the least activity in the feed's recent history.

    Args:
        buckets: change counts per UTC hour (the hour's start, aware), from the feed.
        now: the current time (aware).
        tz: the local time zone: each UTC hour is converted on its own date, so hours on
            either side of a DST change land on the local hour they really were.
        pressure_by_hour: the mean sampled I/O pressure (percent) per local hour, if any.

    Falls back to 02:00 until the history reaches back ``MIN_HISTORY_DAYS``.
    """
    start = now - timedelta(days=HISTORY_DAYS)
    counts = [0] * 24
    oldest: datetime | None = None
    for at, count in buckets:
        if at < start:
            continue
        oldest = at if oldest is None or at < oldest else oldest
        counts[at.astimezone(tz).hour] += count
    if oldest is None or now - oldest < timedelta(days=MIN_HISTORY_DAYS):
        days = 0.0 if oldest is None else (now - oldest).total_seconds() / 86400
        return HourChoice(
            time(FALLBACK_HOUR),
            f"default {FALLBACK_HOUR:02d}:00: {days:.1f} of {MIN_HISTORY_DAYS} days of history",
            False,
        )
    total = sum(counts) or 1
    pressure = pressure_by_hour or {}
    # Changes are weighed as a share of the day's, pressure as a fraction of the minute:
    # both in [0, 1]. Ties go to the hour nearest after the fallback hour.
    scores = [counts[h] / total + pressure.get(h, 0.0) / 100 for h in range(24)]
    best = min(range(24), key=lambda h: (scores[h], (h - FALLBACK_HOUR) % 24))
    return HourChoice(
        time(best),
        f"learned: {counts[best]} changes at {best:02d}:00 local over the last "
        f"{HISTORY_DAYS} days, the quietest hour",
        True,
    )


# --- what status shows ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScheduleView:
    """A repository's schedule as ``status`` shows it (stored by the running manager)."""

    next_run: datetime | None = None
    waiting_since: datetime | None = None
    waiting_reason: str | None = None
    deadline: datetime | None = None
    interval: Interval | None = None
    daily: HourChoice | None = None
    deferrals: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "next_run": _iso(self.next_run),
            "waiting_since": _iso(self.waiting_since),
            "waiting_reason": self.waiting_reason,
            "deadline": _iso(self.deadline),
            "interval_s": self.interval.seconds if self.interval else None,
            "interval_reason": self.interval.reason if self.interval else None,
            "interval": self.interval.to_json() if self.interval else None,
            "daily_at": self.daily.at.strftime("%H:%M") if self.daily else None,
            "daily_reason": self.daily.reason if self.daily else None,
            "deferrals": self.deferrals,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScheduleView:
        daily = None
        if data.get("daily_at"):
            hh, mm = str(data["daily_at"]).split(":")
            daily = HourChoice(time(int(hh), int(mm)), str(data.get("daily_reason") or ""), False)
        return cls(
            next_run=_from_iso(data.get("next_run")),
            waiting_since=_from_iso(data.get("waiting_since")),
            waiting_reason=data.get("waiting_reason"),
            deadline=_from_iso(data.get("deadline")),
            interval=Interval.from_json(data["interval"]) if data.get("interval") else None,
            daily=daily,
            deferrals=int(data.get("deferrals", 0)),
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _from_iso(value: object) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
