"""The data that crosses module boundaries: records, changes, operations, statistics.

Everything here is a frozen dataclass or an enum. A path inside a repository is
``RelPath`` (``bytes``, relative to the repository root, ``/``-separated): file
names on Linux are bytes, and a name that is not UTF-8 is still a file to keep.
"""

from __future__ import annotations

import base64
import enum
import os
import stat as stat_mod
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple
from uuid import UUID

# The JSON forms of paths and times live in the light module the console script's fast path
# prints with; re-exported here, where every other module takes them from.
from fsledger.jsonform import path_text as path_text
from fsledger.jsonform import path_to_json as path_to_json
from fsledger.jsonform import record_json
from fsledger.jsonform import rfc3339 as rfc3339

if TYPE_CHECKING:
    from fsledger.progress import ScanProgress
    from fsledger.schedule import ScheduleView

RelPath = bytes
"""A path relative to a repository root, as the bytes the kernel knows it by."""

NS_PER_S = 1_000_000_000


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def ns_to_datetime(ns: int) -> datetime:
    """Convert nanoseconds since the epoch to an aware UTC datetime (microsecond precision)."""
    return datetime.fromtimestamp(ns / NS_PER_S, UTC)


class ChangeKind(enum.StrEnum):
    """What happened to a file, as both tiers report it."""

    CREATED = "created"
    MODIFIED = "modified"
    """Content (size or hash) changed."""
    META = "meta"
    """Only metadata (mtime, ctime, inode) changed; the content is the same. Not in the feed."""
    DELETED = "deleted"
    MOVED = "moved"
    """A file moved from ``old_path`` to ``path``, content unchanged."""
    DIR_MOVED = "dir_moved"
    """Every record below ``old_path/`` now lives below ``path/``."""
    REPO_OFFLINE = "repository_offline"
    """Feed only: the repository's root became unavailable (records are kept). ``path`` is empty."""
    REPO_ONLINE = "repository_online"
    """Feed only: the repository's root is back."""
    REPO_ADDED = "repository_added"
    """Feed only: a repository was registered; its files follow as ``created`` entries."""
    REPO_REMOVED = "repository_removed"
    """Feed only: a repository was removed (purged or not): a consumer drops what it holds of
    it. Its earlier entries stay in the feed (a purge blanks their paths)."""


class OperationType(enum.StrEnum):
    STARTUP = "startup"
    RECONCILIATION = "reconciliation"
    REALTIME = "realtime"
    DEFERRAL = "deferral"
    """A scheduled reconciliation waiting for a quiet system (``fsledger.schedule``): the
    row spans the wait, and its message says why it waited."""


class OperationStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class RepoState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class FileStat(NamedTuple):
    """What ``lstat`` says about a regular file: the "maybe changed" key.

    A named tuple rather than a frozen dataclass: a rescan builds and compares two of these
    a file (one from the walk, one from the record), and a tuple is built five times faster
    and compared in C.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def is_regular(st: os.stat_result) -> bool:
    return stat_mod.S_ISREG(st.st_mode)


@dataclass(frozen=True, slots=True)
class Digest:
    """A content hash with the algorithm that produced it."""

    algo: str
    hex: str


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One row of ``file_records``: a regular file as the ledger knows it."""

    path: RelPath
    stat: FileStat
    digest: Digest | None
    last_scanned: datetime

    @property
    def size(self) -> int:
        return self.stat.size

    @property
    def content_hash(self) -> str | None:
        return self.digest.hex if self.digest else None

    @property
    def hash_algo(self) -> str | None:
        return self.digest.algo if self.digest else None

    def to_json(self) -> dict[str, Any]:
        st = self.stat
        return record_json(
            self.path,
            st.size,
            st.mtime_ns,
            st.ctime_ns,
            st.inode,
            self.content_hash,
            self.hash_algo,
            rfc3339(self.last_scanned),
        )


class RecordRow(NamedTuple):
    """A stored record in the flat form a rescan reads it.

    A rescan compares every file on disk with its record, and almost all are unchanged:
    the merge compares ``row[1:5]`` with the walk's ``FileStat`` (tuple equality, in C) and
    builds a ``FileRecord`` only for the few that differ. ``scanned_ns`` is
    ``last_scanned`` in nanoseconds (stored to the microsecond), for the racy-mtime rule;
    the datetime is built only by ``record()``, so a store can hand its rows over as they
    come from the database (PostgreSQL computes ``scanned_ns`` in the query).
    """

    path: RelPath
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    content_hash: str | None
    hash_algo: str | None
    scanned_ns: int

    def record(self) -> FileRecord:
        return FileRecord(
            self.path,
            FileStat(self.size, self.mtime_ns, self.ctime_ns, self.inode),
            Digest(self.hash_algo, self.content_hash)
            if self.content_hash is not None and self.hash_algo is not None
            else None,
            _EPOCH + timedelta(microseconds=self.scanned_ns // 1000),
        )


def datetime_to_ns(value: datetime) -> int:
    """An aware datetime as integer nanoseconds since the epoch (exact to the microsecond)."""
    return (value - _EPOCH) // _MICROSECOND * 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


_NEEDS_RECORD = frozenset(
    {ChangeKind.CREATED, ChangeKind.MODIFIED, ChangeKind.META, ChangeKind.MOVED}
)
_NEEDS_OLD_PATH = frozenset({ChangeKind.MOVED, ChangeKind.DIR_MOVED})
_FEED_ONLY = frozenset(
    {
        ChangeKind.REPO_OFFLINE,
        ChangeKind.REPO_ONLINE,
        ChangeKind.REPO_ADDED,
        ChangeKind.REPO_REMOVED,
    }
)


@dataclass(frozen=True, slots=True)
class Change:
    """One change to the ledger of a repository, produced by either tier.

    ``record`` is the new state for CREATED/MODIFIED/META/MOVED, ``None`` for
    DELETED and DIR_MOVED. ``old_path`` is set for MOVED and DIR_MOVED.
    """

    kind: ChangeKind
    path: RelPath
    record: FileRecord | None = None
    old_path: RelPath | None = None

    def __post_init__(self) -> None:
        # A change a file on a first index: sets built once, not tuples of enum lookups.
        kind = self.kind
        if (kind in _NEEDS_RECORD) != (self.record is not None):
            raise ValueError(f"{kind} change for {self.path!r}: record mismatch")
        if (kind in _NEEDS_OLD_PATH) != (self.old_path is not None):
            raise ValueError(f"{kind} change for {self.path!r}: old_path mismatch")
        if kind in _FEED_ONLY:
            raise ValueError(f"{kind} is a feed event of the store, not a change to apply")

    @property
    def in_feed(self) -> bool:
        """Whether downstream consumers hear of it (metadata-only updates are not news)."""
        return self.kind is not ChangeKind.META


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """One entry of the durable change feed."""

    seq: int
    repository_id: UUID
    kind: ChangeKind
    path: RelPath
    old_path: RelPath | None
    size: int | None
    content_hash: str | None
    hash_algo: str | None
    recorded_at: datetime
    tag: int = 0
    """A random number shared by the entries one transaction appended. A cursor carries the
    tag of the entry it points at, so a cursor issued before the database was restored from
    a backup (the same seq now names another entry) is recognised, not silently answered."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "repository_id": str(self.repository_id),
            "kind": self.kind.value,
            **path_to_json(self.path),
            "size": self.size,
            "hash": self.content_hash,
            "hash_algo": self.hash_algo,
            "recorded_at": rfc3339(self.recorded_at),
        }
        if self.old_path is not None:
            old = path_to_json(self.old_path)
            out["old_path"] = old["path"]
            out["old_path_b64"] = old["path_b64"]
        return out


class FeedRow(NamedTuple):
    """A feed entry in the flat form the HTTP API serialises it from: the store's columns as
    text where JSON wants text (``repository_id``, ``recorded_at`` in ``rfc3339`` form).

    A page of a few thousand changes is read and written in milliseconds only when no object
    is built per row (a ``FeedEntry`` with a ``UUID``, a ``datetime`` and an enum cost more
    than the rest of the request together)."""

    seq: int
    repository_id: str
    kind: str
    path: RelPath
    old_path: RelPath | None
    size: int | None
    content_hash: str | None
    hash_algo: str | None
    recorded_at: str
    tag: int


@dataclass(frozen=True, slots=True)
class FeedInfo:
    """Where the change feed stands.

    ``feed_id`` is random per database, so a cursor from another database (or from one that
    was recreated) is recognised instead of silently matching other sequence numbers.
    Entries with ``seq <= pruned_through`` may have been removed by retention: a reader
    whose cursor is older must resync.
    """

    feed_id: str
    pruned_through: int
    latest_seq: int
    latest_tag: int = 0
    """The tag of the entry at ``latest_seq`` (of the retention mark when that was pruned)."""


@dataclass(frozen=True, slots=True)
class DuplicateFile:
    """One member of a group of files with the same content."""

    repository_id: UUID
    path: RelPath

    def to_json(self) -> dict[str, Any]:
        return {"repository_id": str(self.repository_id), **path_to_json(self.path)}

    def cursor(self) -> str:
        """The position after this file in its group (repository id and path, base64url)."""
        raw = self.repository_id.bytes + self.path
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, raw: bytes) -> DuplicateFile:
        """The file a decoded ``cursor`` names. Raises ValueError if it names none."""
        if len(raw) < 17:
            raise ValueError("not a duplicate-files cursor")
        return cls(UUID(bytes=raw[:16]), raw[16:])


@dataclass(frozen=True, slots=True)
class DuplicateGroup:
    """Files sharing one content hash (of one algorithm)."""

    content_hash: str
    hash_algo: str
    size: int
    files: tuple[DuplicateFile, ...]
    """The first files of the group, in (repository, path) order: all of them, or a page
    when the caller bounded it (one group can hold thousands of files)."""
    count: int = -1
    """How many files the group holds in all (-1: ``len(files)``)."""

    @property
    def total(self) -> int:
        return len(self.files) if self.count < 0 else self.count

    @property
    def wasted_bytes(self) -> int:
        """What keeping one copy would save."""
        return self.size * (self.total - 1)

    @property
    def complete(self) -> bool:
        """Whether ``files`` holds every file of the group."""
        return len(self.files) >= self.total

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.content_hash,
            "hash_algo": self.hash_algo,
            "size": self.size,
            "count": self.total,
            "wasted_bytes": self.wasted_bytes,
            "files": [f.to_json() for f in self.files],
            "files_cursor": None if self.complete else self.files[-1].cursor(),
        }


@dataclass(frozen=True, slots=True)
class RepoSettings:
    """Per-repository settings, stored with the repository.

    Two sources, kept apart because they are trusted differently: the operator's (set through
    the CLI or the API, which only the operator reaches) and the root's own ``.fsledger.yaml``
    (``file_*``: written by whoever can write into the tree). The file is read only when the
    operator said so (``trust_repo_config``), and its stored copy follows the file: a file
    removed or no longer trusted clears it. Only the operator's patterns retire records; a
    file's patterns stop new records and leave existing ones alone until the operator accepts
    (``fsledger scan REPO --accept-ignores``).
    """

    ignore_patterns: tuple[str, ...] = ()
    quick_scan_interval_s: float | None = None
    full_scan_interval_s: float | None = None
    trust_repo_config: bool = False
    """Honour the root's ``.fsledger.yaml`` (``repo add --trust-repo-config``)."""
    file_ignore_patterns: tuple[str, ...] = ()
    file_quick_scan_interval_s: float | None = None
    file_full_scan_interval_s: float | None = None
    endpoint_url: str | None = None
    """A bucket's S3 endpoint (``repo add s3://... --endpoint-url``; no secrets): ``None``
    takes the AWS chain's (``AWS_ENDPOINT_URL``, profiles, AWS itself)."""

    @property
    def walk_patterns(self) -> tuple[str, ...]:
        """What the walker and the watcher skip: the operator's and the file's patterns."""
        return tuple(dict.fromkeys(self.ignore_patterns + self.file_ignore_patterns))

    @property
    def quick_interval_s(self) -> float | None:
        """The file's interval (the operator trusted it), else the operator's."""
        return self.file_quick_scan_interval_s or self.quick_scan_interval_s

    @property
    def full_interval_s(self) -> float | None:
        return self.file_full_scan_interval_s or self.full_scan_interval_s

    def to_json(self) -> dict[str, Any]:
        return {
            "ignore_patterns": list(self.ignore_patterns),
            "quick_scan_interval_s": self.quick_scan_interval_s,
            "full_scan_interval_s": self.full_scan_interval_s,
            "trust_repo_config": self.trust_repo_config,
            "file_ignore_patterns": list(self.file_ignore_patterns),
            "file_quick_scan_interval_s": self.file_quick_scan_interval_s,
            "file_full_scan_interval_s": self.file_full_scan_interval_s,
            "endpoint_url": self.endpoint_url,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RepoSettings:
        # A repository stored before ``trust_repo_config`` existed is not trusted: its
        # file is no longer read (see docs/security.md, "Migration").
        return cls(
            ignore_patterns=tuple(data.get("ignore_patterns") or ()),
            quick_scan_interval_s=data.get("quick_scan_interval_s"),
            full_scan_interval_s=data.get("full_scan_interval_s"),
            trust_repo_config=bool(data.get("trust_repo_config", False)),
            file_ignore_patterns=tuple(data.get("file_ignore_patterns") or ()),
            file_quick_scan_interval_s=data.get("file_quick_scan_interval_s"),
            file_full_scan_interval_s=data.get("file_full_scan_interval_s"),
            endpoint_url=data.get("endpoint_url"),
        )


@dataclass(frozen=True, slots=True)
class Repository:
    """A directory tree the ledger keeps true."""

    id: UUID
    name: str
    root: bytes
    """Absolute path of the root, as bytes."""
    settings: RepoSettings = field(default_factory=RepoSettings)
    root_dev: int | None = None
    """``st_dev`` of the root when last seen healthy: another one means an unmounted disk."""
    state: RepoState = RepoState.ONLINE
    created_at: datetime = field(default_factory=utcnow)

    @property
    def root_str(self) -> str:
        return os.fsdecode(self.root)

    @property
    def is_bucket(self) -> bool:
        """Whether the root is a bucket (``s3://BUCKET[/PREFIX]``) rather than a directory."""
        return self.root.startswith(b"s3://")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            **path_to_json(self.root),
            "settings": self.settings.to_json(),
            "root_dev": self.root_dev,
            "state": self.state.value,
            "created_at": rfc3339(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class MountPoint:
    """A filesystem mounted below a repository root, as a scan remembers it.

    An unmounted filesystem leaves an empty directory on its parent's filesystem, which a
    scan would otherwise take for a directory whose files were all deleted. The ledger keeps
    the mount points its scans saw, so that one which is not mounted any more keeps its
    records (reported, as an unreadable directory is) until it returns or a
    ``scan --force`` forgets it.
    """

    path: RelPath
    """The mount point, relative to the root (never the root itself)."""
    fs_type: str = ""
    source: str = ""
    """What was mounted there (``server:/export``, ``/dev/sdb1``), as ``mountinfo`` says."""
    mounted: bool = True
    """Whether it was mounted when a scan last looked."""

    def describe(self) -> str:
        what = " ".join(x for x in (self.fs_type, self.source) if x)
        return f"{os.fsdecode(self.path)}/ ({what})" if what else f"{os.fsdecode(self.path)}/"

    def to_json(self) -> dict[str, Any]:
        return {
            **path_to_json(self.path),
            "fs_type": self.fs_type,
            "source": self.source,
            "mounted": self.mounted,
        }


@dataclass(slots=True)
class ScanStats:
    """What one reconciliation saw and did. Mutable while the scan runs."""

    files_scanned: int = 0
    files_added: int = 0
    files_updated: int = 0
    files_removed: int = 0
    files_moved: int = 0
    metadata_updated: int = 0
    """Records refreshed because only metadata (mtime, ctime, inode) changed."""
    files_hashed: int = 0
    bytes_hashed: int = 0
    skipped_special: int = 0
    """FIFOs, sockets, devices: not regular files, never recorded."""
    unsettled: int = 0
    """Files that changed while they were being looked at; the next pass settles them."""
    errors: list[str] = field(default_factory=list)
    """The first errors (up to a thousand), as "path: what happened"."""
    error_count: int = 0
    notes: list[str] = field(default_factory=list)
    """What the scan decided that the user should know (e.g. a mount point it forgot)."""
    corrupt: list[str] = field(default_factory=list)
    duration_ms: int = 0

    COUNTS = (
        "files_scanned",
        "files_added",
        "files_updated",
        "files_removed",
        "files_moved",
        "metadata_updated",
        "files_hashed",
        "bytes_hashed",
    )
    """The additive counters (what ``add`` sums and ``has_work`` looks at)."""

    def add(self, other: ScanStats) -> None:
        """Add another run's counters to these (errors and corruption are not summed)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def has_work(self) -> bool:
        return any(getattr(self, name) for name in self.COUNTS)

    def to_json(self) -> dict[str, Any]:
        return {
            "files_scanned": self.files_scanned,
            "files_added": self.files_added,
            "files_updated": self.files_updated,
            "files_removed": self.files_removed,
            "files_moved": self.files_moved,
            "metadata_updated": self.metadata_updated,
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "skipped_special": self.skipped_special,
            "unsettled": self.unsettled,
            "errors": list(self.errors),
            "error_count": max(self.error_count, len(self.errors)),
            "corrupt": list(self.corrupt),
            "notes": list(self.notes),
            "duration_ms": self.duration_ms,
        }


@dataclass(frozen=True, slots=True)
class SyncOperation:
    """One row of ``sync_operations``."""

    id: int
    repository_id: UUID
    operation_type: OperationType
    status: OperationStatus
    start_time: datetime
    end_time: datetime | None = None
    duration_ms: int | None = None
    files_scanned: int = 0
    files_added: int = 0
    files_updated: int = 0
    files_removed: int = 0
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "repository_id": str(self.repository_id),
            "operation_type": self.operation_type.value,
            "status": self.status.value,
            "start_time": rfc3339(self.start_time),
            "end_time": rfc3339(self.end_time) if self.end_time else None,
            "duration_ms": self.duration_ms,
            "files_scanned": self.files_scanned,
            "files_added": self.files_added,
            "files_updated": self.files_updated,
            "files_removed": self.files_removed,
            "error_message": self.error_message,
        }


class MirrorState(enum.StrEnum):
    """Whether a mirror follows the feed (``fsledger.s3.mirror``)."""

    ACTIVE = "active"
    PAUSED = "paused"
    """Stopped until ``mirror resume``: ``reason`` says why (too many deletions, say)."""


MIRROR_COUNTERS = (
    "uploaded",
    "uploaded_bytes",
    "skipped",
    "copied",
    "deleted",
    "deferred",
    "errors",
)


@dataclass(frozen=True, slots=True)
class MirrorCounters:
    """What a mirror has done, cumulative (``Store.advance_mirror`` adds to them)."""

    uploaded: int = 0
    """Objects uploaded and verified."""
    uploaded_bytes: int = 0
    skipped: int = 0
    """Uploads found unnecessary: the object was there already with the right hash."""
    copied: int = 0
    """Server-side copies (moves)."""
    deleted: int = 0
    deferred: int = 0
    """Uploads not made because the file changed since the ledger recorded it (a later feed
    entry carries the new content)."""
    errors: int = 0

    def __add__(self, other: MirrorCounters) -> MirrorCounters:
        return MirrorCounters(*(getattr(self, n) + getattr(other, n) for n in MIRROR_COUNTERS))

    def __bool__(self) -> bool:
        return any(getattr(self, n) for n in MIRROR_COUNTERS)

    def to_json(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in MIRROR_COUNTERS}


@dataclass(frozen=True, slots=True)
class Mirror:
    """A repository mirrored to a bucket (``fsledger mirror add``): where, and how far the
    mirror has followed the change feed. No secret is stored: credentials come from the
    AWS chain of the process that runs it."""

    id: UUID
    repository_id: UUID
    url: str
    """``s3://BUCKET[/PREFIX]``."""
    endpoint_url: str | None = None
    max_delete: int | None = None
    """Pause instead of deleting more than this many objects in one go (None: no limit)."""
    state: MirrorState = MirrorState.ACTIVE
    reason: str | None = None
    cursor_seq: int | None = None
    """The feed entry everything up to which is in the bucket; None: not synced yet (the
    mirror starts with a full comparison of the ledger and the bucket)."""
    cursor_tag: int = 0
    inflight_seq: int = 0
    """Entries up to this seq may have been acted on by a run that died: they are checked
    against the bucket (HEAD) before anything is uploaded again."""
    accept_deletes_through: int = 0
    """Deletions up to this feed seq were accepted (``mirror resume --accept-deletes``)."""
    counters: MirrorCounters = field(default_factory=MirrorCounters)
    last_error: str | None = None
    last_error_at: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "repository_id": str(self.repository_id),
            "url": self.url,
            "endpoint_url": self.endpoint_url,
            "max_delete": self.max_delete,
            "state": self.state.value,
            "reason": self.reason,
            "cursor_seq": self.cursor_seq,
            "counters": self.counters.to_json(),
            "last_error": self.last_error,
            "last_error_at": rfc3339(self.last_error_at) if self.last_error_at else None,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """The seed's SyncStatus."""

    repository: Repository
    total_files: int
    last_scan_time: datetime | None
    is_watching: bool
    last_sync_operation: SyncOperation | None
    schedule: ScheduleView | None = None
    """The running manager's schedule: next run, why it waits, the interval and why."""
    total_bytes: int = 0
    condition: Condition | None = None
    """online, offline, degraded or polling, and why (None: the stored state says it)."""
    last_scan: LastScan | None = None
    progress: ScanProgress | None = None
    """The scan running now (or ended in the last seconds), as the daemon publishes it."""

    def to_json(self) -> dict[str, Any]:
        cond = self.condition or Condition(self.repository.state.value)
        return {
            "repository_id": str(self.repository.id),
            "name": self.repository.name,
            "path": path_text(self.repository.root),
            "state": self.repository.state.value,
            "total_files": self.total_files,
            "total_bytes": self.total_bytes,
            "last_scan_time": rfc3339(self.last_scan_time) if self.last_scan_time else None,
            "is_watching": self.is_watching,
            "last_sync_operation": (
                self.last_sync_operation.to_json() if self.last_sync_operation else None
            ),
            "schedule": self.schedule.to_json() if self.schedule else None,
            "condition": cond.to_json(),
            "last_scan": self.last_scan.to_json() if self.last_scan else None,
            "progress": self.progress.to_json() if self.progress else None,
        }


class ConditionKind(enum.StrEnum):
    """How a repository is kept true to disk right now."""

    ONLINE = "online"
    """Watched (or scanned on schedule when no watcher runs)."""
    OFFLINE = "offline"
    """The root is missing, unmounted or refused by the guard: records kept, nothing synced."""
    DEGRADED = "degraded"
    """Partly watched (the inotify watch limit): quick scans fill in."""
    POLLING = "polling"
    """A network filesystem: inotify sees no other client's changes, so it is scanned."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A repository's condition, with the reason a person reads (``root missing``)."""

    state: str
    reason: str | None = None
    since: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "since": rfc3339(self.since) if self.since else None,
        }


@dataclass(frozen=True, slots=True)
class LastScan:
    """What the last completed scan reported: its errors and the corruption ``--verify``
    found (the first few of each, and how many)."""

    files_scanned: int
    error_count: int
    errors: tuple[str, ...]
    corrupt_count: int
    corrupt: tuple[str, ...]
    notes: tuple[str, ...]

    SHOWN: ClassVar[int] = 5

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> LastScan:
        errors = [str(e) for e in stats.get("errors") or []]
        corrupt = [str(c) for c in stats.get("corrupt") or []]
        return cls(
            int(stats.get("files_scanned") or 0),
            max(int(stats.get("error_count") or 0), len(errors)),
            tuple(errors[: cls.SHOWN]),
            len(corrupt),
            tuple(corrupt[: cls.SHOWN]),
            tuple(str(n) for n in (stats.get("notes") or [])[: cls.SHOWN]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "files_scanned": self.files_scanned,
            "error_count": self.error_count,
            "errors": list(self.errors),
            "corrupt_count": self.corrupt_count,
            "corrupt": list(self.corrupt),
            "notes": list(self.notes),
        }
