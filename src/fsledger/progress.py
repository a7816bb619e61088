"""The progress of running scans, as the daemon publishes it (plain Python, no I/O).

A reconciliation reports its running ``ScanStats`` through ``reconcile.Progress`` (every
thousand files, and at each key range's end); a ``ProgressTracker`` turns those into a
``ScanProgress`` snapshot: files and bytes done against the totals expected (from the last
completed scan's counts), the rate, the time left and the phase. A ``ProgressBoard`` holds
the snapshot of each repository's running scan for whoever reads it (the status route, the
SSE stream): readers poll ``version`` and take ``snapshot()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from fsledger.model import ScanStats, rfc3339, utcnow

PUBLISH_EVERY_S = 0.1
"""A tracker publishes at most this often (phase changes and the end at once)."""
KEEP_ENDED_S = 10.0
"""An ended scan's last snapshot stays readable this long (a page polling every few seconds
still sees it finish)."""


class Phase:
    """What a running scan is doing."""

    STARTING = "starting"
    """Checking the root and reading the last scan's counts."""
    SCANNING = "scanning"
    """Walking the tree against the records, hashing what differs."""
    FINISHING = "finishing"
    """The walk is done: moves, deletions (after the root guard) and the last writes."""
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a scan is expected to go through, from the last completed scan's counts."""

    files: int | None
    bytes: int | None


@dataclass(frozen=True, slots=True)
class ScanProgress:
    """One repository's running (or just ended) scan."""

    repository_id: UUID
    operation: str
    """The operation type (``startup``, ``reconciliation``)."""
    verify: bool
    phase: str
    started_at: datetime
    updated_at: datetime
    files_done: int = 0
    bytes_done: int = 0
    """Bytes hashed so far (a rescan hashes only what differs)."""
    files_expected: int | None = None
    bytes_expected: int | None = None
    files_per_s: float | None = None
    bytes_per_s: float | None = None
    eta_s: float | None = None
    """Seconds left at the current rate, when a total is expected."""
    message: str | None = None
    """Why a failed scan failed."""

    @property
    def fraction(self) -> float | None:
        """Done over expected (files; bytes when no file count is expected), at most 1."""
        if self.phase == Phase.DONE:
            return 1.0
        if self.files_expected:
            return min(self.files_done / self.files_expected, 1.0)
        if self.bytes_expected:
            return min(self.bytes_done / self.bytes_expected, 1.0)
        return None

    @property
    def running(self) -> bool:
        return self.phase not in (Phase.DONE, Phase.FAILED)

    def to_json(self) -> dict[str, Any]:
        fraction = self.fraction
        return {
            "repository_id": str(self.repository_id),
            "operation": self.operation,
            "verify": self.verify,
            "phase": self.phase,
            "running": self.running,
            "started_at": rfc3339(self.started_at),
            "updated_at": rfc3339(self.updated_at),
            "files_done": self.files_done,
            "bytes_done": self.bytes_done,
            "files_expected": self.files_expected,
            "bytes_expected": self.bytes_expected,
            "fraction": round(fraction, 4) if fraction is not None else None,
            "files_per_s": _round(self.files_per_s),
            "bytes_per_s": _round(self.bytes_per_s),
            "eta_s": _round(self.eta_s),
            "message": self.message,
        }


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


class ProgressBoard:
    """The latest ``ScanProgress`` of each repository, shared between threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._items: dict[UUID, tuple[ScanProgress, float]] = {}
        self._version = 0
        self._clock = clock

    @property
    def version(self) -> int:
        """Bumped by every publication: a reader compares it with the last it saw."""
        return self._version

    def publish(self, progress: ScanProgress) -> None:
        with self._lock:
            self._items[progress.repository_id] = (progress, self._clock())
            self._version += 1

    def get(self, repo_id: UUID) -> ScanProgress | None:
        """The repository's running scan, or the one that ended in the last seconds."""
        with self._lock:
            item = self._items.get(repo_id)
            if item is None:
                return None
            progress, at = item
            if not progress.running and self._clock() - at > KEEP_ENDED_S:
                del self._items[repo_id]
                return None
            return progress

    def snapshot(self) -> tuple[int, list[ScanProgress]]:
        """The version and every running or recently ended scan."""
        with self._lock:
            version = self._version
            ids = list(self._items)
        return version, [p for rid in ids if (p := self.get(rid)) is not None]

    def track(
        self, repo_id: UUID, operation: str, verify: bool, estimate: Estimate
    ) -> ProgressTracker:
        """Start publishing a scan of ``repo_id``."""
        return ProgressTracker(self, repo_id, operation, verify, estimate, self._clock)


class ProgressTracker:
    """Turns one scan's running ``ScanStats`` into ``ScanProgress`` on a board. ``update``
    is a ``reconcile.Progress``."""

    def __init__(
        self,
        board: ProgressBoard,
        repo_id: UUID,
        operation: str,
        verify: bool,
        estimate: Estimate,
        clock: Callable[[], float],
    ) -> None:
        self._board = board
        self._clock = clock
        self._t0 = clock()
        self._published = 0.0
        now = utcnow()
        self._current = ScanProgress(
            repo_id,
            operation,
            verify,
            Phase.STARTING,
            now,
            now,
            files_expected=estimate.files,
            bytes_expected=estimate.bytes,
        )
        board.publish(self._current)

    @property
    def current(self) -> ScanProgress:
        return self._current

    def update(self, stats: ScanStats) -> None:
        """The scan's running counters (called by the reconciler's thread)."""
        self._set(Phase.SCANNING, stats.files_scanned, stats.bytes_hashed, force=False)

    def finishing(self, stats: ScanStats) -> None:
        """The walk ended: moves, deletions and the last writes follow."""
        self._set(Phase.FINISHING, stats.files_scanned, stats.bytes_hashed, force=True)

    def done(self, stats: ScanStats) -> None:
        self._set(Phase.DONE, stats.files_scanned, stats.bytes_hashed, force=True)

    def failed(self, message: str) -> None:
        cur = self._current
        self._current = replace(cur, phase=Phase.FAILED, updated_at=utcnow(), message=message)
        self._board.publish(self._current)

    def _set(self, phase: str, files: int, nbytes: int, *, force: bool) -> None:
        cur = self._current
        now = self._clock()
        if phase == Phase.SCANNING and cur.phase == Phase.FINISHING:
            phase = Phase.FINISHING  # a last tick after the walk does not go back
        force = force or phase != cur.phase
        files = max(files, cur.files_done)
        nbytes = max(nbytes, cur.bytes_done)
        elapsed = max(now - self._t0, 1e-6)
        files_rate = files / elapsed
        bytes_rate = nbytes / elapsed
        self._current = replace(
            cur,
            phase=phase,
            updated_at=utcnow(),
            files_done=files,
            bytes_done=nbytes,
            files_per_s=files_rate if files else None,
            bytes_per_s=bytes_rate if nbytes else None,
            eta_s=_eta(cur, files, nbytes, files_rate, bytes_rate, phase),
        )
        if force or now - self._published >= PUBLISH_EVERY_S:
            self._published = now
            self._board.publish(self._current)


def _eta(
    cur: ScanProgress, files: int, nbytes: int, files_rate: float, bytes_rate: float, phase: str
) -> float | None:
    if phase == Phase.DONE:
        return 0.0
    if cur.files_expected and files_rate > 0:
        return max(cur.files_expected - files, 0) / files_rate
    if cur.bytes_expected and bytes_rate > 0:
        return max(cur.bytes_expected - nbytes, 0) / bytes_rate
    return None


__all__ = ["Estimate", "Phase", "ProgressBoard", "ProgressTracker", "ScanProgress"]
