"""The ``Store`` protocol: everything the core needs from a database, nothing more.

Two implementations share one contract test suite: ``SqliteStore`` (the embedded
default) and ``PostgresStore`` (production). Paths are bytes and sort bytewise in
both, so ``page_records`` returns them in the order the walker yields them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from fsledger.model import (
    Change,
    DuplicateFile,
    DuplicateGroup,
    FeedEntry,
    FeedInfo,
    FeedRow,
    FileRecord,
    Mirror,
    MirrorCounters,
    MirrorState,
    MountPoint,
    OperationStatus,
    OperationType,
    RecordRow,
    RelPath,
    Repository,
    ScanStats,
    SyncOperation,
)
from fsledger.store.lease import Lease


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The database itself, as ``fsledger doctor`` reports it."""

    kind: str
    """``SQLite`` or ``PostgreSQL``."""
    version: str
    now: datetime | None
    """The database server's clock (``now()``); None when it has none of its own (SQLite
    runs in this process)."""
    path: str | None
    """The local file the database lives in (SQLite), else None."""


class Store(Protocol):
    """Durable state of the ledger: repositories, file records, operations, the change feed.

    Every method is one transaction. Connection failures raise ``StoreUnavailable``;
    other database failures raise ``StoreError``.
    """

    url: str

    def close(self) -> None: ...

    # --- repositories -------------------------------------------------------------
    def add_repository(self, repo: Repository) -> None:
        """Insert a repository; ``RepositoryExists`` if its name or root is taken."""

    def update_repository(self, repo: Repository) -> None: ...

    def get_repository(self, repo_id: UUID) -> Repository | None: ...

    def list_repositories(self) -> list[Repository]: ...

    def delete_repository(self, repo_id: UUID, purge: bool) -> None:
        """Remove a repository; its records, operations and feed entries too when ``purge``.

        Without ``purge`` the records stay (orphaned, keyed by the id) so that adding the
        same root back under the same id finds them again.
        """

    # --- file records -------------------------------------------------------------
    def page_records(
        self, repo_id: UUID, after: RelPath | None, limit: int, prefix: RelPath = b""
    ) -> list[FileRecord]:
        """Up to ``limit`` records with path > ``after`` (and starting with ``prefix``), sorted
        by path bytes."""
        ...

    def iter_records(
        self, repo_id: UUID, page: int = 5000, prefix: RelPath = b""
    ) -> Iterator[FileRecord]:
        """All records of a repository (below directory ``prefix``) in path order."""
        ...

    def iter_record_rows(
        self, repo_id: UUID, lo: RelPath = b"", hi: RelPath | None = None, page: int = 10_000
    ) -> Iterator[RecordRow]:
        """The records with ``lo <= path < hi`` (``hi=None``: no upper bound) in path order,
        in the flat form a rescan compares (see ``RecordRow``)."""
        ...

    def get_record(self, repo_id: UUID, path: RelPath) -> FileRecord | None: ...

    def get_records(self, repo_id: UUID, paths: Sequence[RelPath]) -> dict[RelPath, FileRecord]:
        """The records of those ``paths`` that have one, by path (one query per few hundred
        paths, not one round trip each)."""
        ...

    def records_by_inode(self, repo_id: UUID, inodes: Sequence[int]) -> list[FileRecord]: ...

    def count_records(self, repo_id: UUID) -> int: ...

    def records_bound(self) -> int:
        """An upper bound of the records of every repository, found without counting them
        (what rebuilding a deferred index sorts: see ``defer_indexes``)."""
        ...

    def repository_head(self, repo_id: UUID) -> int:
        """The newest feed sequence number of the repository (0 when it has none). Feed
        appends are serialised in commit order, and every change that adds or removes a
        record appends to the feed in the same transaction: while this number stays the same,
        so does the repository's record count (``Ledger.status`` caches it by this)."""
        ...

    def record_totals(self, repo_id: UUID) -> tuple[int, int]:
        """The repository's record count and the sum of their sizes (one aggregate)."""
        ...

    def server_info(self) -> ServerInfo:
        """What the database is, its version and its clock."""
        ...

    def write_problem(self) -> str | None:
        """Why this process could not write the ledger (file permissions, a read-only
        server, missing table privileges), or None when it can."""
        ...

    def defer_indexes(self) -> AbstractContextManager[None]:
        """Around the creation of very many records (a big first index): the store may stop
        maintaining indexes that only queries use, and rebuild them on exit. Queries stay
        right meanwhile, only slower; a crash leaves them to be rebuilt at the next open."""
        ...

    def add_to_operation(self, op_id: int, stats: ScanStats, end_time: datetime) -> None:
        """Add counts to an operation (realtime rows aggregate a minute of events)."""

    def apply(self, repo_id: UUID, changes: Sequence[Change]) -> int | None:
        """Write a batch of changes in one transaction, appending the feed-worthy ones to the
        change feed. Returns the feed's last sequence number written, if any."""
        ...

    # --- mount points below the root -----------------------------------------------
    def mount_points(self, repo_id: UUID) -> list[MountPoint]:
        """The filesystems mounted below the root that scans remember, in path order."""
        ...

    def set_mount_points(self, repo_id: UUID, points: Sequence[MountPoint]) -> None:
        """Replace the remembered mount points of a repository (one transaction)."""

    # --- mirrors to buckets (fsledger.s3.mirror) -------------------------------------
    def add_mirror(self, mirror: Mirror) -> None:
        """Insert a mirror; ``MirrorExists`` if its URL (at that endpoint) is taken."""

    def get_mirror(self, mirror_id: UUID) -> Mirror | None: ...

    def list_mirrors(self, repo_id: UUID | None = None) -> list[Mirror]:
        """Every mirror (of one repository), oldest first."""
        ...

    def remove_mirror(self, mirror_id: UUID) -> bool:
        """Forget a mirror (the bucket is not touched); False if there was none."""
        ...

    def set_mirror_state(
        self,
        mirror_id: UUID,
        state: MirrorState,
        reason: str | None,
        accept_deletes_through: int | None = None,
    ) -> None:
        """Pause or resume a mirror; ``accept_deletes_through``: deletions up to that feed
        seq no longer count against its ``max_delete``."""

    def advance_mirror(
        self,
        mirror_id: UUID,
        cursor: tuple[int, int] | None,
        counters: MirrorCounters,
        error: str | None = None,
        inflight_seq: int | None = None,
    ) -> None:
        """In one transaction: move the mirror's cursor to ``(seq, tag)`` (unless None), add
        ``counters``, note ``error`` and the seq up to which entries are being acted on."""

    # --- the schedule (fsledger.schedule) ------------------------------------------
    def get_schedule_state(self, name: str) -> str | None:
        """A value the running manager's scheduler keeps (JSON text), or ``None``."""
        ...

    def set_schedule_state(self, name: str, value: str | None) -> None:
        """Store (or with ``None`` delete) a value of the scheduler's, visible to every
        process on this database."""

    def change_counts_by_hour(self, since: datetime) -> list[tuple[datetime, int]]:
        """Feed entries per UTC hour since ``since``: (the hour's start, count), in order."""
        ...

    def change_counts_by_minute(
        self, since: datetime, repo_id: UUID | None = None, until: datetime | None = None
    ) -> list[tuple[datetime, str, int]]:
        """Feed entries per UTC minute and kind recorded from ``since`` (to before
        ``until``), of one repository or all: (the minute's start, kind, count), in order;
        counted by the database."""
        ...

    def recent_changes(
        self, repo_id: UUID | None, kinds: Sequence[str], limit: int
    ) -> list[FeedEntry]:
        """The newest ``limit`` feed entries (of one repository, of these kinds), newest
        first."""
        ...

    # --- sync operations ----------------------------------------------------------
    def start_operation(
        self, repo_id: UUID, op_type: OperationType, owner: str, start_time: datetime
    ) -> SyncOperation: ...

    def finish_operation(
        self,
        op_id: int,
        status: OperationStatus,
        stats: ScanStats | None,
        error: str | None,
        end_time: datetime,
    ) -> None: ...

    def recent_operations(
        self,
        repo_id: UUID | None,
        limit: int,
        op_type: OperationType | None = None,
        status: OperationStatus | None = None,
    ) -> list[SyncOperation]:
        """The newest operations (of one repository, type, status), newest first."""
        ...

    def last_scan_stats(self, repo_id: UUID) -> dict[str, Any] | None:
        """The stats (``ScanStats.to_json``) of the repository's last completed startup
        or reconciliation."""
        ...

    def running_operations(self) -> list[tuple[SyncOperation, str]]:
        """Operations still marked running, with their owner (``host:pid``)."""
        ...

    def last_completed_scan(self, repo_id: UUID) -> datetime | None: ...

    # --- change feed --------------------------------------------------------------
    def changes_since(
        self, after_seq: int, limit: int, repo_id: UUID | None = None
    ) -> list[FeedEntry]: ...

    def feed_page(
        self, after_seq: int, limit: int, repo_id: UUID | None = None
    ) -> tuple[FeedInfo, int | None, list[FeedRow], int]:
        """What one read of the feed needs, in one transaction: the feed's state, the tag of
        the entry at ``after_seq`` (``feed_tag``), up to ``limit`` rows after it (as
        ``feed_rows``) and the retention mark as of the rows' read."""
        ...

    def latest_seq(self) -> int:
        """The newest sequence number the feed ever held (0 for an empty feed)."""
        ...

    def feed_info(self) -> FeedInfo:
        """The feed's id, retention low-water mark, newest sequence number and its tag, read
        at once."""
        ...

    def feed_tag(self, seq: int) -> int | None:
        """The tag of the entry at ``seq`` (of the retention mark when that is ``seq``; 0 for
        the start of the feed), or None when no entry has that number."""
        ...

    def prune_changes(self, older_than: datetime | None, keep_last: int | None) -> int:
        """Remove feed entries recorded before ``older_than`` or older than the newest
        ``keep_last`` sequence numbers, and raise the low-water mark. Returns rows removed."""
        ...

    def get_consumer_cursor(self, name: str) -> int | None:
        """The stored cursor (a sequence number) of a named feed reader, e.g. a webhook."""
        ...

    def get_consumer_position(self, name: str) -> tuple[int, int] | None:
        """The stored cursor of a named feed reader as (seq, tag)."""
        ...

    def set_consumer_cursor(self, name: str, seq: int, tag: int = 0) -> None: ...

    # --- duplicates ---------------------------------------------------------------
    def duplicates(
        self,
        repo_id: UUID | None,
        limit: int,
        min_size: int = 1,
        files_per_group: int | None = None,
        offset: int = 0,
    ) -> list[DuplicateGroup]:
        """Up to ``limit`` groups (after the first ``offset``) of at least two files with
        the same content hash and at least ``min_size`` bytes, largest waste first
        (across repositories without ``repo_id``); each with its first
        ``files_per_group`` files (all without it) and its total count. The rest of a
        group: ``duplicate_files``."""
        ...

    def duplicate_files(
        self,
        repo_id: UUID | None,
        content_hash: str,
        hash_algo: str,
        size: int,
        after: DuplicateFile | None,
        limit: int,
    ) -> list[DuplicateFile]:
        """Up to ``limit`` files of one duplicate group after ``after``, in (repository,
        path) order."""
        ...

    # --- distributed scanning ----------------------------------------------------------
    @property
    def shares_scans(self) -> bool:
        """Whether reconciliations can be split into work items other agents take
        (``fsledger.store.scanwork``: PostgreSQL only)."""
        ...

    # --- ownership between agents ---------------------------------------------------------
    def acquire_lease(self, repo_id: UUID) -> Lease | None:
        """Try to become the one writer of a repository among every agent sharing this store;
        ``None`` when another agent owns it. The lease ends with the process."""
        ...
