"""The settle rule for files a listing or a subtree reconciliation finds in a new directory.

A file is recorded once it is closed or quiet: after its ``IN_CLOSE_WRITE``, or when no
event has come for the debounce time. A file found by a walk instead of an event (in a
directory created and filled at once, whose watch landed after the writer opened it) has
no event history from before its watch; its ctime stands in for it: a file changed within
the debounce time waits in the pending state, where the events read since its watch landed
(a close, further writes) take over. Without this, such a file is recorded at a partial
size and then modified (issue 13, item 4).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from fsledger.decide import SettleRule
from fsledger.ignore import IgnoreRules
from fsledger.model import Change, ChangeKind, Repository
from fsledger.store.base import Store
from fsledger.store.lease import Lease
from fsledger.watch.state import Key, Pending
from fsledger.writer import Applied, Listener, RepoWriter


def wait_quiet(
    pending: Pending, key: Key, ctime_ns: int, now: float, wall_ns: int, debounce_s: float
) -> bool:
    """Whether a file found by a walk must wait before it is recorded (then it is left in
    ``pending`` under ``key``, due when it will have been quiet for ``debounce_s``); caller
    holds the watcher's lock.

    ``now`` is monotonic, ``wall_ns`` the wall clock (ctimes are wall-clock times)."""
    entry = pending.dirty.get(key)
    if entry is not None and (entry.writing or entry.closed_at is not None):
        return True  # events read since its watch landed decide
    quiet_in = SettleRule(0.0, debounce_s).found_by_walk(ctime_ns, wall_ns)
    if quiet_in <= 0:
        return entry is not None  # quiet: looked at now, or when its own event is due
    if entry is None:
        pending.mark(key, now + quiet_in, writing=True)
    else:
        entry.due, entry.writing = max(entry.due, now + quiet_in), True
    return True


HELD_KINDS = frozenset({ChangeKind.CREATED, ChangeKind.MODIFIED})
"""What a reconciliation of a new subtree holds back: records of content that may still
be being written (metadata, moves and deletions are written as they come)."""


class SettlingWriter(RepoWriter):
    """A repository's writer as the live watcher's subtree reconciliation sees it: created
    and modified records of files that are not settled yet are held back (``hold`` queues
    them in the pending state and returns what may be written now); the reconciliation
    counts them as unsettled. Everything else is the real writer's (its lock, listeners,
    lease and verification): this is a view of it, with no state of its own.
    """

    def __init__(self, inner: RepoWriter, hold: Callable[[list[Change]], list[Change]]) -> None:
        # Deliberately not RepoWriter.__init__: every attribute is the inner writer's.
        self.inner = inner
        self.hold = hold

    # Every attribute is the inner writer's, read and written through.
    @property
    def lock(self) -> threading.RLock:
        return self.inner.lock

    @lock.setter
    def lock(self, value: threading.RLock) -> None:
        self.inner.lock = value

    @property
    def store(self) -> Store:
        return self.inner.store

    @store.setter
    def store(self, value: Store) -> None:
        self.inner.store = value

    @property
    def repo(self) -> Repository:
        return self.inner.repo

    @repo.setter
    def repo(self, value: Repository) -> None:
        self.inner.repo = value

    @property
    def rules(self) -> IgnoreRules:
        return self.inner.rules

    @rules.setter
    def rules(self, value: IgnoreRules) -> None:
        self.inner.rules = value

    @property
    def verify(self) -> bool:
        return self.inner.verify

    @verify.setter
    def verify(self, value: bool) -> None:
        self.inner.verify = value

    @property
    def lease(self) -> Lease | None:
        return self.inner.lease

    @lease.setter
    def lease(self, value: Lease | None) -> None:
        self.inner.lease = value

    @property
    def listeners(self) -> list[Listener]:
        return self.inner.listeners

    @listeners.setter
    def listeners(self, value: list[Listener]) -> None:
        self.inner.listeners = value

    def apply(
        self, changes: Sequence[Change], confirm: Callable[[Change], bool] | None = None
    ) -> Applied:
        candidates = [c for c in changes if c.kind in HELD_KINDS and c.record is not None]
        kept_ids = {id(c) for c in self.hold(candidates)} if candidates else set()
        held = tuple(
            c
            for c in changes
            if c.kind in HELD_KINDS and c.record is not None and id(c) not in kept_ids
        )
        if not held:
            return self.inner.apply(changes, confirm)
        ids = {id(c) for c in held}
        rest = [c for c in changes if id(c) not in ids]
        applied = self.inner.apply(rest, confirm) if rest else Applied((), (), None)
        return Applied(applied.changes, applied.dropped + held, applied.last_seq)

    def apply_moves(self, moves: Sequence[Change]) -> Applied:
        # A move keeps its record's content: nothing to hold back.
        return self.inner.apply_moves(moves)
