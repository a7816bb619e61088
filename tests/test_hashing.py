"""Content hashes: the right digest, errors as values, files that change while read."""

from __future__ import annotations

import errno
import gc
import hashlib
import multiprocessing
import os
from itertools import count
from typing import Any

import blake3
import pytest

import fsledger.hashing
from fsledger.hashing import (
    ALGORITHMS,
    BLOCK,
    GENTLE_NICE,
    IOPRIO_CLASS_IDLE,
    HashOutcome,
    HashPool,
    current_priority,
    hash_file,
    hash_many,
)
from treeutil import OsWith

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def write(tree: bytes, name: bytes, data: bytes) -> bytes:
    path = os.path.join(tree, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("size", SIZES)
def test_blake3_matches_the_reference(tree: bytes, size: int) -> None:
    data = os.urandom(size)
    path = write(tree, b"f", data)
    out = hash_file(path)
    assert out.hex == blake3.blake3(data).hexdigest()
    assert out.error is None and not out.unsettled
    st = os.lstat(path)
    assert (out.size, out.mtime_ns, out.ctime_ns, out.inode) == (
        size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )


@pytest.mark.parametrize("size", SIZES)
def test_sha256_matches_hashlib(tree: bytes, size: int) -> None:
    data = os.urandom(size)
    out = hash_file(write(tree, b"f", data), "sha256")
    assert out.hex == hashlib.sha256(data).hexdigest()


def test_blake3_threads_for_big_files(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsledger.hashing, "BIG_FILE", 1024)
    data = os.urandom(2 * BLOCK + 5)
    assert hash_file(write(tree, b"big", data), threads=4).hex == blake3.blake3(data).hexdigest()


def test_awkward_path(tree: bytes) -> None:
    path = write(tree, b"\xff\xfe new\nline", b"content")
    assert hash_file(path).hex == blake3.blake3(b"content").hexdigest()


def test_missing_file_is_an_error_not_an_exception(tree: bytes) -> None:
    out = hash_file(os.path.join(tree, b"missing"))
    assert out.hex is None
    assert out.error is not None and "errno 2" in out.error


def test_directory_is_not_a_regular_file(tree: bytes) -> None:
    out = hash_file(tree)
    assert out.hex is None
    assert out.error == "not a regular file any more"


def test_fifo_does_not_hang(tree: bytes) -> None:
    fifo = os.path.join(tree, b"fifo")
    os.mkfifo(fifo)
    out = hash_file(fifo)
    assert out.hex is None and out.error == "not a regular file any more"


def test_symlink_is_not_followed(tree: bytes) -> None:
    target = write(tree, b"target", b"x")
    link = os.path.join(tree, b"link")
    os.symlink(target, link)
    out = hash_file(link)
    assert out.hex is None
    assert out.error is not None and f"errno {errno.ELOOP}" in out.error


def test_file_changing_while_read_is_unsettled(
    tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fstat pair disagrees (as if the file were written all the time): after a
    second try the outcome is "unsettled", never a hash of content the file no longer has."""
    path = write(tree, b"busy", b"data")
    ticks = count()

    def fstat(fd: int) -> os.stat_result:
        st = os.fstat(fd)
        return os.stat_result(list(st), {"st_mtime_ns": st.st_mtime_ns + next(ticks)})

    monkeypatch.setattr(fsledger.hashing, "os", OsWith(fstat=fstat))
    out = hash_file(path)
    assert out.hex is None and out.unsettled and out.error is None


def test_file_changing_once_is_hashed_again(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tree, b"busy", b"data")
    calls = count()

    def fstat(fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if next(calls) == 1:  # the first "after" differs from its "before"
            return os.stat_result(list(st), {"st_mtime_ns": st.st_mtime_ns + 1})
        return st

    monkeypatch.setattr(fsledger.hashing, "os", OsWith(fstat=fstat))
    out = hash_file(path)
    assert out.hex == blake3.blake3(b"data").hexdigest()


def test_read_error_is_an_error(tree: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tree, b"f", b"data")

    def readv(fd: int, buffers: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsledger.hashing, "os", OsWith(readv=readv))
    out = hash_file(path)
    assert out.hex is None and out.error == "Input/output error (errno 5)"


def _key(path: bytes) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@pytest.mark.parametrize("size", SIZES)
def test_an_expected_key_that_holds_gives_the_same_outcome(tree: bytes, size: int) -> None:
    """With the walk's lstat key as ``expect`` the hash and its key are those of the file."""
    data = os.urandom(size)
    path = write(tree, b"f", data)
    key = _key(path)
    assert (
        hash_file(path, expect=key)
        == hash_file(path)
        == HashOutcome(blake3.blake3(data).hexdigest(), *key)
    )


def test_a_file_changed_since_its_expected_key_is_hashed_as_it_is_now(tree: bytes) -> None:
    """The file was rewritten after the walk's lstat: the outcome is its new content with
    its new key, never the new content under the old key."""
    path = write(tree, b"f", b"old")
    stale = _key(path)
    os.remove(path)
    write(tree, b"f", b"new content")
    out = hash_file(path, expect=stale)
    assert out == HashOutcome(blake3.blake3(b"new content").hexdigest(), *_key(path))
    assert _key(path) != stale


def test_an_expected_key_of_a_file_that_became_a_fifo_or_vanished(tree: bytes) -> None:
    path = write(tree, b"f", b"data")
    stale = _key(path)
    os.remove(path)
    os.mkfifo(path)
    out = hash_file(path, expect=stale)
    assert out.hex is None and out.error == "not a regular file any more"
    os.remove(path)
    out = hash_file(path, expect=stale)
    assert out.hex is None and out.error is not None and "errno 2" in out.error


def test_an_expected_key_saves_the_fstat_before(
    tree: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of ``expect``: one fstat a file, the one after the read."""
    path = write(tree, b"f", b"data")
    key = _key(path)
    calls = count()

    def fstat(fd: int) -> os.stat_result:
        next(calls)
        return os.fstat(fd)

    monkeypatch.setattr(fsledger.hashing, "os", OsWith(fstat=fstat))
    assert hash_file(path, expect=key).hex == blake3.blake3(b"data").hexdigest()
    assert next(calls) == 1


def test_hash_many_keeps_order(tree: bytes) -> None:
    for i in range(5):
        write(tree, b"f%d" % i, b"x" * i)
    paths = [b"f%d" % i for i in range(5)]
    paths.insert(2, b"missing")
    outs = hash_many(tree, paths, "sha256")
    assert [o.hex for o in outs] == [hashlib.sha256(b"x" * i).hexdigest() for i in range(2)] + [
        None
    ] + [hashlib.sha256(b"x" * i).hexdigest() for i in range(2, 5)]


def test_algorithms() -> None:
    assert set(ALGORITHMS) == {"blake3", "sha256"}


def test_pool_hashes_in_worker_processes(tree: bytes) -> None:
    paths = [write(tree, b"f%d" % i, os.urandom(100 + i)) for i in range(20)]
    with HashPool(2, "blake3", 60.0) as pool:
        rels = [os.path.basename(p) for p in paths]
        result = pool.submit(tree, rels)
        outs = pool.collect(result, rels, [os.path.getsize(p) for p in paths])
    for path, out in zip(paths, outs, strict=True):
        with open(path, "rb") as f:
            assert out.hex == blake3.blake3(f.read()).hexdigest()


class _NeverReady:
    def get(self, timeout: float | None = None) -> list[HashOutcome]:
        raise multiprocessing.TimeoutError


def test_pool_abandons_a_chunk_past_its_budget() -> None:
    """A chunk stuck on a dead mount comes back as errors (and the pool is replaced)."""
    pool = HashPool(1, "blake3", 0.0)
    try:
        outs = pool.collect(_NeverReady(), [b"/a", b"/b"], [0, 0])  # type: ignore[arg-type]
        assert [o.hex for o in outs] == [None, None]
        assert all(o.error and "timed out" in o.error for o in outs)
    finally:
        pool.close()


def test_pool_budget_grows_with_size() -> None:
    pool = HashPool(1, "blake3", 60.0)
    assert pool.budget([]) == 60.0
    assert pool.budget([1 << 30, 1 << 30]) == pytest.approx(100.0)


def _frozen(_: object) -> int:
    return gc.get_freeze_count()


def test_forked_workers_leave_what_they_share_out_of_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers that are forks inherit the parent's objects frozen out of the cyclic collector
    (full collections in a worker, and the parent's at exit, do not walk them), and the
    work still runs."""
    monkeypatch.setattr(fsledger.hashing, "_context", lambda: multiprocessing.get_context("fork"))
    pool = HashPool(2, "blake3", 10.0)
    try:
        pool.start()
        shared = gc.get_freeze_count()
        assert shared > 0
        # (less the few a worker frees as it starts)
        assert all(n > 0.99 * shared for n in pool.map_ordered(_frozen, [1, 2, 3], 10))
    finally:
        pool.close()
        gc.unfreeze()


def test_a_gentle_pools_workers_run_at_nice_10_and_idle_io_and_the_parent_does_not():
    parent = current_priority()
    with HashPool(2, "blake3", 30.0, gentle=True) as gentle:
        probes = list(gentle.map_ordered(current_priority, [0, 1, 2, 3], 30.0))
    assert {p.nice for p in probes} == {max(GENTLE_NICE, parent.nice)}
    assert {p.io_class for p in probes} == {IOPRIO_CLASS_IDLE}
    assert current_priority() == parent
    with HashPool(2, "blake3", 30.0) as normal:
        assert set(normal.map_ordered(current_priority, [0, 1], 30.0)) == {parent}


def test_a_gentle_paced_scan_in_workers_records_the_tree_exactly(tmp_path):
    from fsledger.config import Settings
    from fsledger.ledger import Ledger

    root = tmp_path / "tree"
    for d in range(40):  # enough top-level folders for a first index in worker processes
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(3):
            (root / f"d{d:02d}" / f"{i}.jpg").write_bytes(b"%d-%d" % (d, i))
    settings = Settings(
        database_url="sqlite://" + str(tmp_path / "g.db"), max_concurrency=2, batch_size=10
    )

    def on_disk() -> dict[bytes, int]:
        return {os.fsencode(p.relative_to(root)): p.stat().st_size for p in root.rglob("*.jpg")}

    with Ledger(settings) as ledger:
        repo = ledger.add_repository(root)
        stats = ledger.scan(repo, gentle=True)
        assert stats.files_added == 120
        assert {r.path: r.size for r in ledger.files(repo)} == on_disk()
        # A rescan with changes writes paced batches of ten: still exact.
        for p in sorted(root.rglob("0.jpg")):
            p.write_bytes(b"changed, and longer than before")
        stats = ledger.scan(repo, gentle=True)
        assert stats.files_updated == 40
        assert {r.path: r.size for r in ledger.files(repo)} == on_disk()
