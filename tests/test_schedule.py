"""The scheduler's pure decisions: a due run waits while busy and never past the maximum,
a quiet request expires, the quiet hour is learned (and DST is no trouble), the adaptive
interval moves both ways within its bounds."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from fsledger.schedule import (
    Adaptive,
    Gate,
    Interval,
    Policy,
    Pressure,
    Quiet,
    ScheduleView,
    quiet_hour,
    read_pressure,
)

T0 = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)


class World:
    """The clock, pressure and activity the gate sees; the test moves them."""

    def __init__(self) -> None:
        self.now = T0
        self.pressure: Pressure | None = Pressure(0.0, 0.0)
        self.rate: dict[UUID, float] = {}

    def gate(self, **policy: float) -> Gate:
        return Gate(
            Policy(**policy),
            lambda: self.now,
            lambda: self.pressure,
            lambda rid: self.rate.get(rid, 0.0),
        )


def test_due_run_waits_during_a_burst_and_runs_when_quiet():
    world, repo = World(), uuid4()
    gate = world.gate(busy_changes_per_min=100)
    due = world.now
    world.rate[repo] = 5000.0  # an import is landing
    verdict = gate.check(repo, due)
    assert not verdict.run and verdict.kind == "activity"
    assert "5000 changes/min" in (verdict.reason or "")
    world.now += timedelta(minutes=20)
    assert not gate.check(repo, due).run
    world.rate[repo] = 10.0  # the import is over
    verdict = gate.check(repo, due)
    assert verdict.run and verdict.kind is None
    # Another repository's import does not hold this one.
    world.rate[uuid4()] = 9999.0
    assert gate.check(repo, due).run


def test_pressure_defers_and_a_kernel_without_psi_defers_nothing():
    world, repo = World(), uuid4()
    gate = world.gate(busy_io_pressure=20, busy_cpu_pressure=60)
    world.pressure = Pressure(io_avg60=35.0, cpu_avg60=0.0)
    assert gate.check(repo, world.now).kind == "io_pressure"
    world.pressure = Pressure(io_avg60=1.0, cpu_avg60=80.0)
    assert gate.check(repo, world.now).kind == "cpu_pressure"
    world.pressure = None
    assert gate.check(repo, world.now).run


def test_never_waits_past_the_maximum():
    world, repo = World(), uuid4()
    gate = world.gate(max_deferral_s=6 * 3600)
    world.pressure = Pressure(io_avg60=99.0, cpu_avg60=99.0)
    due = world.now
    world.now = due + timedelta(hours=6) - timedelta(seconds=1)
    waiting = gate.check(repo, due)
    assert not waiting.run and waiting.deadline == due + timedelta(hours=6)
    world.now = due + timedelta(hours=6)
    verdict = gate.check(repo, due)
    assert verdict.run and verdict.kind == "max_deferral"
    assert "maximum 6h" in (verdict.reason or "") and "I/O pressure" in (verdict.reason or "")


def test_quiet_request_expires():
    world, repo = World(), uuid4()
    gate = world.gate()
    gate.request_quiet(Quiet(world.now + timedelta(hours=2), by="thumbnailer"))
    verdict = gate.check(repo, world.now)
    assert not verdict.run and verdict.kind == "quiet" and "thumbnailer" in (verdict.reason or "")
    world.now += timedelta(hours=2)
    assert gate.check(repo, world.now).run
    assert gate.quiet() is None


def _history(quiet_local_hour: int, tz: ZoneInfo, days: int, end: datetime) -> list:
    """Change counts per UTC hour: busy every hour but one local hour each day."""
    buckets = []
    # In UTC: arithmetic on zone-aware datetimes is wall-clock arithmetic.
    at = (end.astimezone(UTC) - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
    while at < end:
        busy = at.astimezone(tz).hour != quiet_local_hour
        buckets.append((at, 50 if busy else 1))
        at += timedelta(hours=1)
    return buckets


def test_auto_picks_the_quietest_hour_from_history():
    tz = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 6, 20, 12, 0, tzinfo=tz)
    choice = quiet_hour(_history(4, tz, 14, now), now, tz)
    assert choice.learned and choice.at == time(4)
    assert "quietest" in choice.reason


def test_auto_falls_back_to_two_without_enough_history():
    tz = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 6, 20, 12, 0, tzinfo=tz)
    assert quiet_hour([], now, tz).at == time(2)
    short = quiet_hour(_history(4, tz, 5, now), now, tz)
    assert not short.learned and short.at == time(2) and "of 7 days" in short.reason


def test_auto_hour_is_local_across_dst_transitions():
    """Two weeks around the autumn change: the quiet local hour is 04:00 on both sides,
    although it is 02:00 UTC before and 03:00 UTC after; a UTC-hour count would split it."""
    tz = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 11, 1, 12, 0, tzinfo=tz)  # DST ended on 25 October
    history = _history(4, tz, 14, now)
    utc_hours = {at.hour for at, n in history if n == 1}
    assert utc_hours == {2, 3}
    assert quiet_hour(history, now, tz).at == time(4)
    # Spring forward: 02:00 does not exist on the day of the change; still a valid choice.
    spring = datetime(2026, 4, 5, 12, 0, tzinfo=tz)
    assert quiet_hour(_history(3, tz, 14, spring), spring, tz).at == time(3)


def test_sampled_pressure_moves_the_quiet_hour():
    tz = ZoneInfo("UTC")
    now = datetime(2026, 6, 20, 12, 0, tzinfo=tz)
    flat = [(at, 10) for at, _ in _history(0, tz, 14, now)]
    # Equal change counts everywhere: the hour without I/O pressure wins (ties go to 02:00).
    pressure = {h: 50.0 for h in range(24)} | {5: 0.0}
    assert quiet_hour(flat, now, tz, pressure).at == time(5)
    assert quiet_hour(flat, now, tz).at == time(2)


def test_adaptive_interval_moves_both_ways_within_bounds():
    adaptive = Adaptive(floor_s=3600, ceiling_s=7 * 86400, clean_runs=2)
    interval = adaptive.initial(86400)
    assert interval.seconds == 86400
    seen = []
    for _ in range(10):  # drift every time: halves down to the floor
        interval = adaptive.after(interval, drift=3)
        seen.append(interval.seconds)
    assert seen[:3] == [43200, 21600, 10800] and min(seen) == 3600 == interval.seconds
    assert "floor" in interval.reason
    for _ in range(40):  # clean every time: doubles every second run, up to the ceiling
        interval = adaptive.after(interval, drift=0)
        seen.append(interval.seconds)
    assert max(seen) == 7 * 86400 == interval.seconds and "ceiling" in interval.reason
    assert all(3600 <= s <= 7 * 86400 for s in seen)
    one_clean = adaptive.after(Interval(7200, "x"), drift=0)
    assert one_clean.seconds == 7200 and one_clean.clean_streak == 1
    assert adaptive.after(one_clean, drift=0).seconds == 14400


def test_read_pressure_from_proc_format(tmp_path: Path):
    (tmp_path / "io").write_text(
        "some avg10=1.50 avg60=23.40 avg300=5.00 total=123\n"
        "full avg10=0.00 avg60=11.00 avg300=0.00 total=4\n"
    )
    (tmp_path / "cpu").write_text("some avg10=0.00 avg60=7.25 avg300=0.00 total=9\n")
    assert read_pressure(str(tmp_path)) == Pressure(io_avg60=23.4, cpu_avg60=7.25)
    assert read_pressure(str(tmp_path / "missing")) is None


def test_schedule_view_round_trips_through_json():
    view = ScheduleView(
        next_run=T0,
        waiting_since=T0,
        waiting_reason="quiet requested",
        deadline=T0 + timedelta(hours=6),
        interval=Interval(3600, "shortened", 0),
        deferrals=2,
    )
    assert ScheduleView.from_json(view.to_json()) == view
