"""Tier 2: walk the tree, compare it with the stored records, and repair the ledger.

The walk and the records are two streams sorted by path bytes; reconciliation is
their merge, so memory is bounded by the changes found, not by the size of the tree.
A file is hashed only when its ``lstat`` key (size, mtime_ns, ctime_ns, inode)
differs from its record, when its record has no hash, or when its mtime was "racy"
(within ``RACY_WINDOW_NS`` of the moment it was hashed: a later write could have
kept the same coarse mtime). A no-change rescan hashes nothing.

Nothing is deleted unless the root is healthy before *and* after the walk
(exists, same device, not suddenly empty), and nothing below a directory that
could not be listed is deleted at all.
"""

from __future__ import annotations

import collections
import errno
import gc
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from fsledger import decide
from fsledger.beneath import Beneath, is_dir_below
from fsledger.config import Settings
from fsledger.decide import RACY_WINDOW_NS, LookRule
from fsledger.errors import GuardRefused, RootUnavailable
from fsledger.hashing import HashOutcome, HashPool
from fsledger.merge import (
    RANGE_STALL_FACTOR,
    Absent,
    Look,
    Merge,
    MergeItem,
    NewFile,
    RangeResult,
    RangeTask,
    listing_slices,
    merge_range,
    plan_ranges,
    warm_store,
)
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    OperationStatus,
    OperationType,
    RelPath,
    Repository,
    ScanStats,
    SyncOperation,
    utcnow,
)
from fsledger.mounts import MountGuard
from fsledger.roots import check_root
from fsledger.store.base import Store
from fsledger.store.sql import prefix_range
from fsledger.walk import FileEntry, Listing, Unreadable, walk
from fsledger.writer import GENTLE_PACE, Applied, Batches, Hold, RepoWriter

if TYPE_CHECKING:
    from multiprocessing.pool import AsyncResult

log = logging.getLogger(__name__)

__all__ = ["RACY_WINDOW_NS", "Reconciler", "check_root", "owner_tag", "start_workers"]

CHUNK_FILES = 128
CHUNK_BYTES = 64 << 20
DEFER_INDEXES_AFTER = 50_000
"""A first index that has written this many records asks the store to defer the indexes
only queries use (``Store.defer_indexes``): rebuilding them at the end then costs less
than maintaining them did. Sooner when the store holds fewer records (see
``defer_indexes_after``)."""
INITIAL_BATCH = 5000
"""Changes per transaction while a repository is first indexed (RECONCILIATION_BATCH_SIZE
bounds the incremental work; the first index would be slowed by 100-row transactions)."""

PARALLEL_MIN_RECORDS = 20_000
"""From this many records, a rescan merges key ranges of the tree in worker processes."""
PARALLEL_MIN_DIRS = 32
"""A first index goes to worker processes when planning finds this many cut points (folders
of the tree's top levels), or any between the files of a big folder (``FILES_PER_CUT``)."""
RANGES_PER_WORKER = 4
"""Ranges a worker gets at least: several, so that uneven subtrees even out."""
RANGE_FILES = 10_000
MAX_RANGES = 512
INITIAL_RANGES = 256
"""Ranges of a first index, whose size is not known yet: every file of a range comes back
to the parent, so ranges stay small (~4k files at 1M) to keep its memory flat."""

MAX_ERRORS_KEPT = 1000
"""Errors listed in a scan's stats and logged one by one; the rest are only counted."""

Progress = Callable[[ScanStats], None]


def owner_tag() -> str:
    """``host:pid`` of this process, stored with operations it runs."""
    return f"{os.uname().nodename}:{os.getpid()}"  # socket.gethostname(), without socket


@dataclass(slots=True)
class _Job:
    """A file waiting to be hashed: what the walk saw and what the ledger had."""

    entry: FileEntry
    old: FileRecord | None
    hashed: HashOutcome | None = None
    """Already hashed (by the worker that merged its key range)."""


_gc_lock = threading.Lock()
_gc_scans = 0
_gc_threshold: tuple[int, int, int] | None = None
SCAN_GC_THRESHOLD = 50_000
"""Allocations between young-generation collections while a scan runs (Python's default:
700). A scan allocates a few objects a file, none in cycles, and keeps thousands alive in
its batches, which the default would traverse again and again: ~5% of a first index."""


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect cyclic garbage less often while any scan of this process runs."""
    global _gc_scans, _gc_threshold
    with _gc_lock:
        if _gc_scans == 0:
            _gc_threshold = gc.get_threshold()
            gc.set_threshold(max(SCAN_GC_THRESHOLD, _gc_threshold[0]), *_gc_threshold[1:])
        _gc_scans += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_scans -= 1
            if _gc_scans == 0 and _gc_threshold is not None:
                gc.set_threshold(*_gc_threshold)


class Reconciler:
    """Runs reconciliations. Owns (lazily) the worker processes that merge and hash.

    Args:
        store: the ledger.
        settings: batch size, concurrency, hashing choices.
        pool: worker processes started beforehand (see ``start_workers``); owned from here.
    """

    def __init__(self, store: Store, settings: Settings, pool: HashPool | None = None) -> None:
        self.store = store
        self.settings = settings
        self._pool = pool
        self._gentle_pool: HashPool | None = None
        """Workers of gentle (scheduled) runs: started for such a run, closed after it."""

    def close(self) -> None:
        self._close_gentle()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _close_gentle(self) -> None:
        if self._gentle_pool is not None:
            self._gentle_pool.close()
            self._gentle_pool = None

    def _hash_pool(self, gentle: bool = False) -> HashPool:
        if gentle:
            if self._gentle_pool is None:
                s = self.settings
                self._gentle_pool = HashPool(
                    s.max_concurrency, s.hash_algo, s.hash_timeout_s, gentle=True
                )
            return self._gentle_pool
        if self._pool is None:
            self._pool = HashPool(
                self.settings.max_concurrency, self.settings.hash_algo, self.settings.hash_timeout_s
            )
        return self._pool

    def reconcile(
        self,
        writer: RepoWriter,
        *,
        op_type: OperationType = OperationType.RECONCILIATION,
        verify: bool = False,
        force: bool = False,
        progress: Progress | None = None,
        prefix: RelPath = b"",
        record: bool = True,
        hold: Hold | None = None,
        gentle: bool = False,
        walked: Progress | None = None,
    ) -> ScanStats:
        """Make the ledger of ``writer.repo`` equal to its tree on disk.

        Args:
            writer: the repository's writer.
            op_type: what the ``sync_operations`` row says this run was.
            verify: rehash every file; content that changed while size and mtime did not is
                reported in ``stats.corrupt`` and its stored hash kept.
            force: override the mass-deletion guard (empty root, other device).
            progress: called with the running stats every thousand files.
            prefix: reconcile only the subtree below this directory (the watcher uses it for
                directories that moved in or were created).
            record: write a ``sync_operations`` row for the run.
            hold: given the created and modified changes of a batch, returns those that may
                be written now; the others are held back (the watcher's settle rule for
                files still being written into a new directory) and counted unsettled.
            gentle: a scheduled run: its worker processes run at nice 10 and the idle I/O
                class (workers of their own, closed after the run).
            walked: called once with the stats when the walk has ended (the moves, the
                deletions and the last writes follow): the phase a progress display shows.

        Raises:
            RootUnavailable, GuardRefused: the root failed the guard; nothing was changed.
            StoreError: the database failed; the operation is marked failed.
        """
        repo = writer.repo
        started = utcnow()
        t0 = time.monotonic()
        record_count = self.store.count_records(repo.id)
        if (
            not prefix
            and self.settings.max_concurrency >= 2
            and not repo.is_bucket
            and not 0 < record_count < PARALLEL_MIN_RECORDS
        ):
            # Ranges in workers (a big rescan, or a first index that may be cut in ranges):
            # start them while this process opens its operation. A small rescan merges here
            # and starts them only if it has more than one chunk of files to hash.
            self._hash_pool(gentle).start()
        has_records = record_count > 0
        op = self.store.start_operation(repo.id, op_type, owner_tag(), started) if record else None
        if record:
            log.info("Starting %s for repository %s (%s)", op_type.value, repo.id, repo.root_str)
        stats = ScanStats()
        try:
            if repo.is_bucket:
                from fsledger.s3.bucket import run_bucket  # boto3 only when a bucket is used

                with fewer_collections():
                    run_bucket(
                        self,
                        writer,
                        stats,
                        verify=verify,
                        record_count=record_count,
                        progress=progress,
                        prefix=prefix,
                        force=force,
                        hold=hold,
                    )
                return self._finish(op, stats, t0)
            dev = check_root(repo, has_records, writer.rules, force)
            mounts = MountGuard.load(self.store, repo, writer.rules, prefix, force)
            with fewer_collections():
                _Run(
                    self,
                    writer,
                    stats,
                    verify,
                    record_count,
                    progress,
                    prefix,
                    force=force,
                    dev=dev,
                    mounts=mounts,
                    hold=hold,
                    gentle=gentle,
                    walked=walked,
                ).run()
            stats.notes += mounts.remember(self.store)
        except Exception as exc:
            stats.duration_ms = int((time.monotonic() - t0) * 1000)
            if op is not None:
                self.store.finish_operation(
                    op.id, OperationStatus.FAILED, stats, str(exc), utcnow()
                )
            # A refused root is reported by whoever asked (the CLI's one error line, the
            # manager's "offline" line); anything else is an error worth its own line.
            log.log(
                logging.INFO if isinstance(exc, RootUnavailable) else logging.ERROR,
                "Reconciliation failed for repository %s: %s",
                repo.id,
                exc,
            )
            raise
        finally:
            if gentle:
                self._close_gentle()
        stats.duration_ms = int((time.monotonic() - t0) * 1000)
        if repo.root_dev != dev and not prefix:
            repo = _with_dev(repo, dev)
            self.store.update_repository(repo)
            writer.repo = repo
        return self._finish(op, stats, t0)

    def _finish(self, op: SyncOperation | None, stats: ScanStats, t0: float) -> ScanStats:
        """Close a completed run's operation row and log its counts."""
        stats.duration_ms = int((time.monotonic() - t0) * 1000)
        if op is None:
            return stats
        self.store.finish_operation(op.id, OperationStatus.COMPLETED, stats, None, utcnow())
        log.info(
            "Reconciliation completed: scanned=%d added=%d updated=%d removed=%d moved=%d "
            "hashed=%d errors=%d duration=%.1fs",
            stats.files_scanned,
            stats.files_added,
            stats.files_updated,
            stats.files_removed,
            stats.files_moved,
            stats.files_hashed,
            len(stats.errors),
            stats.duration_ms / 1000,
        )
        return stats


def start_workers(settings: Settings) -> HashPool | None:
    """Start a reconciler's worker processes ahead of the store (for ``Reconciler(pool=)``).

    A command that is about to scan calls this first: from a process that has no threads yet
    (no database pool) the workers are plain forks, which start at once with everything
    already imported, where a forkserver would start a new interpreter. ``None`` when there
    is nothing to gain (one worker).
    """
    if settings.max_concurrency < 2:
        return None
    from fsledger.store import import_backend

    import_backend(settings.database_url)  # imported once, here, not once per worker
    pool = HashPool(settings.max_concurrency, settings.hash_algo, settings.hash_timeout_s)
    pool.start(warm=partial(warm_store, settings.database_url))
    return pool


def scan_wants_workers(settings: Settings, refs: Sequence[str] = ()) -> bool:
    """Whether a command scanning the repositories ``refs`` (every one without) should start
    worker processes first (``start_workers``), asked before it opens the store.

    Not when every one of them is a rescan of fewer than ``PARALLEL_MIN_RECORDS`` records:
    such a scan merges in-process, and forking the workers, opening their connections and
    ending them would be most of a small repository's rescan (800 videos: ~0.05 s on a
    quiet machine, several times that on a busy one). Asked on SQLite only, with a
    read-only connection closed before anything forks (~1 ms). When in doubt (another
    store, a first index, a name it cannot match, a bucket, any error), yes.
    """
    if settings.max_concurrency < 2:
        return False
    try:
        found = _repository_counts(settings.database_url)
    except Exception:
        log.debug("counting records ahead of a scan", exc_info=True)
        return True
    if found is None:
        return True
    if refs:
        chosen = []
        for ref in refs:
            match = [r for r in found if ref in (r[0], r[1]) or r[2] == _root_of(ref)]
            if not match:
                return True
            chosen += match
    else:
        chosen = found
    return any(
        not 0 < count < PARALLEL_MIN_RECORDS or root.startswith(b"s3://")
        for _id, _name, root, count in chosen
    )


def _root_of(ref: str) -> bytes | None:
    try:
        return os.path.realpath(os.path.abspath(os.fsencode(ref))) if ref else None
    except (ValueError, OSError):
        return None


_COUNTS = (
    "SELECT r.id, r.name, r.root_path, "
    "(SELECT count(*) FROM file_records f WHERE f.repository_id = r.id) FROM repositories r"
)


def _repository_counts(url: str) -> list[tuple[str, str, bytes, int]] | None:
    """(id, name, root, records) of every repository; None for a store it cannot ask."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        import sqlite3
        from urllib.parse import quote

        path = "/" + url.removeprefix("sqlite://").lstrip("/")
        if not os.path.exists(path):
            return None
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute(_COUNTS).fetchall()
        finally:
            conn.close()
    else:
        # PostgreSQL: asking costs a connection of its own in this process, on the path to
        # the scan (~10-20 ms with the server's new backend), where the workers' warm-up
        # connections are made on the other core meanwhile: measured, no faster. Workers.
        return None
    return [(str(i), str(n), bytes(root), int(c)) for i, n, root, c in rows]


def defer_indexes_after(store: Store) -> int:
    """The records a first index writes before it asks the store to defer its query-only
    indexes. Rebuilding them sorts the records of every repository: worth it once this scan
    has written as many records as the others hold (up to ``DEFER_INDEXES_AFTER``), and at
    the first batch into a store that holds none (every insert of a big first index then
    skips them: a 100k-file first index, ~0.1 s less CPU in the writer than deferring
    after 50k)."""
    return min(DEFER_INDEXES_AFTER, max(INITIAL_BATCH, store.records_bound()))


def _with_dev(repo: Repository, dev: int) -> Repository:
    return replace(repo, root_dev=dev)


class _Run:
    """One reconciliation's state: the merge, the hashing pipeline and the batches."""

    def __init__(
        self,
        owner: Reconciler,
        writer: RepoWriter,
        stats: ScanStats,
        verify: bool,
        record_count: int,
        progress: Progress | None,
        prefix: RelPath = b"",
        *,
        force: bool = False,
        dev: int | None = None,
        mounts: MountGuard | None = None,
        hold: Hold | None = None,
        gentle: bool = False,
        walked: Progress | None = None,
    ) -> None:
        self.owner = owner
        self.walked = walked
        self.gentle = gentle
        self.hold = hold
        self.mounts = mounts
        """Filesystems mounted below the root: those not mounted now are walked as unreadable."""
        self.prefix = prefix.strip(b"/")
        self.force = force
        self.start_dev = dev
        """The root's device when the walk started (the guard accepted it)."""
        self.store = owner.store
        self.settings = owner.settings
        self.writer = writer
        self.repo = writer.repo
        self.stats = stats
        self.verify = verify
        self.record_count = record_count
        self.has_records = record_count > 0
        self.progress = progress
        self.algo = self.settings.hash_algo
        self.hashing = self.settings.calculate_hashes
        self.rule = LookRule(self.algo, self.hashing, verify)
        self.batch_size = (
            self.settings.batch_size
            if self.has_records
            else max(self.settings.batch_size, INITIAL_BATCH)
        )
        self.out = Batches(
            writer,
            self.batch_size,
            stats,
            defer_after=None if self.has_records else defer_indexes_after(writer.store),
            hold=hold,
            pace=GENTLE_PACE if gentle else 0.0,
        )
        """The changes, handed to the writer a batch at a time (one in flight)."""
        self.deletions: set[RelPath] = set()
        self._last_unreadable: Unreadable | None = None
        self._cuts: list[RelPath] | None = None
        self._listings: dict[RelPath, Listing] = {}
        """The planner's listings of the big folders its cuts fall in (``plan_ranges``)."""
        self.moved_from: set[RelPath] = set()
        self.displacing: list[Change] = []
        """Moves onto a path that has a record of its own (see ``_write_displacing``)."""
        self.vacating: set[RelPath] = set()
        """The sources of ``displacing``: their record leaves when those are written."""
        self.after_moves: list[tuple[Change, Change]] = []
        """Changes of a ``vacating`` path (it holds another file now), held back until the
        move away from it is written: as found, and as written after that move."""
        self.chunk: list[_Job] = []
        self.chunk_bytes = 0
        self.in_flight: collections.deque[tuple[list[_Job], AsyncResult[list[HashOutcome]]]] = (
            collections.deque()
        )
        self.now = utcnow()

    # --- the merge ----------------------------------------------------------------------
    def run(self) -> None:
        """The merge, then a walk of every directory the watcher renamed meanwhile.

        A directory renamed while the walk runs is written by the watcher as one prefix
        update of its records. If the walk had already passed the new name, and the records
        were not written yet (the first index, or changes still in this run's batch), the
        update moves nothing and the files would wait for the next reconciliation: so the
        new location is walked once more.
        """
        renamed: list[RelPath] = []

        def note(_repo: Repository, applied: Applied) -> None:
            renamed.extend(c.path for c in applied.changes if c.kind is ChangeKind.DIR_MOVED)

        writer = self.writer
        # Replaced, not appended to: another thread may be iterating over the list.
        writer.listeners = [*writer.listeners, note]
        try:
            self._merge()
            for _round in range(3):
                targets, renamed[:] = list(dict.fromkeys(renamed)), []
                for path in targets:
                    if is_dir_below(self.repo.root, path):
                        log.info(
                            "Repository %s: %s was renamed during the scan; walking it again",
                            self.repo.id,
                            os.fsdecode(path),
                        )
                        _Run(
                            self.owner,
                            writer,
                            self.stats,
                            self.verify,
                            max(self.record_count, 1),
                            None,
                            path,
                            force=self.force,
                            dev=self.start_dev,
                            mounts=self.mounts,
                            hold=self.hold,
                            gentle=self.gentle,
                        )._merge()
        finally:
            writer.listeners = [f for f in writer.listeners if f is not note]

    def _merge(self) -> None:
        try:
            self._merge_all()
        except BaseException:
            self.out.drain()
            raise
        finally:
            self.out.end_deferral()

    def _merge_all(self) -> None:
        rule = self.rule
        if self.settings.distributed and self.store.shares_scans and not self.prefix:
            self._merge_distributed(rule)
        elif self._ranges_worthwhile():
            self._merge_in_workers(rule)
        else:
            lo, hi = prefix_range(self.prefix) if self.prefix else (b"", None)
            merge = Merge(
                walk(self.repo.root, self.writer.rules, self.prefix, unreadable=self._keep()),
                self.store.iter_record_rows(self.repo.id, lo, hi),
                rule,
                self._tick if self.progress else None,
            )
            for item in merge:
                self._take(item)
            self.stats.files_scanned += merge.scanned
            self.stats.skipped_special += merge.specials
        self._dispatch_chunk(final=True)
        while self.in_flight:
            self._collect_one()
        if self.walked:
            self.walked(self.stats)
        self.out.flush()
        self.out.wait()
        self._write_displacing()
        self._apply_deletions()
        if self.progress:
            self.progress(self.stats)

    def _ranges_worthwhile(self) -> bool:
        """Merge (and hash) key ranges in worker processes: a whole tree, worth starting
        them for, a store they can open, and at least two of them.

        Worth it: a rescan of ``PARALLEL_MIN_RECORDS`` records or more, or a first index of
        a tree in which planning finds ``PARALLEL_MIN_DIRS`` cut points or a folder big
        enough to cut (its size is not known yet; the folders of its top levels, and a
        folder of thousands of files, are a fair sign of it).
        """
        if self.prefix or self.settings.max_concurrency < 2 or ":memory:" in self.store.url:
            return False
        if self.record_count >= PARALLEL_MIN_RECORDS:
            return True
        if self.record_count:
            return False
        self._cuts = plan_ranges(
            self.repo.root, self.writer.rules, INITIAL_RANGES, listings=self._listings
        )
        # A cut point that is not a directory key lies between the files of a big folder.
        between_files = any(not cut.endswith(b"/") for cut in self._cuts)
        return between_files or len(self._cuts) + 1 >= PARALLEL_MIN_DIRS

    def _merge_in_workers(self, rule: LookRule) -> None:
        pool = self.owner._hash_pool(self.gentle)
        if self._cuts is None:
            # About RANGE_FILES files a range: big enough to repay a task, small enough that
            # a range's differences (a first index: every file) stay a few megabytes.
            parts = max(RANGES_PER_WORKER * pool.workers, self.record_count // RANGE_FILES)
            self._cuts = plan_ranges(
                self.repo.root,
                self.writer.rules,
                min(parts, MAX_RANGES),
                listings=self._listings,
            )
        bounds: list[RelPath | None] = [b"", *self._cuts, None]
        keep = self._keep()
        tasks = [
            RangeTask(
                self.store.url,
                self.repo.id,
                self.repo.root,
                self.writer.rules,
                rule,
                lo,
                hi,
                keep,
                hash_looks=self.hashing,
                listings=listing_slices(self._listings, lo, hi) if self._listings else None,
            )
            for lo, hi in zip(bounds, bounds[1:], strict=False)
            if lo is not None
        ]
        self._listings = {}  # handed out: the parent need not keep them
        log.debug("Repository %s: merging %d key ranges in workers", self.repo.id, len(tasks))
        stall = RANGE_STALL_FACTOR * self.settings.hash_timeout_s
        try:
            for result in pool.map_ordered(merge_range, tasks, stall):
                self._take_range(result)
        except TimeoutError as exc:
            raise self._stalled(exc) from exc

    def _merge_distributed(self, rule: LookRule) -> None:
        """The merge as a job of key ranges that other agents help with (PostgreSQL,
        ``RECONCILIATION_DISTRIBUTED``; see ``fsledger.distscan``). The results come back in
        range order and go the way of a local merge's, except that a ``Look`` file hashed
        by whoever computed its range is not hashed again: its outcome, with the ``fstat``
        key it belongs to, is taken as the hashing workers' would be (and written as the
        writer writes theirs: see ``RepoWriter.check_ahead``)."""
        from fsledger.distscan import DistributedMerge

        dist = DistributedMerge(
            self.store,
            self.repo,
            self.writer.rules,
            rule,
            self._keep(),
            self.settings.max_concurrency,
            owner_tag(),
            self.settings.hash_timeout_s,
        )
        try:
            for result in dist.results():
                self._take_range(result)
        except TimeoutError as exc:
            raise self._stalled(exc) from exc
        others = {who: n for who, n in dist.done_by.items() if who != owner_tag()}
        if others:
            log.info("Repository %s: items computed by other agents: %s", self.repo.id, others)

    def _take_range(self, result: RangeResult) -> None:
        """One key range's result, computed in a worker process or by another agent (see
        ``fsledger.merge.compute_range``), taken in range order."""
        for item in result.items:
            if type(item) is tuple:
                self._take_new(item)
            else:
                self._take(item)  # type: ignore[arg-type]
        self.stats.files_scanned += result.scanned
        self.stats.skipped_special += result.specials
        if self.progress:
            self.progress(self.stats)

    def _stalled(self, exc: TimeoutError) -> RootUnavailable:
        return RootUnavailable(
            f"repository {self.repo.name!r}: part of {self.repo.root_str} stopped answering "
            f"({exc}; a hung network mount?). Nothing was deleted; the next scan retries."
        )

    def _keep(self) -> Mapping[RelPath, str] | None:
        """Directories to walk as unreadable: filesystems mounted there at the last scan and
        not now."""
        return self.mounts.unreadable if self.mounts is not None else None

    def _tick(self, scanned: int) -> None:
        assert self.progress is not None
        self.progress(replace(self.stats, files_scanned=self.stats.files_scanned + scanned))

    def _take(self, item: MergeItem) -> None:
        if type(item) is Look:
            self._compare(item.entry, item.old, item.hashed)
        elif type(item) is Absent:
            if item.path not in self.moved_from:
                self.deletions.add(item.path)
        else:
            assert isinstance(item, Unreadable)
            # A directory whose subtree spans two ranges is reported by both.
            if item != self._last_unreadable:
                self._error(item.path, item.error, item.is_dir)
            self._last_unreadable = item

    def _take_new(self, new: NewFile) -> None:
        """A file without a record, hashed by its range's worker (every file of a first
        index): created, unless it is a record's file moved here (a rescan's question)."""
        path, hex_, size, mtime_ns, ctime_ns, inode = new
        stat = FileStat(size, mtime_ns, ctime_ns, inode)
        if self.has_records:
            outcome = HashOutcome(hex_, size, mtime_ns, ctime_ns, inode)
            self._compare(FileEntry(path, stat), None, outcome)
            return
        self.stats.files_hashed += 1
        self.stats.bytes_hashed += size
        record = FileRecord(path, stat, Digest(self.algo, hex_), self.now)
        self._emit(Change(ChangeKind.CREATED, path, record))

    def _error(self, path: RelPath, message: str, is_dir: bool = False) -> None:
        text = f"{os.fsdecode(path) or '.'}{'/' if is_dir else ''}: {message}"
        self.stats.error_count += 1
        # A tree of a million unreadable files must not become a million-entry list.
        if len(self.stats.errors) < MAX_ERRORS_KEPT:
            self.stats.errors.append(text)
        if self.stats.error_count <= MAX_ERRORS_KEPT:
            log.warning("Repository %s: %s", self.repo.id, text)

    def _compare(
        self, entry: FileEntry, old: FileRecord | None, hashed: HashOutcome | None = None
    ) -> None:
        if self.hashing:
            if decide.needs_look(old, entry.stat, self.rule):
                self._queue(_Job(entry, old, hashed))
            return
        kind = decide.classify(old, entry.stat, None, self.rule)
        if kind is not None:
            self._emit(Change(kind, entry.path, self._record(entry, None)))

    def _record(
        self, entry: FileEntry, digest: Digest | None, stat: FileStat | None = None
    ) -> FileRecord:
        return FileRecord(entry.path, stat or entry.stat, digest, self.now)

    # --- hashing pipeline ---------------------------------------------------------------
    def _queue(self, job: _Job) -> None:
        self.chunk.append(job)
        if job.hashed is None:
            self.chunk_bytes += job.entry.stat.size
        if len(self.chunk) >= CHUNK_FILES or self.chunk_bytes >= CHUNK_BYTES:
            self._dispatch_chunk(final=False)

    def _take_chunk(self) -> list[_Job]:
        """Empty the chunk: moves detected, the jobs hashed already (by whoever computed
        their range) finished; what is left to hash."""
        jobs, self.chunk, self.chunk_bytes = self.chunk, [], 0
        if not jobs:
            return []
        jobs = self._detect_moves(jobs)
        done = [j for j in jobs if j.hashed is not None]
        if done:
            self._finish_jobs(done, [j.hashed for j in done if j.hashed is not None])
        return [j for j in jobs if j.hashed is None]

    def _dispatch_chunk(self, final: bool) -> None:
        jobs = self._take_chunk()
        if not jobs:
            return
        paths = [j.entry.path for j in jobs]
        root = self.repo.root
        if final and not self.in_flight:
            # Everything fits in one chunk: hashing here beats starting worker processes.
            sizes = [j.entry.stat.size for j in jobs]
            self._finish_jobs(
                jobs, self.owner._hash_pool(self.gentle).hash_here(root, paths, sizes)
            )
            return
        pool = self.owner._hash_pool(self.gentle)
        self.in_flight.append((jobs, pool.submit(root, paths)))
        while len(self.in_flight) > 2 * pool.workers:
            self._collect_one()

    def _collect_one(self) -> None:
        jobs, result = self.in_flight.popleft()
        pool = self.owner._hash_pool(self.gentle)
        outcomes = pool.collect(
            result,
            [j.entry.path for j in jobs],
            [j.entry.stat.size for j in jobs],
        )
        self._finish_jobs(jobs, outcomes)

    move_match: decide.MoveMatch = staticmethod(decide.is_move_of)
    """Whether a new path is a record's file moved there (buckets: ``is_object_move_of``)."""

    def _looker(self) -> _Looker:
        """Answers "is a record's file gone from its path?" (buckets: a HEAD)."""
        return _Looker(self.repo.root)

    def _detect_moves(self, jobs: list[_Job]) -> list[_Job]:
        """New paths whose inode, size and mtime match a record whose path is gone are moves:
        the record follows the file and keeps its hash."""
        if not self.has_records:
            return jobs
        # New paths, and paths whose record's file was replaced by another file (another
        # inode): ``mv a t; mv b a; mv t b`` leaves every path in place, each holding
        # another record's file.
        new = [j for j in jobs if j.old is None or j.old.stat.inode != j.entry.stat.inode]
        if not new:
            return jobs
        self._await_write()  # the records of this run's batches count too
        candidates = self.store.records_by_inode(self.repo.id, [j.entry.stat.inode for j in new])
        with self._looker() as looker:
            pairs = decide.pair_moves(
                [(j.entry.path, j.entry.stat) for j in new],
                candidates,
                self.rule,
                looker.gone,
                self.moved_from,
                match=self.move_match,
            )
        if not pairs:
            return jobs
        rest: list[_Job] = []
        for job in jobs:
            source = pairs.get(job.entry.path)
            if source is None:
                rest.append(job)
                continue
            self.deletions.discard(source.path)
            record = self._record(job.entry, source.digest)
            move = Change(ChangeKind.MOVED, job.entry.path, record, old_path=source.path)
            if job.old is None:
                self._emit(move)
            else:
                # Onto a record that may itself move (a swap, a cycle): written at the end,
                # after every move to a new path, in an order that keeps each record.
                self.displacing.append(move)
                self.vacating.add(source.path)
        return rest

    def _finish_jobs(self, jobs: list[_Job], outcomes: list[HashOutcome]) -> None:
        rule = self.rule
        for job, out in zip(jobs, outcomes, strict=True):
            entry, old = job.entry, job.old
            if out.error is not None:
                self._error(entry.path, f"cannot hash: {out.error}")
                kind = decide.classify(old, entry.stat, None, rule)
                if kind is not None:
                    self._emit(Change(kind, entry.path, self._record(entry, None)))
                continue
            if out.hex is None:  # unsettled: it changed while read; the next look settles it
                self.stats.unsettled += 1
                continue
            self.stats.files_hashed += 1
            self.stats.bytes_hashed += out.size
            stat = FileStat(out.size, out.mtime_ns, out.ctime_ns, out.inode)
            digest = Digest(self.algo, out.hex)
            if decide.corrupted(old, stat, digest, rule):
                assert old is not None and old.digest is not None
                self.stats.corrupt.append(os.fsdecode(entry.path))
                log.error(
                    "Suspected silent corruption in repository %s: %s (content changed, size "
                    "and mtime did not; stored hash %s kept, now %s)",
                    self.repo.id,
                    os.fsdecode(entry.path),
                    old.digest.hex,
                    digest.hex,
                )
                continue
            kind = decide.classify(old, stat, digest, rule)
            if kind is not None:
                self._emit(Change(kind, entry.path, self._record(entry, digest, stat)))

    # --- writing ------------------------------------------------------------------------
    def _emit(self, change: Change) -> None:
        path = change.path
        if path in self.moved_from:
            # The path's record moved away in this run: what is there now is another file,
            # written after that move, or the move would carry its record away.
            later = replace(change, kind=decide.after_move_away(change.kind))
            if path in self.vacating:
                self.after_moves.append((change, later))
                return
            change = later
        self.out.emit(change)

    def _await_write(self) -> None:
        self.out.wait()

    def _write_displacing(self) -> None:
        """The moves onto paths that had records of their own, once every other change of
        the run is written: each replaces its target's record, which may be one that moves
        away too, so they are written together, in an order that loses none
        (``RepoWriter.apply_moves``)."""
        if not self.displacing:
            return
        moves, self.displacing = self.displacing, []
        applied = self.writer.apply_moves(moves)
        self.stats.unsettled += len(applied.dropped)
        decide.count(self.stats, applied.changes)
        # The changes of the paths these moves vacated, now that their records are gone (a
        # move the disk moved past left its source's record: the change as found, then).
        kept = {m.old_path for m in applied.dropped}
        held, self.after_moves, self.vacating = self.after_moves, [], set()
        for found, later in held:
            self.out.emit(found if found.path in kept else later)
        if held:
            self.out.flush()
            self.out.wait()

    def _apply_deletions(self) -> None:
        if not self.deletions:
            return
        # The guard again, now that the walk is over: a root unmounted or emptied during the
        # walk looks like a tree that lost everything. The device is compared with the one
        # the walk started on, which ``force`` may have accepted in place of the recorded one.
        dev = check_root(self.repo, True, self.writer.rules, self.force)
        if self.start_dev is not None and dev != self.start_dev:
            raise GuardRefused(
                f"root {self.repo.root_str} changed device during the scan; nothing was deleted"
            )
        # Likewise a filesystem below the root unmounted during the walk.
        for point in self.mounts.unmounted_since_start() if self.mounts is not None else ():
            self._error(point, "unmounted during the scan; its records are kept", True)
            self.deletions = {p for p in self.deletions if not p.startswith(point + b"/")}
        self._keep_newly_ignored()
        for path in sorted(self.deletions):
            self._emit(Change(ChangeKind.DELETED, path))
        self.out.flush()
        self.out.wait()

    def _keep_newly_ignored(self) -> None:
        """Records the walk skipped only because of patterns the operator has not accepted
        (a root's own ``.fsledger.yaml``): kept while their file is there, and reported.
        Anyone who can write into the tree can write that file, and must not be able to
        make the feed announce a library deleted; ``scan --accept-ignores`` retires them."""
        rules, retire = self.writer.rules, self.writer.retire
        if rules is retire:
            return
        suspects = [p for p in self.deletions if rules.ignores_path(p)]
        suspects = [p for p in suspects if not retire.ignores_path(p)]
        if not suspects:
            return
        kept: list[RelPath] = []
        with _Looker(self.repo.root) as looker:
            kept = [p for p in suspects if looker.present(p)]
        if not kept:
            return
        self.deletions.difference_update(kept)
        example = os.fsdecode(min(kept)).encode("unicode_escape").decode("ascii")
        note = (
            f"{len(kept)} record(s) match ignore patterns of the root's .fsledger.yaml and are "
            f"kept (e.g. {example}); 'fsledger scan {self.repo.name} --accept-ignores' "
            "retires them"
        )
        self.stats.notes.append(note)
        log.warning("Repository %s: %s", self.repo.id, note)


class _Looker:
    """``lstat`` below a root for the move detection's question "is a record's file gone
    from its path?", resolved without symlinks; the root opened once per chunk."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._tree: Beneath | None = None

    def __enter__(self) -> _Looker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tree is not None:
            self._tree.close()

    def present(self, path: RelPath) -> bool:
        """Whether a regular file is at ``path`` (False if it cannot be seen)."""
        try:
            if self._tree is None:
                self._tree = Beneath(self.root)
            return stat_mod.S_ISREG(self._tree.lstat(path).st_mode)
        except OSError:
            return False

    def gone(self, rec: FileRecord) -> bool:
        try:
            if self._tree is None:
                self._tree = Beneath(self.root)
            st = self._tree.lstat(rec.path)
        except OSError as exc:
            return exc.errno in (errno.ENOENT, errno.ENOTDIR)
        return st.st_ino != rec.stat.inode or not stat_mod.S_ISREG(st.st_mode)
