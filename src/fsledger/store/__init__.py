"""Stores: where the ledger lives. ``open_store(url)`` picks the implementation."""

from __future__ import annotations

from types import ModuleType

from fsledger.errors import ConfigError, MissingExtra
from fsledger.store.base import Store
from fsledger.store.redact import redact_url

_PG_SCHEMES = ("postgresql://", "postgres://")


def _postgres() -> ModuleType:
    """``fsledger.store.postgres``, or the extra to install when psycopg is missing."""
    try:
        import fsledger.store.postgres as postgres
    except ImportError as exc:  # installed without fsledger[postgres]
        raise MissingExtra("postgres", "a postgresql:// database", exc.name) from exc
    return postgres


def import_backend(url: str) -> None:
    """Import the driver of the store a URL names, without connecting (unknown URLs: nothing;
    ``open_store`` reports them)."""
    if url.startswith(_PG_SCHEMES):
        _postgres()
    elif url.startswith("sqlite:///"):
        import fsledger.store.sqlite  # noqa: F401


def open_store(url: str) -> Store:
    """Open (and migrate) the store a URL names.

    ``sqlite:///ABSOLUTE/PATH`` (or ``sqlite:///:memory:``) selects SQLite;
    ``postgresql://...`` (or ``postgres://``) selects PostgreSQL.

    Raises:
        ConfigError: the URL names no known store.
        MissingExtra: PostgreSQL without the ``postgres`` extra installed.
        StoreUnavailable: the database cannot be reached.
    """
    if url.startswith("sqlite:///"):
        from fsledger.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        return SqliteStore(":memory:" if path == "/:memory:" else path)
    if url.startswith(_PG_SCHEMES):
        store: Store = _postgres().PostgresStore(url)
        return store
    raise ConfigError(
        f"database URL {redact_url(url)!r} is not supported: expected sqlite:///PATH or "
        "postgresql://..."
    )


def open_worker_store(url: str) -> Store:
    """Open the store a URL names in a worker process that reads records for a scan another
    process started (a key range of a rescan: see ``fsledger.merge``).

    On PostgreSQL, one plain connection (``PostgresWorkerStore``): no pool and no migration
    check, which that other process has done. Other stores as ``open_store``.
    """
    if url.startswith(_PG_SCHEMES):
        worker: Store = _postgres().PostgresWorkerStore(url)
        return worker
    return open_store(url)


__all__ = ["Store", "import_backend", "open_store", "open_worker_store"]
