"""The library API: what the CLI, the HTTP API and the SyncManager call.

``Ledger`` holds one store, one ``RepoWriter`` per repository (the only path by
which records change) and the reconciler with its hashing workers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from fsledger.activity import Activity
from fsledger.config import Settings
from fsledger.errors import (
    ConfigError,
    FsledgerError,
    RepositoryExists,
    RepositoryNotFound,
    RootUnavailable,
)
from fsledger.ignore import IgnoreRules
from fsledger.leanread import FILES_PAGE
from fsledger.model import (
    Condition,
    ConditionKind,
    DuplicateGroup,
    FeedEntry,
    FileRecord,
    LastScan,
    OperationStatus,
    OperationType,
    RelPath,
    RepoSettings,
    Repository,
    RepoState,
    ScanStats,
    SyncOperation,
    SyncStatus,
    utcnow,
)
from fsledger.progress import Estimate
from fsledger.roots import stat_new_root
from fsledger.s3.location import S3Location, is_s3_url
from fsledger.store import Store, open_store
from fsledger.store.base import ServerInfo

if TYPE_CHECKING:
    # The scanning machinery (worker processes, hashing, the writer) is imported when a
    # command first scans or writes: reading commands (files, status, changes) start
    # without it.
    from fsledger.feed import Cursor, Feed, FeedPage, FilesPage
    from fsledger.hashing import HashPool
    from fsledger.reconcile import Progress, Reconciler
    from fsledger.schedule import Quiet, ScheduleView
    from fsledger.writer import Applied, RepoWriter

log = logging.getLogger(__name__)

SLOW_TOTALS_S = 0.05
"""A status's record totals slower than this are reused for a while (``Ledger.record_totals``)."""
TOTALS_REUSE = 10
TOTALS_REUSE_FROM = 100_000
"""Records below which the totals are always exact (a slow answer there is a busy machine)."""


def normalize_root(path: str | bytes) -> bytes:
    """An absolute, symlink-resolved root path as bytes."""
    raw = os.fsencode(path)
    if not raw:
        raise ConfigError("a repository path cannot be empty")
    if b"\0" in raw:
        raise ConfigError(f"a repository path cannot contain a NUL byte: {path!r}")
    return os.path.realpath(os.path.abspath(raw))


class Ledger:
    """One store and everything that writes to it.

    Args:
        settings: the configuration, read once at the edge.
        store: an open store; opened from ``settings.database_url`` when omitted.
        pool: the reconciler's worker processes, when started beforehand
            (``fsledger.reconcile.start_workers``).
    """

    def __init__(
        self, settings: Settings, store: Store | None = None, pool: HashPool | None = None
    ) -> None:
        self.settings = settings
        try:
            self.store = store or open_store(settings.database_url)
        except BaseException:
            if pool is not None:
                pool.close()
            raise
        self._pool = pool
        self._reconciler: Reconciler | None = None
        self._writers: dict[UUID, RepoWriter] = {}
        self._lock = threading.Lock()
        self._counts: dict[UUID, tuple[int, tuple[int, int]]] = {}
        """Record totals (count, bytes) by repository, with the feed head they were read at."""
        self._totals_kept: dict[UUID, tuple[float, tuple[int, int]]] = {}
        self._activity = Activity(self.store)

    @property
    def reconciler(self) -> Reconciler:
        """Tier 2 of this ledger, made on first use."""
        with self._lock:
            if self._reconciler is None:
                from fsledger.reconcile import Reconciler

                self._reconciler = Reconciler(self.store, self.settings, self._pool)
                self._pool = None  # the reconciler owns it now
            return self._reconciler

    def close(self) -> None:
        if self._reconciler is not None:
            self._reconciler.close()
        elif self._pool is not None:
            self._pool.close()
        self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- repositories -------------------------------------------------------------------
    def add_repository(
        self,
        path: str | bytes,
        name: str | None = None,
        settings: RepoSettings | None = None,
    ) -> Repository:
        """Register a directory tree (without scanning it).

        Raises:
            RootUnavailable: the path is not an existing directory.
            RepositoryExists: the name or the root is taken.
        """
        if is_s3_url(os.fsencode(path)):
            return self._add_bucket(os.fsdecode(path), name, settings or RepoSettings())
        root = normalize_root(path)
        stat_new_root(root)
        repo_name = name or os.fsdecode(os.path.basename(root)) or "root"
        for other in self.store.list_repositories():
            inside = root.startswith(other.root + b"/") or other.root.startswith(root + b"/")
            if inside:
                raise RepositoryExists(
                    f"{os.fsdecode(root)} overlaps repository {other.name!r} "
                    f"({other.root_str}); repositories cannot nest"
                )
        repo = Repository(
            id=uuid.uuid4(), name=repo_name, root=root, settings=settings or RepoSettings()
        )
        self.store.add_repository(repo)
        log.info("Repository %s added: %s (%s)", repo.id, repo.name, repo.root_str)
        return repo

    def _add_bucket(self, url: str, name: str | None, settings: RepoSettings) -> Repository:
        """Register ``s3://BUCKET[/PREFIX]`` (the URL as its root: no secrets; the endpoint
        in its settings), once the bucket answered a listing.

        Raises:
            ConfigError: a bad URL or endpoint, or an option a bucket cannot have.
            RootUnavailable: the bucket is missing, refuses the credentials or is unreachable.
            RepositoryExists: the name is taken, or the prefix overlaps another repository's.
        """
        location = S3Location.parse(url, settings.endpoint_url)
        if settings.trust_repo_config:
            raise ConfigError("a bucket has no .fsledger.yaml to trust")
        root = str(location).encode()
        repo = Repository(
            id=uuid.uuid4(),
            name=name or (location.prefix.rstrip("/").rpartition("/")[2] or location.bucket),
            root=root,
            settings=settings,
        )
        for other in self.store.list_repositories():
            if not other.is_bucket:
                continue
            theirs = S3Location.parse(other.root_str, other.settings.endpoint_url)
            same = theirs.bucket == location.bucket and theirs.endpoint_url == location.endpoint_url
            if same and (
                theirs.prefix.startswith(location.prefix)
                or location.prefix.startswith(theirs.prefix)
            ):
                raise RepositoryExists(
                    f"{location} overlaps repository {other.name!r} ({other.root_str}); "
                    "repositories cannot nest"
                )
        from fsledger.s3.bucket import Bucket

        problem = Bucket(repo).problem()
        if problem is not None:
            raise RootUnavailable(f"cannot add {location}: {problem}")
        self.store.add_repository(repo)
        log.info("Repository %s added: %s (%s)", repo.id, repo.name, repo.root_str)
        return repo

    def list_repositories(self) -> list[Repository]:
        return self.store.list_repositories()

    def repository(self, repo_id: UUID) -> Repository | None:
        """The stored repository with that id, if any."""
        return self.store.get_repository(repo_id)

    def resolve(self, ref: str, base: str | None = None) -> Repository:
        """Find a repository by id, name or root path (relative to ``base``, a client's
        working directory, when given; else to this process's).

        Raises:
            RepositoryNotFound: nothing matches.
        """
        repos = self.store.list_repositories()
        try:
            rid = UUID(ref)
        except ValueError:
            rid = None
        for repo in repos:
            if repo.id == rid or repo.name == ref:
                return repo
        if is_s3_url(ref):
            root = str(S3Location.parse(ref)).encode()
        else:
            root = normalize_root(os.path.join(base, ref) if base else ref) if ref else b""
        for repo in repos:
            if repo.root == root:
                return repo
        known = ", ".join(r.name for r in repos) or "none yet; add one with 'fsledger repo add'"
        raise RepositoryNotFound(f"no repository {ref!r} (known: {known})")

    def remove_repository(self, repo: Repository, purge: bool = False) -> None:
        with self._lock:
            self._writers.pop(repo.id, None)
        self.store.delete_repository(repo.id, purge)
        log.info(
            "Repository %s removed from sync manager%s",
            repo.id,
            " (records purged)" if purge else "",
        )

    def set_state(self, repo: Repository, state: RepoState) -> Repository:
        """Mark a repository online or offline (records are kept either way)."""
        current = self.store.get_repository(repo.id) or repo
        if current.state is state:
            return current
        updated = replace(current, state=state)
        self.store.update_repository(updated)
        with self._lock:
            if (w := self._writers.get(repo.id)) is not None:
                w.repo = updated
        log.warning("Repository %s is now %s", repo.id, state.value)
        return updated

    # --- writing ------------------------------------------------------------------------
    def rules(self, repo: Repository) -> IgnoreRules:
        """What the walker and the watcher skip: the operator's and the trusted file's
        patterns."""
        return IgnoreRules.default(repo.settings.walk_patterns)

    def retiring_rules(self, repo: Repository, accept_ignores: bool = False) -> IgnoreRules:
        """The rules whose matches lose their records while still on disk: the operator's
        only, plus the root file's when the operator accepts them (``--accept-ignores``)."""
        settings = repo.settings
        if accept_ignores or not settings.file_ignore_patterns:
            return self.rules(repo)
        return IgnoreRules.default(settings.ignore_patterns)

    def writer(self, repo: Repository) -> RepoWriter:
        """The one writer of ``repo`` in this process."""
        with self._lock:
            w = self._writers.get(repo.id)
            if w is None and repo.is_bucket:
                from fsledger.s3.bucket import ObjectWriter

                w = ObjectWriter(
                    self.store,
                    repo,
                    self.rules(repo),
                    retire=self.retiring_rules(repo),
                    max_concurrency=self.settings.max_concurrency,
                )
                self._writers[repo.id] = w
            if w is None:
                from fsledger.writer import RepoWriter

                w = RepoWriter(self.store, repo, self.rules(repo), retire=self.retiring_rules(repo))
                self._writers[repo.id] = w
            return w

    def follow_config(self, repo: Repository) -> Repository:
        """Bring the stored copy of the root's ``.fsledger.yaml`` up to date (read only if
        the operator trusts it; cleared when the file is gone) and return the repository."""
        from fsledger.repoconfig import follow_file

        if repo.is_bucket:
            return repo
        updated = follow_file(repo)
        if updated is not repo:
            self.store.update_repository(updated)
            log.info(
                "Repository %s: settings of the root's .fsledger.yaml now: %s",
                repo.id,
                {k: v for k, v in updated.settings.to_json().items() if k.startswith("file_") and v}
                or "none",
            )
        return updated

    def set_settings(self, repo: Repository, settings: RepoSettings) -> Repository:
        """The operator's settings of a repository (CLI, API). Its own ignore patterns
        retire the records they match at the next scan."""
        current = self.store.get_repository(repo.id) or repo
        updated = self.follow_config(replace(current, settings=settings))
        self.store.update_repository(updated)
        with self._lock:
            if (w := self._writers.get(repo.id)) is not None:
                w.refresh(updated, self.rules(updated), self.retiring_rules(updated))
        log.info("Repository %s: settings set by the operator", repo.id)
        return updated

    def scan(
        self,
        repo: Repository,
        *,
        verify: bool = False,
        force: bool = False,
        op_type: OperationType = OperationType.RECONCILIATION,
        progress: Progress | None = None,
        prefix: RelPath = b"",
        accept_ignores: bool = False,
        gentle: bool = False,
        walked: Progress | None = None,
    ) -> ScanStats:
        """Reconcile one repository (or the subtree below ``prefix``) with the disk (tier 2).

        A root that fails the guard marks the repository offline and raises; a
        successful scan marks it online. ``accept_ignores``: records that the root's own
        ``.fsledger.yaml`` ignores are retired too (otherwise they are kept and reported).
        ``gentle``: hash in workers at nice 10 and the idle I/O class (scheduled runs).
        ``walked``: called when the walk has ended (see ``Reconciler.reconcile``).
        """
        writer = self.writer(repo)
        # The stored copy is the newest: another process (or an earlier --force) may have
        # changed its device, state or settings since this one was read.
        repo = self.follow_config(self.store.get_repository(repo.id) or repo)
        writer.refresh(repo, self.rules(repo), self.retiring_rules(repo, accept_ignores))
        try:
            stats = self.reconciler.reconcile(
                writer,
                op_type=op_type,
                verify=verify,
                force=force,
                progress=progress,
                prefix=prefix,
                gentle=gentle,
                walked=walked,
            )
        except RootUnavailable:
            self.set_state(repo, RepoState.OFFLINE)
            raise
        finally:
            if accept_ignores:  # for this scan only
                writer.refresh(writer.repo, self.rules(repo), self.retiring_rules(repo))
        if writer.repo.state is not RepoState.ONLINE:
            self.set_state(writer.repo, RepoState.ONLINE)
        return stats

    def object_hints(self, bucket: str, keys: list[str]) -> list[tuple[Repository, Applied]]:
        """Hints of S3 event notifications: objects ``keys`` of ``bucket`` changed (created,
        overwritten or removed). Each key below a bucket repository's prefix is looked at
        (HEAD, and a GET if its change key moved) and its record written through the
        repository's writer. Returns what each repository concerned wrote.

        Raises:
            RootUnavailable: a bucket could not be reached (its hints are not applied).
        """
        from fsledger.s3.bucket import ObjectWriter, look_at

        out: list[tuple[Repository, Applied]] = []
        for repo in self.store.list_repositories():
            if not repo.is_bucket or repo.state is not RepoState.ONLINE:
                continue
            location = S3Location.parse(repo.root_str, repo.settings.endpoint_url)
            if location.bucket != bucket:
                continue
            paths = [
                location.relative(k).encode("utf-8", "surrogateescape")
                for k in keys
                if k.startswith(location.prefix) and not k.endswith("/")
            ]
            if not paths:
                continue
            writer = self.writer(repo)
            assert isinstance(writer, ObjectWriter)
            applied = look_at(
                writer, paths, self.settings.hash_algo, self.settings.calculate_hashes
            )
            out.append((repo, applied))
        return out

    # --- reading ------------------------------------------------------------------------
    def files(self, repo: Repository, prefix: RelPath = b"") -> Iterator[FileRecord]:
        """Every record of a repository (below ``prefix``), in path byte order."""
        after: RelPath | None = None
        while batch := self.store.page_records(repo.id, after, FILES_PAGE, prefix):
            yield from batch
            after = batch[-1].path

    def files_page(
        self,
        repo: Repository,
        after: RelPath | None = None,
        limit: int = 1000,
        prefix: RelPath = b"",
    ) -> FilesPage:
        """One page of records (below directory ``prefix``) with paths after ``after``, in
        path byte order. Paging by the last path is stable under concurrent writes: a file
        present throughout is listed exactly once. The first page (``after`` None) carries
        the feed cursor to follow once every page is read (see ``FilesPage.feed_cursor``)."""
        head = self.feed.head() if after is None else None
        records = self.store.page_records(repo.id, after, limit, prefix)
        last = records[-1].path if len(records) == limit else None
        from fsledger.feed import FilesPage

        return FilesPage(tuple(records), last, head)

    def directory_count(self, repo: Repository) -> int:
        """How many directories hold the repository's records, the root included: what the
        watcher needs an inotify watch for (at least: empty directories have no record)."""
        return count_directories(row.path for row in self.store.iter_record_rows(repo.id))

    # --- the database itself (fsledger doctor) ------------------------------------------
    def server_info(self) -> ServerInfo:
        """What the database is, its version and its clock."""
        return self.store.server_info()

    def write_problem(self) -> str | None:
        """Why this process could not write the ledger, or None when it can."""
        return self.store.write_problem()

    # --- the change feed ----------------------------------------------------------------
    @property
    def feed(self) -> Feed:
        """The change feed of this ledger's store."""
        from fsledger.feed import Feed

        return Feed(self.store)

    def changes(
        self,
        since: Cursor | str | None = None,
        limit: int = 1000,
        repository: Repository | None = None,
    ) -> FeedPage:
        """Up to ``limit`` changes after the cursor ``since`` (from the start of the feed
        without it), of one repository or all.

        Raises:
            ConfigError: ``since`` is not a cursor.
            ResyncNeeded: the feed cannot answer ``since`` exactly (list the files again,
                then follow from the cursor the error carries).
        """
        from fsledger.feed import Cursor

        cursor = Cursor.parse(since) if isinstance(since, str) else since
        return self.feed.read(cursor, limit, repository.id if repository else None)

    def feed_head(self) -> Cursor:
        """The newest cursor: following from it yields only what happens next."""
        return self.feed.head()

    def duplicates(
        self,
        repository: Repository | None = None,
        limit: int = 100,
        min_size: int = 1,
        files_per_group: int | None = None,
        offset: int = 0,
    ) -> list[DuplicateGroup]:
        """Groups of files with the same content, largest waste first, each with its first
        ``files_per_group`` files (all without it); the ``offset`` first groups skipped."""
        repo_id = repository.id if repository else None
        return self.store.duplicates(repo_id, limit, min_size, files_per_group, offset)

    def status(
        self,
        repo: Repository,
        is_watching: bool = False,
        schedule: ScheduleView | None = None,
    ) -> SyncStatus:
        """A repository's status. ``schedule``: the running manager's own (current) view of
        its schedule; the stored one is read without it."""
        ops = self.store.recent_operations(repo.id, 1)
        stored = self.store.get_repository(repo.id) or repo
        files, nbytes = self.record_totals(repo.id)
        stats = self.store.last_scan_stats(repo.id)
        return SyncStatus(
            repository=stored,
            total_files=files,
            last_scan_time=self.store.last_completed_scan(repo.id),
            is_watching=is_watching,
            last_sync_operation=ops[0] if ops else None,
            schedule=schedule if schedule is not None else self.schedule_view(repo.id),
            total_bytes=nbytes,
            condition=self._stored_condition(stored),
            last_scan=LastScan.from_stats(stats) if stats is not None else None,
        )

    def count_files(self, repo_id: UUID) -> int:
        """How many records the repository holds (see ``record_totals``)."""
        return self.record_totals(repo_id)[0]

    def record_totals(self, repo_id: UUID) -> tuple[int, int]:
        """The record count and bytes of a repository. Counting 100k rows costs PostgreSQL
        tens of milliseconds (a status poll's whole budget while a scan runs), so they are
        kept by the repository's feed head, which moves with every change that adds or
        removes a record or changes its size (``Store.repository_head``); the head is read
        before the count, so a change committed between the two only makes the next call
        count again. While the head moves (a scan writing) and counting is slow on a big
        repository (a million records: a scan of every row), an answer is reused for
        ``TOTALS_REUSE`` times what it cost, so that pages polling the status keep the
        database busy a bounded share of the time."""
        head = self.store.repository_head(repo_id)
        cached = self._counts.get(repo_id)
        if cached is not None and cached[0] == head:
            return cached[1]
        now = time.monotonic()
        kept = self._totals_kept.get(repo_id)
        if kept is not None and kept[0] > now:
            return kept[1]
        totals = self.store.record_totals(repo_id)
        cost = time.monotonic() - now
        self._counts[repo_id] = (head, totals)
        if cost >= SLOW_TOTALS_S and totals[0] >= TOTALS_REUSE_FROM:
            self._totals_kept[repo_id] = (now + cost * TOTALS_REUSE, totals)
        else:
            self._totals_kept.pop(repo_id, None)
        return totals

    def _stored_condition(self, repo: Repository) -> Condition:
        """The condition the database tells: offline, since the oldest of the failed scans
        that followed the last one that completed, for the reason the newest gave."""
        if repo.state is not RepoState.OFFLINE:
            return Condition(ConditionKind.ONLINE.value)
        failed = self.store.recent_operations(repo.id, 20, status=OperationStatus.FAILED)
        scans = [o for o in failed if o.operation_type is not OperationType.REALTIME]
        last_ok = self.store.last_completed_scan(repo.id)
        streak = [o for o in scans if last_ok is None or o.start_time > last_ok]
        if not streak:
            return Condition(ConditionKind.OFFLINE.value, "root unavailable")
        return Condition(
            ConditionKind.OFFLINE.value,
            offline_reason(streak[0].error_message or "root unavailable"),
            streak[-1].start_time,
        )

    def scan_estimate(self, repo: Repository, verify: bool) -> Estimate:
        """What a whole-tree scan of ``repo`` will go through, from the last completed
        scan's counts: its files (or the records now, if more), and the bytes it hashed (a
        ``verify`` scan hashes every record: their total size). Unknown before the first."""
        files, nbytes = self.store.record_totals(repo.id)
        stats = self.store.last_scan_stats(repo.id) or {}
        last_files = int(stats.get("files_scanned") or 0)
        last_bytes = int(stats.get("bytes_hashed") or 0)
        return Estimate(
            max(last_files, files) or None,
            (nbytes if verify else last_bytes) or None,
        )

    def recent_changes(
        self, repository: Repository | None, kinds: tuple[str, ...] = (), limit: int = 100
    ) -> list[FeedEntry]:
        """The newest feed entries (of one repository, of these kinds), newest first: what
        a page shows before it follows the feed from its head."""
        return self.store.recent_changes(repository.id if repository else None, kinds, limit)

    def activity(
        self, since: datetime, repository: Repository | None = None
    ) -> list[tuple[datetime, str, int]]:
        """Feed entries per UTC minute and kind since ``since``, counted by the database.

        Counting is a scan of the entries (a million in the hour of a first index took
        seconds), so the counts of minutes that are over are kept (``Activity``): each
        call counts only what came since the last, and the minutes still open."""
        return self._activity.counts(since, repository.id if repository else None)

    # --- the schedule (kept by the running manager, read by any process) ----------------
    def schedule_view(self, repo_id: UUID) -> ScheduleView | None:
        """The running manager's schedule of a repository: next run, why it waits, interval."""
        text = self.store.get_schedule_state(f"repo:{repo_id}")
        from fsledger.schedule import ScheduleView

        return ScheduleView.from_json(json.loads(text)) if text else None

    def set_schedule_view(self, repo_id: UUID, view: ScheduleView) -> None:
        self.store.set_schedule_state(f"repo:{repo_id}", json.dumps(view.to_json()))

    def quiet(self) -> Quiet | None:
        """A consumer's quiet request, if one was made (it may have expired)."""
        text = self.store.get_schedule_state("quiet")
        from fsledger.schedule import Quiet

        return Quiet.from_json(json.loads(text)) if text else None

    def request_quiet(self, quiet: Quiet | None) -> None:
        """Ask the running manager(s) to start no scheduled reconciliation before
        ``quiet.until``; ``None`` withdraws the request."""
        self.store.set_schedule_state("quiet", json.dumps(quiet.to_json()) if quiet else None)

    def change_counts_by_hour(self, since: datetime) -> list[tuple[datetime, int]]:
        """The feed's entries per UTC hour since ``since`` (the quiet hour is learned from it)."""
        return self.store.change_counts_by_hour(since)

    def start_wait(self, repo_id: UUID) -> int:
        """Open the ``deferral`` operation row of a scheduled run that waits."""
        from fsledger.reconcile import owner_tag

        return self.store.start_operation(repo_id, OperationType.DEFERRAL, owner_tag(), utcnow()).id

    def end_wait(self, op_id: int, message: str) -> None:
        """Close a ``deferral`` row, saying how long the run waited, why, and how it ended."""
        self.store.finish_operation(op_id, OperationStatus.COMPLETED, None, message, utcnow())

    def operations(
        self,
        repo: Repository | None,
        limit: int = 20,
        op_type: OperationType | None = None,
        status: OperationStatus | None = None,
    ) -> list[SyncOperation]:
        return self.store.recent_operations(repo.id if repo else None, limit, op_type, status)

    # --- recovery -----------------------------------------------------------------------
    def recover_interrupted(self) -> int:
        """Mark operations left "running" by a process that died as failed (interrupted).

        Only operations owned by a process of this host that no longer exists are
        touched: another process's scan in progress is left alone.
        """
        import socket

        host = socket.gethostname()
        count = 0
        for op, owner in self.store.running_operations():
            owner_host, _, pid = owner.rpartition(":")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            self.store.finish_operation(
                op.id,
                OperationStatus.FAILED,
                None,
                f"interrupted: process {pid} ended before the operation finished",
                utcnow(),
            )
            count += 1
        if count:
            log.warning("Marked %d interrupted operation(s) as failed", count)
        return count


_REASONS = (
    ("No such file or directory", "root missing"),
    ("is not a directory", "root is not a directory"),
    ("cannot be listed", "root cannot be listed"),
    ("but was on", "root on another device (not mounted?)"),
    ("is empty but", "root empty while files are recorded (not mounted?)"),
    ("stopped answering", "root stopped answering (a hung mount?)"),
    ("is unavailable", "root unavailable"),
)


def offline_reason(message: str) -> str:
    """A refused root's message (``roots.check_root``, a stalled walk) in the few words a
    status card shows; the operation's row keeps the whole message."""
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    return message.split(". ", 1)[0][:200] or "root unavailable"


def count_directories(paths: Iterable[RelPath]) -> int:
    """The directories that hold ``paths`` (relative file paths in path byte order), the
    root included. In that order a directory, once left, never comes back (it sorts as
    ``name/``: its whole subtree is contiguous), so each file adds the directories of its
    own that the previous file's directory did not share: no set of every directory.

    Example:
        >>> count_directories([b"a/b/1", b"a/b/2", b"a/c/3", b"d"])
        4
    """
    count = 1
    prev: list[bytes] = []
    for path in paths:
        parts = path.split(b"/")[:-1]
        same = 0
        for mine, theirs in zip(parts, prev, strict=False):
            if mine != theirs:
                break
            same += 1
        count += len(parts) - same
        prev = parts
    return count


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Ledger", "FsledgerError", "normalize_root"]
