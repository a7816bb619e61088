"""Distributed scanning: one repository's reconciliation computed by several agents.

PostgreSQL only, opt-in (``RECONCILIATION_DISTRIBUTED=true``). The owner of a repository
(the agent holding its lease, the one that writes it) cuts the tree's key space into ranges
(``plan_ranges``) and creates a job of them in the database (``fsledger.store.scanwork``).
Then everyone computes:

* the owner's own worker processes (``LocalWorkers``) and the owner's reconciler thread;
* every other agent on the same database that has the root mounted at the same path
  (``ScanHelper``, a thread of ``SyncManager`` with its own worker processes).

To compute an item is to merge its range (walk + stored records, ``Merge``) and, when the
files are hashed, to hash the files the merge could not rule out (``Look``), keeping each
hash with the ``fstat`` key it belongs to. The result goes into the item's row. The owner
reads the results *in range order* and hands them to its one ``RepoWriter``, which checks
every change against ``lstat`` again: helpers never write records, and a stale or wrong
result can only be dropped, never written.

Why a helper checks the mount: an agent whose path holds an empty directory or another disk
would report every file absent (harmless: the writer sees them on disk) and no file new
(harmful: they would wait for the next scan). So the job carries a fingerprint of the root's
top level and its mount points below, and a helper whose view differs takes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing.pool
import os
import signal
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from fsledger.decide import LookRule
from fsledger.ignore import IgnoreRules
from fsledger.merge import (
    RANGE_STALL_FACTOR,
    RangeResult,
    RangeTask,
    compute_range,
    decode_result,
    encode_result,
    plan_ranges,
)
from fsledger.model import (
    RelPath,
    Repository,
)
from fsledger.mounts import MountTable
from fsledger.store.base import Store

if TYPE_CHECKING:
    from fsledger.s3.bucket import Bucket
    from fsledger.store.scanwork import Claim, Claimer, ScanJob

# fsledger.store.scanwork (and psycopg with it) is imported where it is used: SQLite users
# never load it.

log = logging.getLogger(__name__)

RANGES = 48
"""Items a job is cut into: enough that agents of unequal speed even out, few enough that a
row per item and the owner's in-order reading stay cheap."""
POLL_S = 1.0
"""How often a helper looks for open jobs."""
FORMAT = 1


# --- what a job is ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobParams:
    """Everything an agent needs to compute an item of a job, besides its range."""

    repo_id: UUID
    root: bytes
    patterns: tuple[str, ...]
    hidden: bool
    rule: LookRule
    hash_looks: bool
    unreadable: Mapping[RelPath, str]
    fingerprint: str
    """Digest of the root's top-level names and its mount points below (``root_view``)."""
    hash_timeout_s: float = 60.0
    """The owner's ``FSLEDGER_HASH_TIMEOUT``: a helper's hashes keep to the same budget."""
    endpoint_url: str | None = None
    """A bucket's S3 endpoint (the root is then ``s3://BUCKET[/PREFIX]``)."""

    @property
    def is_bucket(self) -> bool:
        return self.root.startswith(b"s3://")

    @property
    def rules(self) -> IgnoreRules:
        return IgnoreRules(self.patterns, self.hidden)

    def task(self, url: str, lo: RelPath, hi: RelPath | None) -> RangeTask:
        """The range ``[lo, hi)`` of this job as a local scan's worker would get it."""
        return RangeTask(
            url,
            self.repo_id,
            self.root,
            self.rules,
            self.rule,
            lo,
            hi,
            self.unreadable or None,
            hash_looks=self.hash_looks,
        )

    def encode(self) -> bytes:
        """JSON, never pickle: whoever can write the database must not be able to make an
        agent run code."""
        return json.dumps(
            {
                "v": FORMAT,
                "repo": str(self.repo_id),
                "root": _s(self.root),
                "patterns": list(self.patterns),
                "hidden": self.hidden,
                "algo": self.rule.algo,
                "hashing": self.rule.hashing,
                "verify": self.rule.verify,
                "hash_looks": self.hash_looks,
                "unreadable": {_s(k): v for k, v in self.unreadable.items()},
                "fingerprint": self.fingerprint,
                "hash_timeout_s": self.hash_timeout_s,
                "endpoint_url": self.endpoint_url,
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobParams:
        """The inverse of ``encode``; ``ValueError`` for another format version."""
        d = json.loads(data)
        if d.get("v") != FORMAT:
            raise ValueError(f"scan job format {d.get('v')!r} is not {FORMAT}")
        return cls(
            UUID(d["repo"]),
            _b(d["root"]),
            tuple(d["patterns"]),
            bool(d["hidden"]),
            LookRule(d["algo"], bool(d["hashing"]), bool(d["verify"])),
            bool(d["hash_looks"]),
            {_b(k): str(v) for k, v in d["unreadable"].items()},
            str(d["fingerprint"]),
            float(d["hash_timeout_s"]),
            d.get("endpoint_url"),
        )


def _s(path: bytes) -> str:
    # latin-1 maps every byte to one character: any file name survives JSON, whatever the
    # locale of the agents.
    return path.decode("latin-1")


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def root_view(root: bytes, rules: IgnoreRules, endpoint_url: str | None = None) -> str | None:
    """A fingerprint of how this host sees a root: its visible top-level names and the mount
    points below it. ``None`` when the root is missing or not a directory. A bucket's: its
    URL and endpoint, when it can be listed from here (``fsledger.s3.bucket.bucket_view``)."""
    if root.startswith(b"s3://"):
        from fsledger.s3.bucket import bucket_view

        return bucket_view(root, endpoint_url)
    try:
        if not stat_mod.S_ISDIR(os.stat(root).st_mode):
            return None
        names = sorted(n for n in os.listdir(root) if not rules.ignores_name(n, n))
    except OSError:
        return None
    points = sorted(MountTable(root, rules).points)
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        digest.update(b"n" + name + b"\0")
    for point in points:
        digest.update(b"m" + point + b"\0")
    return digest.hexdigest()


# --- what an item's result is -----------------------------------------------------------------


def compute(params: JobParams, lo: RelPath, hi: RelPath | None, store: Store) -> RangeResult:
    """Compute one item: the range's merge and hashes, exactly as a local scan's range
    workers compute theirs (``fsledger.merge.compute_range``: one result type, one codec);
    a bucket's range is listed instead of walked (``fsledger.s3.bucket.compute_bucket_range``)."""
    task = params.task(store.url, lo, hi)
    if params.is_bucket:
        from fsledger.s3.bucket import compute_bucket_range

        return compute_bucket_range(task, store, _bucket(params))
    return compute_range(task, store)


_buckets: dict[tuple[bytes, str | None], Bucket] = {}
_buckets_lock = threading.Lock()


def _bucket(params: JobParams) -> Bucket:
    """This process's client of a job's bucket, kept for its next items."""
    from fsledger.s3.bucket import Bucket

    key = (params.root, params.endpoint_url)
    with _buckets_lock:
        if key not in _buckets:
            _buckets[key] = Bucket.at(params.root.decode("utf-8", "surrogateescape"), key[1])
        return _buckets[key]


# --- the worker processes ---------------------------------------------------------------------


class _WorkerState:
    """What a worker process keeps between items: its connections and decoded jobs."""

    def __init__(self) -> None:
        self.stores: dict[str, Store] = {}
        self.claimers: dict[str, Claimer] = {}
        self.params: dict[UUID, JobParams] = {}

    def store(self, url: str) -> Store:
        if url not in self.stores:
            from fsledger.store import open_store

            self.stores[url] = open_store(url)
        return self.stores[url]

    def claimer(self, url: str, tag: str) -> Claimer:
        if url not in self.claimers:
            from fsledger.store.scanwork import Claimer

            self.claimers[url] = Claimer(url, f"fsledger-scan:{tag}")
        return self.claimers[url]

    def drop(self, url: str) -> None:
        for conn in (self.stores.pop(url, None), self.claimers.pop(url, None)):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


_state = _WorkerState()


def work_loop(url: str, job_ids: list[UUID], tag: str) -> int:
    """Claim and compute items of these jobs until none is pending; returns items done.

    Runs in a worker process. A failure gives the item back (the transaction rolls back)
    and is raised to whoever started the loop.
    """
    done = 0
    try:
        claimer = _state.claimer(url, tag)
        store = _state.store(url)
        while (claim := claimer.claim(job_ids)) is not None:
            try:
                item = claim.item
                params = _state.params.get(item.job_id)
                if params is None:
                    params = _state.params[item.job_id] = JobParams.decode(claim.params)
                result = compute(params, item.lo, item.hi, store)
                claim.finish(encode_result(result), tag)
            finally:
                claim.release()
            done += 1
    except Exception:
        _state.drop(url)
        raise
    return done


_PR_SET_PDEATHSIG = 1


def _worker_init() -> None:
    """Ctrl-C is the parent's; and a worker dies with its parent, so that an agent killed
    with ``kill -9`` takes its claims (the workers' transactions) with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux only; elsewhere the claim ends with the worker
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _context() -> multiprocessing.context.BaseContext:
    # As fsledger.hashing: fork from a single-threaded process, forkserver from the daemon.
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fsledger.hashing", "fsledger.merge", "fsledger.distscan"])
    return ctx


class LocalWorkers:
    """Worker processes that claim items of some jobs: started, waited for and stopped here.

    Args:
        url: the store (each worker opens its own connections).
        workers: how many processes.
        tag: who they work for (``host:pid`` of the agent), written with each result.
    """

    def __init__(self, url: str, workers: int, tag: str) -> None:
        self.url = url
        self.workers = max(1, workers)
        self.tag = tag
        self._pool: multiprocessing.pool.Pool | None = None
        self._running: list[multiprocessing.pool.AsyncResult[int]] = []

    def start(self, job_ids: list[UUID]) -> None:
        """Start a claiming loop in every worker (returns at once)."""
        if self._pool is None:
            self._pool = _context().Pool(self.workers, initializer=_worker_init)
        self._running = [
            self._pool.apply_async(work_loop, (self.url, job_ids, self.tag))
            for _ in range(self.workers)
        ]

    def busy(self) -> bool:
        """Whether a claiming loop still runs."""
        return any(not r.ready() for r in self._running)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the loops to end; items they did. Raises what a loop raised."""
        done = 0
        for r in self._running:
            done += r.get(timeout)
        self._running = []
        return done

    def close(self) -> None:
        pool, self._pool = self._pool, None
        self._running = []
        if pool is not None:
            # Ends the workers at once: a claim in progress rolls back and is redone by
            # whoever takes it next (this agent's reconciler, or another agent).
            reaper = threading.Thread(target=pool.terminate, daemon=True, name="scan-work-close")
            reaper.start()
            reaper.join(10)


# --- the owner's side --------------------------------------------------------------------------


class DistributedMerge:
    """The owner's job: created, worked on, read in range order, removed.

    Args:
        store: the owner's store (PostgreSQL).
        repo: the repository reconciled.
        rules: its ignore rules.
        rule: when a record matching the disk still needs a look.
        unreadable: directories to walk as unreadable (filesystems not mounted now).
        workers: the owner's own worker processes (its reconciler thread works too).
        tag: ``host:pid`` of the owner.
        hash_timeout_s: the budget of one file's hash (``FSLEDGER_HASH_TIMEOUT``), for every
            agent that computes an item.
        plan: the cut points of about N ranges (default: ``plan_ranges`` of the root; a
            bucket's: ``Bucket.plan_cuts``).
    """

    def __init__(
        self,
        store: Store,
        repo: Repository,
        rules: IgnoreRules,
        rule: LookRule,
        unreadable: Mapping[RelPath, str] | None,
        workers: int,
        tag: str,
        hash_timeout_s: float = 60.0,
        plan: Callable[[int], list[RelPath]] | None = None,
    ) -> None:
        self.store = store
        self.repo = repo
        self.rules = rules
        self.plan = plan or (lambda parts: plan_ranges(repo.root, rules, parts))
        endpoint = repo.settings.endpoint_url if repo.is_bucket else None
        view = root_view(repo.root, rules, endpoint)
        self.params = JobParams(
            repo.id,
            repo.root,
            rules.patterns,
            rules.hidden,
            rule,
            rule.hashing,
            dict(unreadable or {}),
            view or "",
            hash_timeout_s,
            endpoint,
        )
        self.workers = LocalWorkers(store.url, workers, tag)
        self.tag = tag
        self.stall_s = RANGE_STALL_FACTOR * hash_timeout_s
        """No item may take longer than this (the budget of a local scan's ranges)."""
        self.done_by: dict[str, int] = {}
        """Items computed in worker processes, by agent (``host:pid``; this one's included)."""

    def results(self) -> Iterator[RangeResult]:
        """The results of every range, in range order (the order of a single merge)."""
        from fsledger.store.scanwork import create_job

        cuts = self.plan(RANGES)
        bounds: list[RelPath | None] = [b"", *cuts, None]
        ranges = [(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if lo is not None]
        job = create_job(self.store.url, self.repo.id, self.tag, self.params.encode(), ranges)
        log.info(
            "Repository %s: distributed scan job %s of %d key ranges",
            self.repo.id,
            job.job_id,
            len(ranges),
        )
        try:
            self.workers.start([job.job_id])
            yield from self._in_order(job)
            try:
                self.workers.wait(30)
            except Exception as exc:
                # Every item was done by someone (a failed claim rolls back and is taken
                # again, by this thread at the latest): a worker's failure lost nothing.
                log.warning("Repository %s: a scan worker failed: %s", self.repo.id, exc)
        finally:
            self.workers.close()
            job.close()

    def _in_order(self, job: ScanJob) -> Iterator[RangeResult]:
        here: dict[int, RangeResult] = {}
        for seq in range(job.size):
            waited_since = time.monotonic()
            while seq not in here:
                if time.monotonic() - waited_since > self.stall_s:
                    # Whoever holds the item is stuck (a read on a dead network mount cannot
                    # be interrupted): the scan fails, as a local range that stalls does.
                    raise TimeoutError(f"no result for item {seq} in {self.stall_s:.0f}s")
                got = job.take(seq, 0.0)
                if got is None:
                    # Someone else holds the next item. Without worker processes of its own
                    # (or once they are done), this thread does another item meanwhile; with
                    # them, it keeps to writing, which the first index waits for most.
                    claim = None if self.workers.busy() else job.claim([job.job_id])
                    if claim is not None:
                        here[claim.item.seq] = self._compute(claim)
                        continue
                    got = job.take(seq, 1.0)
                    if got is None:
                        log.debug("Repository %s: waiting for item %d", self.repo.id, seq)
                        continue
                data, who, claim = got
                if claim is not None:
                    here[seq] = self._compute(claim)
                elif data is None:  # done here, so it was in ``here``: cannot happen
                    raise AssertionError(f"item {seq} of scan job {job.job_id} has no result")
                else:
                    self.done_by[who] = self.done_by.get(who, 0) + 1
                    here[seq] = decode_result(data)
            yield here.pop(seq)

    def _compute(self, claim: Claim) -> RangeResult:
        """Compute an item in this thread, within the stall budget: a read stuck on a dead
        network mount cannot be interrupted, but it can be left behind in a daemon thread."""
        box: list[RangeResult] = []
        errors: list[BaseException] = []
        item = claim.item

        def run() -> None:
            try:
                box.append(compute(self.params, item.lo, item.hi, self.store))
            except BaseException as exc:
                errors.append(exc)

        try:
            worker = threading.Thread(target=run, name="scan-item", daemon=True)
            worker.start()
            worker.join(self.stall_s)
            if errors:
                raise errors[0]
            if not box:
                raise TimeoutError(f"item {item.seq} took more than {self.stall_s:.0f}s")
            claim.finish(None, self.tag)
        finally:
            claim.release()
        return box[0]


# --- the helper in every agent -------------------------------------------------------------------


class ScanHelper:
    """Takes items of other agents' jobs, for repositories whose root is mounted here alike.

    A thread that looks for open jobs every ``POLL_S`` seconds and runs ``workers``
    claiming processes while some are pending. Owned by ``SyncManager``.

    Args:
        url: the store.
        workers: worker processes.
        tag: ``host:pid`` of this agent.
        owned: whether this agent owns a repository (its own jobs it works on already).
    """

    def __init__(
        self, url: str, workers: int, tag: str, owned: Callable[[UUID], bool] | None = None
    ) -> None:
        self.url = url
        self.tag = tag
        self.owned = owned or (lambda _rid: False)
        self._workers = LocalWorkers(url, workers, tag)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._skipped: set[UUID] = set()
        self.items_done = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fsledger-scan-helper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self._workers.close()

    def eligible(self, params: JobParams) -> bool:
        """The root is mounted here as the owner sees it."""
        view = root_view(params.root, params.rules, params.endpoint_url)
        return bool(params.fingerprint) and view == params.fingerprint

    def _run(self) -> None:
        from fsledger.store.scanwork import open_jobs

        while not self._stop.wait(POLL_S):
            try:
                jobs = open_jobs(self.url)
                ids: list[UUID] = []
                for job in jobs:
                    if self.owned(job.repo_id) or job.job_id in self._skipped:
                        continue
                    try:
                        params = JobParams.decode(job.params)
                    except (ValueError, KeyError, TypeError) as exc:
                        # An owner of another version of fsledger: not ours to compute.
                        self._skipped.add(job.job_id)
                        log.warning("Scan job %s cannot be read here: %s", job.job_id, exc)
                        continue
                    if self.eligible(params):
                        ids.append(job.job_id)
                        continue
                    self._skipped.add(job.job_id)
                    log.info(
                        "Scan job %s of repository %s (owner %s): root %s is not mounted here "
                        "as on the owner; not helping",
                        job.job_id,
                        job.repo_id,
                        job.owner,
                        os.fsdecode(params.root),
                    )
                if not ids:
                    continue
                log.info("Helping with scan jobs %s", ", ".join(str(i) for i in ids))
                self._workers.start(ids)
                while self._workers.busy() and not self._stop.wait(0.2):
                    pass
                if not self._stop.is_set():
                    done = self._workers.wait(1)
                    self.items_done += done
                    log.info("Helped with %d scan item(s)", done)
            except Exception:
                log.exception("Scan helper round failed")
