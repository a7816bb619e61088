"""The settle rule for files a listing or a subtree reconciliation finds in a new directory.

A file is recorded once it is closed or quiet: after its ``IN_CLOSE_WRITE``, or when no
event has come for the debounce time. A file found by a walk instead of an event (in a
directory created and filled at once, whose watch landed after the writer opened it) has
no event history from before its watch; its ctime stands in for it: a file changed within
the debounce time waits in the pending state, where the events read since its watch landed
(a close, further writes) take over. Without this, such a file is recorded at a partial
size and then modified (issue 13, item 4). Such a file counts as written and not closed:
when it comes due, a writer that still holds it open holds it back (``SettleRule.held``).
"""

from __future__ import annotations

from fsledger.decide import SettleRule
from fsledger.watch.state import Key, Pending


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
    # Changed within the debounce, and no close read: a writer may hold it open (stalled
    # since), as after an IN_MODIFY without its IN_CLOSE_WRITE (``Watcher._hold_open``).
    if entry is None:
        pending.mark(key, now + quiet_in, writing=True, open_since=now)
    else:
        entry.due, entry.writing = max(entry.due, now + quiet_in), True
        entry.open_since = now if entry.open_since is None else entry.open_since
    return True
