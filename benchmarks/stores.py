"""Fresh, empty databases for each measured run: a SQLite file, or a PostgreSQL schema.

Every initial index starts from an empty database, so a repeat measures the same work
as the first run. PostgreSQL schemas are created and dropped with psycopg; fsledger
reaches one through ``options=-csearch_path=SCHEMA`` in its URL.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import psycopg

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


class BenchStore(Protocol):
    """Hands out empty databases of one kind, and removes them afterwards."""

    name: str

    def fresh(self) -> AbstractContextManager[str]:
        """An empty database's URL, valid inside the ``with`` block."""
        ...

    def unavailable(self) -> str | None:
        """Why this store cannot be benchmarked here, or None if it can."""
        ...


class SqliteBench:
    """A new SQLite file (with its WAL and lease files) per database, on the same disk as the
    library."""

    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def unavailable(self) -> str | None:
        return None

    @contextmanager
    def fresh(self) -> Iterator[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"bench-{uuid.uuid4().hex[:8]}.db"
        try:
            yield "sqlite://" + str(path.absolute())
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            # The directory of the repositories' lease files, beside the database.
            shutil.rmtree(str(path) + ".leases", ignore_errors=True)


class PostgresBench:
    """A new schema per database in the server at ``admin_url``."""

    name = "postgres"

    def __init__(self, admin_url: str = DEFAULT_PG_URL) -> None:
        self.admin_url = admin_url

    def unavailable(self) -> str | None:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"PostgreSQL at {self.admin_url} is unreachable: {exc}"
        return None

    @contextmanager
    def fresh(self) -> Iterator[str]:
        schema = f"fsl_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
            # Every run starts with the server's buffers written out: a run must not pay
            # for the checkpoint of the previous run's writes (a first index of 100k files
            # dirties ~100 MB), nor be spared its own.
            try:
                conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                print("no CHECKPOINT before the run (not a superuser)", file=sys.stderr)
        sep = "&" if "?" in self.admin_url else "?"
        try:
            yield f"{self.admin_url}{sep}options=-csearch_path%3D{schema}"
        finally:
            try:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except psycopg.Error as exc:  # the server went away: say what is left behind
                print(f"could not drop schema {schema}: {exc}", file=sys.stderr)


def make_store(name: str, data_dir: Path, pg_url: str) -> BenchStore:
    """The store called ``name`` (``sqlite`` or ``postgres``)."""
    if name == "sqlite":
        return SqliteBench(data_dir / "db")
    if name == "postgres":
        return PostgresBench(pg_url)
    raise ValueError(f"unknown store {name!r}: expected sqlite or postgres")
