"""The feed's activity per minute, counted by the database once per minute that is over.

The dashboard's chart asks for the changes per minute and kind over the last hour or day,
every minute and after bursts of changes. Counting is a scan of the feed's entries of the
window: cheap on a quiet day, seconds in the hour after a first index of a million files.
A minute that is over does not change any more (an entry's time is when its batch was
written, and a batch commits within seconds), so ``Activity`` keeps the counts of minutes
settled for ``SETTLE`` and asks the store only for what came after them. The minutes still
open are counted each time, and when that is slow over many entries (a first index running)
its answer is reused for ``REUSE`` times what it cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID

from fsledger.model import utcnow

SETTLE = timedelta(minutes=2)
"""A minute this long over is complete: later commits of its entries are not expected."""
KEEP = timedelta(days=1, minutes=10)
"""Minutes older than this are dropped from the counts kept (the longest window is a day)."""
SLOW_S = 0.05
REUSE = 10
REUSE_FROM = 10_000
"""Entries in the open minutes below which they are always counted afresh."""

Counts = list[tuple[datetime, str, int]]


class CountSource(Protocol):
    def change_counts_by_minute(
        self, since: datetime, repo_id: UUID | None = None, until: datetime | None = None
    ) -> Counts: ...


def minute_of(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


@dataclass
class _Kept:
    start: datetime
    """The first minute counted."""
    through: datetime
    """Minutes before this one are counted in ``minutes``."""
    minutes: dict[datetime, dict[str, int]] = field(default_factory=dict)
    tail: Counts = field(default_factory=list)
    tail_from: datetime | None = None
    tail_until: float = 0.0
    """Monotonic time until which ``tail`` (the open minutes) may be reused."""


class Activity:
    """Per-minute counts of the feed, of all repositories or one, kept across calls."""

    def __init__(
        self,
        store: CountSource,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self._monotonic = monotonic
        self._kept: dict[UUID | None, _Kept] = {}
        self._lock = threading.Lock()

    def counts(self, since: datetime, repo_id: UUID | None = None) -> Counts:
        """(minute, kind, count) of the entries recorded since ``since``, in order."""
        since = minute_of(since)
        now = self._clock()
        settled = minute_of(now - SETTLE)
        with self._lock:  # one count at a time: concurrent pages wait for the same answer
            kept = self._kept.get(repo_id)
            if kept is None or since < kept.start:
                kept = self._kept[repo_id] = _Kept(since, since)
            if kept.through < settled:
                for minute, kind, n in self._store.change_counts_by_minute(
                    kept.through, repo_id, settled
                ):
                    kept.minutes.setdefault(minute, {})[kind] = n
                kept.through = settled
            old = minute_of(now - KEEP)
            if kept.start < old:
                kept.start = old
                for minute in [m for m in kept.minutes if m < old]:
                    del kept.minutes[minute]
            tail_from = max(kept.through, since)
            if kept.tail_from != tail_from or self._monotonic() >= kept.tail_until:
                t0 = self._monotonic()
                kept.tail = self._store.change_counts_by_minute(tail_from, repo_id)
                cost = self._monotonic() - t0
                kept.tail_from = tail_from
                many = sum(n for _, _, n in kept.tail) >= REUSE_FROM
                kept.tail_until = t0 + cost * REUSE if cost >= SLOW_S and many else 0.0
            out = [
                (minute, kind, n)
                for minute in sorted(kept.minutes)
                if minute >= since
                for kind, n in sorted(kept.minutes[minute].items())
            ]
            return out + kept.tail


__all__ = ["Activity", "minute_of"]
