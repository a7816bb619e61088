"""A bucket (or a prefix of one) as a repository: tier 2 over ListObjectsV2, hints over HEAD.

A repository whose root is ``s3://BUCKET[/PREFIX]`` keeps one record per object below the
prefix (a key ending in ``/`` is a folder marker, not a file). Its path is the key below
the prefix, as UTF-8 bytes. Its ``FileStat`` is the object's change key::

    size      the object's size
    mtime_ns  LastModified (what the API and ``files --json`` show as the mtime)
    ctime_ns  LastModified too, or a fingerprint of the VersionId in a bucket with
              versioning (listed then with ListObjectVersions, current versions only)
    inode     a 63-bit fingerprint of the ETag (``etag_fingerprint``)

so the merge settles an unchanged object with the same one tuple comparison as a file,
``decide.needs_look`` and ``decide.classify`` decide what a listing entry means, and a
record's key changes whenever the object is written (a new LastModified, and a new ETag for
new content). The racy rule is off for objects (``LookRule.racy``): the ETag sees every
write, whatever the clock's granularity.

A reconciliation (``run_bucket``) is ``fsledger.reconcile``'s run with its listing, its
hashing and its guard replaced:

- the listing is ListObjectsV2 of the prefix, paged, merged with the stored records by
  ``merge.Merge``. AWS lists keys in UTF-8 byte order, the merge's order; some servers
  (SeaweedFS lists a folder ``a/`` before ``a.txt``) do not, so the listing is sorted on
  the way in, in runs of ``RUN_ENTRIES`` spilled to temporary files and merged (bounded
  memory whatever the server's order; one in-memory sort, of nothing out of place, on AWS);
- an object whose key matches its record is never downloaded; the others are hashed by a
  streamed GET in ``CHUNK``-sized pieces, ``RECONCILIATION_MAX_CONCURRENCY`` at a time;
- a new key whose ETag and size match a record whose own key is gone (a HEAD says 404) is
  that record moved (``decide.is_object_move_of``): a prefix renamed by copy + delete
  moves its records, keeping their hashes, without a GET;
- the guard (``roots.check_bucket``): a bucket that is missing, refuses the credentials or
  cannot be reached, or a prefix that lists empty while records exist, raises
  ``RootUnavailable`` (exit 4) before anything is deleted, checked before the listing and
  again before the deletions.

``ObjectWriter`` is the repository's ``RepoWriter``: it confirms each change with a HEAD
of its key (the newer state wins, as with ``lstat`` for files). ``look_at`` applies the
hints of S3 event notifications: HEAD the key, GET it only if its key changed.

boto3 is imported only when a bucket is used (``fsledger.s3.location.make_client``).
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import pickle
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import IO, Any, cast

from fsledger import decide
from fsledger.decide import LookRule
from fsledger.errors import RootUnavailable
from fsledger.hashing import ALGORITHMS, HashOutcome
from fsledger.ignore import IgnoreRules
from fsledger.merge import (
    RANGE_STALL_FACTOR,
    Look,
    Merge,
    MergeItem,
    NewFile,
    RangeResult,
    RangeTask,
)
from fsledger.model import (
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    RelPath,
    Repository,
    ScanStats,
    datetime_to_ns,
    utcnow,
)
from fsledger.reconcile import Progress, Reconciler, _Job, _Run, owner_tag
from fsledger.roots import check_bucket
from fsledger.s3.location import S3Location, make_client
from fsledger.store.base import Store
from fsledger.store.sql import prefix_range
from fsledger.walk import FlatEntry
from fsledger.writer import Applied, Checked, Hold, RepoWriter, Ticket

log = logging.getLogger(__name__)

__all__ = [
    "CALLS",
    "Bucket",
    "ObjectWriter",
    "etag_fingerprint",
    "look_at",
    "object_stat",
    "bucket_view",
    "compute_bucket_range",
    "run_bucket",
]

CHUNK = 1 << 20
"""Bytes read from a GET's body at a time: a 5 GiB object streams through in 1 MiB pieces."""
PAGE_KEYS = 1000
"""Keys per ListObjectsV2 page (S3's maximum)."""
RUN_ENTRIES = 100_000
"""Listing entries sorted in memory at once; longer listings are sorted in spilled runs."""
PLAN_DEPTH = 3
"""Folder levels a range plan lists at most (``Bucket.plan_cuts``)."""
PLAN_PAGES = 5
"""Listing pages of one folder a range plan reads at most: cut points are only hints."""
PLAN_FOLDERS = 500
"""A range plan descends no further once a level holds this many folders."""
RANGE_MIN_RECORDS = 50_000
"""A rescan of this many records or more lists the bucket in key ranges, in parallel."""
RANGE_MIN_FOLDERS = 8
"""A first index lists in key ranges when its plan finds this many ranges or more."""
RANGE_OBJECTS = 20_000
"""About how many objects a key range of a rescan holds."""
MAX_RANGES = 256

CALLS: collections.Counter[str] = collections.Counter()
"""S3 requests this process made, by operation (``GetObject``, ``HeadObject``,
``ListObjectsV2``...): what a scan cost, and the evidence tests check (no GET for a move)."""
_calls_lock = threading.Lock()


def etag_fingerprint(etag: str) -> int:
    """A non-negative 63-bit number standing for an ETag (quotes ignored), stored in the
    record's inode slot: equal ETags give equal numbers, so ``records_by_inode`` finds the
    records a copied object may be a move of."""
    digest = hashlib.blake2b(etag.strip('"').encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def object_stat(
    size: int, last_modified: datetime, etag: str, version_id: str | None = None
) -> FileStat:
    """An object's change key as a ``FileStat`` (see the module's docstring); in a bucket
    with versioning, the VersionId's fingerprint takes the ctime slot (another version with
    the same content and LastModified second is then looked at, and found ``META``)."""
    mtime_ns = datetime_to_ns(last_modified)
    version = mtime_ns if version_id in (None, "", "null") else etag_fingerprint(version_id)
    return FileStat(int(size), mtime_ns, version, etag_fingerprint(etag))


def _problem(exc: BaseException) -> str:
    """What went wrong with a request, for the guard's message (no secrets: botocore's
    messages name the operation, the code and the server's message)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = error.get("Code") or status
        return f"{code}: {error.get('Message') or 'refused'}"
    return f"{type(exc).__name__}: {exc}"


def _is_missing(exc: BaseException) -> bool:
    """A 404 of a key (HEAD answers a bare 404, GET NoSuchKey)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in {"404", "NoSuchKey", "NotFound"} or (status == 404 and code != "NoSuchBucket")


def _count_call(event_name: str = "", **_: Any) -> None:
    with _calls_lock:
        CALLS[event_name.rpartition(".")[2]] += 1


class Bucket:
    """The I/O of one bucket repository: listing, HEAD, streamed GET (thread-safe)."""

    def __init__(self, repo: Repository, max_pool: int = 16) -> None:
        self._setup(S3Location.parse(repo.root_str, repo.settings.endpoint_url), max_pool)

    @classmethod
    def at(cls, root: str, endpoint_url: str | None, max_pool: int = 16) -> Bucket:
        """The bucket of a root URL (``s3://BUCKET[/PREFIX]``), for an agent that has the
        job of a distributed scan rather than the repository (``fsledger.distscan``)."""
        self = cls.__new__(cls)
        self._setup(S3Location.parse(root, endpoint_url), max_pool)
        return self

    def _setup(self, location: S3Location, max_pool: int) -> None:
        self.location = location
        self.client = make_client(self.location, max_pool=max(max_pool, 4))
        self.client.meta.events.register("before-call.s3", _count_call)
        self._versioned: bool | None = None

    @property
    def versioned(self) -> bool:
        """Whether the bucket has (or had: suspended) versioning, so that VersionIds are part
        of the change key. Asked once per listing (``refresh_versioning``) or on first use;
        a server that does not answer (no versioning API, no permission) is unversioned."""
        if self._versioned is None:
            self.refresh_versioning()
        return bool(self._versioned)

    def refresh_versioning(self) -> None:
        try:
            status = self.client.get_bucket_versioning(Bucket=self.location.bucket).get("Status")
        except Exception:  # noqa: BLE001 - not supported or not permitted: plain listing
            status = None
        self._versioned = status in {"Enabled", "Suspended"}

    def _version(self, resp: Any) -> str | None:
        return resp.get("VersionId") if self.versioned else None

    def key(self, path: RelPath) -> str:
        return self.location.key(path.decode("utf-8", "surrogateescape"))

    def problem(self) -> str | None:
        """Why the bucket cannot be listed now (missing, refused, unreachable), or None."""
        try:
            self.client.list_objects_v2(
                Bucket=self.location.bucket, Prefix=self.location.prefix, MaxKeys=1
            )
        except Exception as exc:  # noqa: BLE001 - botocore's errors: any means "not now"
            return _problem(exc)
        return None

    def listing(self, rules: IgnoreRules, below: RelPath = b"") -> Iterator[FlatEntry]:
        """The objects below the prefix (and ``below/``, a folder of it), as the walk's flat
        entries, in path byte order; folder markers and ignored keys are left out.

        Raises:
            RootUnavailable: a page could not be listed.
        """
        return _sorted_runs(self._pages(rules, below))

    def _pages(self, rules: IgnoreRules, below: RelPath) -> Iterator[FlatEntry]:
        self.refresh_versioning()
        folder = below + b"/" if below else b""
        for kind, path, stat in self._list(rules, folder, delimited=False):
            if kind == "o":
                yield (path, stat)  # type: ignore[misc]

    def _list(
        self, rules: IgnoreRules, folder: RelPath, delimited: bool, max_pages: int | None = None
    ) -> Iterator[tuple[str, RelPath, tuple[int, ...]]]:
        """The listing of ``folder`` (a path below the prefix ending in ``/``, or ``b""``):
        ``("o", path, stat)`` for each object (folder markers and ignored keys left out)
        and, ``delimited``, ``("p", folder, ())`` for each common prefix (``a/b/``), in the
        server's order. ``refresh_versioning`` must have been called.

        Raises:
            RootUnavailable: a page could not be listed.
        """
        prefix = self.location.prefix + folder.decode("utf-8", "surrogateescape")
        cut = len(self.location.prefix)
        versioned = bool(self._versioned)
        # With versioning, the current versions (``IsLatest``; a key whose latest is a delete
        # marker has none) and their VersionIds; otherwise the plain listing.
        operation, field = (
            ("list_object_versions", "Versions") if versioned else ("list_objects_v2", "Contents")
        )
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
        if delimited:
            args["Delimiter"] = "/"
        config: dict[str, Any] = {"PageSize": PAGE_KEYS}
        if max_pages is not None:
            config["MaxItems"] = max_pages * PAGE_KEYS
        pages = self.client.get_paginator(operation).paginate(**args, PaginationConfig=config)
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", ()) if delimited else ():
                    key = common["Prefix"]
                    yield ("p", key[cut:].encode("utf-8", "surrogateescape"), ())
                for obj in page.get(field, ()):
                    key = obj["Key"]
                    if key.endswith("/") or (versioned and not obj.get("IsLatest")):
                        continue  # a folder marker, or an older version
                    path = key[cut:].encode("utf-8", "surrogateescape")
                    if rules.ignores_path(path):
                        continue
                    stat = object_stat(
                        obj["Size"],
                        obj["LastModified"],
                        obj["ETag"],
                        obj.get("VersionId") if versioned else None,
                    )
                    yield ("o", path, tuple(stat))
        except RootUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the listing failed part way
            raise RootUnavailable(
                f"bucket {self.location} could not be listed ({_problem(exc)}); nothing was deleted"
            ) from exc

    # --- key ranges ---------------------------------------------------------------------
    def plan_cuts(
        self, parts: int, max_depth: int = PLAN_DEPTH, max_pages: int = PLAN_PAGES
    ) -> list[RelPath]:
        """Cut points that split the bucket's key space into about ``parts`` ranges, as
        ``merge.plan_ranges`` does for a tree: folder keys (``a/b/``) from ``Delimiter="/"``
        listings of the top ``max_depth`` levels (``max_pages`` pages a folder at most).
        Every key falls in exactly one range whatever the bucket holds (a stale plan costs
        balance, never correctness). Returns the sorted cut points ``c1 < c2 < ...``.
        """
        self.refresh_versioning()
        level: list[RelPath] = [b""]
        keys: list[RelPath] = []
        none = IgnoreRules((), False)
        for _depth in range(max_depth):
            below: list[RelPath] = []
            for folder in level:
                below += [p for k, p, _ in self._list(none, folder, True, max_pages) if k == "p"]
            if not below:
                break
            level = below
            keys = sorted(set(level))
            if len(keys) >= 4 * parts or len(level) > PLAN_FOLDERS:
                break
        if len(keys) < 2:
            return []
        step = len(keys) / parts
        cuts = sorted({keys[int(i * step)] for i in range(1, parts)})
        return [c for c in cuts if c]

    def range_listing(
        self, rules: IgnoreRules, lo: RelPath, hi: RelPath | None
    ) -> Iterator[FlatEntry]:
        """The objects whose paths fall in ``[lo, hi)``, in path byte order, whatever order
        the server lists in: the folders wholly inside the range are listed flat (``Prefix``),
        those the range's bounds cut through are listed with ``Delimiter="/"`` and descended
        into, and every key is filtered to the range in byte order, then sorted.

        Raises:
            RootUnavailable: a page could not be listed.
        """
        self.refresh_versioning()

        def inside(path: RelPath) -> bool:
            return lo <= path and (hi is None or path < hi)

        return _sorted_runs(e for e in self._range_pages(rules, b"", lo, hi) if inside(e[0]))

    def _range_pages(
        self, rules: IgnoreRules, folder: RelPath, lo: RelPath, hi: RelPath | None
    ) -> Iterator[FlatEntry]:
        # Every key below ``folder`` lies in [folder, folder_hi): "0" is the byte after "/".
        folder_hi = folder[:-1] + b"0" if folder else None
        whole = lo <= folder and (hi is None or (folder_hi is not None and folder_hi <= hi))
        for kind, path, stat in self._list(rules, folder, delimited=not whole):
            if kind == "o":
                yield (path, stat)  # type: ignore[misc]
                continue
            sub_hi = path[:-1] + b"0"
            if (hi is not None and path >= hi) or sub_hi <= lo:
                continue  # a folder outside the range
            yield from self._range_pages(rules, path, lo, hi)

    def head(self, path: RelPath) -> FileStat | None:
        """The object's change key, or None when there is no object at ``path``.

        Raises:
            Exception: botocore's, for anything but a 404 (cannot know).
        """
        try:
            resp = self.client.head_object(Bucket=self.location.bucket, Key=self.key(path))
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise
        return object_stat(
            resp["ContentLength"], resp["LastModified"], resp["ETag"], self._version(resp)
        )

    def hash_object(self, path: RelPath, algo: str) -> HashOutcome:
        """Hash the object at ``path`` by one streamed GET: the hash with the change key of
        the version read (the GET's own headers), unsettled if the object is gone, or an
        error."""
        try:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=self.key(path))
            hasher = ALGORITHMS[algo](1)
            body = resp["Body"]
            try:
                for piece in body.iter_chunks(CHUNK):
                    hasher.update(piece)
            finally:
                body.close()
        except Exception as exc:  # noqa: BLE001 - reported per object
            if _is_missing(exc):
                return HashOutcome(None, unsettled=True)
            return HashOutcome(None, error=_problem(exc))
        stat = object_stat(
            resp["ContentLength"], resp["LastModified"], resp["ETag"], self._version(resp)
        )
        return HashOutcome(hasher.hexdigest(), *stat)


def _sorted_runs(entries: Iterable[FlatEntry]) -> Iterator[FlatEntry]:
    """``entries`` in path byte order, in bounded memory: runs of ``RUN_ENTRIES`` sorted
    in memory, runs beyond the first spilled to temporary files, then merged."""
    run: list[FlatEntry] = []
    spilled: list[IO[bytes]] = []
    try:
        for entry in entries:
            run.append(entry)
            if len(run) >= RUN_ENTRIES:
                run.sort()
                spill = tempfile.TemporaryFile(prefix="fsledger-listing-")  # noqa: SIM115
                for i in range(0, len(run), 10_000):
                    pickle.dump(run[i : i + 10_000], spill, pickle.HIGHEST_PROTOCOL)
                spill.seek(0)
                spilled.append(spill)
                run = []
        run.sort()
        if not spilled:
            yield from run
            return
        yield from heapq.merge(run, *(_read_run(f) for f in spilled))
    finally:
        for f in spilled:
            f.close()


def _read_run(f: IO[bytes]) -> Iterator[FlatEntry]:
    while True:
        try:
            chunk = pickle.load(f)  # noqa: S301 - our own temporary file
        except EOFError:
            return
        yield from cast("list[FlatEntry]", chunk)


HINT_MEMORY_S = 3600.0
"""How long the writer remembers that a hint wrote a key (see ``ObjectWriter``)."""


class ObjectWriter(RepoWriter):
    """The ``RepoWriter`` of a bucket repository: changes are confirmed by a HEAD of their
    key (``max_concurrency`` at a time) instead of an ``lstat``, and decided again against
    the records as they are under the lock.

    Which changes are HEADed: every change of a hint (``apply_hinted``); of a reconciliation
    (``apply``, through its batches, while ``run_started`` is set), only those whose key a
    hint wrote since the run began: the run's view of any other key (its listing, the GET's
    own headers) is the newest any look has had, and a HEAD of every object would double the
    requests of a first index. Where the object changed again since, the next poll sees its
    key differ, as it would after any write.
    """

    def __init__(
        self,
        store: Store,
        repo: Repository,
        rules: IgnoreRules,
        verify: bool = True,
        retire: IgnoreRules | None = None,
        max_concurrency: int = 8,
    ) -> None:
        super().__init__(store, repo, rules, verify, retire)
        self.max_concurrency = max(1, max_concurrency)
        self._bucket: Bucket | None = None
        self._bucket_lock = threading.Lock()  # not ``lock``: HEADs run while a batch holds it
        self.run_started: float | None = None
        """Monotonic time the reconciliation in progress began (None: HEAD every change)."""
        self._hinted: dict[RelPath, float] = {}
        """Keys hints wrote, with when (pruned after ``HINT_MEMORY_S``)."""
        self._hinting = False

    @property
    def bucket(self) -> Bucket:
        with self._bucket_lock:
            if self._bucket is None:
                self._bucket = Bucket(self.repo, max_pool=2 * self.max_concurrency)
            return self._bucket

    def check_ahead(self, changes: Sequence[Change], ticket: Ticket) -> Checked | None:
        """Never ahead: which keys are HEADed depends on the hints written until the lock is
        taken (``_needs_head``), and the records are decided again under it."""
        return None

    def object_still_true(self, change: Change) -> bool:
        """Whether the bucket still shows what ``change`` says (one HEAD)."""
        kind = change.kind
        if kind is ChangeKind.DIR_MOVED:
            return False  # a bucket has no directories to rename
        if kind is ChangeKind.DELETED and self.retire.ignores_path(change.path):
            return True
        try:
            stat = self.bucket.head(change.path)
        except Exception:  # noqa: BLE001 - cannot know: what cannot be seen is kept
            return False
        if kind is ChangeKind.DELETED:
            return stat is None
        assert change.record is not None
        return stat == change.record.stat

    def apply_hinted(self, changes: Sequence[Change]) -> Applied:
        """Write the changes of a hint (``look_at``): each HEADed, and remembered, so that a
        reconciliation running meanwhile checks its own view of those keys."""
        with self.lock:
            self._hinting = True
            try:
                applied = self.apply(changes)
            finally:
                self._hinting = False
            now = time.monotonic()
            for change in applied.changes:
                self._hinted[change.path] = now
            if len(self._hinted) > 10_000 or applied.changes:
                old = now - HINT_MEMORY_S
                self._hinted = {p: t for p, t in self._hinted.items() if t >= old}
            return applied

    def _needs_head(self, change: Change) -> bool:
        started = self.run_started
        if self._hinting or started is None:
            return True
        hinted = self._hinted.get(change.path)
        if hinted is None and change.old_path is not None:
            hinted = self._hinted.get(change.old_path)
        return hinted is not None and hinted >= started

    def _confirmed(
        self,
        changes: Sequence[Change],
        confirm: Callable[[Change], bool] | None = None,
        seen_hold: bool = False,
    ) -> tuple[list[Change], list[Change]]:
        # seen_hold: never asked here (this writer checks nothing ahead: see check_ahead).
        if not self.verify or not changes:
            return list(changes), []
        verdicts = [True] * len(changes)
        heads = [i for i, c in enumerate(changes) if self._needs_head(c)]
        if len(heads) == 1:
            verdicts[heads[0]] = self.object_still_true(changes[heads[0]])
        elif heads:
            with ThreadPoolExecutor(min(self.max_concurrency, len(heads))) as pool:
                found = pool.map(self.object_still_true, [changes[i] for i in heads])
                for i, ok in zip(heads, found, strict=True):
                    verdicts[i] = ok
        kept: list[Change] = []
        dropped: list[Change] = []
        for change, ok in zip(changes, verdicts, strict=True):
            ok = ok or (confirm is not None and confirm(change))
            (kept if ok else dropped).append(change)
        fresh, stale = self._against_records(kept)
        return fresh, dropped + stale

    def _against_records(self, changes: list[Change]) -> tuple[list[Change], list[Change]]:
        """The changes decided again against the records as they are now (under the lock):
        a poll and a hint may both have seen one new object, and the second to write must
        not announce it created again. A change the records already show is dropped; one
        whose record appeared or went meanwhile gets the kind ``decide.classify`` says."""
        paths = [c.path for c in changes] + [c.old_path for c in changes if c.old_path]
        current = self.store.get_records(self.repo.id, paths) if paths else {}
        fresh: list[Change] = []
        stale: list[Change] = []
        for change in changes:
            kind, rec = change.kind, change.record
            if kind is ChangeKind.DELETED:
                (fresh if change.path in current else stale).append(change)
                continue
            if kind is ChangeKind.MOVED:
                assert change.old_path is not None
                (fresh if change.old_path in current else stale).append(change)
                continue
            if rec is None:
                fresh.append(change)
                continue
            algo = rec.digest.algo if rec.digest else ""
            rule = LookRule(algo, rec.digest is not None, racy=False)
            now = decide.classify(current.get(change.path), rec.stat, rec.digest, rule)
            if now is None:
                stale.append(change)
            else:
                fresh.append(change if now is kind else Change(now, change.path, rec))
        return fresh, stale


class _ObjectLooker:
    """The move detection's question "is a record's object gone from its key?" (a HEAD)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def __enter__(self) -> _ObjectLooker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def gone(self, rec: FileRecord) -> bool:
        try:
            stat = self.bucket.head(rec.path)
        except Exception:  # noqa: BLE001 - cannot know: not a move
            return False
        return stat is None or stat.inode != rec.stat.inode


class _BucketRun(_Run):
    """One reconciliation of a bucket: ``_Run`` with the listing for the walk, streamed GETs
    for the hashing workers, HEADs for ``lstat`` and the bucket's guard."""

    move_match = staticmethod(decide.is_object_move_of)

    def __init__(self, owner: Reconciler, writer: ObjectWriter, *args: Any, **kw: Any) -> None:
        super().__init__(owner, writer, *args, **kw)
        self.bucket = writer.bucket
        self.rule = LookRule(self.algo, self.hashing, self.verify, racy=False)
        self.listed = 0
        self.gets: collections.deque[tuple[list[_Job], list[Future[HashOutcome]]]] = (
            collections.deque()
        )
        self.pool = ThreadPoolExecutor(
            max(1, self.settings.max_concurrency), thread_name_prefix="s3-get"
        )

    def run(self) -> None:
        try:
            self._merge()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _looker(self) -> _ObjectLooker:  # type: ignore[override]
        return _ObjectLooker(self.bucket)

    def _merge_all(self) -> None:
        if self.settings.distributed and self.store.shares_scans and not self.prefix:
            self._merge_distributed(self.rule)
        elif (cuts := self._bucket_cuts()) is not None:
            self._merge_ranges(cuts)
        else:
            lo, hi = prefix_range(self.prefix) if self.prefix else (b"", None)
            merge = Merge(
                self.bucket.listing(self.writer.rules, self.prefix),
                self.store.iter_record_rows(self.repo.id, lo, hi),
                self.rule,
                self._tick if self.progress else None,
            )
            for item in merge:
                self._take(item)
            self.listed = merge.scanned
            self.stats.files_scanned += merge.scanned
        self._dispatch_chunk(final=True)
        while self.gets:
            self._collect_one()
        self.out.flush()
        self.out.wait()
        self._write_displacing()
        self._apply_deletions()
        if self.progress:
            self.progress(self.stats)

    def _bucket_cuts(self) -> list[RelPath] | None:
        """The cut points of a listing in key ranges, or None for one pass: a whole bucket,
        threads to list it with, and enough of it (``RANGE_MIN_RECORDS`` records, or a first
        index whose plan finds ``RANGE_MIN_FOLDERS`` ranges)."""
        threads = self.settings.max_concurrency
        if self.prefix or threads < 2:
            return None
        if self.record_count and self.record_count < RANGE_MIN_RECORDS:
            return None
        parts = max(4 * threads, self.record_count // RANGE_OBJECTS)
        cuts = self.bucket.plan_cuts(min(parts, MAX_RANGES))
        if not self.record_count and len(cuts) + 1 < RANGE_MIN_FOLDERS:
            return None
        return cuts or None

    def _merge_ranges(self, cuts: list[RelPath]) -> None:
        """The listing in key ranges, each listed, merged with its records and its new or
        changed objects hashed by a thread (``compute_bucket_range``: the ``RangeResult`` of
        a tree's range workers), taken in range order as a single merge's items would be."""
        bounds: list[RelPath | None] = [b"", *cuts, None]
        tasks = [
            RangeTask(
                self.store.url,
                self.repo.id,
                self.repo.root,
                self.writer.rules,
                self.rule,
                lo,
                hi,
                hash_looks=self.hashing,
            )
            for lo, hi in zip(bounds, bounds[1:], strict=False)
            if lo is not None
        ]
        threads = max(1, self.settings.max_concurrency)
        log.debug("Repository %s: listing %d key ranges", self.repo.id, len(tasks))
        stall = RANGE_STALL_FACTOR * self.settings.hash_timeout_s
        running: collections.deque[Future[RangeResult]] = collections.deque()
        pending = iter(tasks)
        with ThreadPoolExecutor(threads, thread_name_prefix="s3-range") as ranges:
            try:
                for task in pending:
                    running.append(
                        ranges.submit(compute_bucket_range, task, self.store, self.bucket)
                    )
                    if len(running) >= 2 * threads:
                        self._take_range(running.popleft().result(stall))
                while running:
                    self._take_range(running.popleft().result(stall))
            except TimeoutError as exc:
                raise self._stalled(exc) from exc
            finally:
                for fut in running:
                    fut.cancel()

    def _merge_distributed(self, rule: LookRule) -> None:
        """The ranges as a job other agents on the same PostgreSQL help with (see
        ``fsledger.distscan``): planned from the bucket's folders, computed by whoever can
        list the bucket (``compute_bucket_range``)."""
        from fsledger.distscan import DistributedMerge

        dist = DistributedMerge(
            self.store,
            self.repo,
            self.writer.rules,
            rule,
            None,
            self.settings.max_concurrency,
            owner_tag(),
            self.settings.hash_timeout_s,
            plan=self.bucket.plan_cuts,
        )
        try:
            for result in dist.results():
                self._take_range(result)
        except TimeoutError as exc:
            raise self._stalled(exc) from exc

    def _take_range(self, result: RangeResult) -> None:
        self.listed += result.scanned
        super()._take_range(result)

    def _dispatch_chunk(self, final: bool) -> None:
        jobs = self._take_chunk()
        if not jobs:
            return
        algo = self.algo
        futures = [self.pool.submit(self.bucket.hash_object, j.entry.path, algo) for j in jobs]
        self.gets.append((jobs, futures))
        # Two chunks in flight at most: memory stays bounded by CHUNK a GET in progress.
        while len(self.gets) > 2:
            self._collect_one()

    def _collect_one(self) -> None:
        jobs, futures = self.gets.popleft()
        self._finish_jobs(jobs, [f.result() for f in futures])

    def _apply_deletions(self) -> None:
        if not self.deletions:
            return
        # The guard again before anything is deleted: the bucket still answers, and a
        # listing that found nothing at all is not taken for a library deleted.
        check_bucket(
            self.repo,
            problem=self.bucket.problem(),
            empty=self.listed == 0 and not self.prefix,
            has_records=True,
            force=self.force,
        )
        for path in sorted(self.deletions):
            self._emit(Change(ChangeKind.DELETED, path))
        self.out.flush()
        self.out.wait()


def run_bucket(
    owner: Reconciler,
    writer: RepoWriter,
    stats: ScanStats,
    *,
    verify: bool,
    record_count: int,
    progress: Progress | None,
    prefix: RelPath,
    force: bool,
    hold: Hold | None,
) -> None:
    """One reconciliation of a bucket repository (``Reconciler.reconcile`` calls it).

    Raises:
        RootUnavailable, GuardRefused: the bucket failed the guard; nothing was deleted.
    """
    if not isinstance(writer, ObjectWriter):
        raise TypeError(f"repository {writer.repo.name!r}: a bucket needs an ObjectWriter")
    check_bucket(
        writer.repo,
        problem=writer.bucket.problem(),
        empty=False,
        has_records=record_count > 0,
        force=force,
    )
    run = _BucketRun(
        owner, writer, stats, verify, record_count, progress, prefix, force=force, hold=hold
    )
    writer.run_started = time.monotonic()
    try:
        run.run()
    finally:
        writer.run_started = None


def look_at(
    writer: ObjectWriter, paths: Iterable[RelPath], algo: str, hashing: bool = True
) -> Applied:
    """Apply hints (S3 event notifications) about ``paths``: HEAD each key; a key gone
    deletes its record, a key whose change key differs from its record is hashed by a
    streamed GET and written (created, modified or meta), through the repository's writer.

    Raises:
        RootUnavailable: the bucket cannot be reached (nothing is written).
    """
    bucket = writer.bucket
    rule = LookRule(algo, hashing, racy=False)
    wanted = [p for p in dict.fromkeys(paths) if p and not writer.rules.ignores_path(p)]
    if not wanted:
        return Applied((), (), None)
    records = writer.store.get_records(writer.repo.id, wanted)
    changes: list[Change] = []
    for path in wanted:
        old = records.get(path)
        try:
            stat = bucket.head(path)
        except Exception as exc:  # noqa: BLE001
            raise RootUnavailable(
                f"bucket {bucket.location} cannot be reached ({_problem(exc)})"
            ) from exc
        if stat is None:
            if old is not None:
                changes.append(Change(ChangeKind.DELETED, path))
            continue
        if not decide.needs_look(old, stat, rule):
            continue
        digest: Digest | None = None
        if hashing:
            out = bucket.hash_object(path, algo)
            if out.hex is None:
                continue  # gone or failing meanwhile: the next hint or poll settles it
            stat, digest = (
                FileStat(out.size, out.mtime_ns, out.ctime_ns, out.inode),
                Digest(algo, out.hex),
            )
        kind = decide.classify(old, stat, digest, rule)
        if kind is not None:
            changes.append(Change(kind, path, FileRecord(path, stat, digest, utcnow())))
    return writer.apply_hinted(changes) if changes else Applied((), (), None)


def compute_bucket_range(task: RangeTask, store: Store, bucket: Bucket) -> RangeResult:
    """One key range of a bucket, as ``merge.compute_range`` computes one of a tree: its
    listing (``Bucket.range_listing``) merged with its records, and, with
    ``task.hash_looks``, its new and changed objects hashed by streamed GETs. A new object
    whose ETag and size match a record elsewhere may be that record moved: it is left
    unhashed, for the reconciliation's move detection to pair without a GET.

    Raises:
        RootUnavailable: the range could not be listed (the reconciliation deletes nothing).
    """
    merge = Merge(
        bucket.range_listing(task.rules, task.lo, task.hi),
        store.iter_record_rows(task.repo_id, task.lo, task.hi),
        task.rule,
    )
    listed: list[MergeItem] = list(merge)
    if not task.hash_looks:
        return RangeResult(list(listed), merge.scanned, 0)
    looks = [
        it
        for it in listed
        if type(it) is Look and (it.old is None or it.old.stat.inode != it.entry.stat.inode)
    ]
    suspects: set[tuple[int, int]] = set()
    if looks:
        inodes = sorted({it.entry.stat.inode for it in looks})
        suspects = {
            (r.stat.inode, r.stat.size) for r in store.records_by_inode(task.repo_id, inodes)
        }
    algo = task.rule.algo
    items: list[MergeItem | NewFile] = []
    for item in listed:
        if type(item) is not Look:
            items.append(item)
            continue
        assert isinstance(item, Look)
        entry, old = item.entry, item.old
        stat = entry.stat
        moved_here = (stat.inode, stat.size) in suspects and (
            old is None or old.stat.inode != stat.inode
        )
        if moved_here:
            items.append(item)
            continue
        out = bucket.hash_object(entry.path, algo)
        if old is None and out.hex is not None:
            items.append((entry.path, out.hex, out.size, out.mtime_ns, out.ctime_ns, out.inode))
        else:
            items.append(Look(entry, old, out))
    return RangeResult(items, merge.scanned, 0)


def bucket_view(root: bytes, endpoint_url: str | None) -> str | None:
    """What a distributed scan's helper compares for a bucket (``distscan.root_view``):
    the bucket's URL and endpoint, if the bucket can be listed from here with this agent's
    credentials; None if it cannot."""
    try:
        bucket = Bucket.at(root.decode("utf-8", "surrogateescape"), endpoint_url, 4)
    except Exception:  # noqa: BLE001 - no client (no boto3, a bad URL): not from here
        return None
    if bucket.problem() is not None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(root + b"\0" + (endpoint_url or "").encode())
    return "s3:" + digest.hexdigest()
