"""The production store: PostgreSQL through psycopg 3 and a connection pool."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache, partial
from operator import itemgetter
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.string import BytesBinaryDumper
from psycopg_pool import ConnectionPool, PoolTimeout

from fsledger.errors import StoreError, StoreUnavailable
from fsledger.model import FeedRow, RecordRow
from fsledger.store import migrations
from fsledger.store.base import ServerInfo
from fsledger.store.lease import Lease, PgLease
from fsledger.store.redact import redact_url as _redact
from fsledger.store.redact import scrub
from fsledger.store.sql import (
    DUP_INDEX,
    Cursor,
    DeferredIndex,
    SqlStore,
    inode_out,
    prefix_range,
    upsert_sql,
)

log = logging.getLogger(__name__)

_FEED_LOCK = 0x6673_6C65  # "fsle": serialises change-feed appends across connections
_DEFERRAL_LOCK = _FEED_LOCK + 2
"""With the schema's hash, held (shared, per session) by every connection deferring the
duplicate index: an open that finds the index missing rebuilds it only if no live session
holds it."""


@lru_cache(maxsize=256)
def _pg(query: str) -> str:
    return query.replace("?", "%s")


class _PgCursor:
    """Adapts ``?`` placeholders to psycopg's ``%s``."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, query: str, params: Any = None, binary: bool = False) -> Any:
        return self._cur.execute(_pg(query), params, binary=binary)

    def executemany(self, query: str, params_seq: Any) -> Any:
        return self._cur.executemany(_pg(query), params_seq)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    def copy_rows(
        self, statement: str, rows: Sequence[Sequence[Any]], types: Sequence[str]
    ) -> None:
        """``COPY ... FROM STDIN`` the rows in binary, the columns being of ``types``: no
        text to format here nor to parse in the server."""
        # bytea by oid is psycopg's dbapi20 dumper (a Python call a value, for its Binary
        # wrapper, which fsledger never passes): the C one instead.
        self._cur.adapters.register_dumper(bytes, BytesBinaryDumper)
        with self._cur.copy(statement + " (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)


_ROW_COLS = (
    "file_path, file_size, mtime_ns, ctime_ns, inode, content_hash, hash_algo, "
    "(EXTRACT(EPOCH FROM last_scanned) * 1000000)::BIGINT * 1000"
)
"""A rescan's columns: ``RecordRow``'s fields, in its order."""
_INODE = itemgetter(4)


_as_record_row: Callable[[Sequence[Any]], RecordRow] = partial(tuple.__new__, RecordRow)
"""A fetched row (``_ROW_COLS``) as a ``RecordRow`` without a Python frame a row:
``tuple.__new__`` is what a named tuple's own constructor calls."""

COPY_MIN_ROWS = 1000
"""From this many rows in one batch, upserts are copied in bulk (see ``_upsert_many``)."""
_MOD_TIME = "TIMESTAMPTZ 'epoch' + floor({} / 1000.0) * INTERVAL '1 microsecond'"
"""mod_time from a nanosecond count: whole microseconds (floored, as on SQLite), exact."""
_UPSERT_COLS = (
    "repository_id, file_path, file_size, mod_time, mtime_ns, ctime_ns, inode, content_hash, "
    "hash_algo, last_scanned, created_at, updated_at"
)
_UPSERT_TEMP = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS fsledger_upsert_rows (repository_id UUID, "
    "file_path BYTEA, file_size BIGINT, mod_time_ns BIGINT, mtime_ns BIGINT, "
    "ctime_ns BIGINT, inode BIGINT, content_hash TEXT, hash_algo TEXT, "
    "last_scanned TIMESTAMPTZ, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ) "
    "ON COMMIT DELETE ROWS"
)
_UPSERT_TYPES = (
    "uuid", "bytea", "int8", "int8", "int8", "int8", "int8", "text", "text",
    "timestamptz", "timestamptz", "timestamptz",
)  # fmt: skip
_NEW_TYPES = ("bytea", *_UPSERT_TYPES[1:])
"""``_copy_new``'s columns as psycopg dumps them. In a binary COPY the server reads each
field with its column's own type, psycopg only writes the bytes: a UUID is its 16 bytes
(``UUID.bytes``, dumped in C as a bytea is), a ``timestamptz`` its int8 count of
microseconds since 2000-01-01 (``_pg_time``): no Python call a value, no datetime a row."""
_PG_EPOCH_US = 946_684_800_000_000
"""2000-01-01T00:00:00Z, PostgreSQL's epoch, in Unix microseconds."""


def _pg_time(mtime_ns: int) -> int:
    """``_MOD_TIME`` as a binary ``timestamptz``: whole microseconds (floored) since
    PostgreSQL's epoch."""
    return mtime_ns // 1000 - _PG_EPOCH_US


_FEED_TYPES = ("bytea", "text", "bytea", "bytea", "int8", "text", "text", "timestamptz", "int8")
"""``_insert_feed``'s columns as psycopg dumps them (the repository as ``UUID.bytes``:
see ``_NEW_TYPES``)."""


def _connect(url: str, timeout_s: float, autocommit: bool = False) -> psycopg.Connection[Any]:
    """One plain connection, or ``StoreUnavailable`` with the server's own reason."""
    try:
        return psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=autocommit)
    except psycopg.Error as exc:
        raise StoreUnavailable(
            f"PostgreSQL at {_redact(url)} cannot be reached: "
            + scrub(" ".join(str(exc).split()), url)
        ) from exc


def _store_error(url: str, exc: psycopg.Error) -> StoreError:
    """A psycopg error as the store reports it: unreachable or failed, no password shown."""
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnavailable(
            f"PostgreSQL at {_redact(url)} is unreachable: {scrub(str(exc), url)}"
        )
    return StoreError(f"PostgreSQL at {_redact(url)} failed: {scrub(str(exc), url)}")


class PostgresStore(SqlStore):
    """``Store`` on a PostgreSQL database (``postgresql://user@host:port/db``)."""

    shares_scans = True
    _UPSERT = upsert_sql(_MOD_TIME.format("?::bigint"))
    _HOUR_BUCKET = "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')"
    _MINUTE_BUCKET = "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')"

    def __init__(self, url: str, max_connections: int = 4, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = connect_timeout
        self._deferred = DeferredIndex(self._drop_dup_index, self._build_dup_index)
        self._deferring: psycopg.Connection[Any] | None = None
        # One direct attempt first: it fails at once with the server's own reason (refused,
        # unknown database, auth), where the pool would keep retrying until its timeout.
        _connect(url, connect_timeout).close()
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=connect_timeout,
            check=ConnectionPool.check_connection,
            # Writes open their own transaction (``_tx``); a read is one statement, or
            # statements each reading their own snapshot (READ COMMITTED) anyway.
            kwargs={"autocommit": True},
            open=False,
            name="fsledger",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreUnavailable(
                f"PostgreSQL at {_redact(url)} cannot be reached within {connect_timeout:.0f}s; "
                "is the server running and the URL right?"
            ) from exc
        self.migrate()

    def _fetch_record_rows(self, cur: Cursor, where: str, params: Sequence[Any]) -> list[Any]:
        # The rows arrive as RecordRow's fields: binary results (bytes for bytea, decoded in
        # C), and last_scanned as nanoseconds computed by the server (EXTRACT is exact
        # numeric since PostgreSQL 14; before, a double rounded back to whole microseconds),
        # not a datetime decoded a row.
        assert isinstance(cur, _PgCursor)
        cur.execute(
            f"SELECT {_ROW_COLS} FROM file_records WHERE {where} ORDER BY file_path LIMIT ?",
            params,
            binary=True,
        )
        return cur.fetchall()

    def _record_rows(self, rows: list[Any]) -> Iterator[RecordRow]:
        # No Python code runs per row: a lazy map of a C call, each row made as the merge
        # takes it (made all at once, a page's worth of new tuples costs 0.6 us a row more
        # in cache misses). An inode stored negative (>= 2**63: see inode_in) is rare; one
        # C-level pass finds out.
        if rows and min(map(_INODE, rows)) < 0:
            rows = [(*r[:4], inode_out(r[4]), *r[5:]) for r in rows]
        return map(_as_record_row, rows)

    @contextmanager
    def _cursor(self, transaction: bool) -> Iterator[Cursor]:
        """A pooled connection's cursor, inside a transaction or not (the pool autocommits)."""
        try:
            with (
                self._pool.connection() as conn,
                conn.transaction() if transaction else nullcontext(),
                conn.cursor() as cur,
            ):
                yield _PgCursor(cur)
        except PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL at {_redact(self.url)} is unreachable") from exc
        except psycopg.Error as exc:
            raise _store_error(self.url, exc) from exc

    def _tx(self) -> AbstractContextManager[Cursor]:
        return self._cursor(transaction=True)

    def _read(self) -> AbstractContextManager[Cursor]:
        # No BEGIN/COMMIT around reads (see the pool's autocommit): a no-change rescan of a
        # small tree reads in six of them, 12 round trips of its ~20.
        return self._cursor(transaction=False)

    def migrate(self) -> None:
        with self._tx() as cur:
            # Two processes starting at once must not both migrate.
            cur.execute("SELECT pg_advisory_xact_lock(?)", (_FEED_LOCK + 1,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())"
            )
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            current = int(cur.fetchone()[0])
            for version, script in enumerate(migrations.POSTGRES, start=1):
                if version <= current:
                    continue
                log.info("Applying PostgreSQL schema migration %d", version)
                cur.execute(script)
                cur.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            cur.execute("SELECT to_regclass('idx_file_records_dup') IS NULL")
            if cur.fetchone()[0]:
                # Dropped by a deferral (defer_indexes): rebuilt here if the process that
                # dropped it died before building it (its session lock went with it).
                cur.execute(
                    "SELECT pg_try_advisory_xact_lock(?, hashtext(current_schema()))",
                    (_DEFERRAL_LOCK,),
                )
                if cur.fetchone()[0]:
                    log.info("Rebuilding idx_file_records_dup (a big first index was cut off)")
                    cur.execute(DUP_INDEX)

    def _upsert_many(self, cur: Cursor, rows: list[tuple[Any, ...]], new: bool = False) -> None:
        # Big batches (a first index, a large import) are copied in bulk, several times
        # faster than a statement per row. New files are copied straight into file_records
        # (COPY inserts pages at a time); if another writer created one of the paths since,
        # the copy is undone and the batch goes the general way: COPY into a temporary
        # table and one INSERT ... ON CONFLICT. A batch naming one path twice keeps the
        # per-row path: one INSERT ... ON CONFLICT cannot update the same row twice.
        if len(rows) < COPY_MIN_ROWS or len({r[1] for r in rows}) != len(rows):
            super()._upsert_many(cur, rows)
            return
        assert isinstance(cur, _PgCursor)
        if new and self._copy_new(cur, rows):
            return
        cur.execute(_UPSERT_TEMP)
        copied = _UPSERT_COLS.replace("mod_time,", "mod_time_ns,")
        cur.copy_rows(f"COPY fsledger_upsert_rows ({copied}) FROM STDIN", rows, _UPSERT_TYPES)
        selected = _UPSERT_COLS.replace("mod_time,", _MOD_TIME.format("mod_time_ns") + ",")
        cur.execute(
            f"INSERT INTO file_records ({_UPSERT_COLS}) SELECT {selected} "
            "FROM fsledger_upsert_rows " + self._UPSERT[self._UPSERT.index("ON CONFLICT") :]
        )
        cur.execute("TRUNCATE fsledger_upsert_rows")

    def _copy_new(self, cur: _PgCursor, rows: list[tuple[Any, ...]]) -> bool:
        """COPY records of new files straight into file_records; False (and nothing
        written) if one of the paths has a record already."""
        # COPY cannot compute a column: mod_time is the one value made in Python here.
        rows = [(r[0].bytes, r[1], r[2], _pg_time(r[3]), *r[4:]) for r in rows]
        cur.execute("SAVEPOINT fsledger_copy_new")
        try:
            cur.copy_rows(f"COPY file_records ({_UPSERT_COLS}) FROM STDIN", rows, _NEW_TYPES)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT fsledger_copy_new")
            return False
        cur.execute("RELEASE SAVEPOINT fsledger_copy_new")
        return True

    def _insert_feed(self, cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) < COPY_MIN_ROWS:
            super()._insert_feed(cur, rows)
            return
        assert isinstance(cur, _PgCursor)
        # COPY assigns seq from the column default in row order, as the INSERTs would.
        rows = [(r[0].bytes, *r[1:]) for r in rows]
        cur.copy_rows(f"COPY change_log ({self._FEED_COLS_IN}) FROM STDIN", rows, _FEED_TYPES)

    def _drop_dup_index(self) -> bool:
        # (see DeferredIndex) On its own connection, which holds the deferral's session lock
        # until the index is built again. Declined if another transaction holds the table
        # for long (DROP INDEX waits for every reader of file_records, and queues the rest).
        try:
            conn = _connect(self.url, self._timeout, autocommit=True)
        except StoreError as exc:
            log.info("Keeping idx_file_records_dup during this first index: %s", exc)
            return False
        try:
            conn.execute(
                "SELECT pg_advisory_lock_shared(%s, hashtext(current_schema()))", (_DEFERRAL_LOCK,)
            )
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '2s'")
                conn.execute("DROP INDEX IF EXISTS idx_file_records_dup")
        except psycopg.Error as exc:
            conn.close()
            log.info("Keeping idx_file_records_dup during this first index: %s", exc)
            return False
        self._deferring = conn
        return True

    def _build_dup_index(self) -> None:
        conn, self._deferring = self._deferring, None
        assert conn is not None
        try:
            with conn.transaction():
                # A sort of every record: 64 MB (the default) spills a million to disk.
                conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
                conn.execute(DUP_INDEX)
            return
        except psycopg.OperationalError:
            # The deferring connection was lost meanwhile (a restart, a network cut): build
            # on the pool's.
            log.info("Rebuilding idx_file_records_dup on another connection", exc_info=True)
        except psycopg.Error as exc:
            raise _store_error(self.url, exc) from exc
        finally:
            conn.close()
        with self._tx() as cur:
            cur.execute(DUP_INDEX)

    # Text made by the server: no UUID or datetime object per row in Python.
    _FEED_ROW_COLS = (
        "seq, repository_id::text, kind, file_path, old_path, file_size, content_hash, "
        "hash_algo, to_char(recorded_at AT TIME ZONE 'UTC', "
        '\'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"\'), tag'
    )

    def _feed_rows_out(self, rows: list[Any]) -> list[FeedRow]:
        return list(map(FeedRow._make, rows))

    def _lock_feed(self, cur: Cursor) -> None:
        # Without this, two transactions could commit seq 6 before seq 5 and a reader
        # at cursor 6 would never see 5.
        cur.execute("SELECT pg_advisory_xact_lock(?)", (_FEED_LOCK,))

    def _move_prefix(self, cur: Cursor, rid: Any, old: bytes, new: bytes, now: Any) -> None:
        lo, hi = prefix_range(old)
        cur.execute(
            "UPDATE file_records SET file_path = ? || substring(file_path from ?), "
            "updated_at = ? WHERE repository_id = ? AND file_path >= ? AND file_path < ?",
            (new, len(old) + 1, now, rid, lo, hi),
        )

    def acquire_lease(self, repo_id: UUID) -> Lease | None:
        try:
            return PgLease.try_acquire(self.url, repo_id)
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"PostgreSQL at {_redact(self.url)} is unreachable: {scrub(str(exc), self.url)}"
            ) from exc

    def server_info(self) -> ServerInfo:
        with self._read() as cur:
            cur.execute("SELECT current_setting('server_version'), now()")
            version, now = cur.fetchone()
        return ServerInfo("PostgreSQL", str(version), now, None)

    def write_problem(self) -> str | None:
        with self._read() as cur:
            cur.execute(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
                "has_table_privilege('file_records', 'INSERT, UPDATE, DELETE') "
                "AND has_table_privilege('change_log', 'INSERT') "
                "AND has_table_privilege('sync_operations', 'INSERT, UPDATE') "
                "AND has_table_privilege('repositories', 'INSERT, UPDATE, DELETE'), "
                "current_user"
            )
            standby, read_only, granted, user = cur.fetchone()
        if standby:
            return "the server is a read-only standby (in recovery): connect to the primary"
        if read_only == "on":
            return "the session is read-only (default_transaction_read_only is on)"
        if not granted:
            return (
                f"the role {user} lacks INSERT/UPDATE/DELETE on fsledger's tables: "
                f"GRANT them (or connect as the tables' owner)"
            )
        return None

    def close(self) -> None:
        self._pool.close()


class PostgresWorkerStore(PostgresStore):
    """``PostgresStore`` on one plain connection, for a worker process that reads the records
    of a scan another process started (``fsledger.store.open_worker_store``).

    Opening it costs one connection, where ``PostgresStore`` connects twice (the direct
    attempt, then its pool), starts the pool's threads and checks the schema under a lock:
    ~30 ms a worker a scan, before its first range. No migration check: the process that
    started the scan has migrated. Not for threads: one transaction at a time.
    """

    IDLE_CHECK_S = 1.0
    """A connection unused for this long is checked before use (see ``_live``)."""

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = connect_timeout
        self._conn = self._open()
        self._used = time.monotonic()

    def _open(self) -> psycopg.Connection[Any]:
        conn = _connect(self.url, self._timeout, autocommit=True)
        try:
            # Its queries read key ranges in path order, which the unique index holds. Without
            # statistics (a table just filled by a first index, before autovacuum analyzes
            # it, or never where autovacuum is off) the planner expects a handful of rows
            # and sorts a bitmap scan's instead: 12 ms against 6 ms of the server's time per
            # 10k rows, on a machine whose cores the workers need.
            conn.execute("SET enable_bitmapscan = off")
        except psycopg.Error as exc:
            conn.close()
            raise _store_error(self.url, exc) from exc
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, replaced when it is closed or broken. One that sat idle is pinged
        first, as the pool it replaces checks each connection it lends: workers outlive a
        scan (the daemon keeps them), and the server may have restarted in between."""
        conn = self._conn
        now = time.monotonic()
        if not conn.closed and not conn.broken and now - self._used > self.IDLE_CHECK_S:
            try:
                conn.execute("")
            except psycopg.Error:
                log.debug("PostgreSQL worker connection lost while idle; reconnecting")
        if conn.closed or conn.broken:
            conn.close()
            conn = self._conn = self._open()
        self._used = now
        return conn

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        conn = self._live()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield _PgCursor(cur)
        except psycopg.Error as exc:
            raise _store_error(self.url, exc) from exc
        finally:
            self._used = time.monotonic()

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        # No BEGIN/COMMIT around reads: this store serves a rescan's pages, one statement
        # each, and one statement reads one snapshot in a transaction or not (under READ
        # COMMITTED, PostgreSQL's default, so does each statement of a transaction). The
        # two round trips saved a page each wait for the server's process to be scheduled,
        # on cores the workers keep busy.
        conn = self._live()
        try:
            with conn.cursor() as cur:
                yield _PgCursor(cur)
        except psycopg.Error as exc:
            raise _store_error(self.url, exc) from exc
        finally:
            self._used = time.monotonic()

    def close(self) -> None:
        self._conn.close()
