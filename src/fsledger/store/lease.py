"""Repository ownership between agents: one writer per repository across processes and hosts.

The database is the coordinator; there is no cluster layer of our own.

* PostgreSQL: a session-level advisory lock per repository, held by one dedicated
  connection of the owning agent. If the agent dies, its connection dies and the
  lock is released by the server; a standby agent's next try takes it. Before every
  batch the writer asks whether the lock is still held by that connection (a
  network blip that killed the session must not leave two writers).
* SQLite: an ``flock`` on a file beside the database, one per repository. SQLite is
  one host's store, so a kernel lock is the whole story; it too dies with its process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

if TYPE_CHECKING:
    import psycopg

# psycopg is imported where PgLease uses it: this module is imported by every command, and
# loading psycopg (~100 ms) would slow every start of the CLI, SQLite users' included.

log = logging.getLogger(__name__)


class Lease(Protocol):
    """Ownership of one repository by this process."""

    repo_id: UUID

    def held(self) -> bool:
        """Whether this process still owns the repository (checked before each write)."""
        ...

    def release(self) -> None: ...


def lock_key(repo_id: UUID) -> int:
    """A stable signed 64-bit advisory-lock key for a repository."""
    import hashlib  # here: a SQLite ledger takes no advisory locks

    digest = hashlib.blake2b(b"fsledger-repo:" + repo_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def make_private_dirs(path: str) -> None:
    """Create ``path`` and each missing parent ``0700``, whatever the umask.

    ``os.makedirs`` gives only the last directory its ``mode``: the parents it creates get
    ``0777 & ~umask``, which under ``umask 0`` made ``~/.local`` and ``~/.local/share``
    world-writable (anyone could then swap the database's directory). Directories that
    exist keep their mode.
    """
    missing: list[str] = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else: theirs, left as it is
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask


class FileLease:
    """An ``flock`` held on ``<db>.leases/<repo_id>.lock``."""

    def __init__(self, repo_id: UUID, fd: int) -> None:
        self.repo_id = repo_id
        self._fd: int | None = fd

    @classmethod
    def try_acquire(cls, db_path: str, repo_id: UUID) -> FileLease | None:
        folder = db_path + ".leases"
        make_private_dirs(folder)
        fd = os.open(
            os.path.join(folder, f"{repo_id}.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(repo_id, fd)

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class PgLease:
    """A session advisory lock held by a dedicated PostgreSQL connection."""

    def __init__(self, repo_id: UUID, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        self.repo_id = repo_id
        self._conn: psycopg.Connection[tuple[object, ...]] | None = conn
        self._lock = threading.Lock()

    @classmethod
    def try_acquire(cls, url: str, repo_id: UUID) -> PgLease | None:
        import psycopg

        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(repo_id),)).fetchone()
        if not row or not row[0]:
            conn.close()
            return None
        return cls(repo_id, conn)

    def held(self) -> bool:
        with self._lock:
            return self._held()

    def _held(self) -> bool:
        import psycopg

        conn = self._conn
        if conn is None or conn.closed:
            return False
        key = lock_key(self.repo_id) & 0xFFFFFFFFFFFFFFFF
        try:
            # A bigint advisory lock shows in pg_locks as classid = high half, objid = low half.
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND objsubid = 1 "
                "AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
                (key >> 32, key & 0xFFFFFFFF),
            ).fetchone()
        except psycopg.Error as exc:
            log.warning("Lost the lease of repository %s: %s", self.repo_id, exc)
            return False
        return bool(row and row[0])

    def release(self) -> None:
        import psycopg

        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):  # a dead session took its locks with it
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(self.repo_id),))
            conn.close()
