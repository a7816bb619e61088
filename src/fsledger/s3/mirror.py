"""A repository mirrored to a bucket, driven by the durable change feed.

A mirror follows the feed from its stored cursor (table ``mirrors``), like a webhook
consumer: what to do for each entry is decided by the pure ``plan``; the ``MirrorRunner``
does it against the bucket and advances the cursor only once the page's actions are done::

    created / modified  ->  upload of the file as the ledger records it (streamed; multipart
                            from PART_SIZE on, through boto3's transfer manager), the content
                            hash in the object's metadata (x-amz-meta-<algo>: hex), verified
    moved               ->  server-side copy (after a HEAD found the source right), delete
    dir_moved           ->  the same for every record below the new directory, then the old
                            directory's leftover objects are deleted
    deleted             ->  delete (batched), guarded by --max-delete
    repository_removed  ->  the mirror pauses

What is uploaded is what the ledger records: the bytes are hashed while they are read, and an
object is only completed when they hash to the recorded hash (a small file is read whole and
checked before its PUT, whose Content-MD5 the server checks; a big file's last part is held
back until the hash matched, so a mismatch aborts the multipart upload). A file that changed
since it was recorded is left to the feed entry that records the change (counted "deferred").

Nothing is uploaded twice after a crash: before a page is acted on its last seq is stored as
``inflight_seq``; a run that starts again HEADs every key of entries up to it and skips those
already there with the right size and hash. A mirror without a cursor (new, or one whose cursor
the feed no longer answers) starts with a full comparison of the ledger and the bucket
(``verify`` with repair), from the feed head read before it.

The bucket is never listed to find work, except to compare it in full (a new mirror,
``mirror verify``) and to find what a moved directory left behind.

Deletions are guarded: more than ``max_delete`` pending in the feed (plus those done in the
last minute) pause the mirror until ``mirror resume --accept-deletes``; while the repository
is offline, the mirror acts on nothing.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

from fsledger.beneath import Beneath
from fsledger.errors import ConfigError, ResyncNeeded, StoreError
from fsledger.feed import Cursor, Feed, FeedHub
from fsledger.hashing import ALGORITHMS
from fsledger.model import (
    ChangeKind,
    FeedEntry,
    FileRecord,
    Mirror,
    MirrorCounters,
    MirrorState,
    RelPath,
    RepoState,
)
from fsledger.s3.keys import key_of, path_of
from fsledger.s3.location import S3Location, make_client
from fsledger.s3.wire import LeanFailed, LeanS3
from fsledger.store.base import Store

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20
"""Files from this size are uploaded in parts of this size (multipart); smaller ones are
read whole (at most ``concurrency`` of them in memory at once) and sent in one PUT."""
PAGE = 500
"""Feed entries acted on per step (one cursor write each)."""
RECENT_S = 60.0
"""Deletions done within this window count with the pending ones against ``max_delete``."""
DELETE_BATCH = 1000
"""Keys per DeleteObjects request (S3's limit)."""
IDLE_POLL_S = 0.5
"""How often a runner without a feed hub (or a paused one) looks again."""
HUB_WAIT_S = 5.0
"""The longest an idle runner waits on the feed hub before it looks anyway."""


# --- what to do: pure ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Upload:
    path: RelPath


@dataclass(frozen=True, slots=True)
class Move:
    old: RelPath
    new: RelPath


@dataclass(frozen=True, slots=True)
class DirMove:
    old: RelPath
    new: RelPath


@dataclass(frozen=True, slots=True)
class Delete:
    path: RelPath


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str


Action = Upload | Move | DirMove | Delete | Pause


def plan(entry: FeedEntry) -> Action | None:
    """What a mirror does for one feed entry of its repository (None: nothing)."""
    kind = entry.kind
    if kind is ChangeKind.CREATED or kind is ChangeKind.MODIFIED:
        return Upload(entry.path)
    if kind is ChangeKind.MOVED and entry.old_path is not None:
        return Move(entry.old_path, entry.path)
    if kind is ChangeKind.DIR_MOVED and entry.old_path is not None:
        return DirMove(entry.old_path, entry.path)
    if kind is ChangeKind.DELETED:
        return Delete(entry.path)
    if kind is ChangeKind.REPO_REMOVED:
        return Pause("the repository was removed")
    return None


def deletions_refused(pending: int, recent: int, max_delete: int | None) -> str | None:
    """Why a mirror must pause before deleting (None: it may go on): more deletions pending
    plus done in the last minute than ``max_delete``."""
    if max_delete is None or pending == 0 or pending + recent <= max_delete:
        return None
    return (
        f"{pending} deletions pending ({recent} done in the last minute), more than "
        f"--max-delete {max_delete}: 'fsledger mirror resume --accept-deletes' to go on"
    )


def groups(actions: Iterable[Action]) -> Iterator[list[Action]]:
    """The actions in waves that may run at once: consecutive actions no two of which touch
    the same path (a move touches its old and its new path). Actions on distinct paths
    commute, so a wave's uploads and moves run concurrently and its deletions go in one
    request; an action on a path the wave already touches (a chain ``a -> b, b -> c``, a
    swap, a deletion after a creation) starts the next wave; a second upload of a path in the
    wave is dropped (both would upload its current record). A directory move or a pause is a
    wave of its own."""
    run: list[Action] = []
    paths: set[RelPath] = set()
    uploads: set[RelPath] = set()
    for action in actions:
        if isinstance(action, Upload) and action.path in uploads:
            continue  # both would upload the path's current record
        touched = _paths(action)
        if run and (touched is None or _paths(run[0]) is None or not paths.isdisjoint(touched)):
            yield run
            run, paths, uploads = [], set(), set()
        run.append(action)
        paths.update(touched or ())
        if isinstance(action, Upload):
            uploads.add(action.path)
    if run:
        yield run


def _paths(action: Action) -> tuple[RelPath, ...] | None:
    """The paths an action touches; None for one that must be alone in its wave."""
    if isinstance(action, (Upload, Delete)):
        return (action.path,)
    if isinstance(action, Move):
        return (action.old, action.new)
    return None


@dataclass(frozen=True, slots=True)
class LedgerFile:
    size: int
    algo: str
    hex: str


@dataclass(frozen=True, slots=True)
class BucketObject:
    key: str
    size: int
    hash: str | None = None
    """The hash in the object's metadata for the ledger's algorithm (None: none, or not
    looked at)."""


@dataclass
class Comparison:
    """``compare``'s answer: what the bucket lacks, holds in excess or holds wrong."""

    checked: int = 0
    missing: list[RelPath] = field(default_factory=list)
    wrong: list[RelPath] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    """Keys: an object below the prefix that no record has (or no key ``encode`` makes)."""

    @property
    def exact(self) -> bool:
        return not (self.missing or self.wrong or self.extra)


def compare(
    ledger: Iterable[tuple[RelPath, LedgerFile]], bucket: Mapping[RelPath, BucketObject]
) -> Comparison:
    """The ledger's files against the bucket's objects (by decoded path): a record without an
    object is missing, an object of another size or hash (as far as ``hash`` was read) is
    wrong, an object without a record is extra."""
    out = Comparison()
    seen: set[RelPath] = set()
    for path, want in ledger:
        out.checked += 1
        seen.add(path)
        obj = bucket.get(path)
        if obj is None:
            out.missing.append(path)
        elif obj.size != want.size or obj.hash != want.hex:
            out.wrong.append(path)
    out.extra = sorted(obj.key for path, obj in bucket.items() if path not in seen)
    return out


# --- doing it ------------------------------------------------------------------------------
class _Changed(Exception):
    """The file is not what the ledger records any more."""


class _LocalError(Exception):
    """The file could not be opened or read (its OSError is the cause)."""


_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR}
"""Errors of a path that is not the recorded file any more: its later entries say what
became of it."""


class _HashingReader:
    """A big file's bytes for the transfer manager, hashed as they are read; the read that
    would hand over the last bytes raises ``_Changed`` instead when the bytes do not hash
    to the recorded hash, so the multipart upload is aborted, never completed."""

    def __init__(self, fd: int, record: FileRecord) -> None:
        assert record.digest is not None
        self.fd = fd
        self.remaining = record.size
        self.want = record.digest.hex
        self.hasher = ALGORITHMS[record.digest.algo](1)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        if self.remaining == 0:
            return b""
        n = self.remaining if n is None or n < 0 else min(n, self.remaining)
        try:
            data = _read_exactly(self.fd, n)
        except OSError as exc:
            raise _LocalError() from exc
        self.hasher.update(data)
        self.remaining -= len(data)
        if self.remaining == 0 and self.hasher.hexdigest() != self.want:
            raise _Changed("the file's content is not the recorded one any more")
        return data


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise _Changed("the file is shorter than recorded")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


@dataclass
class RunnerStats:
    """A running mirror's view for status, /metrics and the API (in memory)."""

    backlog: int = 0
    state: str = "starting"
    """``syncing``, ``idle``, ``paused``, ``waiting: repository offline``, ``error``, ..."""
    last_step_at: float = 0.0
    window: deque[tuple[float, int, int]] = field(default_factory=deque)
    """(time, objects, bytes) of recent steps, for rates."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, objects: int, nbytes: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.window.append((now, objects, nbytes))
            while self.window and self.window[0][0] < now - RECENT_S:
                self.window.popleft()

    def rates(self) -> tuple[float, float]:
        """Objects/s and bytes/s over the last minute."""
        now = time.monotonic()
        with self.lock:
            items = [w for w in self.window if w[0] >= now - RECENT_S]
        if not items:
            return 0.0, 0.0
        span = max(now - items[0][0], 1.0)
        return sum(i[1] for i in items) / span, sum(i[2] for i in items) / span


class MirrorRunner:
    """Keeps one mirror: ``step`` acts on one page of the feed; ``run`` loops until stopped.

    Args:
        store: the ledger's store (feed, records, the mirror's row).
        mirror_id: which mirror.
        concurrency: requests in flight at most (``FSLEDGER_MIRROR_CONCURRENCY``, 4).
        client: a boto3 S3 client (tests); one from the AWS chain when omitted.
        hub: the daemon's ``FeedHub``: an idle runner waits on it and wakes the moment the
            feed grows (else it polls the feed every ``IDLE_POLL_S``).
    """

    def __init__(
        self,
        store: Store,
        mirror_id: UUID,
        concurrency: int = 4,
        client: Any = None,
        hub: FeedHub | None = None,
    ) -> None:
        mirror = store.get_mirror(mirror_id)
        if mirror is None:
            raise ConfigError(f"no mirror {mirror_id}")
        self.store = store
        self.feed = Feed(store)
        self.mirror = mirror
        self.location = S3Location.parse(mirror.url, mirror.endpoint_url)
        self.concurrency = max(1, concurrency)
        self.client = client or make_client(self.location, max_pool=self.concurrency * 2 + 2)
        self.bucket = self.location.bucket
        self._lean = LeanS3.of(self.client, self.bucket)
        """The small PUTs and the copies without botocore's per-request CPU (None: all
        through botocore)."""
        self.prefix = self.location.prefix
        self.stats = RunnerStats()
        self._recent: deque[tuple[float, int]] = deque()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fsledger-mirror")
        self._accepted = False
        self._open_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hub = hub
        self._head = 0
        """The feed's newest seq when the last step found nothing (more) to do."""
        self._feed_id: str | None = None
        self._warmed = False

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"fsledger-mirror-{self.location}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.hub is not None:
            self.hub.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._lean is not None:
            self._lean.close()

    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                busy = self.step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a mirror keeps trying; the error is shown
                failures += 1
                self.stats.state = "error"
                log.warning("Mirror %s: %s", self.location, exc)
                self._note_error(exc)
                self._stop.wait(min(30.0, 0.5 * 2**failures))
                continue
            if not busy:
                self._idle()

    def _idle(self) -> None:
        """Wait for work: until the feed grows past what the last step saw (the hub wakes
        this at once), or ``IDLE_POLL_S`` (a paused mirror may be resumed, an offline
        repository come back: those are not feed entries)."""
        if self.hub is not None and self.stats.state == "idle":
            self.hub.wait(self._head, HUB_WAIT_S, cancel=self._stop)
        else:
            self._stop.wait(IDLE_POLL_S)

    def sync(self, timeout: float | None = None) -> Mirror:
        """Act until the mirror has caught up with the feed (or is paused); for the CLI and
        tests. Returns the mirror's row."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.step():
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.refresh()

    def refresh(self) -> Mirror:
        mirror = self.store.get_mirror(self.mirror.id)
        if mirror is None:
            raise ConfigError(f"mirror {self.mirror.id} was removed")
        self.mirror = mirror
        return mirror

    def warm(self) -> None:
        """Have the pool's threads started and each one's connection to the bucket open
        (again, if the server closed it while idle), without waiting: the first requests of
        a step then find them ready instead of paying for them."""
        self._warmed = True
        lean = self._lean
        if lean is None or not lean.usable:
            return
        barrier = threading.Barrier(self.concurrency)

        def one() -> None:
            lean.warm()
            # Held until every thread has one: each connection is another thread's.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(1.0)

        for _ in range(self.concurrency):
            self._pool.submit(one)

    # --- one step -----------------------------------------------------------------------
    def step(self) -> bool:
        """Act on the next page of the feed. True when there was work (call again)."""
        mirror = self.refresh()
        if mirror.state is MirrorState.PAUSED:
            self.stats.state = "paused"
            return False
        repo = self.store.get_repository(mirror.repository_id)
        if repo is None:
            self.store.set_mirror_state(mirror.id, MirrorState.PAUSED, "the repository is gone")
            return False
        if repo.state is RepoState.OFFLINE:
            self.stats.state = "waiting: repository offline"
            return False
        if mirror.cursor_seq is None:
            self.full_sync(repair=True)
            return True
        if not self._warmed:
            self.warm()
        if self._feed_id is None:
            self._feed_id = self.feed.head().feed_id
        # The feed id read once: a database whose feed is another one (restored elsewhere)
        # refuses this cursor (ResyncNeeded), as it should.
        since = Cursor(self._feed_id, mirror.cursor_seq, mirror.cursor_tag)
        try:
            page = self.feed.read(since, PAGE, repo.id)
        except ResyncNeeded as exc:
            log.warning("Mirror %s: %s; comparing the bucket in full", self.location, exc)
            self.full_sync(repair=True)
            return True
        head = self.store.latest_seq()
        self.stats.backlog = max(0, head - since.seq)
        if not page.entries:
            self._head = head
            if page.cursor.seq != since.seq:
                self.store.advance_mirror(
                    mirror.id, (page.cursor.seq, page.cursor.tag or 0), MirrorCounters()
                )
            self.stats.state = "idle"
            return False
        self.stats.state = "syncing"
        self.warm()  # while the page's records are read
        actions = [a for e in page.entries if (a := plan(e)) is not None]
        reason = self._deletions_refused(page.entries, mirror)
        if reason is not None:
            log.warning("Mirror %s paused: %s", self.location, reason)
            self.store.set_mirror_state(mirror.id, MirrorState.PAUSED, reason)
            self.stats.state = "paused"
            return False
        last = page.entries[-1].seq
        self._accepted = last <= mirror.accept_deletes_through
        check_first = mirror.inflight_seq >= page.entries[0].seq
        if not check_first:
            self.store.advance_mirror(mirror.id, None, MirrorCounters(), inflight_seq=last)
        counters = MirrorCounters()
        errors: list[str] = []
        with Beneath(repo.root) as below:
            for group in groups(actions):
                done, errs = self._act(group, below, repo.id, check_first)
                counters += done
                errors += errs
        self.store.advance_mirror(
            mirror.id,
            (page.cursor.seq, page.cursor.tag or 0),
            counters,
            errors[-1] if errors else None,
        )
        self.stats.note(
            counters.uploaded + counters.copied + counters.deleted, counters.uploaded_bytes
        )
        paused = any(isinstance(a, Pause) for a in actions)
        if not page.has_more and page.cursor.seq >= head and not paused:
            # The page reached the head read after it: nothing is left to look at now (a
            # step more would only find that out with another round of queries).
            self._head = head
            self.stats.backlog = 0
            self.stats.state = "idle"
            return False
        return True

    def _deletions_refused(self, entries: tuple[FeedEntry, ...], mirror: Mirror) -> str | None:
        if mirror.max_delete is None or not any(e.kind is ChangeKind.DELETED for e in entries):
            return None
        pending = 0
        feed_id = self._feed_id or self.feed.head().feed_id
        cursor = Cursor(feed_id, mirror.cursor_seq or 0, mirror.cursor_tag)
        for _ in range(200):  # look ahead through the backlog, at most 100k entries
            page = self.feed.read(cursor, PAGE, mirror.repository_id)
            pending += sum(
                1
                for e in page.entries
                if e.kind is ChangeKind.DELETED and e.seq > mirror.accept_deletes_through
            )
            if pending > mirror.max_delete or not page.has_more:
                break
            cursor = page.cursor
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()
        recent = sum(n for _, n in self._recent)
        return deletions_refused(pending, recent, mirror.max_delete)

    def _act(
        self, wave: list[Action], below: Beneath, repo_id: UUID, check_first: bool
    ) -> tuple[MirrorCounters, list[str]]:
        """One wave (``groups``): its deletions, moves and uploads all at once in the pool.

        The wave's paths are distinct, so the order among its actions does not matter but
        for a move's old key, which goes only once its copy is made: the deletions of
        deleted paths are one DeleteObjects sent first, beside the copies and the uploads;
        the moves are started before the uploads, and the old keys of those made are
        deleted in one more DeleteObjects while the uploads still run. The wave ends when
        all of it is done (a later wave may make a key this one deletes)."""
        first = wave[0]
        if isinstance(first, Pause):
            self.store.set_mirror_state(self.mirror.id, MirrorState.PAUSED, first.reason)
            return MirrorCounters(), []
        if isinstance(first, DirMove):
            return self.move_dir(first.old, first.new, below, repo_id)
        uploads = [a.path for a in wave if isinstance(a, Upload)]
        moves = [a for a in wave if isinstance(a, Move)]
        deletions = [a.path for a in wave if isinstance(a, Delete)]
        records = self.store.get_records(
            repo_id, uploads + [m.old for m in moves] + [m.new for m in moves] + deletions
        )
        # A path that has a record again was created anew: its entry uploads it.
        gone = [key_of(self.prefix, p) for p in deletions if p not in records]
        moved: list[tuple[Move, FileRecord]] = []
        for m in moves:
            record = records.get(m.new)
            if record is not None and record.digest is not None:
                moved.append((m, record))
            # else moved on or gone: a later entry says where
        put = [r for p in uploads if (r := records.get(p)) is not None and r.digest is not None]

        # The jobs go to the pool's threads as ``concurrency`` loops that each take the next
        # job until none is left (not a future each: 270 submissions from this thread while
        # the workers run contend for the executor's locks).
        jobs: deque[Callable[[], None]] = deque()
        batches: list[tuple[MirrorCounters, list[str]]] = []
        results: list[tuple[MirrorCounters, str | None]] = []
        move_results: list[tuple[MirrorCounters, str | None] | None] = [None] * len(moved)
        left = [len(moved)]
        lock = threading.Lock()

        def delete(keys: list[str]) -> None:
            batches.append(self.delete_keys(keys, count=False))

        def move(i: int, m: Move, record: FileRecord) -> None:
            move_results[i] = self._move_one(m.old, record, below)
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            # The last copy is made: the old keys of the moves made go, beside the uploads.
            olds = [
                key_of(self.prefix, made.old)
                for (made, _), done in zip(moved, move_results, strict=True)
                if done is not None and done[1] is None and made.old not in records
            ]  # the old key of a failed move stays
            if olds:
                jobs.appendleft(partial(delete, olds))

        def upload(record: FileRecord) -> None:
            results.append(self._upload_one(record, below, check_first))

        if gone:
            jobs.append(partial(delete, gone))
        jobs.extend(partial(move, i, m, record) for i, (m, record) in enumerate(moved))
        jobs.extend(partial(upload, record) for record in put)
        self._drain(jobs)
        counters, errors = MirrorCounters(), list[str]()
        for done, error in [*(r for r in move_results if r is not None), *results]:
            counters += done
            if error:
                errors.append(error)
        for done, errs in batches:
            counters, errors = counters + done, errors + errs
        if gone:
            counters += MirrorCounters(deleted=len(gone))
            if not self._accepted:
                self._recent.append((time.monotonic(), len(gone)))
        return counters, errors

    def _drain(self, jobs: deque[Callable[[], None]]) -> None:
        """Run ``jobs`` on the pool: ``concurrency`` loops, each taking the next job (a job
        may add more) until none is left. The first exception stops every loop from
        taking another job and is raised once they all stopped."""
        failed: list[BaseException] = []

        def loop() -> None:
            while not failed:
                try:
                    job = jobs.popleft()
                except IndexError:
                    return
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - raised by _drain
                    failed.append(exc)
                    return

        loops = [self._pool.submit(loop) for _ in range(min(self.concurrency, len(jobs)))]
        for one in loops:
            one.result()
        if failed:
            raise failed[0]

    # --- uploads ------------------------------------------------------------------------
    def upload_paths(
        self, paths: list[RelPath], below: Beneath, repo_id: UUID, check_first: bool
    ) -> tuple[MirrorCounters, list[str]]:
        """Upload the current records of ``paths`` (those that have one) concurrently."""
        records = self.store.get_records(repo_id, paths)
        todo = [records[p] for p in paths if p in records and records[p].digest is not None]
        results = list(self._pool.map(lambda r: self._upload_one(r, below, check_first), todo))
        total = MirrorCounters()
        errors = []
        for counters, error in results:
            total += counters
            if error:
                errors.append(error)
        return total, errors

    def _upload_one(
        self, record: FileRecord, below: Beneath, check_first: bool
    ) -> tuple[MirrorCounters, str | None]:
        """Upload one record's file. A file that is not what the ledger records any more is
        deferred; one that cannot be read or named is an error of its own (counted, the
        mirror goes on); a failure of the bucket (unreachable, refused) raises, so that the
        step fails and its entries are acted on again."""
        try:
            key = key_of(self.prefix, record.path)
        except ValueError as exc:
            return MirrorCounters(errors=1), str(exc)
        if check_first and self._holds(key, record):
            return MirrorCounters(skipped=1), None
        try:
            self.put(key, record, below)
        except _Changed as exc:
            log.info("Mirror %s: %r left to a later entry (%s)", self.location, record.path, exc)
            return MirrorCounters(deferred=1), None
        except _LocalError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in _GONE:
                log.info("Mirror %s: %r is gone (%s)", self.location, record.path, cause)
                return MirrorCounters(deferred=1), None
            log.warning("Mirror %s: cannot read %r: %s", self.location, record.path, cause)
            return MirrorCounters(errors=1), f"reading {record.path!r}: {cause}"
        return MirrorCounters(uploaded=1, uploaded_bytes=record.size), None

    def _holds(self, key: str, record: FileRecord) -> bool:
        """The bucket has ``key`` with the record's size and hash (HEAD)."""
        head = self.head(key)
        return head is not None and _matches(head, record)

    def head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)  # type: ignore[no-any-return]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _open(self, record: FileRecord, below: Beneath) -> int:
        """A descriptor of ``record``'s file; ``_Changed`` when it is not a regular file any
        more, ``_LocalError`` when it cannot be opened."""
        try:
            # Beneath caches directory descriptors and is not thread-safe: one open at a
            # time (the reads, the hashing and the upload run concurrently).
            with self._open_lock:
                fd = below.open(record.path, os.O_RDONLY)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise _Changed("not a regular file any more")
        except OSError as exc:
            raise _LocalError() from exc
        return fd

    def _read_small(self, record: FileRecord, below: Beneath) -> tuple[bytes, Any]:
        """A small file's bytes, checked against the record's hash, and their MD5;
        ``_Changed`` when they are not the recorded content any more."""
        digest = record.digest
        assert digest is not None
        fd = self._open(record, below)
        try:
            data = _read_exactly(fd, record.size)
        except OSError as exc:
            raise _LocalError() from exc
        finally:
            os.close(fd)
        hasher = ALGORITHMS[digest.algo](1)
        hasher.update(data)
        if hasher.hexdigest() != digest.hex:
            raise _Changed("the file's content is not the recorded one any more")
        return data, hashlib.md5(data, usedforsecurity=False)

    def _put_small(self, key: str, record: FileRecord, data: bytes, md5: Any) -> None:
        """One PUT of a small file's (checked) bytes with Content-MD5, which the server
        checks; read back (HEAD) only when its ETag is not that MD5."""
        digest = record.digest
        assert digest is not None
        metadata = {digest.algo: digest.hex}
        content_md5 = base64.b64encode(md5.digest()).decode()
        etag = None
        if self._lean is not None and self._lean.usable:
            try:
                etag = self._lean.put(key, data, content_md5, metadata)
            except LeanFailed as exc:
                log.debug("Mirror %s: lean PUT of %r: %s", self.location, key, exc)
        if etag is None:
            response = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentMD5=content_md5, Metadata=metadata
            )
            etag = response.get("ETag", "").strip('"')
        # The server checked Content-MD5; its ETag of a plain PUT is that MD5.
        if etag != md5.hexdigest():
            self._read_back(key, record)

    def _read_back(self, key: str, record: FileRecord) -> None:
        head = self.head(key)
        if head is None or not _matches(head, record):
            raise RuntimeError(f"{key!r} does not read back with the size and hash uploaded")

    def put(self, key: str, record: FileRecord, below: Beneath) -> None:
        """Upload ``record``'s file to ``key``, verified; ``_Changed`` when the file is not
        what the record says any more (nothing is completed then)."""
        digest = record.digest
        assert digest is not None
        if record.size < PART_SIZE:
            data, md5 = self._read_small(record, below)
            self._put_small(key, record, data, md5)
            return
        from boto3.s3.transfer import TransferConfig

        fd = self._open(record, below)
        try:
            config = TransferConfig(
                multipart_threshold=PART_SIZE,
                multipart_chunksize=PART_SIZE,
                max_concurrency=self.concurrency,
                use_threads=True,
            )
            self.client.upload_fileobj(
                _HashingReader(fd, record),
                self.bucket,
                key,
                ExtraArgs={"Metadata": {digest.algo: digest.hex}},
                Config=config,
            )
        finally:
            os.close(fd)
        self._read_back(key, record)

    # --- moves and deletions ------------------------------------------------------------
    def copy(self, src: str, dst: str, record: FileRecord) -> None:
        digest = record.digest
        assert digest is not None
        extra = {"Metadata": {digest.algo: digest.hex}, "MetadataDirective": "REPLACE"}
        source = {"Bucket": self.bucket, "Key": src}
        if record.size < (5 << 30):
            self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource=source, **extra)
        else:
            self.client.copy(source, self.bucket, dst, ExtraArgs=extra)

    def _move_one(
        self, old: RelPath, record: FileRecord, below: Beneath
    ) -> tuple[MirrorCounters, str | None]:
        """Bring ``record`` to its key by a server-side copy of ``old``'s object when that
        holds the record's content, else by an upload.

        A small file is read (and checked against its record) first: the copy is then made
        only if ``old``'s ETag is the MD5 of those bytes (a precondition the server checks,
        one request instead of a HEAD and a copy), and the copy's own ETag must be that MD5
        too; otherwise the bytes just read are PUT. A big file, or one that is not its
        record any more, is looked at with a HEAD first."""
        try:
            src, dst = key_of(self.prefix, old), key_of(self.prefix, record.path)
        except ValueError as exc:
            return MirrorCounters(errors=1), str(exc)
        if record.size < PART_SIZE:
            try:
                data, md5 = self._read_small(record, below)
            except (_Changed, _LocalError):
                pass  # the HEAD below decides: a copy of the recorded content, or a deferral
            else:
                if self.copy_if(src, dst, record, md5.hexdigest()):
                    return MirrorCounters(copied=1), None
                self._put_small(dst, record, data, md5)
                return MirrorCounters(uploaded=1, uploaded_bytes=record.size), None
        if self._holds(src, record):
            self.copy(src, dst, record)
            return MirrorCounters(copied=1), None
        return self._upload_one(record, below, check_first=True)

    def copy_if(self, src: str, dst: str, record: FileRecord, md5_hex: str) -> bool:
        """Copy ``src`` to ``dst`` with the record's hash in the metadata if ``src``'s ETag
        is ``md5_hex`` (checked by the server) and the copy's ETag is too. False when it was
        not copied, or the copy is not those bytes (the caller then uploads over it)."""
        from botocore.exceptions import ClientError

        digest = record.digest
        assert digest is not None
        metadata = {digest.algo: digest.hex}
        etag: str | None = None
        if self._lean is not None and self._lean.usable:
            try:
                etag = self._lean.copy(src, dst, metadata, md5_hex)
                return etag == md5_hex
            except LeanFailed as exc:
                log.debug("Mirror %s: lean copy of %r: %s", self.location, src, exc)
        try:
            response = self.client.copy_object(
                Bucket=self.bucket,
                Key=dst,
                CopySource={"Bucket": self.bucket, "Key": src},
                CopySourceIfMatch=f'"{md5_hex}"',
                Metadata=metadata,
                MetadataDirective="REPLACE",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        etag = response.get("CopyObjectResult", {}).get("ETag", "").strip('"')
        return etag == md5_hex

    def move_dir(
        self, old: RelPath, new: RelPath, below: Beneath, repo_id: UUID
    ) -> tuple[MirrorCounters, list[str]]:
        records = list(self.store.iter_records(repo_id, prefix=new))
        start = len(new) + 1
        todo = [(old + b"/" + r.path[start:], r) for r in records if r.digest is not None]
        results = list(self._pool.map(lambda t: self._move_one(t[0], t[1], below), todo))
        counters, errors = MirrorCounters(), []
        for done, error in results:
            counters += done
            errors += [error] if error else []
        if errors:
            return counters, errors  # the old objects stay until the copies are all made
        # What is left below the old directory and has no record there now.
        leftovers = self.list_objects(key_of(self.prefix, old) + "/")
        paths = {}
        for key in leftovers:
            try:
                paths[path_of(self.prefix, key)] = key
            except ValueError:
                continue
        live = self.store.get_records(repo_id, list(paths))
        more, errs = self.delete_keys([k for p, k in paths.items() if p not in live], count=False)
        return counters + more, errors + errs

    def delete_keys(self, keys: list[str], count: bool = True) -> tuple[MirrorCounters, list[str]]:
        """Delete ``keys`` (a missing one is fine), in batches of 1000; a key the bucket
        refuses to delete raises."""
        deleted, errors = 0, list[str]()
        for i in range(0, len(keys), DELETE_BATCH):
            chunk = keys[i : i + DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
            )
            failed = response.get("Errors", [])
            if failed:  # the bucket refused: the step fails and is done again
                e = failed[0]
                raise RuntimeError(
                    f"{len(failed)} deletions refused, e.g. {e.get('Key')!r}: {e.get('Code')} "
                    f"{e.get('Message')}"
                )
            deleted += len(chunk)
        return MirrorCounters(deleted=deleted if count else 0), errors

    def list_objects(self, prefix: str) -> Iterator[str]:
        """Keys below ``prefix`` (ListObjectsV2, paged)."""
        for obj in self.list_sized(prefix):
            yield obj[0]

    def list_sized(self, prefix: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"])

    # --- the full comparison ------------------------------------------------------------
    def verify(self, repair: bool = False) -> Comparison:
        """Compare the bucket (listed) with the ledger's records: key, size and the hash in
        each object's metadata (a HEAD per object of the right size). With ``repair``, upload
        what is missing or wrong and delete what is extra."""
        mirror = self.refresh()
        repo = self.store.get_repository(mirror.repository_id)
        if repo is None:
            raise ConfigError("the mirror's repository is gone")
        algo_of: dict[RelPath, LedgerFile] = {}
        for record in self.store.iter_records(repo.id):
            if record.digest is not None:
                algo_of[record.path] = LedgerFile(
                    record.size, record.digest.algo, record.digest.hex
                )
        bucket: dict[RelPath, BucketObject] = {}
        strangers: list[str] = []
        for key, size in self.list_sized(self.prefix):
            try:
                bucket[path_of(self.prefix, key)] = BucketObject(key, size)
            except ValueError:
                strangers.append(key)
        sized = [(p, o) for p, o in bucket.items() if p in algo_of and algo_of[p].size == o.size]

        def look(item: tuple[RelPath, BucketObject]) -> tuple[RelPath, BucketObject]:
            path, obj = item
            head = self.head(obj.key)
            meta = (head or {}).get("Metadata", {})
            return path, BucketObject(obj.key, obj.size, meta.get(algo_of[path].algo))

        bucket.update(self._pool.map(look, sized))
        result = compare(sorted(algo_of.items()), bucket)
        result.extra = sorted(result.extra + strangers)
        if repair and not result.exact:
            self._repair(result, repo.root, repo.id)
        return result

    def _repair(self, result: Comparison, root: bytes, repo_id: UUID) -> None:
        mirror = self.mirror
        counters, errors = MirrorCounters(), []
        with Beneath(root) as below:
            done, errs = self.upload_paths(result.missing + result.wrong, below, repo_id, False)
            counters += done
            errors += errs
        done, errs = self.delete_keys(result.extra)
        counters += done
        errors += errs
        self.store.advance_mirror(mirror.id, None, counters, errors[-1] if errors else None)

    def full_sync(self, repair: bool = True) -> Comparison:
        """A mirror without a usable cursor: note the feed head, compare the whole bucket
        with the ledger, repair, then follow the feed from that head. More objects without
        a record than ``max_delete`` pause the mirror instead."""
        head = self.feed.head()
        mirror = self.refresh()
        extra_allowed = mirror.max_delete
        result = self.verify(repair=False)
        if (
            extra_allowed is not None
            and len(result.extra) > extra_allowed
            and mirror.accept_deletes_through < head.seq
        ):
            reason = (
                f"{len(result.extra)} objects in the bucket have no record, more than "
                f"--max-delete {extra_allowed}: 'fsledger mirror resume --accept-deletes' "
                "deletes them"
            )
            self.store.set_mirror_state(mirror.id, MirrorState.PAUSED, reason)
            return result
        if repair and not result.exact:
            repo = self.store.get_repository(mirror.repository_id)
            assert repo is not None
            self._repair(result, repo.root, repo.id)
        self.store.advance_mirror(
            mirror.id, (head.seq, head.tag or 0), MirrorCounters(), inflight_seq=head.seq
        )
        return result

    def _note_error(self, exc: BaseException) -> None:
        with contextlib.suppress(StoreError):
            self.store.advance_mirror(self.mirror.id, None, MirrorCounters(errors=1), str(exc))


def _matches(head: Mapping[str, Any], record: FileRecord) -> bool:
    digest = record.digest
    return (
        digest is not None
        and int(head.get("ContentLength", -1)) == record.size
        and head.get("Metadata", {}).get(digest.algo) == digest.hex
    )


__all__ = [
    "Action",
    "Comparison",
    "Delete",
    "DirMove",
    "MirrorRunner",
    "Move",
    "Pause",
    "Upload",
    "compare",
    "deletions_refused",
    "groups",
    "plan",
]
