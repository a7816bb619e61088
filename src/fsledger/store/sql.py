"""The SQL both stores share. Subclasses supply connections, type adapters and migrations.

Queries are written with ``?`` placeholders; the PostgreSQL store rewrites them to
``%s``. No ORM: the statements are the documentation of what is stored.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol
from uuid import UUID

# The record schema's pieces the lean reader of ``fsledger files`` shares (re-exported).
from fsledger.leanread import DUP_INDEX as DUP_INDEX
from fsledger.leanread import RECORD_COLS, records_page_query
from fsledger.leanread import U64 as _U64
from fsledger.leanread import inode_out as inode_out
from fsledger.leanread import prefix_range as prefix_range
from fsledger.model import (
    MIRROR_COUNTERS,
    Change,
    ChangeKind,
    Digest,
    DuplicateFile,
    DuplicateGroup,
    FeedEntry,
    FeedInfo,
    FeedRow,
    FileRecord,
    FileStat,
    Mirror,
    MirrorCounters,
    MirrorState,
    MountPoint,
    OperationStatus,
    OperationType,
    RecordRow,
    RelPath,
    RepoSettings,
    Repository,
    RepoState,
    ScanStats,
    SyncOperation,
    datetime_to_ns,
    rfc3339,
    utcnow,
)

log = logging.getLogger(__name__)

_I63 = 1 << 63


def inode_in(inode: int) -> int:
    """Store a 64-bit unsigned inode number in a signed 64-bit column."""
    return inode - _U64 if inode >= _I63 else inode


@lru_cache(maxsize=1024)
def _parse_ts(text: str) -> datetime:
    """A stored timestamp text as a datetime; cached, since a scan's rows share one."""
    return datetime.fromisoformat(text)


@lru_cache(maxsize=256)
def _rfc3339_text(text: str) -> str:
    """A stored ISO timestamp in the one RFC 3339 form (``model.rfc3339``)."""
    return rfc3339(datetime.fromisoformat(text))


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, query: Any, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, query: Any, params_seq: Any, /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


_OP_COLS = (
    "id, repository_id, operation_type, status, start_time, end_time, duration_ms, "
    "files_scanned, files_added, files_updated, files_removed, error_message"
)
_FEED_COLS = (
    "seq, repository_id, kind, file_path, old_path, file_size, content_hash, hash_algo, "
    "recorded_at, tag"
)
_REDACTED = "redacted"
"""The kind of a feed entry whose repository was purged: its path is blanked, its seq and
tag stay (so cursors pointing at it still check out), and readers skip it."""


def new_tag() -> int:
    """The tag of the feed entries one transaction appends (see ``FeedEntry.tag``)."""
    import secrets  # here: only a write needs it, and it loads random and hmac

    return secrets.randbits(32)


def upsert_sql(mod_time: str) -> str:
    """The record upsert; ``mod_time`` is the dialect's SQL for the seed's ``mod_time``
    timestamp from the ``mtime_ns`` parameter in its place (the 4th): computed by the
    database, not converted through a ``datetime`` a row in Python."""
    return (
        "INSERT INTO file_records (repository_id, file_path, file_size, mod_time, mtime_ns, "
        "ctime_ns, inode, content_hash, hash_algo, last_scanned, created_at, updated_at) "
        f"VALUES (?, ?, ?, {mod_time}, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (repository_id, file_path) DO UPDATE SET file_size = excluded.file_size, "
        "mod_time = excluded.mod_time, mtime_ns = excluded.mtime_ns, "
        "ctime_ns = excluded.ctime_ns, inode = excluded.inode, "
        "content_hash = excluded.content_hash, hash_algo = excluded.hash_algo, "
        "last_scanned = excluded.last_scanned, updated_at = excluded.updated_at, "
        "scan_generation = file_records.scan_generation + 1"
    )


class DeferredIndex:
    """One index a store drops around a big first index and builds once at the end.

    The duplicate index is keyed by hash: every insert lands on a random page of it, and
    once it outgrows the cache (a million records) each batch rewrites thousands of its
    pages; built at the end it is one sort. Nested and concurrent deferrals of one store
    share one drop and one build. ``drop`` may decline (returns False: the index stays and
    nothing is built at the end).
    """

    def __init__(self, drop: Callable[[], bool], build: Callable[[], None]) -> None:
        self._drop = drop
        self._build = build
        self._lock = threading.Lock()
        self._holders = 0
        self._dropped = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                self._dropped = self._drop()
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._dropped:
                    self._dropped = False
                    self._build()


class SqlStore:
    """Shared implementation of the ``Store`` protocol over a DB-API connection."""

    url: str
    _scanned_in: tuple[datetime | None, Any] = (None, None)
    shares_scans: bool = False
    _deferred: DeferredIndex | None = None

    # --- what a dialect provides ------------------------------------------------------
    def _tx(self) -> AbstractContextManager[Cursor]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor inside a transaction that only reads (one consistent snapshot)."""
        return self._tx()

    def _uuid_in(self, value: UUID) -> Any:
        return value

    def _uuid_out(self, value: Any) -> UUID:
        return value if isinstance(value, UUID) else UUID(str(value))

    def _ts_in(self, value: datetime) -> Any:
        return value

    def _ts_out(self, value: Any) -> datetime:
        return value if isinstance(value, datetime) else _parse_ts(value)

    def _fetch_record_rows(self, cur: Cursor, where: str, params: Sequence[Any]) -> list[Any]:
        """One page of ``iter_record_rows`` as the driver returns it: the records matching
        ``where`` in path order, ``params`` ending with the LIMIT, path first."""
        cur.execute(
            f"SELECT {RECORD_COLS} FROM file_records WHERE {where} ORDER BY file_path LIMIT ?",
            params,
        )
        return cur.fetchall()

    def _record_rows(self, rows: list[Any]) -> Iterator[RecordRow]:
        """A fetched page as ``RecordRow``s. The hot path of every rescan: one tuple a row,
        made as the merge takes it, ``last_scanned`` converted once per distinct value (the
        rows one scan wrote share one)."""
        scanned: dict[Any, int] = {}
        for path, size, mtime_ns, ctime_ns, inode, chash, algo, raw in rows:
            ns = scanned.get(raw)
            if ns is None:
                ns = scanned[raw] = datetime_to_ns(self._ts_out(raw))
            yield RecordRow(
                path if type(path) is bytes else self._blob_out(path),
                size,
                mtime_ns,
                ctime_ns,
                inode + _U64 if inode < 0 else inode,
                chash,
                algo,
                ns,
            )

    def _blob_out(self, value: Any) -> bytes:
        return bytes(value)

    def _lock_feed(self, cur: Cursor) -> None:
        """Serialise feed appends so sequence numbers become visible in order."""

    def close(self) -> None:
        raise NotImplementedError

    # --- row mapping --------------------------------------------------------------------
    def _record(self, row: Sequence[Any]) -> FileRecord:
        # The hot path of every rescan (one call per stored file): no helper calls where an
        # expression does, and last_scanned parsed once per distinct value, since the rows
        # one scan wrote all share one (see _parse_ts).
        path, size, mtime_ns, ctime_ns, inode, chash, algo, scanned = row
        return FileRecord(
            path if type(path) is bytes else self._blob_out(path),
            FileStat(size, mtime_ns, ctime_ns, inode + _U64 if inode < 0 else inode),
            Digest(algo, chash) if chash is not None else None,
            scanned if type(scanned) is datetime else _parse_ts(scanned),
        )

    def _repo(self, row: Sequence[Any]) -> Repository:
        rid, name, root, settings, dev, state, created = row
        return Repository(
            id=self._uuid_out(rid),
            name=name,
            root=self._blob_out(root),
            settings=RepoSettings.from_json(json.loads(settings or "{}")),
            root_dev=inode_out(dev) if dev is not None else None,
            state=RepoState(state),
            created_at=self._ts_out(created),
        )

    def _op(self, row: Sequence[Any]) -> SyncOperation:
        return SyncOperation(
            id=row[0],
            repository_id=self._uuid_out(row[1]),
            operation_type=OperationType(row[2]),
            status=OperationStatus(row[3]),
            start_time=self._ts_out(row[4]),
            end_time=self._ts_out(row[5]) if row[5] is not None else None,
            duration_ms=row[6],
            files_scanned=row[7] or 0,
            files_added=row[8] or 0,
            files_updated=row[9] or 0,
            files_removed=row[10] or 0,
            error_message=row[11],
        )

    def _feed(self, row: Sequence[Any]) -> FeedEntry:
        return FeedEntry(
            seq=row[0],
            repository_id=self._uuid_out(row[1]),
            kind=ChangeKind(row[2]),
            path=self._blob_out(row[3]),
            old_path=self._blob_out(row[4]) if row[4] is not None else None,
            size=row[5],
            content_hash=row[6],
            hash_algo=row[7],
            recorded_at=self._ts_out(row[8]),
            tag=row[9],
        )

    # --- repositories -------------------------------------------------------------------
    def _repo_params(self, repo: Repository) -> tuple[Any, ...]:
        return (
            repo.name,
            repo.root,
            json.dumps(repo.settings.to_json()),
            inode_in(repo.root_dev) if repo.root_dev is not None else None,
            repo.state.value,
        )

    def add_repository(self, repo: Repository) -> None:
        from fsledger.errors import RepositoryExists

        with self._tx() as cur:
            cur.execute(
                "SELECT name FROM repositories WHERE name = ? OR root_path = ?",
                (repo.name, repo.root),
            )
            if row := cur.fetchone():
                raise RepositoryExists(
                    f"a repository named {row[0]!r} already has that name or root "
                    f"({repo.root_str}); pick another --name or remove it first"
                )
            cur.execute(
                "INSERT INTO repositories (name, root_path, settings, root_dev, state, id, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*self._repo_params(repo), self._uuid_in(repo.id), self._ts_in(repo.created_at)),
            )
            self._append_event(cur, self._uuid_in(repo.id), ChangeKind.REPO_ADDED)

    def _append_event(self, cur: Cursor, rid: Any, kind: ChangeKind) -> None:
        """Append a repository's lifecycle event to the feed, in the caller's transaction, so
        the feed never shows the change without the event or the event without the change."""
        self._lock_feed(cur)
        cur.execute(
            "INSERT INTO change_log (repository_id, kind, file_path, recorded_at, tag) "
            "VALUES (?, ?, ?, ?, ?)",
            (rid, kind.value, b"", self._ts_in(utcnow()), new_tag()),
        )

    def update_repository(self, repo: Repository) -> None:
        rid = self._uuid_in(repo.id)
        with self._tx() as cur:
            cur.execute("SELECT state FROM repositories WHERE id = ?", (rid,))
            row = cur.fetchone()
            cur.execute(
                "UPDATE repositories SET name = ?, root_path = ?, settings = ?, root_dev = ?, "
                "state = ? WHERE id = ?",
                (*self._repo_params(repo), rid),
            )
            if row is not None and row[0] != repo.state.value:
                # A root going away or coming back is news for feed readers too, written in
                # the same transaction as the state so neither is ever seen without the other.
                kind = (
                    ChangeKind.REPO_OFFLINE
                    if repo.state is RepoState.OFFLINE
                    else ChangeKind.REPO_ONLINE
                )
                self._append_event(cur, rid, kind)

    _REPO_SELECT = (
        "SELECT id, name, root_path, settings, root_dev, state, created_at FROM repositories"
    )

    def get_repository(self, repo_id: UUID) -> Repository | None:
        with self._read() as cur:
            cur.execute(self._REPO_SELECT + " WHERE id = ?", (self._uuid_in(repo_id),))
            row = cur.fetchone()
        return self._repo(row) if row else None

    def list_repositories(self) -> list[Repository]:
        with self._read() as cur:
            cur.execute(self._REPO_SELECT + " ORDER BY name")
            return [self._repo(r) for r in cur.fetchall()]

    def delete_repository(self, repo_id: UUID, purge: bool) -> None:
        rid = self._uuid_in(repo_id)
        with self._tx() as cur:
            cur.execute("DELETE FROM repositories WHERE id = ?", (rid,))
            if cur.rowcount == 0:
                return
            if purge:
                for table in ("file_records", "sync_operations", "mount_points"):
                    cur.execute(f"DELETE FROM {table} WHERE repository_id = ?", (rid,))
                # The feed's entries are blanked, not deleted: deleting them moved the head
                # backwards when they were the newest, and left cursors naming nothing.
                self._lock_feed(cur)
                cur.execute(
                    "UPDATE change_log SET kind = ?, file_path = ?, old_path = NULL, "
                    "file_size = NULL, content_hash = NULL, hash_algo = NULL "
                    "WHERE repository_id = ?",
                    (_REDACTED, b"", rid),
                )
            self._append_event(cur, rid, ChangeKind.REPO_REMOVED)

    # --- file records -------------------------------------------------------------------
    def page_records(
        self, repo_id: UUID, after: RelPath | None, limit: int, prefix: RelPath = b""
    ) -> list[FileRecord]:
        sql, params = records_page_query(self._uuid_in(repo_id), after, limit, prefix)
        with self._read() as cur:
            cur.execute(sql, params)
            return [self._record(r) for r in cur.fetchall()]

    def iter_records(
        self, repo_id: UUID, page: int = 5000, prefix: RelPath = b""
    ) -> Iterator[FileRecord]:
        """All records of a repository (below directory ``prefix``) in path order, fetched a
        page at a time."""
        after: RelPath | None = None
        while batch := self.page_records(repo_id, after, page, prefix):
            yield from batch
            after = batch[-1].path
            if len(batch) < page:
                return

    def iter_record_rows(
        self, repo_id: UUID, lo: RelPath = b"", hi: RelPath | None = None, page: int = 10_000
    ) -> Iterator[RecordRow]:
        """The records with ``lo <= path < hi`` in path order, flat (see ``RecordRow``), a page
        at a time (see ``_fetch_record_rows`` and ``_record_rows``)."""
        rid = self._uuid_in(repo_id)
        bounds = " AND file_path < ?" if hi is not None else ""
        tail = (hi,) if hi is not None else ()
        after: RelPath | None = None
        while True:
            with self._read() as cur:
                op, start = (">=", lo) if after is None else (">", after)
                rows = self._fetch_record_rows(
                    cur,
                    f"repository_id = ? AND file_path {op} ?{bounds}",
                    (rid, start, *tail, page),
                )
            yield from self._record_rows(rows)
            if len(rows) < page:
                return
            last = rows[-1][0]
            after = last if type(last) is bytes else self._blob_out(last)

    def get_record(self, repo_id: UUID, path: RelPath) -> FileRecord | None:
        with self._read() as cur:
            cur.execute(
                f"SELECT {RECORD_COLS} FROM file_records WHERE repository_id = ? AND file_path = ?",
                (self._uuid_in(repo_id), path),
            )
            row = cur.fetchone()
        return self._record(row) if row else None

    def get_records(self, repo_id: UUID, paths: Sequence[RelPath]) -> dict[RelPath, FileRecord]:
        out: dict[RelPath, FileRecord] = {}
        if not paths:
            return out
        with self._read() as cur:
            for i in range(0, len(paths), 500):
                chunk = paths[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                cur.execute(
                    f"SELECT {RECORD_COLS} FROM file_records WHERE repository_id = ? "
                    f"AND file_path IN ({marks})",
                    (self._uuid_in(repo_id), *chunk),
                )
                for row in cur.fetchall():
                    record = self._record(row)
                    out[record.path] = record
        return out

    def records_by_inode(self, repo_id: UUID, inodes: Sequence[int]) -> list[FileRecord]:
        if not inodes:
            return []
        out: list[FileRecord] = []
        with self._read() as cur:
            for i in range(0, len(inodes), 500):
                chunk = [inode_in(n) for n in inodes[i : i + 500]]
                marks = ", ".join("?" * len(chunk))
                cur.execute(
                    f"SELECT {RECORD_COLS} FROM file_records WHERE repository_id = ? "
                    f"AND inode IN ({marks})",
                    (self._uuid_in(repo_id), *chunk),
                )
                out += [self._record(r) for r in cur.fetchall()]
        return out

    def defer_indexes(self) -> AbstractContextManager[None]:
        return self._deferred.hold() if self._deferred is not None else nullcontext()

    def count_records(self, repo_id: UUID) -> int:
        with self._read() as cur:
            cur.execute(
                "SELECT count(*) FROM file_records WHERE repository_id = ?",
                (self._uuid_in(repo_id),),
            )
            return int(cur.fetchone()[0])

    def records_bound(self) -> int:
        # The largest id: one step down the primary key, where count(*) reads every row.
        with self._read() as cur:
            cur.execute("SELECT coalesce(max(id), 0) FROM file_records")
            return int(cur.fetchone()[0])

    def repository_head(self, repo_id: UUID) -> int:
        with self._read() as cur:
            cur.execute(
                "SELECT coalesce(max(seq), 0) FROM change_log WHERE repository_id = ?",
                (self._uuid_in(repo_id),),
            )
            return int(cur.fetchone()[0])

    def record_totals(self, repo_id: UUID) -> tuple[int, int]:
        with self._read() as cur:
            cur.execute(
                "SELECT count(*), coalesce(sum(file_size), 0) FROM file_records "
                "WHERE repository_id = ?",
                (self._uuid_in(repo_id),),
            )
            count, total = cur.fetchone()
            return int(count), int(total)

    # --- apply --------------------------------------------------------------------------
    _UPSERT: str
    """The dialect's ``upsert_sql``."""

    def _record_params(self, rid: Any, rec: FileRecord, now: Any) -> tuple[Any, ...]:
        st = rec.stat
        digest = rec.digest
        # One scan's records share one last_scanned: convert it once, not once per row. One
        # attribute holds key and value, so threads sharing the store never see them apart.
        scanned = self._scanned_in
        if scanned[0] is not rec.last_scanned:
            scanned = self._scanned_in = (rec.last_scanned, self._ts_in(rec.last_scanned))
        return (
            rid,
            rec.path,
            st.size,
            st.mtime_ns,  # for mod_time (see _MOD_TIME)
            st.mtime_ns,
            st.ctime_ns,
            inode_in(st.inode),
            digest.hex if digest is not None else None,
            digest.algo if digest is not None else None,
            scanned[1],
            now,
            now,
        )

    def _upsert_many(self, cur: Cursor, rows: list[tuple[Any, ...]], new: bool = False) -> None:
        """Insert or update records (``_record_params`` rows). ``new``: every row is a
        ``CREATED`` change, which a dialect may insert faster (a conflict stays possible:
        another writer may have created the path since, and must still be handled)."""
        cur.executemany(self._UPSERT, rows)

    _FEED_COLS_IN = (
        "repository_id, kind, file_path, old_path, file_size, content_hash, hash_algo, "
        "recorded_at, tag"
    )

    def _insert_feed(self, cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
        """Append rows (in ``_FEED_COLS_IN`` order) to the change feed, in order."""
        cur.executemany(
            f"INSERT INTO change_log ({self._FEED_COLS_IN}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _last_known(
        self, cur: Cursor, rid: Any, paths: list[RelPath]
    ) -> dict[RelPath, tuple[int | None, str | None, str | None]]:
        """(size, hash, algorithm) of the records of ``paths`` that have one, read in the
        writing transaction before the batch changes them: what a ``deleted`` entry says the
        file was, so that a consumer can pair it with a later ``created`` of the same content."""
        out: dict[RelPath, tuple[int | None, str | None, str | None]] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            cur.execute(
                "SELECT file_path, file_size, content_hash, hash_algo FROM file_records "
                f"WHERE repository_id = ? AND file_path IN ({marks})",
                (rid, *chunk),
            )
            for path, size, chash, algo in cur.fetchall():
                out[self._blob_out(path)] = (size, chash, algo)
        return out

    def _delete_prefix(self, cur: Cursor, rid: Any, prefix: RelPath) -> None:
        lo, hi = prefix_range(prefix)
        cur.execute(
            "DELETE FROM file_records WHERE repository_id = ? AND file_path >= ? AND file_path < ?",
            (rid, lo, hi),
        )

    def _move_prefix(self, cur: Cursor, rid: Any, old: RelPath, new: RelPath, now: Any) -> None:
        lo, hi = prefix_range(old)
        cur.execute(
            "SELECT id, file_path FROM file_records WHERE repository_id = ? "
            "AND file_path >= ? AND file_path < ?",
            (rid, lo, hi),
        )
        cut = len(old)
        rows = [(new + self._blob_out(p)[cut:], now, i) for i, p in cur.fetchall()]
        cur.executemany("UPDATE file_records SET file_path = ?, updated_at = ? WHERE id = ?", rows)

    def apply(self, repo_id: UUID, changes: Sequence[Change]) -> int | None:
        if not changes:
            return None
        rid = self._uuid_in(repo_id)
        now = self._ts_in(utcnow())
        feed = [c for c in changes if c.in_feed]
        with self._tx() as cur:
            deleted = [c.path for c in feed if c.kind is ChangeKind.DELETED]
            last = self._last_known(cur, rid, deleted) if deleted else {}
            upserts: list[tuple[Any, ...]] = []
            deletes: list[tuple[Any, ...]] = []
            created = 0  # how many of the upserts are CREATED changes

            def flush() -> None:
                nonlocal created
                if upserts:
                    self._upsert_many(cur, upserts, new=created == len(upserts))
                    upserts.clear()
                    created = 0
                if deletes:
                    cur.executemany(
                        "DELETE FROM file_records WHERE repository_id = ? AND file_path = ?",
                        deletes,
                    )
                    deletes.clear()

            for ch in changes:
                if ch.kind is ChangeKind.DELETED:
                    if upserts:
                        flush()
                    deletes.append((rid, ch.path))
                elif ch.kind is ChangeKind.MOVED or ch.kind is ChangeKind.DIR_MOVED:
                    flush()
                    assert ch.old_path is not None
                    if ch.kind is ChangeKind.DIR_MOVED:
                        self._delete_prefix(cur, rid, ch.path)
                        self._move_prefix(cur, rid, ch.old_path, ch.path, now)
                    else:
                        assert ch.record is not None
                        cur.execute(
                            "DELETE FROM file_records WHERE repository_id = ? AND file_path = ?",
                            (rid, ch.path),
                        )
                        cur.execute(
                            "DELETE FROM file_records WHERE repository_id = ? AND file_path = ?",
                            (rid, ch.old_path),
                        )
                        self._upsert_many(cur, [self._record_params(rid, ch.record, now)])
                else:
                    if deletes:
                        flush()
                    assert ch.record is not None
                    upserts.append(self._record_params(rid, ch.record, now))
                    created += ch.kind is ChangeKind.CREATED
            flush()
            if not feed:
                return None
            self._lock_feed(cur)
            tag = new_tag()
            rows: list[tuple[Any, ...]] = []
            size: int | None
            chash: str | None
            algo: str | None
            for c in feed:
                rec = c.record
                if rec is not None:
                    size, chash, algo = rec.size, rec.content_hash, rec.hash_algo
                    if deleted:  # a path written earlier in this batch, then deleted in it
                        last[c.path] = (size, chash, algo)
                elif c.kind is ChangeKind.DELETED:
                    size, chash, algo = last.pop(c.path, (None, None, None))
                else:
                    size = chash = algo = None
                rows.append((rid, c.kind.value, c.path, c.old_path, size, chash, algo, now, tag))
            self._insert_feed(cur, rows)
            cur.execute("SELECT max(seq) FROM change_log")
            return int(cur.fetchone()[0])

    # --- sync operations --------------------------------------------------------------
    def start_operation(
        self, repo_id: UUID, op_type: OperationType, owner: str, start_time: datetime
    ) -> SyncOperation:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO sync_operations (repository_id, operation_type, start_time, status, "
                "owner) VALUES (?, ?, ?, ?, ?) RETURNING id",
                (
                    self._uuid_in(repo_id),
                    op_type.value,
                    self._ts_in(start_time),
                    OperationStatus.RUNNING.value,
                    owner,
                ),
            )
            op_id = int(cur.fetchone()[0])
        return SyncOperation(op_id, repo_id, op_type, OperationStatus.RUNNING, start_time)

    def finish_operation(
        self,
        op_id: int,
        status: OperationStatus,
        stats: ScanStats | None,
        error: str | None,
        end_time: datetime,
    ) -> None:
        s = stats or ScanStats()
        with self._tx() as cur:
            cur.execute("SELECT start_time FROM sync_operations WHERE id = ?", (op_id,))
            row = cur.fetchone()
            start = self._ts_out(row[0]) if row else end_time
            cur.execute(
                "UPDATE sync_operations SET status = ?, end_time = ?, duration_ms = ?, "
                "files_scanned = ?, files_added = ?, files_updated = ?, files_removed = ?, "
                "error_message = ?, stats = ? WHERE id = ?",
                (
                    status.value,
                    self._ts_in(end_time),
                    int((end_time - start).total_seconds() * 1000),
                    s.files_scanned,
                    s.files_added,
                    s.files_updated,
                    s.files_removed,
                    error,
                    json.dumps(s.to_json()),
                    op_id,
                ),
            )

    def add_to_operation(self, op_id: int, stats: ScanStats, end_time: datetime) -> None:
        """Add counts to an operation (realtime rows aggregate a minute of events)."""
        with self._tx() as cur:
            cur.execute(
                "UPDATE sync_operations SET files_scanned = files_scanned + ?, "
                "files_added = files_added + ?, files_updated = files_updated + ?, "
                "files_removed = files_removed + ?, end_time = ? WHERE id = ?",
                (
                    stats.files_scanned,
                    stats.files_added,
                    stats.files_updated,
                    stats.files_removed,
                    self._ts_in(end_time),
                    op_id,
                ),
            )

    def recent_operations(
        self,
        repo_id: UUID | None,
        limit: int,
        op_type: OperationType | None = None,
        status: OperationStatus | None = None,
    ) -> list[SyncOperation]:
        conds: list[str] = []
        params: list[Any] = []
        if repo_id is not None:
            conds.append("repository_id = ?")
            params.append(self._uuid_in(repo_id))
        if op_type is not None:
            conds.append("operation_type = ?")
            params.append(op_type.value)
        if status is not None:
            conds.append("status = ?")
            params.append(status.value)
        where = f"WHERE {' AND '.join(conds)} " if conds else ""
        with self._read() as cur:
            cur.execute(
                f"SELECT {_OP_COLS} FROM sync_operations {where}"
                "ORDER BY start_time DESC, id DESC LIMIT ?",
                (*params, limit),
            )
            return [self._op(r) for r in cur.fetchall()]

    def last_scan_stats(self, repo_id: UUID) -> dict[str, Any] | None:
        with self._read() as cur:
            cur.execute(
                "SELECT stats FROM sync_operations WHERE repository_id = ? AND status = ? "
                "AND operation_type IN (?, ?) AND stats IS NOT NULL "
                "ORDER BY start_time DESC, id DESC LIMIT 1",
                (
                    self._uuid_in(repo_id),
                    OperationStatus.COMPLETED.value,
                    OperationType.STARTUP.value,
                    OperationType.RECONCILIATION.value,
                ),
            )
            row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        value = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        return value if isinstance(value, dict) else None

    def running_operations(self) -> list[tuple[SyncOperation, str]]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {_OP_COLS}, owner FROM sync_operations WHERE status = ?",
                (OperationStatus.RUNNING.value,),
            )
            return [(self._op(r), r[12] or "") for r in cur.fetchall()]

    def last_completed_scan(self, repo_id: UUID) -> datetime | None:
        with self._read() as cur:
            cur.execute(
                "SELECT max(start_time) FROM sync_operations WHERE repository_id = ? "
                "AND status = ? AND operation_type NOT IN (?, ?)",
                (
                    self._uuid_in(repo_id),
                    OperationStatus.COMPLETED.value,
                    OperationType.REALTIME.value,
                    OperationType.DEFERRAL.value,
                ),
            )
            row = cur.fetchone()
        return self._ts_out(row[0]) if row and row[0] is not None else None

    # --- change feed --------------------------------------------------------------------
    def changes_since(
        self, after_seq: int, limit: int, repo_id: UUID | None = None
    ) -> list[FeedEntry]:
        with self._read() as cur:
            if repo_id is None:
                cur.execute(
                    f"SELECT {_FEED_COLS} FROM change_log WHERE seq > ? AND kind <> ? "
                    "ORDER BY seq LIMIT ?",
                    (after_seq, _REDACTED, limit),
                )
            else:
                cur.execute(
                    f"SELECT {_FEED_COLS} FROM change_log WHERE seq > ? AND repository_id = ? "
                    "AND kind <> ? ORDER BY seq LIMIT ?",
                    (after_seq, self._uuid_in(repo_id), _REDACTED, limit),
                )
            return [self._feed(r) for r in cur.fetchall()]

    # The columns of a FeedRow, as the dialect turns them into text in SQL.
    _FEED_ROW_COLS = (
        "seq, repository_id, kind, file_path, old_path, file_size, content_hash, hash_algo, "
        "recorded_at, tag"
    )

    def feed_page(
        self, after_seq: int, limit: int, repo_id: UUID | None = None
    ) -> tuple[FeedInfo, int | None, list[FeedRow], int]:
        # One transaction, two statements (three when the page is empty): the API's hot
        # path paid a pooled transaction per question before, four of them a page.
        where = "seq > ? AND kind <> ?"
        params: list[Any] = [after_seq, _REDACTED]
        if repo_id is not None:
            where += " AND repository_id = ?"
            params.append(self._uuid_in(repo_id))
        with self._read() as cur:
            cur.execute(
                "SELECT f.feed_id, f.pruned_through, f.pruned_tag, c.seq, c.tag, "
                "(SELECT tag FROM change_log WHERE seq = ?) FROM feed_state f "
                "LEFT JOIN (SELECT seq, tag FROM change_log ORDER BY seq DESC LIMIT 1) c ON 1 = 1 "
                "WHERE f.id = 1",
                (after_seq,),
            )
            feed_id, pruned, pruned_tag, seq, tag, at = cur.fetchone()
            # The retention mark is read with the rows, in the same statement: a prune that
            # passed the cursor while the page was read is seen, not answered with a hole.
            cur.execute(
                f"SELECT {self._FEED_ROW_COLS}, (SELECT pruned_through FROM feed_state "
                f"WHERE id = 1) FROM change_log WHERE {where} ORDER BY seq LIMIT ?",
                (*params, limit),
            )
            rows = cur.fetchall()
            if rows:
                pruned_after = int(rows[0][-1])
            else:
                cur.execute("SELECT pruned_through FROM feed_state WHERE id = 1")
                pruned_after = int(cur.fetchone()[0])
        if seq is None or seq < pruned:
            seq, tag = pruned, pruned_tag
        if at is None:
            at = pruned_tag if after_seq == pruned else (0 if after_seq == 0 else None)
        info = FeedInfo(str(feed_id), int(pruned), int(seq), int(tag))
        page = self._feed_rows_out([r[:-1] for r in rows])
        return info, None if at is None else int(at), page, pruned_after

    def _feed_rows_out(self, rows: list[Any]) -> list[FeedRow]:
        """Fetched rows as ``FeedRow``s (SQLite: stored ISO text made RFC 3339 once per
        distinct value, which one batch shares)."""
        make = FeedRow._make
        blob = self._blob_out
        out = []
        for r in rows:
            path, old = r[3], r[4]
            if type(path) is not bytes:
                path = blob(path)
                old = blob(old) if old is not None else None
            out.append(
                make((r[0], r[1], r[2], path, old, r[5], r[6], r[7], _rfc3339_text(r[8]), r[9]))
            )
        return out

    def latest_seq(self) -> int:
        with self._read() as cur:
            return self._latest_seq(cur)

    def _latest_seq(self, cur: Cursor) -> int:
        # Retention may have emptied the log: the newest number ever pruned still counts.
        cur.execute("SELECT coalesce(max(seq), 0) FROM change_log")
        latest = int(cur.fetchone()[0])
        cur.execute("SELECT pruned_through FROM feed_state WHERE id = 1")
        row = cur.fetchone()
        return max(latest, int(row[0]) if row else 0)

    def feed_info(self) -> FeedInfo:
        with self._read() as cur:
            cur.execute(
                "SELECT f.feed_id, f.pruned_through, f.pruned_tag, c.seq, c.tag FROM feed_state f "
                "LEFT JOIN (SELECT seq, tag FROM change_log ORDER BY seq DESC LIMIT 1) c ON 1 = 1 "
                "WHERE f.id = 1"
            )
            feed_id, pruned, pruned_tag, seq, tag = cur.fetchone()
        if seq is None or seq < pruned:  # retention emptied the log: the mark is the head
            seq, tag = pruned, pruned_tag
        return FeedInfo(str(feed_id), int(pruned), int(seq), int(tag))

    def feed_tag(self, seq: int) -> int | None:
        with self._read() as cur:
            cur.execute("SELECT tag FROM change_log WHERE seq = ?", (seq,))
            row = cur.fetchone()
            if row is not None:
                return int(row[0])
            cur.execute("SELECT pruned_through, pruned_tag FROM feed_state WHERE id = 1")
            pruned, pruned_tag = cur.fetchone()
        if seq == pruned:
            return int(pruned_tag)
        return 0 if seq == 0 else None

    def prune_changes(self, older_than: datetime | None, keep_last: int | None) -> int:
        with self._tx() as cur:
            # Appends wait for this, so the low-water mark never passes an uncommitted entry.
            self._lock_feed(cur)
            cutoff = 0
            if older_than is not None:
                cur.execute(
                    "SELECT coalesce(max(seq), 0) FROM change_log WHERE recorded_at < ?",
                    (self._ts_in(older_than),),
                )
                cutoff = int(cur.fetchone()[0])
            if keep_last is not None:
                cutoff = max(cutoff, self._latest_seq(cur) - keep_last)
            cur.execute("SELECT pruned_through FROM feed_state WHERE id = 1")
            pruned = int(cur.fetchone()[0])
            if cutoff <= pruned:
                return 0
            # The mark's tag is kept: a reader whose cursor is the mark is still checked.
            cur.execute("SELECT tag FROM change_log WHERE seq = ?", (cutoff,))
            row = cur.fetchone()
            cur.execute("DELETE FROM change_log WHERE seq <= ?", (cutoff,))
            removed = max(cur.rowcount, 0)
            cur.execute(
                "UPDATE feed_state SET pruned_through = ?, pruned_tag = ? WHERE id = 1",
                (cutoff, int(row[0]) if row else 0),
            )
            return removed

    def get_consumer_cursor(self, name: str) -> int | None:
        position = self.get_consumer_position(name)
        return position[0] if position else None

    def get_consumer_position(self, name: str) -> tuple[int, int] | None:
        with self._read() as cur:
            cur.execute("SELECT seq, tag FROM feed_consumers WHERE name = ?", (name,))
            row = cur.fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def set_consumer_cursor(self, name: str, seq: int, tag: int = 0) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO feed_consumers (name, seq, tag, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, tag = excluded.tag, "
                "updated_at = excluded.updated_at",
                (name, seq, tag, self._ts_in(utcnow())),
            )

    # --- the schedule ------------------------------------------------------------------
    _HOUR_BUCKET = "substr(recorded_at, 1, 13)"
    """The UTC hour of a feed entry as text ``YYYY-MM-DDTHH`` (each store's SQL)."""

    def get_schedule_state(self, name: str) -> str | None:
        with self._read() as cur:
            cur.execute("SELECT value FROM schedule_state WHERE name = ?", (name,))
            row = cur.fetchone()
        return str(row[0]) if row else None

    def set_schedule_state(self, name: str, value: str | None) -> None:
        with self._tx() as cur:
            if value is None:
                cur.execute("DELETE FROM schedule_state WHERE name = ?", (name,))
                return
            cur.execute(
                "INSERT INTO schedule_state (name, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (name, value, self._ts_in(utcnow())),
            )

    def change_counts_by_hour(self, since: datetime) -> list[tuple[datetime, int]]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._HOUR_BUCKET} AS h, count(*) FROM change_log "
                "WHERE recorded_at >= ? GROUP BY h ORDER BY h",
                (self._ts_in(since),),
            )
            rows = cur.fetchall()
        return [
            (datetime.strptime(str(h), "%Y-%m-%dT%H").replace(tzinfo=UTC), int(n)) for h, n in rows
        ]

    _MINUTE_BUCKET = "substr(recorded_at, 1, 16)"
    """The UTC minute of a feed entry as text ``YYYY-MM-DDTHH:MM`` (each store's SQL)."""

    def change_counts_by_minute(
        self, since: datetime, repo_id: UUID | None = None, until: datetime | None = None
    ) -> list[tuple[datetime, str, int]]:
        where = "recorded_at >= ? AND kind <> ?"
        params: list[Any] = [self._ts_in(since), _REDACTED]
        if until is not None:
            where += " AND recorded_at < ?"
            params.append(self._ts_in(until))
        if repo_id is not None:
            where += " AND repository_id = ?"
            params.append(self._uuid_in(repo_id))
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._MINUTE_BUCKET} AS m, kind, count(*) FROM change_log "
                f"WHERE {where} GROUP BY m, kind ORDER BY m, kind",
                params,
            )
            rows = cur.fetchall()
        return [
            (datetime.strptime(str(m), "%Y-%m-%dT%H:%M").replace(tzinfo=UTC), str(k), int(n))
            for m, k, n in rows
        ]

    def recent_changes(
        self, repo_id: UUID | None, kinds: Sequence[str], limit: int
    ) -> list[FeedEntry]:
        where = "kind <> ?"
        params: list[Any] = [_REDACTED]
        if repo_id is not None:
            where += " AND repository_id = ?"
            params.append(self._uuid_in(repo_id))
        if kinds:
            where += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        with self._read() as cur:
            cur.execute(
                f"SELECT {_FEED_COLS} FROM change_log WHERE {where} ORDER BY seq DESC LIMIT ?",
                (*params, limit),
            )
            return [self._feed(r) for r in cur.fetchall()]

    # --- mirrors (fsledger.s3.mirror) ---------------------------------------------------
    _MIRROR_COLS = (
        "id, repository_id, url, endpoint_url, max_delete, state, reason, cursor_seq, "
        "cursor_tag, inflight_seq, accept_deletes_through, "
        + ", ".join(MIRROR_COUNTERS)
        + ", last_error, last_error_at, created_at, updated_at"
    )

    def _mirror(self, row: Sequence[Any]) -> Mirror:
        n = len(MIRROR_COUNTERS)
        counters = MirrorCounters(*(int(v) for v in row[11 : 11 + n]))
        error, error_at, created, updated = row[11 + n :]
        return Mirror(
            id=self._uuid_out(row[0]),
            repository_id=self._uuid_out(row[1]),
            url=row[2],
            endpoint_url=row[3] or None,
            max_delete=row[4],
            state=MirrorState(row[5]),
            reason=row[6],
            cursor_seq=row[7],
            cursor_tag=int(row[8]),
            inflight_seq=int(row[9]),
            accept_deletes_through=int(row[10]),
            counters=counters,
            last_error=error,
            last_error_at=self._ts_out(error_at) if error_at is not None else None,
            created_at=self._ts_out(created),
            updated_at=self._ts_out(updated),
        )

    def add_mirror(self, mirror: Mirror) -> None:
        from fsledger.errors import MirrorExists

        now = self._ts_in(utcnow())
        with self._tx() as cur:
            cur.execute(
                "SELECT 1 FROM mirrors WHERE url = ? AND endpoint_url = ?",
                (mirror.url, mirror.endpoint_url or ""),
            )
            if cur.fetchone() is not None:
                raise MirrorExists(f"{mirror.url} is already a mirror")
            cur.execute(
                "INSERT INTO mirrors (id, repository_id, url, endpoint_url, max_delete, state, "
                "reason, cursor_seq, cursor_tag, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._uuid_in(mirror.id),
                    self._uuid_in(mirror.repository_id),
                    mirror.url,
                    mirror.endpoint_url or "",
                    mirror.max_delete,
                    mirror.state.value,
                    mirror.reason,
                    mirror.cursor_seq,
                    mirror.cursor_tag,
                    now,
                    now,
                ),
            )

    def get_mirror(self, mirror_id: UUID) -> Mirror | None:
        with self._read() as cur:
            cur.execute(
                f"SELECT {self._MIRROR_COLS} FROM mirrors WHERE id = ?", (self._uuid_in(mirror_id),)
            )
            row = cur.fetchone()
        return self._mirror(row) if row else None

    def list_mirrors(self, repo_id: UUID | None = None) -> list[Mirror]:
        with self._read() as cur:
            if repo_id is None:
                cur.execute(f"SELECT {self._MIRROR_COLS} FROM mirrors ORDER BY created_at, url")
            else:
                cur.execute(
                    f"SELECT {self._MIRROR_COLS} FROM mirrors WHERE repository_id = ? "
                    "ORDER BY created_at, url",
                    (self._uuid_in(repo_id),),
                )
            rows = cur.fetchall()
        return [self._mirror(r) for r in rows]

    def remove_mirror(self, mirror_id: UUID) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM mirrors WHERE id = ?", (self._uuid_in(mirror_id),))
            return cur.rowcount > 0

    def set_mirror_state(
        self,
        mirror_id: UUID,
        state: MirrorState,
        reason: str | None,
        accept_deletes_through: int | None = None,
    ) -> None:
        sets = "state = ?, reason = ?, updated_at = ?"
        params: list[Any] = [state.value, reason, self._ts_in(utcnow())]
        if accept_deletes_through is not None:
            sets += ", accept_deletes_through = ?"
            params.append(accept_deletes_through)
        with self._tx() as cur:
            cur.execute(
                f"UPDATE mirrors SET {sets} WHERE id = ?", (*params, self._uuid_in(mirror_id))
            )

    def advance_mirror(
        self,
        mirror_id: UUID,
        cursor: tuple[int, int] | None,
        counters: MirrorCounters,
        error: str | None = None,
        inflight_seq: int | None = None,
    ) -> None:
        now = self._ts_in(utcnow())
        sets = ", ".join(f"{n} = {n} + ?" for n in MIRROR_COUNTERS) + ", updated_at = ?"
        params: list[Any] = [getattr(counters, n) for n in MIRROR_COUNTERS] + [now]
        if cursor is not None:
            sets += ", cursor_seq = ?, cursor_tag = ?"
            params += [cursor[0], cursor[1]]
        if inflight_seq is not None:
            sets += ", inflight_seq = ?"
            params.append(inflight_seq)
        if error is not None:
            sets += ", last_error = ?, last_error_at = ?"
            params += [error[:2000], now]
        with self._tx() as cur:
            cur.execute(
                f"UPDATE mirrors SET {sets} WHERE id = ?", (*params, self._uuid_in(mirror_id))
            )

    # --- mount points below the root ----------------------------------------------------
    def mount_points(self, repo_id: UUID) -> list[MountPoint]:
        with self._read() as cur:
            cur.execute(
                "SELECT mount_path, fs_type, source, mounted FROM mount_points "
                "WHERE repository_id = ? ORDER BY mount_path",
                (self._uuid_in(repo_id),),
            )
            rows = cur.fetchall()
        return [MountPoint(self._blob_out(p), fs, src, bool(m)) for p, fs, src, m in rows]

    def set_mount_points(self, repo_id: UUID, points: Sequence[MountPoint]) -> None:
        rid, now = self._uuid_in(repo_id), self._ts_in(utcnow())
        with self._tx() as cur:
            cur.execute("DELETE FROM mount_points WHERE repository_id = ?", (rid,))
            if points:
                cur.executemany(
                    "INSERT INTO mount_points (repository_id, mount_path, fs_type, source, "
                    "mounted, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(rid, p.path, p.fs_type, p.source, p.mounted, now) for p in points],
                )

    # --- duplicates ---------------------------------------------------------------------
    def _dup_where(self, repo_id: UUID | None, min_size: int) -> tuple[str, list[Any]]:
        where = "content_hash IS NOT NULL AND file_size >= ?"
        params: list[Any] = [min_size]
        if repo_id is not None:
            where += " AND repository_id = ?"
            params.append(self._uuid_in(repo_id))
        return where, params

    def duplicates(
        self,
        repo_id: UUID | None,
        limit: int,
        min_size: int = 1,
        files_per_group: int | None = None,
        offset: int = 0,
    ) -> list[DuplicateGroup]:
        where, params = self._dup_where(repo_id, min_size)
        with self._read() as cur:
            # Same hash and algorithm means same content; size is in the key only so that
            # waste can be computed (equal content has equal size).
            cur.execute(
                "SELECT content_hash, hash_algo, file_size, count(*) FROM file_records "
                f"WHERE {where} GROUP BY content_hash, hash_algo, file_size "
                "HAVING count(*) > 1 "
                "ORDER BY file_size * (count(*) - 1) DESC, content_hash, hash_algo "
                "LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            heads = cur.fetchall()
        groups: list[DuplicateGroup] = []
        for chash, algo, size, count in heads:
            files = self.duplicate_files(
                repo_id, chash, algo, int(size), None, files_per_group or int(count)
            )
            groups.append(DuplicateGroup(chash, algo, int(size), tuple(files), int(count)))
        return groups

    def duplicate_files(
        self,
        repo_id: UUID | None,
        content_hash: str,
        hash_algo: str,
        size: int,
        after: DuplicateFile | None,
        limit: int,
    ) -> list[DuplicateFile]:
        where, params = self._dup_where(repo_id, 0)
        where += " AND content_hash = ? AND hash_algo = ? AND file_size = ?"
        params += [content_hash, hash_algo, size]
        if after is not None:
            # (repository, path) > after, spelled out: row values compare alike everywhere.
            where += " AND (repository_id > ? OR (repository_id = ? AND file_path > ?))"
            rid = self._uuid_in(after.repository_id)
            params += [rid, rid, after.path]
        with self._read() as cur:
            cur.execute(
                f"SELECT repository_id, file_path FROM file_records WHERE {where} "
                "ORDER BY repository_id, file_path LIMIT ?",
                (*params, limit),
            )
            return [DuplicateFile(self._uuid_out(r), self._blob_out(p)) for r, p in cur.fetchall()]
