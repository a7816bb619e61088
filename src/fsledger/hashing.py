"""Content hashes, named with their algorithm, computed in-thread or in worker processes.

A file is hashed through one open descriptor and ``fstat``-ed before and after, so a
file that changed while it was read is reported as unsettled instead of being
recorded with a hash of content it no longer has. A caller that has just ``lstat``-ed
the file (a walk) passes that key as ``expect``: it stands for the "before", and one
``fstat`` a file is saved (a syscall costs 2-4 µs on a virtual machine).
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import os
import signal
import stat as stat_mod
import threading
from collections.abc import Callable, Iterator, Sequence
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from fsledger.beneath import Beneath, split
from fsledger.model import RelPath

if TYPE_CHECKING:
    import multiprocessing.context
    import multiprocessing.pool

# multiprocessing, blake3 and hashlib (OpenSSL) are imported where they are first used: a
# command that hashes nothing in-process and starts no workers (a small repository's
# rescan) does not pay their ~10-20 ms of imports.

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

BLOCK = 1 << 20
"""Read size: large reads keep the per-call overhead of Python out of the way."""

_buffers = threading.local()

_beat: Any = None
"""In a worker process: its pool's shared progress clock (``HashPool``), a ``RawValue`` of
the ``time.monotonic()`` at which some worker last finished a file or a directory."""


def beat() -> None:
    """Mark progress: a worker finished a file (or listed a directory). A scan stalls only
    when no worker has done so for its stall time (``HashPool.map_ordered``). Does nothing
    outside a pool's workers."""
    if _beat is not None:
        _beat.value = _monotonic()


def _buffer() -> tuple[bytearray, memoryview]:
    """This thread's read buffer. One per thread, not one per file: a fresh ``BLOCK`` is
    zeroed and faulted in on every allocation, which cost more than hashing a photo."""
    try:
        return _buffers.pair  # type: ignore[no-any-return]
    except AttributeError:
        buf = bytearray(BLOCK)
        _buffers.pair = pair = (buf, memoryview(buf))
        return pair


class _Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...
    def hexdigest(self) -> str: ...


def _blake3(threads: int = 1) -> _Hasher:
    global _blake3_new
    if _blake3_new is None:
        from blake3 import blake3 as _blake3_new
    return _blake3_new(max_threads=threads)  # type: ignore[no-any-return]


_blake3_new: Any = None


def _sha256(threads: int = 1) -> _Hasher:
    import hashlib

    return hashlib.sha256()


ALGORITHMS: dict[str, Callable[[int], _Hasher]] = {"blake3": _blake3, "sha256": _sha256}
DEFAULT_ALGO = "blake3"
BIG_FILE = 8 << 20
"""From this size, blake3 hashes with its own threads (``threads`` of them), as ``b3sum``
does: a video is hashed on every core instead of one, while the reads stay ``BLOCK``-sized
(measured: larger reads cost more CPU than they save, and a threaded update of a 1 MiB
block costs no more CPU than a single-threaded one). Not ``mmap``: a file truncated while
mapped raises SIGBUS in the process that reads it."""
HASH_THREADS = len(os.sched_getaffinity(0)) or 1
"""The threads a scan's hashing uses for a file from ``BIG_FILE`` bytes."""


class HashOutcome(NamedTuple):
    """The result of hashing one file.

    Exactly one of (``hex``), (``error``) and (``unsettled``) describes it: a hash with
    the ``fstat`` key it belongs to, an error message, or "changed while being read".
    A named tuple: one is built (and pickled) a file hashed, and a frozen dataclass of
    seven fields cost four times as much to build.
    """

    hex: str | None
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    error: str | None = None
    unsettled: bool = False


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""O_NONBLOCK: if a FIFO took the file's place, open must not hang."""


def hash_file(
    path: bytes,
    algo: str = DEFAULT_ALGO,
    threads: int = 1,
    expect: tuple[int, int, int, int] | None = None,
) -> HashOutcome:
    """Hash one file by a path the caller trusts, without following a final symlink.

    Files below a repository root are hashed with ``hash_below`` or ``hash_at`` instead: a
    path string would follow a symlinked directory in its middle.
    """
    return _hash(lambda: os.open(path, _FILE_FLAGS), algo, threads, expect)


def hash_at(
    dir_fd: int,
    name: bytes,
    algo: str = DEFAULT_ALGO,
    threads: int = 1,
    expect: tuple[int, int, int, int] | None = None,
) -> HashOutcome:
    """Hash the file ``name`` (one path component) of the directory open at ``dir_fd``."""
    return _hash(lambda: os.open(name, _FILE_FLAGS, dir_fd=dir_fd), algo, threads, expect)


def hash_below(
    below: Beneath,
    rel: RelPath,
    algo: str = DEFAULT_ALGO,
    threads: int = 1,
    expect: tuple[int, int, int, int] | None = None,
) -> HashOutcome:
    """Hash the file ``rel`` below a root, reached without following any symlink."""
    parent, name = split(rel)
    try:
        dir_fd = below.dir_fd(parent)
    except OSError as exc:
        return HashOutcome(None, error=f"{exc.strerror or exc} (errno {exc.errno})")
    return hash_at(dir_fd, name, algo, threads, expect)


def _hash(
    opener: Callable[[], int],
    algo: str,
    threads: int,
    expect: tuple[int, int, int, int] | None,
) -> HashOutcome:
    """``expect``: the file's ``(size, mtime_ns, ctime_ns, inode)`` as seen just before (an
    ``lstat``). If the file still has that key after it was read, the hash is of that
    state; otherwise (or on any error) the file is hashed again the usual way, and the
    caller compares the key it gets back with what it saw (an inode that differs is
    another file: its hash must not be stored for the one seen).

    Never raises for file-level problems: they come back as ``error``.
    """
    factory = ALGORITHMS[algo]
    if expect is not None:
        hex_ = _hash_expecting(opener, factory, threads, expect)
        if hex_ is not None:
            return HashOutcome(hex_, *expect)
    for _attempt in range(2):
        try:
            fd = opener()
        except OSError as exc:
            return HashOutcome(None, error=f"{exc.strerror or exc} (errno {exc.errno})")
        try:
            before = os.fstat(fd)
            if not stat_mod.S_ISREG(before.st_mode):
                return HashOutcome(None, error="not a regular file any more")
            hasher = _read_all(fd, factory, threads, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            return HashOutcome(None, error=f"{exc.strerror or exc} (errno {exc.errno})")
        finally:
            os.close(fd)
        if _key(before) == _key(after):
            return HashOutcome(hasher.hexdigest(), *_key(after))
    return HashOutcome(None, *_key(after), unsettled=True)


def _read_all(fd: int, factory: Callable[[int], _Hasher], threads: int, size: int) -> _Hasher:
    """A new hasher fed the file open at ``fd``, which should hold ``size`` bytes."""
    big = size >= BIG_FILE
    hasher = factory(threads if big else 1)
    buf, view = _buffer()
    left = size
    progress = _beat if big else None
    while n := os.readv(fd, [buf]):
        hasher.update(view[:n])
        left -= n
        if left == 0 and n < BLOCK:
            # The size promised, in a short read: skip the read that would return EOF.
            # (A file that grew meanwhile fails the caller's fstat after.)
            break
        if progress is not None:
            progress.value = _monotonic()  # a big file on a slow disk is progress too
    if _beat is not None:
        _beat.value = _monotonic()
    return hasher


def _hash_expecting(
    opener: Callable[[], int],
    factory: Callable[[int], _Hasher],
    threads: int,
    expect: tuple[int, int, int, int],
) -> str | None:
    """The hash of the file ``opener`` opens if it still has the key ``expect`` once read."""
    try:
        fd = opener()
    except OSError:
        return None
    try:
        hasher = _read_all(fd, factory, threads, expect[0])
        after = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if stat_mod.S_ISREG(after.st_mode) and _key(after) == expect:
        return hasher.hexdigest()
    return None


def hash_many(
    root: bytes, paths: Sequence[RelPath], algo: str, threads: int = HASH_THREADS
) -> list[HashOutcome]:
    """Hash a chunk of files below ``root`` (the unit of work a worker process receives);
    files from ``BIG_FILE`` bytes with ``threads`` threads."""
    try:
        below = Beneath(root)
    except OSError as exc:
        error = f"root {os.fsdecode(root)}: {exc.strerror or exc} (errno {exc.errno})"
        return [HashOutcome(None, error=error) for _p in paths]
    with below:
        return [hash_below(below, p, algo, threads) for p in paths]


GENTLE_NICE = 10
"""The nice value of a gentle (scheduled) reconciliation's workers."""
IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290)}
"""(ioprio_set, ioprio_get) syscall numbers: glibc has no wrapper for either."""


class Priority(NamedTuple):
    """A process's CPU nice value and I/O scheduling class (None where unknown)."""

    nice: int
    io_class: int | None


def _ioprio_syscall(which: int, *args: int) -> int | None:
    import ctypes
    import platform

    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(numbers[which], *args))
    return None if result < 0 else result


def lower_priority() -> None:
    """Make this process gentle: nice 10 and the idle I/O class, so that a scheduled
    reconciliation's reads and hashing yield to everything else on the machine (a photo
    server's thumbnailing, the API). One-way: an unprivileged process cannot raise its
    priority again, which is why gentle runs get workers of their own."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < GENTLE_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, GENTLE_NICE)
    except OSError as exc:
        log.warning("Hashing worker keeps its CPU priority: %s", exc)
    value = IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
    if _ioprio_syscall(0, _IOPRIO_WHO_PROCESS, 0, value) is None:
        log.warning("Hashing worker keeps its I/O priority: ioprio_set is unavailable")


def current_priority(_: object = None) -> Priority:
    """This process's priority (what a gentle worker runs at; also a probe for tests)."""
    raw = _ioprio_syscall(1, _IOPRIO_WHO_PROCESS, 0)
    io_class = None if raw is None else raw >> _IOPRIO_CLASS_SHIFT
    return Priority(os.getpriority(os.PRIO_PROCESS, 0), io_class)


def _worker_init(
    warm: Callable[[], object] | None = None, gentle: bool = False, progress: Any = None
) -> None:
    """Workers leave Ctrl-C to their parent: a terminal's SIGINT reaches the whole process
    group, and a worker dying mid-queue-operation could leave the pool unable to stop.

    A gentle pool's workers lower their priority first (``lower_priority``). ``warm`` is
    called next (see ``HashPool.start``); it must not raise. ``progress``: the pool's shared
    progress clock (see ``beat``).
    """
    global _beat
    _beat = progress
    if progress is not None:
        from fsledger import walk

        walk.listed_hook = beat
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gentle:
        lower_priority()
    # A worker builds a range's items, thousands of small acyclic objects, then hands them
    # off: the default young-generation threshold (700) would traverse them over and over.
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    if warm is not None:
        warm()


def _context() -> multiprocessing.context.BaseContext:
    """How workers start: ``fork`` from a single-threaded process (a CLI scan: instant, the
    modules already imported), ``forkserver`` otherwise (the daemon runs threads, the watcher
    and HTTP, which a fork would copy mid-flight; its pool is started once and kept)."""
    import multiprocessing

    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fsledger.hashing", "fsledger.merge"])
    return ctx


def _pool_class() -> type[multiprocessing.pool.Pool]:
    """``multiprocessing.pool.Pool`` whose worker-handler thread sleeps until it has work
    (defined on first use, when multiprocessing is imported).

    The stock pool also wakes that thread whenever a result waits in the pipe, and it spins
    until the result thread has read it: measured, 12k wake-ups (half a second of the GIL)
    in a first index of 100k files, whose ranges return megabytes each. The thread has
    nothing to do with results: worker exits wake it through their sentinels, and closing,
    terminating and an emptied task cache through the change notifier, which stays.
    """
    global _pool_cls
    if _pool_cls is None:
        import multiprocessing.pool

        class _Pool(multiprocessing.pool.Pool):
            def _get_sentinels(self) -> list[Any]:
                return [self._change_notifier._reader]  # type: ignore[attr-defined]

        _pool_cls = _Pool
    return _pool_cls


_pool_cls: type[multiprocessing.pool.Pool] | None = None


class HashPool:
    """Worker processes that hash chunks of files; owned by one object that starts and stops them.

    A chunk that takes longer than its budget (a hung network mount) is abandoned:
    its files come back as errors, a warning is logged and the workers are replaced.
    A ``gentle`` pool's workers run at nice 10 and the idle I/O class (scheduled runs).
    """

    def __init__(self, workers: int, algo: str, timeout_s: float, gentle: bool = False) -> None:
        self.workers = max(1, workers)
        self.algo = algo
        self.timeout_s = timeout_s
        self.gentle = gentle
        self._pool: multiprocessing.pool.Pool | None = None
        self._lock = threading.Lock()
        self._progress: Any = None
        """The workers' shared progress clock (``beat``): the ``time.monotonic()`` of the last
        file or directory any of them finished."""

    def _get_pool(self, warm: Callable[[], object] | None = None) -> multiprocessing.pool.Pool:
        with self._lock:
            if self._pool is None:
                context = _context()
                if context.get_start_method() == "fork":
                    # Forks share this process's objects: freeze them out of the cyclic
                    # collector first (as the gc module's documentation advises before a
                    # fork). Otherwise every full collection in a worker walks all of them
                    # (~30 ms a time after the imports of a CLI scan, and copies the pages
                    # it touches), and so does this process's last one at exit.
                    gc.freeze()
                self._progress = context.RawValue("d", _monotonic())
                self._pool = _pool_class()(
                    self.workers,
                    initializer=_worker_init,
                    initargs=(warm, self.gentle, self._progress),
                    context=context,
                )
            return self._pool

    def map_ordered(
        self, fn: Callable[[_T], _R], tasks: Sequence[_T], stall_s: float
    ) -> Iterator[_R]:
        """Run ``fn`` over ``tasks`` in the workers, yielding results in the tasks' order as
        they complete (a scan's key ranges: see ``fsledger.merge``).

        At most two tasks per worker are submitted ahead of the result being consumed: a
        consumer slower than the workers (the writer of a first index) must not find every
        range's results piled up in its memory.

        Raises:
            TimeoutError: for ``stall_s`` seconds, no result came and no worker finished a
                file or listed a directory (``beat``; a read stuck on a dead network mount
                cannot be interrupted): the workers are abandoned. Progress is measured per
                file, not per task: on a loaded machine a big range may take longer than
                ``stall_s`` while every file of it takes milliseconds.
        """
        import multiprocessing

        pool = self._get_pool()
        progress = self._progress
        ahead = 2 * self.workers
        pending: collections.deque[multiprocessing.pool.AsyncResult[_R]] = collections.deque()
        queued = iter(tasks)
        for task in itertools.islice(queued, ahead):
            pending.append(pool.apply_async(fn, (task,)))
        poll = min(stall_s, 1.0)
        last = _monotonic()
        while pending:
            head = pending[0]
            while True:
                try:
                    result = head.get(poll)
                    break
                except multiprocessing.TimeoutError:
                    if progress is not None:
                        last = max(last, progress.value)
                    if _monotonic() - last >= stall_s:
                        self._abandon()
                        raise TimeoutError(f"no progress for {stall_s:.0f}s") from None
            pending.popleft()
            last = _monotonic()
            for task in itertools.islice(queued, 1):
                pending.append(pool.apply_async(fn, (task,)))
            yield result

    def start(self, warm: Callable[[], object] | None = None) -> None:
        """Start the workers now rather than at the first task: from a single-threaded
        process they are forks, and a fork taken before the store has filled its page cache
        does not carry that cache into every worker's memory.

        Each worker calls ``warm`` as it starts (a scan's workers open their database
        connection while this process opens its own: see ``fsledger.merge.warm_store``).
        """
        self._get_pool(warm)

    def budget(self, sizes: Sequence[int]) -> float:
        """Seconds a chunk of files of these sizes may take: the timeout plus 20 s a GiB."""
        return self.timeout_s + 20.0 * sum(sizes) / (1 << 30)

    def submit(
        self, root: bytes, paths: Sequence[RelPath]
    ) -> multiprocessing.pool.AsyncResult[list[HashOutcome]]:
        """Hash the files ``paths`` below ``root`` in a worker (see ``collect``)."""
        return self._get_pool().apply_async(hash_many, (root, list(paths), self.algo))

    def collect(
        self,
        result: multiprocessing.pool.AsyncResult[list[HashOutcome]],
        paths: Sequence[bytes],
        sizes: Sequence[int],
    ) -> list[HashOutcome]:
        """Wait for a submitted chunk within its budget; abandon it past that."""
        import multiprocessing

        budget = self.budget(sizes)
        try:
            return result.get(timeout=budget)
        except multiprocessing.TimeoutError:
            for p in paths:
                log.warning("Failed to calculate hash for %s: timeout after %.0fs", p, budget)
            self._abandon()
            return [HashOutcome(None, error=f"hash timed out after {budget:.0f}s") for _ in paths]

    def hash_here(
        self, root: bytes, paths: Sequence[RelPath], sizes: Sequence[int]
    ) -> list[HashOutcome]:
        """Hash a few files without worker processes, still within the budget.

        The work runs in a daemon thread: a read stuck on a dead network mount cannot be
        interrupted, but it can be left behind.
        """
        box: list[list[HashOutcome]] = []
        worker = threading.Thread(
            target=lambda: box.append(hash_many(root, paths, self.algo)),
            name="hash-inline",
            daemon=True,
        )
        worker.start()
        budget = self.budget(sizes)
        worker.join(budget)
        if box:
            return box[0]
        for p in paths:
            log.warning("Failed to calculate hash for %s: timeout after %.0fs", p, budget)
        return [HashOutcome(None, error=f"hash timed out after {budget:.0f}s") for _ in paths]

    def _abandon(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            # terminate() may block on a worker stuck in the kernel: never in our thread.
            threading.Thread(target=pool.terminate, daemon=True, name="hash-pool-reaper").start()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            # close() is only called with no work in flight, so nothing is lost by ending the
            # workers at once; in a thread, bounded, because join() on a pool whose worker
            # died holding its queue lock would wait forever.
            reaper = threading.Thread(target=pool.terminate, daemon=True, name="hash-pool-close")
            reaper.start()
            reaper.join(10)

    def __enter__(self) -> HashPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
