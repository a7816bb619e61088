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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fsledger.beneath import Beneath
from fsledger.decide import LookRule
from fsledger.hashing import HashOutcome, hash_below
from fsledger.ignore import IgnoreRules
from fsledger.merge import Absent, Look, Merge, MergeItem, plan_ranges
from fsledger.model import (
    Digest,
    FileRecord,
    FileStat,
    RelPath,
    Repository,
    datetime_to_ns,
    ns_to_datetime,
)
from fsledger.mounts import MountTable
from fsledger.store.base import Store
from fsledger.walk import FileEntry, Unreadable, walk

if TYPE_CHECKING:
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

    @property
    def rules(self) -> IgnoreRules:
        return IgnoreRules(self.patterns, self.hidden)

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
        )


def _s(path: bytes) -> str:
    # latin-1 maps every byte to one character: any file name survives JSON, whatever the
    # locale of the agents.
    return path.decode("latin-1")


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def root_view(root: bytes, rules: IgnoreRules) -> str | None:
    """A fingerprint of how this host sees a root: its visible top-level names and the mount
    points below it. ``None`` when the root is missing or not a directory."""
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


@dataclass(slots=True)
class ItemResult:
    """A range's merge, and the hashes of its ``Look`` files when the job asked for them."""

    items: list[MergeItem] = field(default_factory=list)
    outcomes: dict[RelPath, HashOutcome] = field(default_factory=dict)
    scanned: int = 0
    specials: int = 0

    def encode(self) -> bytes:
        """Compact JSON (what a ``scan_work`` row holds): one short list per item."""
        out: list[Any] = []
        outcomes = self.outcomes
        for item in self.items:
            if type(item) is Look:
                path, st = item.entry
                o = outcomes.get(path)
                old = item.old
                out.append(
                    [
                        "L",
                        _s(path),
                        *st,
                        None
                        if old is None
                        else [
                            *old.stat,
                            old.content_hash,
                            old.hash_algo,
                            datetime_to_ns(old.last_scanned),
                        ],
                        None
                        if o is None
                        else [o.hex, o.size, o.mtime_ns, o.ctime_ns, o.inode, o.error, o.unsettled],
                    ]
                )
            elif type(item) is Absent:
                out.append(["A", _s(item.path)])
            else:
                assert isinstance(item, Unreadable)
                out.append(["U", _s(item.path), item.is_dir, item.error])
        return json.dumps(
            {"v": FORMAT, "scanned": self.scanned, "specials": self.specials, "items": out},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ItemResult:
        """The inverse of ``encode``; ``ValueError`` for another format version."""
        d = json.loads(data)
        if d.get("v") != FORMAT:
            raise ValueError(f"scan result format {d.get('v')!r} is not {FORMAT}")
        res = cls(scanned=int(d["scanned"]), specials=int(d["specials"]))
        for row in d["items"]:
            tag = row[0]
            if tag == "L":
                path = _b(row[1])
                entry = FileEntry(path, FileStat(row[2], row[3], row[4], row[5]))
                old = None
                if (r := row[6]) is not None:
                    digest = Digest(r[5], r[4]) if r[4] is not None else None
                    old = FileRecord(
                        path, FileStat(r[0], r[1], r[2], r[3]), digest, ns_to_datetime(r[6])
                    )
                res.items.append(Look(entry, old))
                if (o := row[7]) is not None:
                    res.outcomes[path] = HashOutcome(o[0], o[1], o[2], o[3], o[4], o[5], o[6])
            elif tag == "A":
                res.items.append(Absent(_b(row[1])))
            else:
                res.items.append(Unreadable(_b(row[1]), bool(row[2]), str(row[3])))
        return res


def compute(params: JobParams, lo: RelPath, hi: RelPath | None, store: Store) -> ItemResult:
    """Merge one range (and hash its ``Look`` files if the job says so)."""
    merge = Merge(
        walk(
            params.root,
            params.rules,
            lo=lo,
            hi=hi,
            unreadable=params.unreadable or None,
            flat=True,
        ),
        store.iter_record_rows(params.repo_id, lo, hi),
        params.rule,
    )
    result = ItemResult(list(merge))
    result.scanned, result.specials = merge.scanned, merge.specials
    if params.hash_looks:
        looks = [item.entry for item in result.items if type(item) is Look]
        result.outcomes = _hash_within_budget(params, looks)
    return result


def _hash_within_budget(params: JobParams, entries: list[FileEntry]) -> dict[RelPath, HashOutcome]:
    """Hash files in a daemon thread, within the budget the owner's hashing workers would
    have (``FSLEDGER_HASH_TIMEOUT`` plus 20 s a GiB): a read stuck on a dead network mount
    cannot be interrupted, but it can be left behind, and its files reported as errors."""
    done: dict[RelPath, HashOutcome] = {}
    algo, root = params.rule.algo, params.root

    def run() -> None:
        try:
            below = Beneath(root)
        except OSError as exc:
            error = HashOutcome(None, error=f"root: {exc.strerror or exc} (errno {exc.errno})")
            done.update({e.path: error for e in entries})
            return
        with below:
            for entry in entries:
                done[entry.path] = hash_below(below, entry.path, algo, expect=entry.stat)

    worker = threading.Thread(target=run, name="scan-hash", daemon=True)
    worker.start()
    budget = params.hash_timeout_s + 20.0 * sum(e.stat.size for e in entries) / (1 << 30)
    worker.join(budget)
    if worker.is_alive():
        late = [e.path for e in entries if e.path not in done]
        log.warning(
            "Repository %s: %d file(s) not hashed within %.0fs (first: %s)",
            params.repo_id,
            len(late),
            budget,
            os.fsdecode(late[0]) if late else "-",
        )
        error = HashOutcome(None, error=f"hash timed out after {budget:.0f}s")
        return {**{p: error for p in late}, **dict(done)}
    return done


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
                claim.finish(result.encode(), tag)
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
    ) -> None:
        self.store = store
        self.repo = repo
        self.rules = rules
        view = root_view(repo.root, rules)
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
        )
        self.workers = LocalWorkers(store.url, workers, tag)
        self.tag = tag
        self.done_by: dict[str, int] = {}
        """Items computed in worker processes, by agent (``host:pid``; this one's included)."""

    def results(self) -> Iterator[ItemResult]:
        """The results of every range, in range order (the order of a single merge)."""
        from fsledger.store.scanwork import create_job

        cuts = plan_ranges(self.repo.root, self.rules, RANGES)
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

    def _in_order(self, job: ScanJob) -> Iterator[ItemResult]:
        here: dict[int, ItemResult] = {}
        for seq in range(job.size):
            while seq not in here:
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
                    here[seq] = ItemResult.decode(data)
            yield here.pop(seq)

    def _compute(self, claim: Claim) -> ItemResult:
        try:
            item = claim.item
            result = compute(self.params, item.lo, item.hi, self.store)
            claim.finish(None, self.tag)
        finally:
            claim.release()
        return result


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
        return bool(params.fingerprint) and root_view(params.root, params.rules) == (
            params.fingerprint
        )

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
