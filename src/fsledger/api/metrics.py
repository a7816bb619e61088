"""``/metrics``: the seed's SyncMetrics and the feed's state as Prometheus ``fsledger_*`` series.

Values are read at scrape time from their owners (the SyncManager, the watcher, the store,
the feed hub, the webhook dispatchers); only the two histograms keep state here.

The event-latency histogram is fed from the live watcher's ``metrics`` object: its
``latency_ms`` window (a bounded deque of the most recent close-to-row latencies, oldest
first) and, if it has one, ``latency_count`` (samples ever taken). Each scrape observes the
samples taken since the previous scrape. Without ``latency_count`` new samples can only be
told apart while the window is still filling, so the histogram stops growing once it is full.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fsledger.api.webhooks import WebhookDispatcher, display_url
from fsledger.errors import StoreError
from fsledger.feed import FeedHub
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import RepoState

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class LatencySource(Protocol):
    """What the watcher's ``metrics`` object offers for the latency histogram."""

    latency_ms: Sequence[float]
    """The most recent samples in milliseconds (a bounded window), oldest first."""
    latency_count: int
    """Samples taken since start (optional: see the module docstring)."""


class Metrics(Collector):
    """The registry behind ``/metrics``.

    Args:
        ledger: the ledger (repository states, feed position).
        manager: the SyncManager, if one runs in this process.
        hub: the feed hub (feed position, SSE clients).
        webhooks: the webhook dispatchers of this process.
    """

    def __init__(
        self,
        ledger: Ledger,
        manager: SyncManager | None,
        hub: FeedHub | None,
        webhooks: Callable[[], Sequence[WebhookDispatcher]] = lambda: (),
    ) -> None:
        self.ledger = ledger
        self.manager = manager
        self.hub = hub
        self.webhooks = webhooks
        self.sse_clients = 0
        self._lock = threading.Lock()
        self._latency_seen = 0
        self._window_len = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.event_latency = Histogram(
            "fsledger_event_latency_seconds",
            "Time from a file system event to its change being written (live watcher).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "fsledger_feed_delivery_latency_seconds",
            "Time from a change being recorded in the feed to its SSE event being sent, for "
            "streams that had caught up (a replay of older changes is not a delivery delay).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def sse_opened(self) -> None:
        with self._lock:
            self.sse_clients += 1

    def sse_try_open(self, cap: int) -> bool:
        """Count one more stream unless ``cap`` are open already (then False)."""
        with self._lock:
            if self.sse_clients >= cap:
                return False
            self.sse_clients += 1
            return True

    def sse_closed(self) -> None:
        with self._lock:
            self.sse_clients -= 1

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        self._drain_latency()
        return generate_latest(self.registry)

    def _drain_latency(self) -> None:
        live = getattr(self.manager, "live", None) if self.manager is not None else None
        source = getattr(live, "metrics", None)
        samples = getattr(source, "latency_ms", None)
        if samples is None:
            return
        with self._lock:
            window = list(samples)
            total = getattr(source, "latency_count", None)
            if not isinstance(total, int):
                total = self._latency_seen + max(len(window) - self._window_len, 0)
            self._window_len = len(window)
            new = min(max(total - self._latency_seen, 0), len(window))
            self._latency_seen = total
        for ms in window[len(window) - new :]:
            self.event_latency.observe(ms / 1000.0)

    # --- Collector ----------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        yield from self._repositories()
        if self.manager is not None:
            yield from self._sync()
        yield from self._feed()
        yield from self._webhooks()
        yield from self._mirrors()

    def _repositories(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "fsledger_repositories", "Repositories in the ledger, by state.", labels=["state"]
        )
        try:
            repos = self.ledger.list_repositories()
        except StoreError as exc:
            log.warning("Metrics: cannot list repositories: %s", exc)
            repos = []
        for state in RepoState:
            g.add_metric([state.value], sum(1 for r in repos if r.state is state))
        yield g

    def _sync(self) -> Iterator[Metric]:
        assert self.manager is not None
        m = self.manager.metrics()
        live = getattr(self.manager.live, "metrics", None)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge(
            "fsledger_watched_repositories",
            "Repositories watched live.",
            m.watched_repositories,
        )
        yield gauge(
            "fsledger_watched_directories", "Directories with a watch.", m.watched_directories
        )
        yield gauge(
            "fsledger_degraded_repositories",
            "Repositories whose live watching is degraded (scheduled scans stand in).",
            m.degraded_repositories,
        )
        yield gauge(
            "fsledger_offline_repositories",
            "Repositories whose root is unavailable.",
            m.offline_repositories,
        )
        yield counter(
            "fsledger_events_processed", "File system events processed.", m.events_processed
        )
        yield counter(
            "fsledger_events_ignored", "File system events ignored by rules.", m.events_ignored
        )
        yield gauge(
            "fsledger_event_latency_p50_seconds",
            "Median event latency reported by the watcher.",
            m.event_latency_ms / 1000.0,
        )
        yield gauge(
            "fsledger_event_queue_depth",
            "Events waiting in the watcher's queue.",
            float(getattr(live, "queue_depth", 0) or 0),
        )
        deferrals = CounterMetricFamily(
            "fsledger_schedule_deferrals",
            "Scheduled reconciliations that waited for a quiet system, by what they waited for.",
            labels=["reason"],
        )
        for reason, count in sorted(m.schedule_deferrals.items()):
            deferrals.add_metric([reason], count)
        yield deferrals
        yield gauge(
            "fsledger_schedule_waiting",
            "Scheduled reconciliations waiting for a quiet system now.",
            m.schedule_waiting,
        )
        yield gauge(
            "fsledger_reconciliation_queue_depth",
            "Reconciliations queued.",
            m.reconciliations_queued,
        )
        yield gauge(
            "fsledger_reconciliation_duration_seconds",
            "Duration of the last reconciliation.",
            m.reconciliation_duration_s,
        )
        yield gauge(
            "fsledger_last_reconciliation_timestamp_seconds",
            "When the last reconciliation finished (Unix time; 0 before the first).",
            m.last_reconciliation.timestamp() if m.last_reconciliation else 0.0,
        )
        files = CounterMetricFamily(
            "fsledger_reconciliation_files",
            "Files seen and changed by reconciliations since start.",
            labels=["action"],
        )
        for action, value in (
            ("scanned", m.files_scanned),
            ("added", m.files_added),
            ("updated", m.files_updated),
            ("removed", m.files_removed),
            ("moved", m.files_moved),
        ):
            files.add_metric([action], value)
        yield files
        yield counter(
            "fsledger_reconciliation_errors",
            "Reconciliations that failed (offline roots, store errors).",
            m.reconciliation_errors,
        )

    def _feed(self) -> Iterator[Metric]:
        try:
            info = self.ledger.store.feed_info()
        except StoreError as exc:
            log.warning("Metrics: cannot read the change feed: %s", exc)
        else:
            yield GaugeMetricFamily(
                "fsledger_feed_sequence", "Newest change-feed sequence number.", info.latest_seq
            )
            yield GaugeMetricFamily(
                "fsledger_feed_pruned_through",
                "Retention low-water mark: entries up to it may be gone.",
                info.pruned_through,
            )
        yield GaugeMetricFamily(
            "fsledger_sse_clients", "Open Server-Sent Events streams.", self.sse_clients
        )

    def _webhooks(self) -> Iterator[Metric]:
        hooks = list(self.webhooks())
        batches = CounterMetricFamily(
            "fsledger_webhook_batches", "Batches acknowledged by the receiver.", labels=["url"]
        )
        changes = CounterMetricFamily(
            "fsledger_webhook_changes", "Changes acknowledged by the receiver.", labels=["url"]
        )
        failures = CounterMetricFamily(
            "fsledger_webhook_failures", "Delivery attempts that failed.", labels=["url"]
        )
        lag = GaugeMetricFamily(
            "fsledger_webhook_lag",
            "Sequence numbers between the feed's head and the webhook's cursor.",
            labels=["url"],
        )
        latest = self.hub.latest if self.hub is not None else 0
        for hook in hooks:
            label = [display_url(hook.url)]
            s = hook.stats
            with s.lock:
                batches.add_metric(label, s.delivered_batches)
                changes.add_metric(label, s.delivered_changes)
                failures.add_metric(label, s.failed_attempts)
                lag.add_metric(label, max(latest - s.cursor_seq, 0))
        yield from (batches, changes, failures, lag)

    def _mirrors(self) -> Iterator[Metric]:
        """Mirrors to buckets: counters as stored (every process's work), the state, the
        backlog and, from this daemon's runners, the current rates."""
        try:
            mirrors = self.ledger.store.list_mirrors()
            head = self.ledger.store.latest_seq() if mirrors else 0
        except StoreError as exc:
            log.warning("Metrics: cannot read the mirrors: %s", exc)
            return
        if not mirrors:
            return
        objects = CounterMetricFamily(
            "fsledger_mirror_objects",
            "Objects a mirror handled, by action: uploaded (and verified), skipped (already "
            "there with the right hash), copied (server-side, for moves), deleted, deferred "
            "(the file changed since recorded).",
            labels=["mirror", "action"],
        )
        nbytes = CounterMetricFamily(
            "fsledger_mirror_uploaded_bytes", "Bytes uploaded by a mirror.", labels=["mirror"]
        )
        errors = CounterMetricFamily(
            "fsledger_mirror_errors", "Actions of a mirror that failed.", labels=["mirror"]
        )
        backlog = GaugeMetricFamily(
            "fsledger_mirror_backlog",
            "Feed sequence numbers after the mirror's cursor (-1: not synced yet).",
            labels=["mirror"],
        )
        paused = GaugeMetricFamily(
            "fsledger_mirror_paused", "1 while a mirror is paused.", labels=["mirror"]
        )
        rate = GaugeMetricFamily(
            "fsledger_mirror_bytes_per_second",
            "Upload rate of a mirror over the last minute (this daemon's runner).",
            labels=["mirror"],
        )
        supervisor = getattr(self.manager, "mirrors", None)
        for m in mirrors:
            label = [m.url]
            c = m.counters
            for action in ("uploaded", "skipped", "copied", "deleted", "deferred"):
                objects.add_metric([m.url, action], getattr(c, action))
            nbytes.add_metric(label, c.uploaded_bytes)
            errors.add_metric(label, c.errors)
            backlog.add_metric(label, -1 if m.cursor_seq is None else max(head - m.cursor_seq, 0))
            paused.add_metric(label, 1 if m.state.value == "paused" else 0)
            live = supervisor.live(m.id) if supervisor is not None else None
            if live is not None:
                rate.add_metric(label, live["bytes_per_s"])
        yield from (objects, nbytes, errors, backlog, paused, rate)

    def describe(self) -> list[Any]:
        return []


__all__ = ["Metrics", "LatencySource", "CONTENT_TYPE"]
