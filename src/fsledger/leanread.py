"""The lean SQLite reader of ``fsledger files REPO --json``, and the pieces of the record
schema it shares with the stores (``fsledger.store.sql`` imports them from here).

The console script (``fsledger.entry``) serves that command with this module, ``sqlite3``
and ``fsledger.jsonform``: none of click, the model's dataclasses, the settings or the
store, whose imports cost several times the command's work (docs/benchmarks.md, "The CLI's
start-up"). It serves only the plain case and declines everything else *before printing
anything*, so that the full CLI runs instead and says what it always said: a database that
does not exist yet (the store creates it), a schema other than the one this version writes
(the store migrates, or refuses), a database busy with a writer (the store waits), an
index left dropped by a crash (the store rebuilds it), a repository named other than by its
name (an id, a root path) or not found.
"""

from __future__ import annotations

import os

from fsledger.jsonform import dumps, record_json, rfc3339

TYPE_CHECKING = False  # typing costs the fast path its import; mypy still reads the block
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterator, Sequence
    from typing import Any, NoReturn, TextIO

RECORD_COLS = (
    "file_path, file_size, mtime_ns, ctime_ns, inode, content_hash, hash_algo, last_scanned"
)
"""A file record's columns, in the order every store reads them."""

SCHEMA_VERSION = 9
"""The SQLite schema this reader reads: ``len(fsledger.store.migrations.SQLITE)`` (a test
holds them equal; importing that module here would load the store package, which loads the
model). At any other version it declines: the store migrates, or refuses, as it does."""

FILES_PAGE = 5000
"""Records read per transaction by ``Ledger.files`` (and so by ``fsledger files``)."""

DUP_INDEX_NAME = "idx_file_records_dup"
DUP_INDEX = f"CREATE INDEX IF NOT EXISTS {DUP_INDEX_NAME} ON file_records(content_hash, file_size)"
"""The one index ``defer_indexes`` defers, as migration 2 made it (both dialects)."""

U64 = 1 << 64


def inode_out(value: int) -> int:
    """A stored inode number (a signed 64-bit column) as the unsigned number it is."""
    return value + U64 if value < 0 else value


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """The half-open byte range [lo, hi) holding every path below directory ``prefix``."""
    return prefix + b"/", prefix + b"0"  # "0" is the byte after "/"


def records_page_query(
    rid: object, after: bytes | None, limit: int, prefix: bytes = b""
) -> tuple[str, list[object]]:
    """The query of one page of a repository's records (below directory ``prefix``) with
    paths after ``after``, in path byte order: ``SqlStore.page_records`` and this reader."""
    where, params = ["repository_id = ?"], [rid]
    if after is not None:
        where.append("file_path > ?")
        params.append(after)
    if prefix:
        lo, hi = prefix_range(prefix.rstrip(b"/"))
        where.append("file_path >= ? AND file_path < ?")
        params += [lo, hi]
    sql = (
        f"SELECT {RECORD_COLS} FROM file_records WHERE {' AND '.join(where)} "
        "ORDER BY file_path LIMIT ?"
    )
    return sql, [*params, limit]


_UUID_CHARS = frozenset("0123456789abcdefABCDEF{}-urnid:_+xX")


def could_be_uuid(ref: str) -> bool:
    """Whether ``uuid.UUID(ref)`` might accept ``ref``: True for every text it accepts (and
    for many it does not). It drops ``urn:``, ``uuid:``, braces and hyphens, then reads 32
    characters with ``int(_, 16)``, which also takes ``_``, a sign, ``0x``, whitespace and
    any Unicode decimal digit."""
    return all(c in _UUID_CHARS or c.isdecimal() or c.isspace() for c in ref)


class Declined(Exception):
    """This reader does not serve the case: the full CLI runs instead (nothing printed yet)."""


def files_json(path: str, ref: str, out: TextIO) -> None:
    """Print ``fsledger files REF --json`` of the SQLite database at ``path``, as the full
    CLI does (the same pages, in the same transactions, the same lines).

    Raises:
        Declined: before printing anything, for every case but the plain one (see above).
        SystemExit: a page after the first failed: the store's error line was printed, as
            the full CLI prints it.
    """
    if could_be_uuid(ref) or ref.startswith("-") or path == "/:memory:":
        raise Declined
    try:
        # What the store checks first, without its O_CREAT: a file that is there, and
        # that this user may write (the store opens it for writing, and fails else).
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        raise Declined from None
    import sqlite3

    try:
        # timeout 0: a lock held by a writer declines at once (the store would wait for it).
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    except sqlite3.Error:
        raise Declined from None
    try:
        try:
            pages = _pages(conn, _resolve(conn, ref))
            page = next(pages, None)
            # Served from here on: later pages wait for a busy database as the store's do.
            conn.execute("PRAGMA busy_timeout = 30000")
        except sqlite3.Error:
            raise Declined from None
        scanned: dict[object, str] = {}
        write = out.write
        while page:
            for row in page:  # a line a write, as the click command does (so a reader
                write(_line(row, scanned))  # that goes away fails the same write)
            try:
                page = next(pages, None)
            except sqlite3.Error as exc:
                _fail(exc, path)
    finally:
        conn.close()


def _resolve(conn: sqlite3.Connection, ref: str) -> str:
    """The stored id of repository ``ref`` after checking the database is as the store
    leaves it (else ``Declined``)."""
    # The store's start (``SqliteStore.migrate``) in its write transaction; here it only
    # looks: the same lock, and nothing to migrate or rebuild.
    conn.execute("BEGIN IMMEDIATE")
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        index = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (DUP_INDEX_NAME,)
        ).fetchone()
    finally:
        conn.rollback()
    if mode != "wal" or version != SCHEMA_VERSION or index is None:
        raise Declined
    # ``Ledger.resolve`` by name (ids and root paths go to the full CLI).
    conn.execute("BEGIN")
    try:
        names = conn.execute("SELECT id, name FROM repositories ORDER BY name").fetchall()
    finally:
        conn.commit()
    for rid, name in names:
        if name == ref:
            return str(rid)
    raise Declined


def _pages(conn: sqlite3.Connection, rid: str) -> Iterator[list[Any]]:
    """``Ledger.files``: a page at a time, each in its own read transaction."""
    after: bytes | None = None
    while True:
        sql, params = records_page_query(rid, after, FILES_PAGE)
        conn.execute("BEGIN")
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.commit()
        if not rows:
            return
        yield rows
        after = bytes(rows[-1][0])


def _line(row: Sequence[Any], scanned: dict[object, str]) -> str:
    """One stored record as its ``--json`` line (``SqlStore._record``, then
    ``FileRecord.to_json``: a record without a hash has no algorithm either)."""
    path, size, mtime_ns, ctime_ns, inode, chash, algo, raw = row
    when = scanned.get(raw)
    if when is None:
        from datetime import datetime

        when = scanned[raw] = rfc3339(datetime.fromisoformat(raw))
    record = record_json(
        bytes(path),
        size,
        mtime_ns,
        ctime_ns,
        inode_out(inode),
        chash,
        algo if chash is not None else None,
        when,
    )
    return dumps(record) + "\n"


def _fail(exc: sqlite3.Error, path: str) -> NoReturn:
    """The store's error line and exit code, as the full CLI reports a failed read (its
    modules loaded only now, on this rare path)."""
    from fsledger.cli import _fail
    from fsledger.store.sqlite import _translate

    _fail(_translate(exc, path))
