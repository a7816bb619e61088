"""``realtime`` rows of ``sync_operations``: live work, aggregated per repository.

A row is opened by the first write of a minute, counts are added to it as passes commit,
and it is finished once a minute has passed (or when the watcher stops or the repository
is removed): at most one row a minute per repository, however many events there were.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from uuid import UUID

from fsledger.errors import StoreError
from fsledger.model import OperationStatus, OperationType, ScanStats, utcnow
from fsledger.reconcile import owner_tag
from fsledger.store.base import Store

log = logging.getLogger(__name__)

ROW_S = 60.0
"""How long one ``realtime`` row covers at most."""


@dataclass(slots=True)
class _Row:
    op_id: int
    started: float
    totals: ScanStats = field(default_factory=ScanStats)


def has_work(stats: ScanStats) -> bool:
    return stats.has_work()


class RealtimeLog:
    """The open ``realtime`` row of each repository. Thread-safe.

    A database error here is logged and forgotten: the records themselves are written
    (and retried) elsewhere; the operation log is bookkeeping.
    """

    def __init__(self, store: Store, row_s: float = ROW_S) -> None:
        self.store = store
        self.row_s = row_s
        self._rows: dict[UUID, _Row] = {}
        self._lock = threading.Lock()

    def add(self, repo_id: UUID, stats: ScanStats) -> None:
        """Count a committed pass into the repository's row (opening one if needed)."""
        if not has_work(stats):
            return
        with self._lock:
            row = self._rows.get(repo_id)
            try:
                if row is not None and time.monotonic() - row.started >= self.row_s:
                    self._finish(repo_id)
                    row = None
                now = utcnow()
                if row is None:
                    op = self.store.start_operation(
                        repo_id, OperationType.REALTIME, owner_tag(), now
                    )
                    row = self._rows[repo_id] = _Row(op.id, time.monotonic())
                self.store.add_to_operation(row.op_id, stats, now)
            except StoreError as exc:
                log.warning("Repository %s: cannot record realtime operation: %s", repo_id, exc)
                return
            row.totals.add(stats)

    def roll(self) -> None:
        """Finish the rows that are a minute old."""
        with self._lock:
            now = time.monotonic()
            for repo_id in [r for r, row in self._rows.items() if now - row.started >= self.row_s]:
                self._finish(repo_id)

    def finish(self, repo_id: UUID | None = None) -> None:
        """Finish one repository's row, or every row."""
        with self._lock:
            for rid in [repo_id] if repo_id is not None else list(self._rows):
                self._finish(rid)

    def _finish(self, repo_id: UUID) -> None:
        row = self._rows.pop(repo_id, None)
        if row is None:
            return
        try:
            self.store.finish_operation(
                row.op_id, OperationStatus.COMPLETED, row.totals, None, utcnow()
            )
        except StoreError as exc:
            log.warning("Repository %s: cannot finish realtime operation: %s", repo_id, exc)
