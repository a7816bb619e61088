"""What the watcher reports about itself: the seed's watcher metrics plus overflow and
degradation counts, and close-to-row latency samples."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

LATENCY_SAMPLES = 10_000


@dataclass
class WatcherMetrics:
    """Live counters of one ``Watcher``. Updated by its threads; read them at any time.

    ``latency_ms`` holds the most recent close-to-row latencies: from the moment an
    ``IN_CLOSE_WRITE`` was read to the commit of the row it led to.
    """

    watched_repositories: int = 0
    watched_directories: int = 0
    events_processed: int = 0
    events_ignored: int = 0
    """Events for ignored names (hidden files, ``*.tmp``, ...): they never reach the store."""
    degraded_repositories: int = 0
    """Repositories that hit the inotify watch limit: partly watched, kept true by scans."""
    overflows: int = 0
    resyncs_requested: int = 0
    store_retries: int = 0
    writes_held: int = 0
    """Due looks put back because a writer still held the file open (``SettleRule.held``)."""
    """Batches that failed against the database and were retried (events kept meanwhile)."""
    latency_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )
    latency_count: int = 0
    """Latency samples ever taken (the window keeps the last ``LATENCY_SAMPLES``)."""

    def record_latency(self, ms: float) -> None:
        self.latency_ms.append(ms)
        self.latency_count += 1

    def latency_percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100, nearest rank) of the latency samples, if any."""
        samples = sorted(self.latency_ms)
        if not samples:
            return None
        rank = max(1, math.ceil(q / 100 * len(samples)))
        return samples[min(rank, len(samples)) - 1]

    def latency_p50(self) -> float:
        """Median close-to-row latency in ms (0.0 before the first sample)."""
        return self.latency_percentile(50) or 0.0

    def latency_p99(self) -> float:
        """99th percentile close-to-row latency in ms (0.0 before the first sample)."""
        return self.latency_percentile(99) or 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "watched_repositories": self.watched_repositories,
            "watched_directories": self.watched_directories,
            "events_processed": self.events_processed,
            "events_ignored": self.events_ignored,
            "degraded_repositories": self.degraded_repositories,
            "overflows": self.overflows,
            "resyncs_requested": self.resyncs_requested,
            "store_retries": self.store_retries,
            "latency_samples": self.latency_count,
            "latency_p50_ms": self.latency_percentile(50),
            "latency_p99_ms": self.latency_percentile(99),
        }
