"""One processing pass for one repository: look at the disk now, write what it says.

A pass runs four steps, in this order:

1. directory renames, as pure path rewrites of the stored records, in event order (one
   ``DIR_MOVED`` each: no file is looked at, nothing is rehashed);
2. file renames: when the file at the new path is the old record's file (same inode,
   size and mtime) the record follows it and keeps its hash (``MOVED``);
3. directory checks: subtrees that exist are reconciled (``Reconciler`` with a prefix),
   those that do not are cleared;
4. dirty paths: ``lstat`` each, hash when its ``lstat`` key differs from its record,
   and write ``CREATED``/``MODIFIED``/``META``/``DELETED`` in batches.

Steps 2-4 are state-based (they write what the disk shows when they look), so doing
them again after a database error is harmless; step 1 is consumed as soon as it commits.
Everything goes through the repository's ``RepoWriter``, which re-checks each change
against ``lstat`` under its lock: a change the disk has moved past is dropped, and its
path is looked at again.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable

from fsledger import decide
from fsledger.beneath import Beneath
from fsledger.config import Settings
from fsledger.errors import RootUnavailable
from fsledger.hashing import HashOutcome, hash_below
from fsledger.ledger import Ledger
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    RelPath,
    ScanStats,
    utcnow,
)
from fsledger.mounts import unmounted
from fsledger.walk import FileEntry, Unreadable, walk
from fsledger.watch.metrics import WatcherMetrics
from fsledger.watch.settle import wait_quiet
from fsledger.watch.state import (
    Check,
    DirMove,
    Dirty,
    DirtyJob,
    FileMove,
    MoveJob,
    RepoWatch,
    Work,
    below,
    moved,
    parent_of,
    show,
    swapped,
    under,
)
from fsledger.watch.tree import GONE, WatchTree
from fsledger.writer import Applied

log = logging.getLogger(__name__)

MIN_APPLY_BATCH = 1000
"""Changes per transaction at most, unless RECONCILIATION_BATCH_SIZE is larger."""
FOREIGN_SLACK_S = 5.0
"""How long before a rename was read it may have happened (the reader can lag)."""


class Applier:
    """Runs the steps of a pass (see the module docstring).

    Args:
        ledger: store, writers and reconciler.
        settings: hashing choices and the batch size.
        metrics: where close-to-row latencies go.
        lock: the watcher's lock, taken to touch pending state and the watch tree.
        tree: the watch tree (directories that need watching are watched before a check).
        settle_s: how soon a path that was dropped (the disk moved on) is looked at again.
        debounce_s: how soon a file that changed while it was hashed is looked at again.
        catch_up: reads the events queued before now (the watcher's reader).
    """

    def __init__(
        self,
        ledger: Ledger,
        settings: Settings,
        metrics: WatcherMetrics,
        lock: threading.RLock,
        tree: WatchTree,
        settle_s: float,
        debounce_s: float,
        catch_up: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.catch_up = catch_up
        """Lets the reader read every event queued before now (never called under the lock)."""
        self.store = ledger.store
        self.settings = settings
        self.metrics = metrics
        self.lock = lock
        self.tree = tree
        self.settle_s = settle_s
        self.debounce_s = debounce_s
        self.apply_batch = max(settings.batch_size, MIN_APPLY_BATCH)

    def run(self, repo: RepoWatch, work: Work, stats: ScanStats) -> None:
        """Process ``work``, consuming it as it commits.

        Raises:
            StoreError: the database failed; what is left in ``work`` is still to do.
        """
        self._dir_moves(repo, work, stats)
        self._file_moves(repo, work, stats)
        self._checks(repo, work, stats)
        self._links(repo, work)
        self._dirty(repo, work, stats)

    # --- 1. directory renames --------------------------------------------------------------
    def _dir_moves(self, repo: RepoWatch, work: Work, stats: ScanStats) -> None:
        moves = [m for m in work.dir_moves if m.old != m.new]
        if not moves:
            work.dir_moves = []
            return
        units = _units(moves)
        done: list[tuple[list[DirMove], bool]] = []
        """Each unit written (a rename, or the two halves of an exchange) and whether it was."""
        try:
            i = 0
            while i < len(units):
                if len(units[i]) == 2:  # an exchange: its own transaction
                    first, second = units[i]
                    if first is second:  # a half without its partner: see _units
                        done.append(([first], False))
                        i += 1
                        continue
                    applied = repo.writer.exchange(first.old, first.new)
                    done.append((units[i], bool(applied.changes)))
                    if applied.changes:
                        log.info(
                            "Directories exchanged: %s <-> %s (repository %s)",
                            show(first.old),
                            show(first.new),
                            repo.id,
                        )
                        stats.files_moved += 2
                    i += 1
                    continue
                j = i
                while j < len(units) and len(units[j]) == 1:
                    j += 1
                run = [u[0] for u in units[i:j]]
                changes = [Change(ChangeKind.DIR_MOVED, m.new, old_path=m.old) for m in run]
                applied = repo.writer.apply(changes, confirm=self._hops(repo, run, changes))
                kept = {id(c) for c in applied.changes}
                done += [([m], id(c) in kept) for m, c in zip(run, changes, strict=True)]
                for change in applied.changes:
                    log.info(
                        "Directory moved: %s -> %s (repository %s)",
                        show(change.old_path or b""),
                        show(change.path),
                        repo.id,
                    )
                stats.files_moved += len(applied.changes)
                i = j
        finally:
            written = {id(m) for unit, _ in done for m in unit}
            work.dir_moves = [m for m in moves if id(m) not in written]
            self._after_dir_moves(repo, done, work)

    def _after_dir_moves(
        self, repo: RepoWatch, done: list[tuple[list[DirMove], bool]], work: Work
    ) -> None:
        with self.lock:
            foreign = list(repo.foreign)
        # Walk the batch in order, in the path space the records are in after each rename.
        # A dropped rename (its directory moved on again, or is gone, before it was written)
        # leaves its new location "hollow": the records never came, and a later rename out
        # of a hollow subtree brings nothing either. Such locations are made true from the
        # disk instead (the reconciler's inode-based move detection still keeps the hashes
        # of files that only moved), as are renames another writer raced (below).
        hollow: list[RelPath] = []
        checks: list[Check] = []
        for unit, ok in done:
            if not ok:
                for move in unit:
                    hollow.append(move.new)
                    checks += [Check(move.new, move.wd), Check(move.old, None)]
                continue
            move = unit[0]
            if len(unit) == 2:  # an exchange: each side's paths go to the other side

                def step(path: RelPath, a: RelPath = move.old, b: RelPath = move.new) -> RelPath:
                    return swapped(path, a, b)

                carried_hollow = any(under(move.old, h) or under(move.new, h) for h in hollow)
            else:

                def step(path: RelPath, a: RelPath = move.old, b: RelPath = move.new) -> RelPath:
                    return moved(path, a, b)

                carried_hollow = any(under(move.old, h) for h in hollow)
            hollow = [step(h) for h in hollow]
            checks = [Check(step(c.path), c.wd) for c in checks]
            raced = any(
                t >= move.read_at - FOREIGN_SLACK_S and (under(p, move.old) or under(p, move.new))
                for t, p in foreign
            )
            if carried_hollow:
                hollow += [m.new for m in unit]
            if carried_hollow or raced:
                if raced:
                    # Another writer (a reconciliation) changed records on either side
                    # between the rename and its rewrite: it may have dropped records the
                    # rewrite was to carry, or written some the rewrite replaced.
                    log.info(
                        "Repository %s: %s was renamed while a reconciliation ran; scanning it",
                        repo.id,
                        show(move.new),
                    )
                checks += [Check(m.new, m.wd) for m in unit]
        work.checks += checks

    def _hops(
        self, repo: RepoWatch, moves: list[DirMove], changes: list[Change]
    ) -> Callable[[Change], bool]:
        """The writer's ``confirm`` for renames whose directory has been renamed again since:
        ``mv D0 C/D1 && mv C/D1 D2`` leaves no directory at ``C/D1`` by the time the first
        rename is written, yet it happened, and the feed's consumers know the files by the
        paths it gives them. The writer's disk check cannot confirm such a hop; the watch
        tree can (the directory's watch names where it is now). When the tree does not know
        yet, the reader is first let to read the events queued meanwhile.

        Asked by the writer, under its lock, at the moment it finds the disk moved on: a
        verdict taken before the write would race the next rename (``mv C/D1 D2`` landing
        between the verdict and the write drops the hop)."""
        by_id = {id(c): m for m, c in zip(moves, changes, strict=True)}
        caught_up = False

        def moved_on(move: DirMove) -> bool:
            with self.lock:
                now_at = self.tree.path_of(move.wd)
            return now_at is not None and now_at != move.new

        def confirm(change: Change) -> bool:
            nonlocal caught_up
            move = by_id.get(id(change))
            if move is None:
                return False
            if moved_on(move):
                return True
            if caught_up or self.catch_up is None:
                return False
            caught_up = True
            self.catch_up()
            return moved_on(move)

        return confirm

    # --- 2. file renames -------------------------------------------------------------------
    def _file_moves(self, repo: RepoWatch, work: Work, stats: ScanStats) -> None:
        """Write the file renames of this pass as one set (``apply_moves`` orders a swap or a
        cycle). A rename whose file has moved on again (``a -> t`` read, ``t -> b`` done on
        disk but maybe not read yet) waits for its next hop, and with it every rename that
        shares a path with it (``c -> a`` would replace the record ``a -> t`` still has to
        carry) and every dirty look at one of those paths: writing part of an entangled set
        loses the identity of the file that waits."""
        changes: list[Change] = []
        now = utcnow()
        sources = [job.src for job in work.moves if job.src is not None]
        records = self.store.get_records(repo.id, sources)  # as before any of them is written
        rule = self._rule()
        looked: list[tuple[MoveJob, os.stat_result | None]] = []
        moved_on: list[MoveJob] = []
        with _Tree(repo.repo.root) as tree:
            for job in work.moves:
                src, dst = job.src, job.dst
                if src is None or dst is None or src == dst or src not in records:
                    continue
                try:
                    st = tree.lstat(dst)
                except OSError as exc:
                    # Moved into a directory that cannot be searched (chmod 000): which
                    # file is there cannot be known. The record stays; the look at each
                    # name (queued with the rename) marks the directory, which is scanned
                    # again when it can be read (RepoWatch.failed).
                    log.info(
                        "Repository %s: cannot look at %s (%s); its rename waits for a scan",
                        repo.id,
                        show(dst),
                        exc,
                    )
                    self._failed(repo, parent_of(dst))
                    continue
                if st is None and not job.move.retried:
                    # Renamed on again before this pass looked: put back, to join its next hop.
                    moved_on.append(job)
                looked.append((job, st))
        held: list[MoveJob] = []
        if moved_on:
            if self.catch_up is not None:
                # The next hop happened before our lstat: its events are queued already.
                # Read them, so that the put-back below joins it now.
                self.catch_up()
            held = _entangled(work.moves, moved_on)
        held_ids = {id(job) for job in held}
        for job, st in looked:
            if id(job) in held_ids or st is None or not stat_mod.S_ISREG(st.st_mode):
                continue
            src, dst = job.src, job.dst
            assert src is not None and dst is not None
            old = records[src]
            stat = FileStat.from_stat(st)
            if not decide.is_move_of(old, dst, stat, rule):
                continue  # not the same content any more: the dirty look at dst decides
            record = FileRecord(dst, stat, old.digest, now)
            changes.append(Change(ChangeKind.MOVED, dst, record, old_path=src))
        if held:
            self._put_back_moves(repo, held, {id(job.move) for job in moved_on}, work)
            # Pending again: a retry of this pass after a database error must not write them.
            work.moves = [job for job in work.moves if id(job) not in held_ids]
        if changes:
            # In an order that never replaces a record still to move (a swap, a cycle).
            applied = repo.writer.apply_moves(changes)
            self._committed(repo, applied, stats)
            # A rename changes the ctime of the file's other names (hard links).
            moved = list(applied.changes)
            work.dirty += self._link_peers(
                repo, moved, {c.path for c in moved}, frozen_wds=work.frozen_wds
            )
        work.moves = []

    def _put_back_moves(
        self, repo: RepoWatch, held: list[MoveJob], moved_on: set[int], work: Work
    ) -> None:
        """Put file renames back into the pending work, in their order, ahead of what was
        read since (caller does not hold the lock). Those whose file had moved on
        (``moved_on``: ids of their ``FileMove``) are put back once: a later hop from their
        target joins them into one move, as the event reader joins hops it reads together;
        without one (the file was deleted) the next pass drops them. The dirty looks of
        this pass at any of their paths wait with them: a look now would write a half-done
        cycle (a file recorded anew at the name another file still has to leave)."""
        keys = {k for job in held for k in (job.move.src, job.move.dst)}
        paths = {p for job in held for p in (job.src, job.dst) if p is not None}
        with self.lock:
            pending = repo.pending
            back: list[FileMove] = []
            for job in held:
                move = job.move
                if id(move) not in moved_on:
                    back.append(move)
                    continue
                move.retried = True
                later = next((m for m in pending.file_moves if m.src == move.dst), None)
                if later is not None:
                    # Joined with its next hop: progress, so it may wait again.
                    later.src = move.src
                    later.retried = False
                else:
                    back.append(move)
            pending.file_moves[:0] = back
            due = time.monotonic() + self.settle_s
            for key in keys:
                pending.requeue(key, due)
            kept: list[DirtyJob] = []
            for look in work.dirty:
                if look.key is not None and (look.key in keys or look.path in paths):
                    pending.requeue(look.key, due, look.dirty)
                else:
                    kept.append(look)
            work.dirty = kept

    def _rule(self) -> decide.LookRule:
        return decide.LookRule(self.settings.hash_algo, self.settings.calculate_hashes)

    # --- 3. directory checks ---------------------------------------------------------------
    def _checks(self, repo: RepoWatch, work: Work, stats: ScanStats) -> None:
        """Reconcile directories that exist (outermost first), then clear those that do not."""
        existing: list[RelPath] = []
        gone: list[RelPath] = []
        work.seen_checks += work.checks
        watched = {c.path: c.wd for c in work.checks if c.wd is not None}
        for path in dict.fromkeys(c.path for c in work.checks):
            kind = self._dir_kind(repo, path)
            if kind == "dir":
                existing.append(path)
            elif kind == "gone":
                wd = watched.get(path)
                with self.lock:
                    now_at = self.tree.path_of(wd)
                    elsewhere = now_at is not None and now_at != path
                    if elsewhere and wd is not None:
                        # Watched, elsewhere: renamed since this pass took its work. Its
                        # records go with that rename; look at it where it is next time.
                        repo.pending.check_wd(wd, time.monotonic() + self.settle_s)
                if not elsewhere:
                    gone.append(path)
        # Sorted by path + "/", a directory's subtree directly follows it.
        tops: list[RelPath] = []
        for path in sorted(existing, key=lambda p: p + b"/" if p else b""):
            if not tops or not under(path, tops[-1]):
                tops.append(path)
        if gone:
            # A filesystem unmounted below the root may take its mount point with it (an
            # automounter): what was below it is not gone, and the reconciliation, which
            # knows the mount points, keeps it.
            away = self._unmounted(repo)
            tops += [p for p in gone if any(under(p, m) for m in away)]
            gone = [p for p in gone if not any(under(p, m) for m in away)]
        for path in tops:
            if path and not self.store.page_records(repo.id, None, 1, path):
                self._list_new(repo, path, work, stats)
            else:
                self._reconcile_below(repo, path, work, stats)
        for path in gone:
            with self.lock:
                for p in [p for p in repo.disputed if under(p, path)]:
                    del repo.disputed[p]
            self._clear_below(repo, path, stats)
            parent = repo.index.by_path.get(parent_of(path))
            if parent is not None:  # a file may have taken the directory's name
                name = path.rpartition(b"/")[2]
                work.dirty.append(DirtyJob((parent, name), path, Dirty(0.0)))
        work.checks = []

    def _dir_kind(self, repo: RepoWatch, path: RelPath) -> str:
        if path and repo.rules.ignores_path(path):
            return "gone"
        try:
            with Beneath(repo.repo.root) as tree:
                st = tree.lstat(path)
        except OSError as exc:
            if exc.errno in GONE:
                return "gone"
            log.warning(
                "Repository %s: cannot look at %s (%s); its records are kept",
                repo.id,
                show(path),
                exc,
            )
            self._failed(repo, parent_of(path) if exc.errno == errno.EACCES else path)
            return "unknown"
        return "dir" if stat_mod.S_ISDIR(st.st_mode) else "gone"

    def _reconcile_below(
        self, repo: RepoWatch, path: RelPath, work: Work, stats: ScanStats
    ) -> None:
        # Watched first (a no-op for directories the reader already watched), so that what
        # is created during the scan is seen by one or the other.
        self._caught_up_if_disputed(repo, path)
        with self.lock:
            self.tree.watch(repo, path)
            self._absorb_checks(repo, path, work)
        try:
            result = self.ledger.reconciler.reconcile(
                repo.writer,
                prefix=path,
                record=False,
                hold=lambda changes: self._hold(repo, changes, work),
            )
        except RootUnavailable as exc:
            # The guard looks at the root; for a subtree it means the directory went away
            # meanwhile (its events tell where), or the root did (the next pass's root check
            # stops watching and asks for a reconciliation).
            log.info("Repository %s: %s not scanned: %s", repo.id, show(path), exc)
            return
        work.covered.append(path)
        stats.add(result)
        with self.lock:
            if result.errors:
                repo.failed.add(path)  # some of it could not be read: see RepoWatch.failed
            else:
                repo.failed = {f for f in repo.failed if not under(f, path)}
        changed = result.files_added + result.files_updated + result.files_removed
        log.log(
            logging.INFO if changed or result.files_moved else logging.DEBUG,
            "Directory scanned: %s (repository %s): added=%d updated=%d removed=%d moved=%d",
            show(path),
            repo.id,
            result.files_added,
            result.files_updated,
            result.files_removed,
            result.files_moved,
        )

    def _caught_up_if_disputed(self, repo: RepoWatch, path: RelPath) -> None:
        """Before walking ``path`` again for a directory an earlier walk found otherwise
        than the watch tree had it (``RepoWatch.disputed``), let the reader read every
        event queued until now: the disk's word is taken on this walk, which must not be
        ahead of events that were merely slow to be read (a busy machine)."""
        with self.lock:
            disputed = any(under(p, path) for p in repo.disputed)
        if disputed and self.catch_up is not None:
            self.catch_up()

    def _list_new(self, repo: RepoWatch, path: RelPath, work: Work, stats: ScanStats) -> None:
        """A directory with nothing stored below it (created, or moved in): no reconciliation
        needed, its files join this pass's dirty paths (and its large batches)."""
        self._caught_up_if_disputed(repo, path)
        with self.lock:
            self.tree.watch(repo, path)
            self._absorb_checks(repo, path, work)
        found: list[FileEntry] = []
        for item in walk(repo.repo.root, repo.rules, path):
            if isinstance(item, FileEntry):
                found.append(item)
            elif isinstance(item, Unreadable):
                self._failed(repo, item.path if item.is_dir else parent_of(item.path))
        found = self._moved_into_new(repo, found, stats)
        with self.lock:
            work.dirty += self._settle_listed(repo, found)

    def _moved_into_new(
        self, repo: RepoWatch, found: list[FileEntry], stats: ScanStats
    ) -> list[FileEntry]:
        """Of the files a listing of a new directory found, write those that are recorded
        files moved there as moves; returns the others.

        ``mkdir new && mv a/f new/`` (or a directory moved into a directory just made) sends
        the IN_MOVED_TO to a watch that did not exist yet: only the IN_MOVED_FROM arrives,
        which alone would count as a move out, and the listing would find a new file. The
        file is the record's (same inode, size and mtime, its old path no longer holds it,
        as a reconciliation pairs moves), so it keeps its identity and its hash."""
        if not found:
            return found
        candidates = self.store.records_by_inode(repo.id, [f.stat.inode for f in found])
        if not candidates:
            return found
        with _Tree(repo.repo.root) as tree:

            def gone(rec: FileRecord) -> bool:
                try:
                    st = tree.lstat(rec.path)
                except OSError:
                    return False  # cannot know: not a move
                return st is None or st.st_ino != rec.stat.inode or not stat_mod.S_ISREG(st.st_mode)

            pairs = decide.pair_moves(
                [(f.path, f.stat) for f in found], candidates, self._rule(), gone
            )
        if not pairs:
            return found
        now = utcnow()
        moves = [
            Change(
                ChangeKind.MOVED,
                f.path,
                FileRecord(f.path, f.stat, pairs[f.path].digest, now),
                old_path=pairs[f.path].path,
            )
            for f in found
            if f.path in pairs
        ]
        self._committed(repo, repo.writer.apply_moves(moves), stats)
        return [f for f in found if f.path not in pairs]

    def _settle_listed(self, repo: RepoWatch, found: list[FileEntry]) -> list[DirtyJob]:
        """Files a listing of a new directory found, under the settle rule of every other
        path (caller holds the lock): a file is recorded once closed or quiet.

        A program that creates a directory and writes into it may still have its files
        open when the listing comes (their IN_CREATE came before the watch existed).
        Events read since the watch landed decide when such a file is looked at (an
        IN_CLOSE_WRITE, or the debounce after its last IN_MODIFY); a file without any is
        looked at now if its ctime is older than the debounce, otherwise when it will be
        (a write before then sends events, which push it further). Returns the files to
        look at in this pass; the others wait in the pending state."""
        pending = repo.pending
        wds = {p: repo.index.by_path.get(p) for p in {parent_of(f.path) for f in found}}
        now, wall_ns = time.monotonic(), time.time_ns()
        jobs: list[DirtyJob] = []
        for file in found:
            wd = wds[parent_of(file.path)]
            if wd is None:  # not watched (the watch limit): no event would tell more
                jobs.append(DirtyJob(None, file.path, Dirty(0.0)))
                continue
            key = (wd, file.path.rpartition(b"/")[2])
            if not wait_quiet(pending, key, file.stat.ctime_ns, now, wall_ns, self.debounce_s):
                jobs.append(DirtyJob(key, file.path, Dirty(0.0)))
        return jobs

    def _hold(self, repo: RepoWatch, changes: list[Change], work: Work) -> list[Change]:
        """Of the created/modified records a subtree reconciliation is about to write, those
        that may be written now; the others (files not closed or quiet yet: ``wait_quiet``)
        wait in the pending state, to be looked at as any path an event touched (and are
        not covered by the reconciliation: ``Work.held``)."""
        now, wall_ns = time.monotonic(), time.time_ns()
        kept: list[Change] = []
        with self.lock:
            for change in changes:
                assert change.record is not None
                wd = repo.index.by_path.get(parent_of(change.path))
                key = (wd, change.path.rpartition(b"/")[2]) if wd is not None else None
                ctime_ns = change.record.stat.ctime_ns
                if key is None or not wait_quiet(
                    repo.pending, key, ctime_ns, now, wall_ns, self.debounce_s
                ):
                    kept.append(change)
                else:
                    work.held.add(change.path)
        return kept

    def _failed(self, repo: RepoWatch, path: RelPath) -> None:
        """Remember a directory that could not be read (see ``RepoWatch.failed``)."""
        with self.lock:
            repo.failed.add(path)

    def _absorb_checks(self, repo: RepoWatch, top: RelPath, work: Work) -> None:
        """Take the pending checks of directories in ``top``'s subtree (caller holds the lock):
        the walk of ``top`` about to start covers them, as their watches are in place
        already. Without this, a directory a burst keeps filling (``tar -x`` creating year,
        month and event folders) is listed once with its parent, then, when its own check
        comes due, reconciled again with records below it: seconds of rescanning a subtree
        that is still growing, while the rest of the burst waits."""
        pending = repo.pending
        for path, wd in repo.index.subtree_wds(top):
            if wd in pending.check_wds and wd not in work.frozen_wds:
                del pending.check_wds[wd]
                work.seen_checks.append(Check(path, wd))
        for path in [p for p in pending.check_paths if under(p, top)]:
            if path in repo.disputed:
                continue  # to be walked again once the events that explain it are read
            if not any(under(path, f) for f in work.frozen_paths):
                del pending.check_paths[path]
                work.seen_checks.append(Check(path, None))

    def _clear_below(self, repo: RepoWatch, path: RelPath, stats: ScanStats) -> None:
        if not path:
            return  # a whole repository is never cleared from events
        batch: list[Change] = []
        for record in self.store.iter_records(repo.id, prefix=path):
            batch.append(Change(ChangeKind.DELETED, record.path))
            if len(batch) >= self.apply_batch:
                self._committed(repo, repo.writer.apply(batch), stats)
                batch = []
        if batch:
            self._committed(repo, repo.writer.apply(batch), stats)

    # --- 4. dirty paths --------------------------------------------------------------------
    def _links(self, repo: RepoWatch, work: Work) -> None:
        """Ignored names an event touched (``Pending.links``): when one is a file with other
        links, the records with its inode are other names of it, and what the event did
        (a write through the ignored name, a new link) changed them too. They are looked
        at in this pass, as dirty paths; the ignored name itself is never recorded."""
        if not work.links:
            return
        hints: dict[int, bool] = {}
        with _Tree(repo.repo.root) as tree:
            for job in work.links:
                try:
                    st = tree.lstat(job.path)
                except OSError:
                    continue  # cannot be looked at: its other names wait for a reconciliation
                if st is not None and stat_mod.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    hints[st.st_ino] = hints.get(st.st_ino, False) or job.dirty.content
        work.links = []
        if not hints:
            return
        records = self.store.records_by_inode(repo.id, sorted(hints))
        if not records:
            return
        with self.lock:
            wds = {r.path: repo.index.by_path.get(parent_of(r.path)) for r in records}
        work.dirty += [
            DirtyJob(
                (wd, r.path.rpartition(b"/")[2]) if (wd := wds[r.path]) is not None else None,
                r.path,
                Dirty(0.0, content=hints.get(r.stat.inode, True)),
            )
            for r in records
        ]

    def _dirty(self, repo: RepoWatch, work: Work, stats: ScanStats) -> None:
        """Look at the dirty paths a batch at a time: one query for the batch's records, then
        each path's lstat (and hash), then one transaction for what changed."""
        looked: set[RelPath] = set()
        relooked: set[RelPath] = set()
        if work.linked:
            # Names written through and gone with their directory (``Dirty.inode``).
            work.dirty += self._link_peers(repo, [], looked, work.linked, work.frozen_wds)
            work.linked = set()
        while work.dirty:
            jobs = work.dirty[: self.apply_batch]
            todo: list[DirtyJob] = []
            for job in jobs:
                work.seen_dirty.append(job)
                if job.path in looked or (
                    job.path not in work.held and any(below(job.path, t) for t in work.covered)
                ):
                    continue  # looked at already, or reconciled after the event was read
                looked.add(job.path)
                todo.append(job)
            records = self.store.get_records(repo.id, [job.path for job in todo])
            batch: list[Change] = []
            with _Tree(repo.repo.root) as tree:
                for job in todo:
                    change, again = self._look(
                        repo, tree, job.path, records.get(job.path), job.dirty, work
                    )
                    stats.files_scanned += 1
                    if again and job.key is not None:
                        with self.lock:
                            due = time.monotonic() + self.debounce_s
                            repo.pending.requeue(job.key, due, job.dirty)
                    if change is not None:
                        batch.append(change)
            if any(c.kind is ChangeKind.DELETED for c in batch):
                batch = self._keep_unmounted(repo, batch)
            self._commit_dirty(repo, batch, jobs, stats)
            del work.dirty[: len(jobs)]
            gone = {
                old.stat.inode
                for c in batch
                if c.kind is ChangeKind.DELETED and (old := records.get(c.path)) is not None
            }
            # A name with other links when its event was read (``Dirty.inode``): they are
            # looked at too, whatever this look found (the name gone, replaced, unchanged
            # since a look at another name): a record of it may never have existed.
            gone |= {job.dirty.inode for job in todo if job.dirty.inode is not None}
            work.dirty += self._link_peers(repo, batch, looked, gone, work.frozen_wds, relooked)

    def _link_peers(
        self,
        repo: RepoWatch,
        batch: list[Change],
        looked: set[RelPath],
        gone: set[int] | None = None,
        frozen_wds: set[int] | None = None,
        relooked: set[RelPath] | None = None,
    ) -> list[DirtyJob]:
        """Other names of the files just written (hard links: records with the same inode),
        to be looked at in this pass too. A write through one name changes the content of
        all of them, but inotify reports only the name written (and nothing at all for a
        name in another directory); a new link, a rename or an unlink of one name (``gone``:
        the inodes of records just deleted, or of names that had other links when their
        event was read, ``Dirty.inode``) changes the others' ctime. Looks are
        state-based, so a record that merely shares an inode number (another filesystem
        mounted below the root) costs one lstat and changes nothing.

        A name looked at earlier in the pass (``looked``) is looked at once more
        (``relooked``) when its record is not what this batch recorded for its file: its
        look raced the write through the other name (``ln c.jpg p.jpg``, then a write
        through p.jpg that truncates first: c.jpg recorded empty)."""
        fresh: dict[int, set[FileStat]] = {}
        for c in batch:
            if c.record is not None and c.kind in (
                ChangeKind.CREATED,
                ChangeKind.MODIFIED,
                ChangeKind.META,
                ChangeKind.MOVED,
            ):
                fresh.setdefault(c.record.stat.inode, set()).add(c.record.stat)
        inodes = {
            c.record.stat.inode
            for c in batch
            if c.record is not None
            and c.kind
            in (ChangeKind.CREATED, ChangeKind.MODIFIED, ChangeKind.META, ChangeKind.MOVED)
        }
        inodes |= gone or set()
        if not inodes:
            return []
        peers: list[RelPath] = []
        for r in self.store.records_by_inode(repo.id, sorted(inodes)):
            if r.path not in looked:
                peers.append(r.path)
            elif (
                relooked is not None
                and r.path not in relooked
                and (stats := fresh.get(r.stat.inode)) is not None
                and (len(stats) > 1 or r.stat not in stats)
            ):
                relooked.add(r.path)
                looked.discard(r.path)
                peers.append(r.path)
        with self.lock:
            wds = {p: repo.index.by_path.get(parent_of(p)) for p in peers}
            waiting = self._pending_peers(repo, inodes, looked, frozen_wds or set())
        return waiting + [
            DirtyJob(
                (wd, path.rpartition(b"/")[2]) if (wd := wds[path]) is not None else None,
                path,
                Dirty(0.0, content=True),
            )
            for path in peers
        ]

    def _pending_peers(
        self, repo: RepoWatch, inodes: set[int], looked: set[RelPath], frozen_wds: set[int]
    ) -> list[DirtyJob]:
        """Pending names (not recorded yet, or waiting) known to be other links of
        ``inodes`` (``Dirty.inode``): taken from the pending state into this pass (caller
        holds the lock). ``ln y x`` while a writer holds y open: x comes due, its inode is
        open for writing, so it is held (``SettleRule.held``); the writer's close is read
        for y alone, and x, without a record to find it by, would wait out its hold."""
        jobs: list[DirtyJob] = []
        pending = repo.pending.dirty
        for key, entry in list(pending.items()):
            if entry.inode is None or entry.inode not in inodes or key[0] in frozen_wds:
                continue
            path = self.tree.key_path(key)
            if path is None or path in looked:
                continue
            del pending[key]
            jobs.append(DirtyJob(key, path, entry))
        return jobs

    def _unmounted(self, repo: RepoWatch) -> list[RelPath]:
        """Remembered mount points below the root that are not mounted now."""
        return unmounted(self.store, repo.writer.repo, repo.rules)

    def _keep_unmounted(self, repo: RepoWatch, batch: list[Change]) -> list[Change]:
        """Drop deletions below a filesystem that is not mounted any more: an event read
        from it (a bind mount detached sends none of its own) finds its files "gone"."""
        away = self._unmounted(repo)
        if not away:
            return batch
        kept = [
            c for c in batch if c.kind is ChangeKind.DELETED and any(under(c.path, m) for m in away)
        ]
        for change in kept:
            log.warning(
                "Repository %s: %s is below a filesystem that is not mounted now; its record "
                "is kept",
                repo.id,
                show(change.path),
            )
        ids = {id(c) for c in kept}
        return [c for c in batch if id(c) not in ids]

    def _commit_dirty(
        self, repo: RepoWatch, batch: list[Change], jobs: list[DirtyJob], stats: ScanStats
    ) -> None:
        if batch:
            applied = repo.writer.apply(batch)
            self._committed(repo, applied, stats)
            if applied.dropped:
                # The disk moved on between our look and the write: look again.
                dropped = {c.path for c in applied.dropped}
                due = time.monotonic() + self.settle_s
                with self.lock:
                    for job in jobs:
                        if job.path in dropped and job.key is not None:
                            repo.pending.requeue(job.key, due, job.dirty)
                            job.dirty.closed_at = None
        for job in jobs:
            self._sample(job)

    def _sample(self, job: DirtyJob) -> None:
        if job.dirty.closed_at is not None:
            self.metrics.record_latency((time.monotonic() - job.dirty.closed_at) * 1000)
            job.dirty.closed_at = None

    def _look(
        self,
        repo: RepoWatch,
        tree: _Tree,
        path: RelPath,
        old: FileRecord | None,
        dirty: Dirty,
        work: Work,
    ) -> tuple[Change | None, bool]:
        """What the disk says about ``path`` now, as a change to its record ``old`` (if any),
        and whether to look again later (it changed while it was being hashed). The
        decisions are ``fsledger.decide``'s, the same a reconciliation makes."""
        try:
            st = tree.lstat(path)
        except OSError as exc:
            log.warning(
                "Repository %s: cannot look at %s (%s); its record is kept",
                repo.id,
                show(path),
                exc,
            )
            self._failed(repo, parent_of(path))  # issue 13 item 7: looked at again
            return None, False
        if st is None or not stat_mod.S_ISREG(st.st_mode):
            return (Change(ChangeKind.DELETED, path) if old is not None else None), False
        key = FileStat.from_stat(st)
        now = utcnow()
        rule = self._rule()
        if not rule.hashing:
            kind = decide.classify(old, key, None, rule)
            return (Change(kind, path, FileRecord(path, key, None, now)) if kind else None), False
        if not decide.needs_look(old, key, rule, content_hint=dirty.content):
            return None, False
        cached = work.hashed.get(path)
        if cached is not None and cached[0] == key:
            stat, digest = cached
        else:
            out = tree.hash(path, rule.algo, self.settings.max_concurrency, key)
            if out.error is not None:
                log.warning(
                    "Failed to calculate hash for %s (repository %s): %s",
                    show(path),
                    repo.id,
                    out.error,
                )
                kind = decide.classify(old, key, None, rule)
                record = FileRecord(path, key, None, now)
                return (Change(kind, path, record) if kind else None), False
            if out.hex is None:
                return None, True  # written while we read it: look again later
            stat = FileStat(out.size, out.mtime_ns, out.ctime_ns, out.inode)
            digest = Digest(rule.algo, out.hex)
            work.hashed[path] = (stat, digest)
        kind = decide.classify(old, stat, digest, rule)
        if kind is None:
            return None, False
        return Change(kind, path, FileRecord(path, stat, digest, now)), False

    def _committed(self, repo: RepoWatch, applied: Applied, stats: ScanStats) -> None:
        """Count (as a reconciliation does) and log what a writer wrote (the seed's lines)."""
        decide.count(stats, applied.changes)
        rid = repo.id
        for change in applied.changes:
            kind, path = change.kind, show(change.path)
            if kind is ChangeKind.CREATED:
                log.info("File created: %s (repository %s)", path, rid)
            elif kind is ChangeKind.MODIFIED:
                log.info("File modified: %s (repository %s)", path, rid)
            elif kind is ChangeKind.DELETED:
                log.info("File deleted: %s (repository %s)", path, rid)
            elif kind is ChangeKind.MOVED:
                log.info(
                    "File moved: %s -> %s (repository %s)",
                    show(change.old_path or b""),
                    path,
                    rid,
                )
            elif kind is ChangeKind.META:
                log.debug("File metadata updated: %s (repository %s)", path, rid)


class _Tree:
    """The repository's root for one batch of looks: ``lstat`` and hashing below it without
    following symlinks (``fsledger.beneath``). A root that cannot be opened makes every
    ``lstat`` raise, so nothing is taken for deleted."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._tree: Beneath | None = None
        self._error: OSError | None = None
        try:
            self._tree = Beneath(root)
        except OSError as exc:
            self._error = exc

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tree is not None:
            self._tree.close()

    def lstat(self, rel: RelPath) -> os.stat_result | None:
        """The ``lstat`` of ``rel``, ``None`` if it is gone (or a symlink stands where one
        of its directories was).

        Raises:
            OSError: its state cannot be known (EACCES, EIO, the root unavailable).
        """
        if self._tree is None:
            assert self._error is not None
            raise self._error
        try:
            return self._tree.lstat(rel)
        except OSError as exc:
            if exc.errno in GONE:
                return None
            raise

    def hash(self, rel: RelPath, algo: str, threads: int, expect: FileStat) -> HashOutcome:
        if self._tree is None:
            return HashOutcome(None, error=str(self._error))
        return hash_below(self._tree, rel, algo, threads, expect)


def _entangled(moves: list[MoveJob], seeds: list[MoveJob]) -> list[MoveJob]:
    """The renames of ``moves`` (in order) that share a path with ``seeds``, directly or
    through other renames: a set that must be written together or not at all."""
    names: set[object] = set()
    for job in seeds:
        names.update((job.move.src, job.move.dst, job.src, job.dst))
    names.discard(None)
    held = {id(job) for job in seeds}
    grown = True
    while grown:
        grown = False
        for job in moves:
            if id(job) in held:
                continue
            mine = {job.move.src, job.move.dst, job.src, job.dst} - {None}
            if mine & names:
                held.add(id(job))
                names |= mine
                grown = True
    return [job for job in moves if id(job) in held]


def _units(moves: list[DirMove]) -> list[list[DirMove]]:
    """Directory renames as written: one each, except the two halves of an exchange
    (``renameat2(RENAME_EXCHANGE)``: X -> Y, then Y -> X marked ``exchange``), which are
    one swap; written one after the other, the second would take the records the first
    just moved. A second half whose first half is not right before it cannot be written
    as a swap: it is left unwritten (a unit that fails), so both sides are scanned."""
    units: list[list[DirMove]] = []
    for move in moves:
        prev = units[-1] if units else None
        if (
            move.exchange
            and prev is not None
            and len(prev) == 1
            and (prev[0].old, prev[0].new) == (move.new, move.old)
        ):
            prev.append(move)
        elif move.exchange:
            units.append([move, move])  # no partner: not written (see _dir_moves)
        else:
            units.append([move])
    return units
