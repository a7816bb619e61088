"""The embedded default store: stdlib ``sqlite3`` in WAL mode."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from itertools import chain
from typing import Any
from uuid import UUID

from fsledger.errors import StoreError, StoreUnavailable
from fsledger.store import migrations
from fsledger.store.base import ServerInfo
from fsledger.store.lease import FileLease, Lease, make_private_dirs
from fsledger.store.sql import DUP_INDEX, Cursor, DeferredIndex, SqlStore, upsert_sql

INODE_INDEX_NAME = "idx_file_records_inode"
INODE_INDEX = f"CREATE INDEX IF NOT EXISTS {INODE_INDEX_NAME} ON file_records(repository_id, inode)"
"""Migration 1's inode index, deferred with the duplicate index on SQLite."""

log = logging.getLogger(__name__)

ROWS_A_STATEMENT = 64
"""Rows a multi-row INSERT of a big batch of feed rows carries (9 parameters a row)."""


_FEED_COLS = SqlStore._FEED_COLS_IN
_ONE_FEED = f"INSERT INTO change_log ({_FEED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_MULTI_FEED = f"INSERT INTO change_log ({_FEED_COLS}) VALUES " + ", ".join(
    ["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * ROWS_A_STATEMENT
)


def _many_rows(cur: Cursor, multi: str, one: str, rows: list[tuple[Any, ...]]) -> None:
    """``rows`` in order: ``ROWS_A_STATEMENT`` at a time through ``multi``, the rest
    through ``one``.

    Not for file_records' upsert: a statement of several rows that may update keeps a
    statement journal, which passes SQLite's 64 KiB spill threshold and goes to a
    temporary file (measured: 0.3 s less user time and 0.25 s more kernel time on 100k
    records)."""
    n = ROWS_A_STATEMENT
    full = len(rows) - len(rows) % n
    flat = chain.from_iterable
    cur.executemany(multi, [tuple(flat(rows[i : i + n])) for i in range(0, full, n)])
    if full < len(rows):
        cur.executemany(one, rows[full:])


CHECKPOINT_INTERVAL_S = 1.0
"""How often the checkpointer copies the WAL back into the database (see ``_Checkpointer``)."""


def _translate(exc: sqlite3.Error, path: str) -> StoreError:
    text = str(exc)
    if "unable to open" in text or "readonly" in text or isinstance(exc, sqlite3.InterfaceError):
        return StoreUnavailable(f"SQLite database {path} cannot be opened or written: {text}")
    if "locked" in text or "busy" in text:
        return StoreError(
            f"SQLite database {path} is locked by another process (waited 30 s): {text}"
        )
    return StoreError(f"SQLite database {path} failed: {text}")


class SqliteStore(SqlStore):
    """``Store`` on one SQLite file.

    One connection, guarded by a lock: SQLite has one writer at a time anyway, and
    WAL lets other processes (a CLI next to the daemon) read meanwhile. Every writing
    transaction is ``BEGIN IMMEDIATE`` so a write never upgrades from a read lock
    (which SQLite would refuse rather than wait for); a reading one is a plain
    (deferred) ``BEGIN``, which in WAL mode takes no lock a writer waits for: a reader
    polling from another process must not stall the daemon's writes (nor they it).
    """

    # mod_time as ISO 8601 text from mtime_ns (parameter 4, named as ?4 to use it thrice;
    # the ? after it is 5): floor division, so a time before 1970 is right too.
    _UPSERT = upsert_sql(
        "strftime('%Y-%m-%dT%H:%M:%S', ?4 / 1000000000 - (?4 % 1000000000 < 0), 'unixepoch') "
        "|| printf('.%06d+00:00', (?4 % 1000000000 + 1000000000) % 1000000000 / 1000)"
    )

    def _insert_feed(self, cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
        # Big batches (a first index) go ROWS_A_STATEMENT rows to an INSERT: a statement run
        # a row costs its own bind, step and reset, and the read and write of change_log's
        # AUTOINCREMENT sequence (measured: 100k rows, 0.39-0.45 s of CPU a row at a time,
        # 0.28 s 64 at a time). The rows of one statement get their seq in VALUES order.
        if len(rows) < 2 * ROWS_A_STATEMENT:
            super()._insert_feed(cur, rows)
            return
        _many_rows(cur, _MULTI_FEED, _ONE_FEED, rows)

    def __init__(self, path: str) -> None:
        self.path = path
        self._deferred = DeferredIndex(self._drop_dup_index, self._build_dup_index)
        self.url = "sqlite://" + path if path.startswith("/") else "sqlite:///" + path
        self._lock = threading.RLock()
        try:
            if path != ":memory:":
                parent = os.path.dirname(path)
                if parent:
                    make_private_dirs(parent)
                # Create the file 0600 ourselves: the ledger lists every file name a user has.
                os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # A first index inserts into indexes in hash and inode order, i.e. at random:
            # with SQLite's default 2 MiB page cache most inserts evict a page. 32 MiB (an
            # upper bound, taken only as pages are used) holds a 100k-file library's indexes
            # and cut the CPU of its inserts by a fifth; more would only add to peak memory.
            self._conn.execute("PRAGMA cache_size=-32768")
            if path != ":memory:":
                self._conn.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpointer does it
        except OSError as exc:
            raise StoreUnavailable(
                f"SQLite database {path} cannot be created: {exc.strerror or exc}"
            ) from exc
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        self.migrate()
        self._checkpointer = _Checkpointer(path) if path != ":memory:" else None

    def _tx(self) -> AbstractContextManager[Cursor]:
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[Cursor]:
        return self._transaction("BEGIN")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Cursor]:
        with self._lock:
            try:
                cur = self._conn.cursor()
                cur.execute(begin)
                try:
                    yield cur
                except BaseException:
                    self._conn.rollback()
                    raise
                else:
                    self._conn.commit()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    def server_info(self) -> ServerInfo:
        # sqlite:////abs gives //abs: the same file, shown the usual way.
        path = None if self.path == ":memory:" else "/" + os.path.abspath(self.path).lstrip("/")
        return ServerInfo("SQLite", sqlite3.sqlite_version, None, path)

    def write_problem(self) -> str | None:
        if self.path == ":memory:":
            return None
        if not os.access(self.path, os.W_OK):
            return f"the database file {self.path} is not writable by this user"
        directory = os.path.dirname(self.path) or "."
        for suffix in ("-wal", "-shm"):
            side = self.path + suffix
            if os.path.exists(side):
                if not os.access(side, os.W_OK):
                    return f"{side} (SQLite's write-ahead log) is not writable by this user"
            elif not os.access(directory, os.W_OK | os.X_OK):
                return f"SQLite cannot create {side}: {directory} is not writable by this user"
        return None

    def migrate(self) -> None:
        with self._tx() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            current = int(cur.fetchone()[0])
            for version, script in enumerate(migrations.SQLITE, start=1):
                if version <= current:
                    continue
                log.info("Applying SQLite schema migration %d to %s", version, self.path)
                for statement in script.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            # Rebuilt if a deferral (defer_indexes) ended in a crash.
            cur.execute(DUP_INDEX)
            cur.execute(INODE_INDEX)

    def _drop_dup_index(self) -> bool:
        # (see DeferredIndex) A million inserts took 37 s with the index, 12 s without it
        # and 1.5 s to build it at the end. The inode index is deferred with it: a first
        # index inserts into it in inode order per folder, i.e. at random across the tree
        # (a 100k-file first index: ~0.2 s less CPU in the writer, for ~0.05 s of sort at
        # the end). Only move detection reads it, which a first index does not do; a watcher
        # meanwhile finds moves all the same, with a scan of the table.
        with self._tx() as cur:
            cur.execute("DROP INDEX IF EXISTS idx_file_records_dup")
            cur.execute(f"DROP INDEX IF EXISTS {INODE_INDEX_NAME}")
        return True

    def _build_dup_index(self) -> None:
        with self._tx() as cur:
            cur.execute(DUP_INDEX)
            cur.execute(INODE_INDEX)

    def _uuid_in(self, value: UUID) -> Any:
        return str(value)

    def _ts_in(self, value: datetime) -> Any:
        return value.isoformat()

    def acquire_lease(self, repo_id: UUID) -> Lease | None:
        if self.path == ":memory:":
            return _MemoryLease(repo_id)
        return FileLease.try_acquire(self.path, repo_id)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._lock:
            self._conn.close()


class _Checkpointer:
    """Copies a WAL database's log back into the database, on its own thread and connection.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that
    writer copies the log into the database and fsyncs it (tens of milliseconds every few
    thousand rows) while it holds the store's lock, so a burst of live changes waited for
    it. A PASSIVE checkpoint beside the writers takes no lock they wait for; a commit then
    only appends to the log.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._thread = threading.Thread(
            target=self._run, name="fsledger-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECKPOINT_INTERVAL_S):
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # Transient (the database is busy or being replaced); the next round retries.
                log.debug("SQLite database %s: checkpoint failed: %s", self.path, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30.0)
        self._conn.close()


class _MemoryLease:
    """An in-memory database is private to its process: owning it is owning everything."""

    def __init__(self, repo_id: UUID) -> None:
        self.repo_id = repo_id

    def held(self) -> bool:
        return True

    def release(self) -> None:
        pass
