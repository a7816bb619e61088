"""Tier 1: the real-time watcher.

Two threads, owned by ``Watcher``:

* the *reader* drains the backend (so the kernel queue empties even while the database
  is slow or away), keeps the watch tree true (a new directory is watched the moment its
  event is read, then reconciled, so files created before the watch landed are not
  missed), pairs renames by cookie and coalesces everything else into per-path entries;
* the *applier* waits until entries are due and runs a pass (``apply.Applier``): look at
  the disk *now*, write what it shows through the repository's one ``RepoWriter``.

Events are hints, never facts: a file created and deleted inside the debounce window is
looked at once, found absent, and leaves nothing. ``IN_CLOSE_WRITE``, moves and deletes
settle a path within ``SETTLE_S``; anything that may be a write in progress waits
``settings.debounce_s`` after the path's last event. Under a burst (``tar -x``) passes
are spaced a little further apart, so that they become a few large transactions.

Renames: IN_MOVED_FROM and IN_MOVED_TO are paired by cookie, adjacent or not. A pair
inside one repository is a rename (a directory's is one prefix rewrite of its records);
a FROM left unpaired for ``PAIR_WAIT_S`` was moved out (its records are removed); a TO
without a FROM was moved in (a file is looked at, a directory watched and reconciled).

A file rename whose file moved on before the pass looked (``a -> t`` read, ``t -> b`` not
yet) waits for its next hop, and every rename and look that shares a name with it waits
too: part of an entangled set written alone (``c -> a`` replacing the record ``a -> t``
still has to carry) loses a file's identity. Likewise for renames held back below a
directory whose pair is not read yet.

Ignored names are never recorded, but an event on an ignored file is not dropped unseen:
when the file has other links, the records with its inode are looked at (a write through
``.hidden``, a hard link of ``photo.jpg``, changes photo.jpg; inotify names only
``.hidden``). An unlink or rename of one link refreshes the other names too (their ctime).

What the watcher cannot repair by itself it hands to the SyncManager through
``on_resync(repo, prefix, reason)``: an ``IN_Q_OVERFLOW`` (events were lost), a lost
watch, a root that went away. The manager runs those reconciliations; the watcher never
waits for them.
"""

from __future__ import annotations

import logging
import stat as stat_mod
import threading
import time
from collections.abc import Callable
from uuid import UUID

from fsledger.beneath import Beneath
from fsledger.config import Settings
from fsledger.errors import FsledgerError, RootUnavailable, StoreError
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, RelPath, Repository, ScanStats
from fsledger.roots import root_present
from fsledger.watch.apply import Applier
from fsledger.watch.backend import InotifyBackend, WatchBackend
from fsledger.watch.events import EventInterpreter
from fsledger.watch.metrics import WatcherMetrics
from fsledger.watch.openfiles import open_for_writing
from fsledger.watch.realtime import RealtimeLog
from fsledger.watch.state import (
    Check,
    DirtyJob,
    FileMove,
    Key,
    MoveJob,
    RepoWatch,
    Work,
    moved,
    related,
    show,
    under,
)
from fsledger.watch.tree import WatchTree
from fsledger.writer import Applied

log = logging.getLogger(__name__)

SETTLE_S = 0.015
"""Batching window after IN_CLOSE_WRITE, a move or a delete (watchman settles in 20 ms)."""
PAIR_WAIT_S = 0.05
"""How long an IN_MOVED_FROM waits for its IN_MOVED_TO before it counts as moved out."""
READ_TIMEOUT_S = 0.1
"""Longest the reader blocks in one read while idle (how fast it notices ``stop``)."""
BUSY_READ_TIMEOUT_S = 0.005
"""Longest it blocks while work is pending: a pass waits for one read cycle (see
``_catch_up``)."""
GATHER_S = 0.002
"""After a read that found events while work is pending, how long the reader lets more
gather before reading again: under a burst the kernel hands over a few events per read,
and each read cycle (locks, wake-ups, expiry) costs more than the events in it."""
BURST_ITEMS = 32
HOLD_MIN_S = 0.005
MAX_HOLD_S = 0.1
"""While passes keep finding ``BURST_ITEMS`` or more, the spacing of their starts doubles
from ``HOLD_MIN_S`` up to ``MAX_HOLD_S`` (and resets after a small pass or a lull): single
files and trickles are written within the settle window, a burst (``tar -x``) becomes a
few large transactions a second. Spacing starts, not a pause after each pass: a pass that
took longer than the hold let the next batch grow meanwhile, and waiting more would only
idle the applier while the burst piles up."""
FOREIGN_WINDOW_S = 60.0
"""How long other writers' changes are remembered (against renames not yet written)."""

ResyncCallback = Callable[[Repository, RelPath, str], None]


class Watcher:
    """Keeps the ledger of watched repositories true from inotify events (tier 1).

    Args:
        ledger: the store, the writers (one per repository) and the reconciler.
        settings: ``debounce_s``, ``write_hold_s``, ``hash_algo``, ``calculate_hashes``,
            ``batch_size``.
        backend: the event source; an ``InotifyBackend`` when omitted.
        on_resync: asks for a reconciliation of ``prefix`` (``b""``: the whole repository)
            of a repository, with a reason; called from the watcher's threads, so it must
            only queue the work. When omitted the watcher runs it itself, on a helper thread.

    Example:
        >>> watcher = Watcher(ledger, settings, on_resync=manager.request)  # doctest: +SKIP
        >>> watcher.add(repo)  # doctest: +SKIP
        >>> watcher.start()  # doctest: +SKIP
    """

    def __init__(
        self,
        ledger: Ledger,
        settings: Settings,
        backend: WatchBackend | None = None,
        on_resync: ResyncCallback | None = None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.backend: WatchBackend = backend if backend is not None else InotifyBackend()
        self.on_resync = on_resync
        self.metrics = WatcherMetrics()
        self.debounce_s = settings.debounce_s
        self.settle_s = min(SETTLE_S, settings.debounce_s)
        self.retry_initial_s = 0.1
        """First backoff after a database error (doubling up to ``retry_max_s``)."""
        self.retry_max_s = 30.0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._read_lock = threading.Lock()
        self._process_lock = threading.Lock()
        self._repos: dict[UUID, RepoWatch] = {}
        self._tree = WatchTree(self.backend)
        self._events = EventInterpreter(
            self._repos,
            self._tree,
            self.metrics,
            self.settle_s,
            self.debounce_s,
            PAIR_WAIT_S,
            max_hold_s=settings.write_hold_s,
        )
        self._realtime = RealtimeLog(ledger.store)
        self._applier = Applier(
            ledger,
            settings,
            self.metrics,
            self._lock,
            self._tree,
            self.settle_s,
            self.debounce_s,
            catch_up=self._catch_up,
        )
        self._read_cycles = 0
        self._busy = False
        self._own = threading.local()
        """Set while this watcher writes, so its writer listener tells its own writes from
        other writers'."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # === public API =======================================================================
    def add(self, repo: Repository) -> None:
        """Watch the root and every non-ignored directory below it (one watch each).

        Reaching the inotify watch limit is not an error: a clear warning is logged and
        the repository is marked degraded (``degraded(repo.id)``); what is watched stays
        watched, and scheduled reconciliations keep the rest true. Call it before the
        repository's reconciliation, so nothing falls between the scan and the watch.

        Raises:
            RootUnavailable: the root cannot be watched (missing, not a directory).
        """
        with self._lock:
            current = self._repos.get(repo.id)
            if current is not None and not current.lost:
                return
            if current is not None:
                self._events.forget(current)
            writer = self.ledger.writer(repo)
            state = RepoWatch(repo, writer, self.ledger.rules(repo))
            self._repos[repo.id] = state
            if self._on_write not in writer.listeners:
                # Replaced, not appended to: another thread may be iterating over the list.
                writer.listeners = [*writer.listeners, self._on_write]
                writer.attach_live()  # scans of it confirm under the writer's lock only
            self._tree.watch(state, b"")
            watched = b"" in state.index.by_path
            if not watched and not state.degraded:
                del self._repos[repo.id]
                self._unlisten(state)
            self._events.update_metrics()
            count = len(state.index)
        if not watched and not state.degraded:
            raise RootUnavailable(
                f"repository {repo.name!r}: cannot watch root {repo.root_str}; is it mounted?"
            )
        log.info("File watcher started for repository %s", repo.id)
        log.info("Watching %d directories in repository %s", count, repo.id)

    def remove(self, repo_id: UUID) -> None:
        """Stop watching a repository; what was pending for it is dropped."""
        with self._lock:
            state = self._repos.pop(repo_id, None)
            if state is None:
                return
            self._events.forget(state)
            self._unlisten(state)
        self._realtime.finish(repo_id)
        log.info("File watcher stopped for repository %s", repo_id)

    def _unlisten(self, state: RepoWatch) -> None:
        writer = state.writer
        if self._on_write in writer.listeners:
            writer.listeners = [f for f in writer.listeners if f != self._on_write]
            writer.detach_live()

    def _on_write(self, repo: Repository, applied: Applied) -> None:
        """Writer listener: remember what other writers (reconciliations) changed, so that a
        directory rename written after them can be checked (see ``Applier``)."""
        if getattr(self._own, "active", False) or not applied.changes:
            return
        with self._lock:
            state = self._repos.get(repo.id)
            if state is None or state.lost:
                return
            now = time.monotonic()
            foreign = state.foreign
            for change in applied.changes:
                if change.kind is not ChangeKind.META:
                    foreign.append((now, change.path))
                    if change.old_path is not None:
                        foreign.append((now, change.old_path))
            while foreign and (foreign[0][0] < now - FOREIGN_WINDOW_S or len(foreign) > 100_000):
                foreign.popleft()

    def writing(self) -> bool:
        """Whether the calling thread is this watcher writing live changes (a writer
        listener tells the watcher's writes from a reconciliation's with it)."""
        return bool(getattr(self._own, "active", False))

    def check(self, repo_id: UUID, path: RelPath) -> None:
        """Watch ``path`` again and reconcile what is below it, soon (a filesystem mounted
        there again: mounting sends no event, and the old watches are on what it hid)."""
        with self._cond:
            state = self._repos.get(repo_id)
            if state is None or state.lost:
                return
            state.pending.check_path(path, time.monotonic())
            self._cond.notify_all()

    def is_watching(self, repo_id: UUID) -> bool:
        with self._lock:
            state = self._repos.get(repo_id)
            return state is not None and not state.lost and b"" in state.index.by_path

    def degraded(self, repo_id: UUID) -> bool:
        """Whether the repository hit the watch limit (some directories are not watched)."""
        with self._lock:
            state = self._repos.get(repo_id)
            return state is not None and state.degraded

    def start(self) -> None:
        """Start the reader and applier threads."""
        if self._threads or self._closed:
            return
        self._stop.clear()
        for target, name in (
            (self._read_loop, "fsledger-watch-read"),
            (self._apply_loop, "fsledger-watch-apply"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Flush everything pending, then stop the threads and close the backend."""
        if self._closed:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(30.0)
        self._threads = []
        try:
            self.flush()
        except Exception:
            log.exception("Watcher: flushing pending events at stop failed")
        self._realtime.finish()
        self._closed = True
        self.backend.close()
        log.info("File watcher stopped")

    def flush(self) -> None:
        """Read every event available and process everything pending now, debounce or not.

        A move still waiting for its other half counts as a move out or in."""
        for _ in range(5):
            self._drain(expire=True)
            if not self._process(force=True):
                break
        self._realtime.roll()

    def process_due(self) -> bool:
        """Read every event available and process what is due, as the background threads do
        (for tests and benchmarks that drive the watcher by hand). Returns whether
        anything was processed."""
        self._drain(expire=False)
        return self._process(force=False) > 0

    # === reading ==========================================================================
    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._read_once():
                    self._stop.wait(GATHER_S)
            except Exception:
                log.exception("Watcher: reading events failed")
                self._stop.wait(1.0)

    def _read_once(self) -> bool:
        """One read cycle; returns whether it read events while work was pending."""
        with self._read_lock:
            with self._lock:
                timeout = READ_TIMEOUT_S
                busy = self._busy or any(s.pending for s in self._repos.values())
                if busy:
                    timeout = BUSY_READ_TIMEOUT_S
                oldest = self._events.oldest_unpaired()
                if oldest is not None:
                    timeout = max(0.0, min(timeout, oldest + PAIR_WAIT_S - time.monotonic()))
            events = self.backend.read(timeout)
            with self._cond:
                now = time.monotonic()
                if events:
                    self._events.ingest(events, now)
                self._events.expire(now, force=False)
                self._read_cycles += 1
                self._cond.notify_all()
        self._dispatch_resyncs()
        return busy and bool(events)

    def _drain(self, expire: bool) -> None:
        with self._read_lock:
            while events := self.backend.read(0):
                with self._cond:
                    self._events.ingest(events, time.monotonic())
            with self._cond:
                self._events.expire(time.monotonic(), force=expire)
        self._dispatch_resyncs()

    def _dispatch_resyncs(self) -> None:
        with self._lock:
            requests, self._events.resyncs = self._events.resyncs, []
        for repo, prefix, reason in requests:
            where = f" of {show(prefix)}" if prefix else ""
            log.warning("Repository %s needs a reconciliation%s: %s", repo.id, where, reason)
            try:
                (self.on_resync or self._resync_here)(repo, prefix, reason)
            except Exception:
                log.exception("Resync request for repository %s failed", repo.id)

    def _resync_here(self, repo: Repository, prefix: RelPath, reason: str) -> None:
        """Without a manager: reconcile on a helper thread (recorded in sync_operations)."""

        def run() -> None:
            try:
                self.ledger.reconciler.reconcile(self.ledger.writer(repo), prefix=prefix)
            except FsledgerError as exc:
                log.warning("Reconciliation after '%s' failed for %s: %s", reason, repo.id, exc)

        threading.Thread(target=run, name="fsledger-watch-resync", daemon=True).start()

    # === processing =======================================================================
    def _apply_loop(self) -> None:
        hold, last_start, last_end = 0.0, 0.0, 0.0
        while not self._stop.is_set():
            try:
                with self._cond:
                    now = time.monotonic()
                    if now - last_end > 2 * MAX_HOLD_S:
                        hold = 0.0  # a lull: the next change is written at once
                    delay = self._next_delay(now)
                    if delay is not None:
                        delay = max(delay, last_start + hold - now)
                    if delay is None or delay > 0:
                        self._cond.wait(min(delay if delay is not None else 1.0, 1.0))
                        continue
                if self._stop.is_set():
                    break
                last_start = time.monotonic()
                taken = self._process(force=False)
                last_end = time.monotonic()
                if taken >= BURST_ITEMS:
                    hold = min(MAX_HOLD_S, max(HOLD_MIN_S, 2 * hold))
                elif taken:
                    hold = 0.0
                else:
                    # Due work held back by a directory move still waiting for its pair.
                    self._stop.wait(PAIR_WAIT_S / 4)
                self._realtime.roll()
            except Exception:
                log.exception("Watcher: processing events failed")
                self._stop.wait(1.0)

    def _next_delay(self, now: float) -> float | None:
        dues = [d for s in self._repos.values() if (d := s.pending.next_due()) is not None]
        return min(dues) - now if dues else None

    def _process(self, force: bool) -> int:
        """One pass over everything due (everything, with ``force``); returns how many
        items it took."""
        with self._process_lock:
            now = time.monotonic()
            with self._lock:
                if force:
                    self._events.expire(now, force=True)
                taken = [
                    (state, work)
                    for state in list(self._repos.values())
                    if not state.lost and (work := self._take(state, now, force))
                ]
                self._busy = bool(taken)
            count = sum(len(work) for _, work in taken)  # before the passes consume them
            try:
                for state, work in taken:
                    self._run(state, work)
            finally:
                self._busy = False
            self._dispatch_resyncs()
            return count

    def _take(self, state: RepoWatch, now: float, force: bool) -> Work | None:
        """Move the due part of a repository's pending state into a ``Work`` (caller holds
        the lock), resolving watch descriptors to the paths they have now."""
        if self._events.displacing(state) and not force:
            # A rename landed on a watched directory: until its exchange partner comes
            # (or the pair wait ends) nothing of this repository is written.
            return None
        pending = state.pending
        tree = self._tree
        state.move_log.clear()
        # Below a directory whose IN_MOVED_FROM is unpaired, paths are unknown until it
        # pairs (a rename) or expires (moved out): hold that subtree back.
        frozen_paths = self._events.frozen_paths(state)
        frozen_wds = {wd for p in frozen_paths for _, wd in state.index.subtree_wds(p)}

        def ready(due: float) -> bool:
            return force or due <= now

        moves: list[MoveJob] = []
        kept_moves: list[FileMove] = []
        kept_keys: set[Key] = set()
        """Names of the file renames held back: a later rename onto or from one of them
        (``mv x dirA/y`` held, then ``mv z x``) and a look at one would be written before
        it, replacing the record it still has to carry. They wait with it."""
        for move in pending.file_moves:
            if (
                move.src[0] in frozen_wds
                or move.dst[0] in frozen_wds
                or move.src in kept_keys
                or move.dst in kept_keys
            ):
                kept_moves.append(move)
                kept_keys.update((move.src, move.dst))
            else:
                moves.append(MoveJob(move, tree.key_path(move.src), tree.key_path(move.dst)))
        checks: list[Check] = []
        for wd, due in list(pending.check_wds.items()):
            if ready(due) and wd not in frozen_wds:
                del pending.check_wds[wd]
                if (path := tree.path_of(wd)) is not None:
                    checks.append(Check(path, wd))
        for path, due in list(pending.check_paths.items()):
            if ready(due) and not any(under(path, p) for p in frozen_paths):
                del pending.check_paths[path]
                checks.append(Check(path, None))
        dirty: list[DirtyJob] = []
        linked: set[int] = set()
        for key, entry in list(pending.dirty.items()):
            if ready(entry.due) and key[0] not in frozen_wds and key not in kept_keys:
                del pending.dirty[key]
                if (path := tree.key_path(key)) is not None:
                    dirty.append(DirtyJob(key, path, entry))
                elif entry.inode is not None:
                    linked.add(entry.inode)  # its directory is gone: its other names
        if not force:
            dirty = self._hold_open(state, dirty, now)
        links: list[DirtyJob] = []
        for key, entry in list(pending.links.items()):
            if ready(entry.due) and key[0] not in frozen_wds:
                del pending.links[key]
                if (path := tree.key_path(key)) is not None:
                    links.append(DirtyJob(key, path, entry))
        work = Work(pending.dir_moves, moves, checks, dirty, links, linked)
        work.frozen_wds, work.frozen_paths = frozen_wds, frozen_paths
        pending.dir_moves = []
        pending.file_moves = kept_moves
        return work if work else None

    def _hold_open(self, state: RepoWatch, dirty: list[DirtyJob], now: float) -> list[DirtyJob]:
        """The due looks, less the files written and not closed since that a writer still
        holds open (``SettleRule.held``): put back, due at their close, at the debounce
        after a later write, or when their hold is over (caller holds the lock). A writer
        stalled between two writes longer than the debounce (``cp`` under load) would
        otherwise leave a record, and a feed entry, of a partial size. Which are open is
        asked of ``/proc`` once for all of them (``openfiles``), and only for these: the
        others were closed or not written."""
        rule = self._events.rule
        suspects = [
            job
            for job in dirty
            if job.key is not None
            and job.dirty.open_since is not None
            and now < rule.hold_until(job.dirty.open_since)
        ]
        if not suspects:
            return dirty
        inodes: dict[int, tuple[int, int]] = {}
        try:
            # Below the root's descriptor: no symlinked directory on the way is followed.
            tree = Beneath(state.repo.root)
        except OSError:
            return dirty
        with tree:
            for job in suspects:
                try:
                    st = tree.lstat(job.path)
                except (OSError, ValueError):
                    continue
                if stat_mod.S_ISREG(st.st_mode):
                    inodes[id(job)] = (st.st_dev, st.st_ino)
        writing = open_for_writing(inodes.values()) if inodes else set()
        held = {
            id(job)
            for job in suspects
            if rule.held(job.dirty.open_since, now, inodes.get(id(job)) in writing)
        }
        if not held:
            return dirty
        self.metrics.writes_held += len(held)
        for job in dirty:
            if id(job) in held and job.key is not None:
                entry = job.dirty
                assert entry.open_since is not None
                # Its close (IN_CLOSE_WRITE: every writable descriptor sends one) or a
                # later write makes it due sooner; otherwise the hold's end does.
                entry.due = rule.hold_until(entry.open_since)
                newer = state.pending.dirty.get(job.key)
                if newer is None:
                    state.pending.dirty[job.key] = entry
                else:  # cannot happen under the lock; kept the newer's due and flags
                    newer.content |= entry.content
        return [job for job in dirty if id(job) not in held]

    def _run(self, state: RepoWatch, work: Work) -> None:
        """Process one repository's work, retrying database errors with backoff; what
        cannot be written is put back, never dropped."""
        if not self._root_ok(state):
            return
        stats = ScanStats()
        self._own.active = True
        try:
            self._apply_retrying(state, work, stats)
        except StoreError as exc:
            log.error(
                "Repository %s: cannot write live changes (%s); %d items kept for the next try",
                state.id,
                exc,
                len(work),
            )
            with self._lock:
                self._put_back(state, work)
            return
        except Exception as exc:
            log.exception("Watcher failed to process events of repository %s", state.id)
            with self._lock:
                self._events.request_resync(state, b"", f"watcher error: {exc}")
            return
        finally:
            self._own.active = False
            self._realtime.add(state.id, stats)
        self._catch_up()
        with self._lock:
            self._recheck_after_moves(state, work)

    def _catch_up(self) -> None:
        """Read every event queued before now. A directory renamed while this pass looked
        at the disk has its IN_MOVED_FROM/TO in the kernel queue already; once they are
        read, ``_recheck_after_moves`` sees the rename and looks at what it made stale."""
        reader = self._threads[0] if self._threads else None
        if reader is None or not reader.is_alive() or reader is threading.current_thread():
            self._drain(expire=False)
            return
        with self._cond:
            # The cycle in flight may have started before our last look; the next has not.
            target = self._read_cycles + 2
            deadline = time.monotonic() + 2.0
            while self._read_cycles < target and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("Watcher: the reader is slow to catch up (a large new tree?)")
                    break
                self._cond.wait(left)

    def _apply_retrying(self, state: RepoWatch, work: Work, stats: ScanStats) -> None:
        """Apply ``work``, waiting out database errors with exponential backoff (from
        ``retry_initial_s``, doubling up to ``retry_max_s``). While running, an outage is
        waited out for as long as it lasts; once stopping, the third failure is raised.
        (A loop of its own: a retry library would be one more dependency for ten lines.)"""
        wait = self.retry_initial_s
        attempt = 1
        while True:
            try:
                self._applier.run(state, work, stats)
                return
            except StoreError as exc:
                if self._stop.is_set() and attempt >= 3:
                    raise
                self.metrics.store_retries += 1
                log.warning(
                    "Repository %s: database error writing live changes (%s); retrying in "
                    "%.1fs (attempt %d), events are kept",
                    state.id,
                    exc,
                    wait,
                    attempt,
                )
                self._backoff(wait)
                wait = min(wait * 2, self.retry_max_s)
                attempt += 1

    def _backoff(self, seconds: float) -> None:
        self._stop.wait(seconds)  # stop() cuts a backoff short

    def _root_ok(self, state: RepoWatch) -> bool:
        """Never act on a root that is missing or on another device (an unmounted disk looks
        like a tree that lost everything)."""
        repo = state.writer.repo
        ok = root_present(repo.root, repo.root_dev)
        if not ok:
            with self._lock:
                if not state.lost:
                    self._events.lose(state, "the repository root is unavailable")
        return ok

    def _put_back(self, state: RepoWatch, work: Work) -> None:
        """Return unprocessed work to the pending state (caller holds the lock)."""
        if state.lost or self._repos.get(state.id) is not state:
            return
        pending = state.pending
        now = time.monotonic()
        pending.dir_moves[:0] = work.dir_moves
        pending.file_moves[:0] = [job.move for job in work.moves]
        for check in work.checks:
            if check.wd is not None and self._tree.owner(check.wd) is not None:
                pending.check_wd(check.wd, now)
            else:
                pending.check_path(check.path, now)
        for job in work.dirty:
            if job.key is not None:
                pending.requeue(job.key, now, job.dirty)
        for job in work.links:
            if job.key is not None and job.key not in pending.links:
                pending.links[job.key] = job.dirty
                job.dirty.due = now
        self._cond.notify_all()

    def _recheck_after_moves(self, state: RepoWatch, work: Work) -> None:
        """Directories renamed while this pass looked at the disk may have made what it saw
        stale (a file seen missing at its old path, a subtree that left a directory while
        it was being reconciled): look at those paths again."""
        if not state.move_log or state.lost:
            return
        moved_dirs = list(state.move_log)

        def hit(path: RelPath | None) -> bool:
            return path is not None and any(
                related(path, o) or related(path, n) for o, n, _ in moved_dirs
            )

        def forward(path: RelPath) -> RelPath:
            for old, new, _ in moved_dirs:
                path = moved(path, old, new)
            return path

        pending = state.pending
        due = time.monotonic() + self.settle_s
        for job in work.seen_dirty:
            if job.key is not None and hit(job.path):
                pending.requeue(job.key, due, job.dirty)
        for check in work.seen_checks:
            if not hit(check.path):
                continue
            if check.wd is not None and self._tree.owner(check.wd) is not None:
                pending.check_wd(check.wd, due)
            else:
                pending.check_path(forward(check.path), due)
            for old, new, wd in moved_dirs:
                if under(old, check.path) and old != check.path:
                    if wd is not None and self._tree.owner(wd) is not None:
                        pending.check_wd(wd, due)
                    else:
                        pending.check_path(forward(new), due)
        for mjob in work.taken_moves:
            if hit(mjob.src) or hit(mjob.dst):
                pending.requeue(mjob.move.src, due)
                pending.requeue(mjob.move.dst, due)
        self._cond.notify_all()
