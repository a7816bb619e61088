"""Work items of distributed scans, in PostgreSQL: the database is the only coordinator.

A job is one reconciliation of one repository, cut into key ranges (``scan_work`` rows). Its
owner holds a session advisory lock on the job's key for as long as the job lives, on the
connection of its ``ScanJob``; helpers list only jobs whose lock is held (``open_jobs``), so
the job of an agent that died is left alone and swept by the next job created.

Claiming is ``SELECT ... FOR UPDATE SKIP LOCKED`` inside a transaction that stays open while
the item is computed (``Claim``): the row lock *is* the claim. An agent that dies loses its
connection, the server rolls the transaction back, and the item is pending again for anyone
else; no state "running" is ever committed, so none can be left behind.

Only this module speaks the SQL of it; ``fsledger.distscan`` decides what the items mean.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import errors as pg_errors

from fsledger.errors import StoreError, StoreUnavailable
from fsledger.model import RelPath
from fsledger.store.redact import redact_url, scrub

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One key range of a job: ``lo <= path < hi`` (``hi=None``: no upper bound)."""

    job_id: UUID
    seq: int
    lo: RelPath
    hi: RelPath | None


@dataclass(frozen=True, slots=True)
class OpenJob:
    """A job with pending items whose owner is alive."""

    job_id: UUID
    repo_id: UUID
    owner: str
    params: bytes


def job_lock_key(job_id: UUID) -> int:
    """The signed 64-bit advisory-lock key the owner of a job holds."""
    digest = hashlib.blake2b(b"fsledger-scan-job:" + job_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _split(key: int) -> tuple[int, int]:
    """A bigint advisory lock shows in pg_locks as classid = high half, objid = low half."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


_OWNER_ALIVE = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.objsubid = 1 AND l.classid::bigint = j.lock_hi AND l.objid::bigint = j.lock_lo "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


def _store_error(url: str, exc: psycopg.Error) -> StoreError:
    text = scrub(" ".join(str(exc).split()), url)
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnavailable(f"PostgreSQL at {redact_url(url)} is unreachable: {text}")
    return StoreError(f"PostgreSQL at {redact_url(url)} failed: {text}")


class _Conn:
    """One dedicated connection, its errors turned into the store's."""

    def __init__(self, url: str, application: str) -> None:
        self.url = url
        try:
            self.conn: Conn = psycopg.connect(
                url, connect_timeout=10, application_name=application[:63]
            )
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: psycopg.Error) -> StoreError:
        return _store_error(self.url, exc)

    def rollback(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


class Claim:
    """A claimed item: its row is locked by an open transaction until ``finish`` or ``release``."""

    def __init__(self, owner: _Conn, item: WorkItem, params: bytes) -> None:
        self._owner = owner
        self.item = item
        self.params = params
        self._open = True

    def finish(self, result: bytes | None, by: str) -> None:
        """Store the result (``None``: the claimer used it itself), mark the item done, commit."""
        item = self.item
        try:
            self._owner.conn.execute(
                "UPDATE scan_work SET state = 'done', result = %s, claimed_by = %s, "
                "finished_at = NOW() WHERE job_id = %s AND seq = %s",
                (result, by, item.job_id, item.seq),
            )
            self._owner.conn.commit()
        except psycopg.Error as exc:
            self._owner.rollback()
            raise self._owner._error(exc) from exc
        finally:
            self._open = False

    def release(self) -> None:
        """Give the item back untouched (pending again for anyone)."""
        if self._open:
            self._open = False
            self._owner.rollback()


class Claimer(_Conn):
    """Claims items of some jobs, one at a time, over its own connection (a worker's)."""

    def claim(self, job_ids: Sequence[UUID]) -> Claim | None:
        """Lock the first pending item of these jobs that nobody holds; ``None`` if none."""
        try:
            row = self.conn.execute(
                "SELECT w.job_id, w.seq, w.lo, w.hi, j.params FROM scan_work w "
                "JOIN scan_jobs j ON j.job_id = w.job_id "
                "WHERE w.job_id = ANY(%s) AND w.state = 'pending' AND j.state = 'open' "
                # The job of an owner that died is nobody's business any more.
                f"AND {_OWNER_ALIVE} "
                "ORDER BY j.created_at, w.seq LIMIT 1 FOR UPDATE OF w SKIP LOCKED",
                (list(job_ids),),
            ).fetchone()
        except psycopg.Error as exc:
            self.rollback()
            raise self._error(exc) from exc
        if row is None:
            self.rollback()
            return None
        return Claim(self, WorkItem(row[0], row[1], bytes(row[2]), _opt(row[3])), bytes(row[4]))


def _opt(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


class ScanJob(Claimer):
    """The owner's handle on one job: it holds the job's lock and reads the results in order.

    Created by ``create_job``; ``close`` removes the job (and its results).
    """

    def __init__(self, url: str, job_id: UUID, size: int, application: str) -> None:
        super().__init__(url, application)
        self.job_id = job_id
        self.size = size

    def take(self, seq: int, wait_s: float) -> tuple[bytes | None, str, Claim | None] | None:
        """Item ``seq``: ``(result, who, None)`` when done (``result`` is ``None`` if this owner
        computed it itself; ``who`` computed it), ``(None, "", claim)`` when pending and now
        locked here (compute it), or ``None`` when another holds it after ``wait_s`` seconds.

        Raises:
            StoreError: the item is gone (the job was removed under its owner).
        """
        conn = self.conn
        try:
            if wait_s > 0:
                conn.execute(f"SET LOCAL lock_timeout = '{max(1, int(wait_s * 1000))}ms'")
                lock = "FOR UPDATE"
            else:
                lock = "FOR UPDATE NOWAIT"
            row = conn.execute(
                "SELECT state, result, lo, hi, claimed_by FROM scan_work "
                "WHERE job_id = %s AND seq = %s " + lock,
                (self.job_id, seq),
            ).fetchone()
        except pg_errors.LockNotAvailable:
            self.rollback()
            return None
        except psycopg.Error as exc:
            self.rollback()
            raise self._error(exc) from exc
        if row is None:
            self.rollback()
            raise StoreError(f"scan job {self.job_id}: item {seq} is gone")
        if row[0] == "done":
            self.rollback()  # nothing was changed; ends the read's transaction
            return _opt(row[1]), str(row[4] or ""), None
        item = WorkItem(self.job_id, seq, bytes(row[2]), _opt(row[3]))
        return None, "", Claim(self, item, b"")

    def close(self) -> None:
        """Remove the job and its results, and let go of its lock (the connection)."""
        try:
            self.conn.execute("SET LOCAL lock_timeout = '2s'")
            self.conn.execute("DELETE FROM scan_jobs WHERE job_id = %s", (self.job_id,))
            self.conn.commit()
        except psycopg.Error as exc:
            # A helper still holding an item of this job (it can only be one that lost a race
            # with this owner): the row is swept with the next job created.
            self.rollback()
            log.debug("scan job %s left for the next sweep: %s", self.job_id, exc)
            with contextlib.suppress(psycopg.Error):
                self.conn.execute(
                    "UPDATE scan_jobs SET state = 'closed' WHERE job_id = %s", (self.job_id,)
                )
                self.conn.commit()
        super().close()


def create_job(
    url: str,
    repo_id: UUID,
    owner: str,
    params: bytes,
    ranges: Sequence[tuple[RelPath, RelPath | None]],
) -> ScanJob:
    """Create a job of ``ranges`` (in key order: ``seq`` 0, 1, ...) and hold its lock.

    Jobs closed, or whose owner is gone, are swept first (those a helper still holds an
    item of are left for the next time).
    """
    job_id = uuid4()
    job = ScanJob(url, job_id, len(ranges), f"fsledger-scan-owner:{owner}")
    conn = job.conn
    key = job_lock_key(job_id)
    hi, lo = _split(key)
    try:
        conn.execute("SET LOCAL lock_timeout = '200ms'")
        conn.execute(f"DELETE FROM scan_jobs j WHERE j.state = 'closed' OR NOT {_OWNER_ALIVE}")
        conn.commit()
    except psycopg.Error as exc:
        job.rollback()
        log.debug("stale scan jobs not swept this time: %s", exc)
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        conn.execute(
            "INSERT INTO scan_jobs (job_id, repository_id, owner, params, lock_hi, lock_lo) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (job_id, repo_id, owner, params, hi, lo),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO scan_work (job_id, seq, repository_id, lo, hi) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(job_id, seq, repo_id, a, b) for seq, (a, b) in enumerate(ranges)],
            )
        conn.commit()
    except psycopg.Error as exc:
        job.rollback()
        job.conn.close()
        raise job._error(exc) from exc
    return job


def open_jobs(url: str) -> list[OpenJob]:
    """Jobs with pending items whose owner still holds their lock, oldest first."""
    try:
        with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT j.job_id, j.repository_id, j.owner, j.params FROM scan_jobs j "
                "WHERE j.state = 'open' AND EXISTS (SELECT 1 FROM scan_work w "
                f"WHERE w.job_id = j.job_id AND w.state = 'pending') AND {_OWNER_ALIVE} "
                "ORDER BY j.created_at"
            ).fetchall()
    except psycopg.Error as exc:
        raise _store_error(url, exc) from exc
    return [OpenJob(r[0], r[1], r[2], bytes(r[3])) for r in rows]
