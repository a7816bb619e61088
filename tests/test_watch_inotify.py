"""The watcher on real inotify, real temporary trees and real programs.

After the initial scan no reconciliation runs (asserted through ``sync_operations``):
every workload must reach the ledger through events alone, and the ledger must then
equal an independent walk of the disk.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import pytest

from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, FeedEntry, OperationType, Repository
from fsledger.watch import Watcher
from support import disk_state, ledger_state, wait_exact, wait_for
from watch_support import exchange, write

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/sys/fs/inotify"), reason="inotify is Linux-only"
)


def need(tool: str) -> str:
    """The path of a command-line tool; skip without it (fail under CI, where the image
    is expected to have it: see the Makefile / CI setup)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install -y {tool})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed ({done.returncode}): {done.stderr}"


class Live:
    """A ledger, a scanned repository at ``root`` and a started watcher on real inotify."""

    def __init__(
        self,
        tmp_path: Path,
        debounce_s: float = 0.5,
        url: str | None = None,
        write_hold_s: float = 30.0,
    ) -> None:
        self.root = tmp_path / "lib"
        self.outside = tmp_path / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        self.settings = Settings(
            database_url=url or "sqlite://" + str(tmp_path / "db.sqlite"),
            max_concurrency=2,
            debounce_s=debounce_s,
            write_hold_s=write_hold_s,
        )
        self.ledger = Ledger(self.settings)
        self.resyncs: list[tuple[UUID, bytes, str]] = []
        self.watcher: Watcher | None = None
        self.repo: Repository | None = None

    def start(self, populate: Callable[[Path], None] | None = None) -> Repository:
        if populate is not None:
            populate(self.root)
        repo = self.ledger.add_repository(os.fsencode(self.root))
        self.ledger.scan(repo)
        self.repo = self.ledger.store.get_repository(repo.id)
        assert self.repo is not None
        self.watcher = Watcher(self.ledger, self.settings, on_resync=self._on_resync)
        self.watcher.add(self.repo)
        self.watcher.start()
        self.seq0 = self.ledger.store.latest_seq()
        return self.repo

    def _on_resync(self, repo: Repository, prefix: bytes, reason: str) -> None:
        self.resyncs.append((repo.id, prefix, reason))

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.ledger.close()

    def p(self, rel: str) -> Path:
        return self.root / rel

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until the ledger equals the disk, then check it got there from events only."""
        assert self.repo is not None
        wait_exact(self.ledger, self.repo, self.root, timeout)
        ops = self.ledger.store.recent_operations(self.repo.id, 1000)
        scans = [o for o in ops if o.operation_type is not OperationType.REALTIME]
        assert len(scans) == 1, f"only the initial scan may have run: {scans}"
        assert self.resyncs == []

    def feed_kinds(self) -> list[tuple[ChangeKind, bytes, bytes | None]]:
        assert self.repo is not None
        entries = self.ledger.store.changes_since(self.seq0, 1_000_000, self.repo.id)
        return [(e.kind, e.path, e.old_path) for e in entries]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    lv = Live(tmp_path)
    yield lv
    lv.close()


def base_tree(root: Path) -> None:
    for i in range(12):
        write(root / f"albums/a{i % 3}/IMG_{i:03}.jpg", f"photo {i} " * 20)
    write(root / "readme.txt", "hello")
    write(root / ".hidden/config", "ignored")


def source_tree(top: Path, files: int, dirs: int) -> Path:
    for i in range(files):
        write(top / f"d{i % dirs}/s{i % 3}/file_{i:04}.dat", os.urandom(64) + str(i).encode())
    write(top / "d0/.DS_Store", "junk")
    write(top / "d1/edit.swp", "junk")
    return top


# === programs ============================================================================
@pytest.mark.slow
def test_tar_extract(live: Live, tmp_path: Path) -> None:
    tar = need("tar")
    live.start(base_tree)
    src = source_tree(tmp_path / "src", 400, 25)
    archive = tmp_path / "archive.tar"
    run(tar, "-cf", archive, "-C", src, ".")
    live.p("extracted").mkdir()
    run(tar, "-xf", archive, "-C", live.p("extracted"))
    live.settle()


@pytest.mark.slow
def test_rsync_into_the_tree(live: Live, tmp_path: Path) -> None:
    rsync = need("rsync")
    live.start(base_tree)
    src = source_tree(tmp_path / "src", 200, 10)
    run(rsync, "-a", f"{src}/", f"{live.p('synced')}/")
    live.settle()
    # A second run updates changed files through hidden temp files renamed into place.
    for i in range(0, 200, 7):
        write(src / f"d{i % 10}/s{i % 3}/file_{i:04}.dat", b"rewritten " + os.urandom(40))
    run(rsync, "-a", f"{src}/", f"{live.p('synced')}/")
    live.settle()


@pytest.mark.slow
def test_git_checkout_of_another_commit(live: Live) -> None:
    git = need("git")
    live.start(base_tree)
    repo = live.p("project")
    repo.mkdir()
    g = [
        git,
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.org",
        "-c",
        "init.defaultBranch=main",
    ]
    run(*g, "init", "-q", cwd=repo)
    for i in range(30):
        write(repo / f"src/m{i % 4}/file{i}.py", f"print({i})\n")
    run(*g, "add", "-A", cwd=repo)
    run(*g, "commit", "-qm", "one", cwd=repo)
    run(*g, "checkout", "-qb", "other", cwd=repo)
    for i in range(0, 30, 3):
        write(repo / f"src/m{i % 4}/file{i}.py", f"print('changed {i}')\n")
    for i in range(1, 30, 7):
        (repo / f"src/m{i % 4}/file{i}.py").unlink()
    for i in range(5):
        write(repo / f"docs/new{i}.md", f"# doc {i}\n")
    os.rename(repo / "src/m0", repo / "src/renamed")
    run(*g, "add", "-A", cwd=repo)
    run(*g, "commit", "-qm", "two", cwd=repo)
    live.settle()
    run(*g, "checkout", "-q", "main", cwd=repo)
    live.settle()
    run(*g, "checkout", "-q", "other", cwd=repo)
    live.settle()


@pytest.mark.slow
def test_cp_of_a_large_file(live: Live, tmp_path: Path) -> None:
    cp = need("cp")
    live.start(base_tree)
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        block = os.urandom(1 << 20)
        for i in range(50):
            fh.write(block[:-8] + i.to_bytes(8, "big"))
    live.p("videos").mkdir()
    run(cp, big, live.p("videos/big.bin"))
    live.settle()


def test_rm_rf_of_a_subtree(live: Live) -> None:
    live.start(base_tree)
    run("rm", "-rf", live.p("albums/a1"))
    live.settle()
    run("rm", "-rf", live.p("albums"))
    live.settle()
    assert live.watcher is not None
    assert live.watcher.metrics.watched_directories == 1


def test_moving_trees_into_inside_and_out_of_the_repository(live: Live) -> None:
    live.start(base_tree)
    source_tree(live.outside / "incoming", 60, 4)
    run("mv", live.outside / "incoming", live.p("incoming"))  # into
    live.settle()
    run("mv", live.p("incoming"), live.p("albums/sorted"))  # inside
    live.settle()
    run("mv", live.p("albums/sorted/d1"), live.outside / "d1")  # out
    write(live.outside / "single.jpg", "one file")
    run("mv", live.outside / "single.jpg", live.p("single.jpg"))
    run("mv", live.p("readme.txt"), live.outside / "readme.txt")
    live.settle()
    # Moved-out directories are no longer watched: changes there do not reach the ledger.
    write(live.outside / "d1/after.dat", "outside now")
    write(live.p("marker.jpg"), "marker")
    live.settle()


def test_editor_atomic_saves(live: Live) -> None:
    live.start(base_tree)
    target = live.p("readme.txt")
    for i, temp in enumerate((".readme.txt.swp", "readme.txt.tmp", "readme.txt.new", "4913")):
        tmp = live.p(temp)
        with open(tmp, "wb") as fh:
            fh.write(f"version {i} of the readme\n".encode() * (i + 1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        live.settle()
    # A backup copy next to it (vim's readme.txt~) is ignored.
    shutil.copy(target, live.p("readme.txt~"))
    live.settle()


@pytest.mark.slow
def test_a_file_written_slowly_in_chunks(live: Live) -> None:
    live.start(base_tree)
    path = live.p("recording.wav")
    with open(path, "wb") as fh:
        for i in range(10):
            fh.write(os.urandom(4096) + bytes([i]))
            fh.flush()
            time.sleep(0.2)  # the workload itself: a slow writer, not synchronisation
    live.settle()
    # Appending in separate opens (a logger) settles at each close.
    for i in range(5):
        with open(path, "ab") as fh:
            fh.write(b"more %d\n" % i)
        time.sleep(0.1)
    live.settle()


def test_directory_rename_rehashes_nothing(live: Live) -> None:
    def tree(root: Path) -> None:
        base_tree(root)
        for i in range(100):
            write(root / f"photos/2023/{i % 5}/IMG_{i:04}.jpg", f"pixels {i}" * 50)

    live.start(tree)
    assert live.repo is not None
    before = {
        p.replace(b"photos/", b"pictures/", 1): v
        for p, v in ledger_state(live.ledger, live.repo).items()
    }
    os.rename(live.p("photos"), live.p("pictures"))
    live.settle()
    assert live.feed_kinds() == [(ChangeKind.DIR_MOVED, b"pictures", b"photos")]
    assert ledger_state(live.ledger, live.repo) == before
    # Files in the renamed tree's subdirectories are followed at their new paths.
    write(live.p("pictures/2023/3/new.jpg"), "new")
    live.settle()


def test_new_directory_with_files_created_before_its_watch(live: Live) -> None:
    live.start(base_tree)
    for i in range(20):
        deep = live.p(f"fresh/{i}/a/b")
        deep.mkdir(parents=True)
        write(deep / "f.jpg", str(i))
        os.makedirs(live.p(f"fresh/{i}/c"))
    live.settle()


@pytest.mark.slow
def test_a_real_queue_overflow_loses_nothing(tmp_path: Path) -> None:
    live = Live(tmp_path)
    try:
        live.start(base_tree)
        assert live.watcher is not None and live.repo is not None
        # Starve the reader: hold its lock while more events than max_queued_events pile up.
        with open("/proc/sys/fs/inotify/max_queued_events") as fh:
            limit = int(fh.read())
        with live.watcher._read_lock:
            # Into directories already watched (new ones would not be, with the reader
            # held): create + modify + close_write per file.
            for i in range(limit // 2):
                write(live.p(f"albums/a{i % 3}/f{i}.dat"), str(i))
            write(live.p("flood/deep/f.dat"), "in a directory created during the overflow")
        wait_for("a resync request", lambda: bool(live.resyncs))
        assert live.watcher.metrics.overflows >= 1
        assert (live.repo.id, b"", "inotify queue overflow") in live.resyncs
        # The manager would run this reconciliation; here the test does.
        live.ledger.reconciler.reconcile(live.ledger.writer(live.repo))
        wait_exact(live.ledger, live.repo, live.root)
        # And the tree stays watched, new directories included.
        write(live.p("flood/deep/after.dat"), "after")
        write(live.p("flood/new/after.dat"), "after")
        wait_exact(live.ledger, live.repo, live.root)
    finally:
        live.close()


@pytest.mark.slow
def test_close_to_row_latency_is_measured(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    live.start(base_tree)
    assert live.watcher is not None
    for i in range(200):
        write(live.p(f"lat/f{i}.jpg"), str(i))
        time.sleep(0.005)  # the workload: one file every few ms
    live.settle()
    metrics = live.watcher.metrics
    assert len(metrics.latency_ms) >= 150
    with capsys.disabled():
        print(
            f"\nclose->row latency over {len(metrics.latency_ms)} files: "
            f"p50={metrics.latency_p50():.1f} ms p99={metrics.latency_p99():.1f} ms"
        )


def test_stop_flushes_pending_events(tmp_path: Path) -> None:
    live = Live(tmp_path, debounce_s=3600.0)
    try:
        live.start(base_tree)
        assert live.watcher is not None and live.repo is not None
        with open(live.p("open.jpg"), "wb") as fh:
            fh.write(b"still open")
            fh.flush()
            watcher = live.watcher
            wait_for("two events processed", lambda: watcher.metrics.events_processed >= 2)
            live.watcher.stop()
        assert b"open.jpg" in ledger_state(live.ledger, live.repo)
        assert (
            disk_state(live.root)[b"open.jpg"] == ledger_state(live.ledger, live.repo)[b"open.jpg"]
        )
    finally:
        live.close()


# === issue 13: renames the kernel reports in pieces, new directories, hard links ===========
State = dict[bytes, tuple[int, str | None]]


def replay(state: State, entries: list[FeedEntry]) -> State:
    """What a consumer that knew ``state`` holds after applying ``entries`` in order."""
    out = dict(state)
    for e in entries:
        if e.kind is ChangeKind.DIR_MOVED:
            assert e.old_path is not None
            lo_new, lo_old = e.path + b"/", e.old_path + b"/"
            for path in [p for p in out if p.startswith(lo_new)]:
                del out[path]
            for path in [p for p in out if p.startswith(lo_old)]:
                out[e.path + path[len(e.old_path) :]] = out.pop(path)
        elif e.kind is ChangeKind.MOVED:
            assert e.old_path is not None and e.size is not None
            out.pop(e.old_path, None)
            out[e.path] = (e.size, e.content_hash)
        elif e.kind is ChangeKind.DELETED:
            out.pop(e.path, None)
        elif e.kind in (ChangeKind.CREATED, ChangeKind.MODIFIED):
            assert e.size is not None
            out[e.path] = (e.size, e.content_hash)
    return out


@pytest.fixture
def live_db(tmp_path: Path, store_url: str) -> Iterator[Live]:
    """``Live`` on each store (SQLite and PostgreSQL)."""
    lv = Live(tmp_path, url=store_url)
    yield lv
    lv.close()


def swap_tree(root: Path) -> None:
    for side in ("left", "right"):
        for i in range(6):
            write(root / f"{side}/sub{i % 2}/f{i}.jpg", f"{side} {i} " * (10 + i))
    write(root / "other/keep.txt", "x")


def test_exchange_of_two_directories_swaps_their_records(live_db: Live) -> None:
    """renameat2(RENAME_EXCHANGE) of two directories: inotify sends a rename pair for each
    side; they must be applied as one swap, the feed must replay to the ledger, and the
    swapped directories' watches must name the right paths afterwards."""
    lv = live_db
    lv.start(swap_tree)
    assert lv.repo is not None
    for round_ in range(3):
        seq0 = lv.ledger.store.latest_seq()
        before = ledger_state(lv.ledger, lv.repo)
        exchange(lv.p("left"), lv.p("right"))
        lv.settle()
        entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
        assert {e.kind for e in entries} == {ChangeKind.DIR_MOVED}, entries
        assert replay(before, entries) == ledger_state(lv.ledger, lv.repo)
        # Files written below both swapped directories land at their new paths.
        write(lv.p(f"left/sub0/new{round_}.jpg"), f"new left {round_}")
        write(lv.p(f"right/sub1/new{round_}.jpg"), f"new right {round_}")
        lv.settle()
    # Directories in different parents, one of them nested below the other's sibling.
    write(lv.p("other/deep/x/f.jpg"), "deep")
    lv.settle()
    seq0 = lv.ledger.store.latest_seq()
    before = ledger_state(lv.ledger, lv.repo)
    exchange(lv.p("left/sub1"), lv.p("other/deep"))
    lv.settle()
    entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
    assert {e.kind for e in entries} == {ChangeKind.DIR_MOVED}, entries
    assert replay(before, entries) == ledger_state(lv.ledger, lv.repo)


def test_exchange_of_two_files(live_db: Live) -> None:
    lv = live_db
    lv.start(swap_tree)
    assert lv.repo is not None
    seq0 = lv.ledger.store.latest_seq()
    before = ledger_state(lv.ledger, lv.repo)
    exchange(lv.p("left/sub0/f0.jpg"), lv.p("right/sub1/f1.jpg"))
    lv.settle()
    entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
    assert replay(before, entries) == ledger_state(lv.ledger, lv.repo)


def test_chained_directory_renames_reach_the_feed_as_moves(live_db: Live) -> None:
    """``mv D0 C/D1 && mv C/D1 D2 && mv D2 D3`` and ``mv a b/c && mv b c2`` in quick
    succession, many times over: the feed says only moves, and replays to the ledger."""
    lv = live_db

    def tree(root: Path) -> None:
        write(root / "D0/x/f.jpg", "moving file")
        write(root / "D0/g.jpg", "another")
        write(root / "a/y/h.jpg", "a's file")
        write(root / "b/keep.jpg", "b's file")
        (root / "C").mkdir()

    lv.start(tree)
    assert lv.repo is not None
    for i in range(20):
        seq0 = lv.ledger.store.latest_seq()
        before = ledger_state(lv.ledger, lv.repo)
        os.rename(lv.p("D0"), lv.p("C/D1"))
        os.rename(lv.p("C/D1"), lv.p("D2"))
        os.rename(lv.p("D2"), lv.p("D3"))
        os.rename(lv.p("a"), lv.p("b/c"))
        os.rename(lv.p("b"), lv.p("c2"))
        lv.settle()
        entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
        kinds = {e.kind for e in entries}
        shown = [(e.kind.value, e.old_path, e.path) for e in entries]
        assert kinds <= {ChangeKind.DIR_MOVED, ChangeKind.MOVED}, (i, shown)
        assert replay(before, entries) == ledger_state(lv.ledger, lv.repo), (i, entries)
        # Back again, for the next round.
        os.rename(lv.p("D3"), lv.p("D0"))
        os.rename(lv.p("c2/c"), lv.p("a"))
        os.rename(lv.p("c2"), lv.p("b"))
        lv.settle()


def test_first_file_of_a_new_directory_is_recorded_once_at_its_final_size(
    live_db: Live,
) -> None:
    """A program that creates a directory and writes a file in it in two parts (with a
    pause while the file is open): one ``created``, at the final size."""
    lv = live_db
    lv.start(base_tree)
    assert lv.repo is not None
    seq0 = lv.ledger.store.latest_seq()
    for i in range(5):
        d = lv.p(f"new{i}/inner")
        d.mkdir(parents=True)
        with open(d / "f.bin", "wb") as fh:
            fh.write(os.urandom(65536))
            fh.flush()
            time.sleep(0.05)  # the workload: a writer pausing with the file open
            fh.write(os.urandom(65536))
    lv.settle()
    entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
    assert [(e.kind, e.path, e.size) for e in entries] == [
        (ChangeKind.CREATED, f"new{i}/inner/f.bin".encode(), 131072) for i in range(5)
    ]


@pytest.mark.slow
def test_no_file_of_a_copied_tree_first_appears_at_a_partial_size(
    live: Live, tmp_path: Path
) -> None:
    cp = need("cp")
    live.start(base_tree)
    assert live.repo is not None
    src = tmp_path / "src"
    rng = random.Random(13)
    for i in range(2000):
        size = rng.choice((0, 1, 100, 5000, 70_000, 200_000)) if i % 50 else 600_000
        write(src / f"d{i % 40}/s{i % 7}/file_{i:04}.dat", rng.randbytes(size))
    seq0 = live.ledger.store.latest_seq()
    run(cp, "-a", src, live.p("copy"))
    live.settle()
    final = disk_state(live.root)
    entries = live.ledger.store.changes_since(seq0, 100_000, live.repo.id)
    partial = [
        (e.path, e.size, final[e.path][0])
        for e in entries
        if e.kind is ChangeKind.CREATED and e.size != final[e.path][0]
    ]
    assert partial == []
    assert [e for e in entries if e.kind is not ChangeKind.CREATED] == []


def stalled_write(path: Path, data: bytes, split: int, stall_s: float) -> None:
    """A writer that writes ``data[:split]``, stalls ``stall_s`` with the file open (longer
    than the debounce: ``cp`` under load), then writes the rest and closes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data[:split])
        time.sleep(stall_s)
        os.write(fd, data[split:])
    finally:
        os.close(fd)


def first_sizes(lv: Live) -> dict[bytes, list[tuple[ChangeKind, int | None]]]:
    assert lv.repo is not None
    out: dict[bytes, list[tuple[ChangeKind, int | None]]] = {}
    for e in lv.ledger.store.changes_since(lv.seq0, 100_000, lv.repo.id):
        out.setdefault(e.path, []).append((e.kind, e.size))
    return out


@pytest.mark.parametrize("split", [131_072, 0], ids=["after-a-prefix", "before-any-write"])
@pytest.mark.parametrize("where", ["known-dir", "new-dir"])
def test_a_writer_stalled_past_the_debounce_is_not_recorded_at_a_partial_size(
    live_db: Live, where: str, split: int
) -> None:
    """A file written in part, then left open without a write for longer than the
    debounce (four times over), then finished and closed: its first record, and its only
    feed entry, has the full size (nor is it recorded empty when the stall comes before
    the first write). Inotify said it was written and not closed, and the
    writer still held it open (``/proc``): it was held back, not recorded at 131072 bytes
    and then modified (the flake of ``test_no_file_of_a_copied_tree_first_appears_at_a_
    partial_size`` under load, made deterministic by a writer of our own)."""
    lv = live_db
    lv.start(base_tree)
    data = random.Random(7).randbytes(200_000)
    target = lv.p("albums/a0/big.dat" if where == "known-dir" else "fresh/sub/big.dat")
    target.parent.mkdir(parents=True, exist_ok=True)
    stalled_write(target, data, split, 4 * lv.settings.debounce_s)
    lv.settle()
    rel = os.fsencode(target.relative_to(lv.root))
    assert first_sizes(lv)[rel] == [(ChangeKind.CREATED, 200_000)]
    assert lv.watcher is not None and lv.watcher.metrics.writes_held >= 1


def test_a_real_cp_stalled_by_its_source_is_not_recorded_at_a_partial_size(
    live_db: Live,
) -> None:
    """The real ``cp``, stalled as under load, but deterministically: it copies from a pipe
    (``cp /dev/stdin``) that gets 131072 bytes, nothing for four debounces, then the rest.
    The file's first record, and its only feed entry, has the full size."""
    cp = need("cp")
    lv = live_db
    lv.start(base_tree)
    data = random.Random(11).randbytes(200_000)
    proc = subprocess.Popen(
        [cp, "/dev/stdin", str(lv.p("albums/copied.dat"))], stdin=subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(data[:131_072])
    proc.stdin.flush()
    time.sleep(4 * lv.settings.debounce_s)
    proc.stdin.write(data[131_072:])
    proc.stdin.close()
    assert proc.wait(30) == 0
    lv.settle()
    assert first_sizes(lv)[b"albums/copied.dat"] == [(ChangeKind.CREATED, 200_000)]


def test_a_file_kept_open_is_recorded_when_its_hold_is_over(tmp_path: Path) -> None:
    """A log: written, and held open without a close. It is recorded once the hold is
    over (at what it then has), and its later writes after the next one."""
    lv = Live(tmp_path, debounce_s=0.3, write_hold_s=2.0)
    try:
        lv.start(base_tree)
        assert lv.repo is not None
        with open(lv.p("app.log"), "wb") as log:
            log.write(b"line 1\n")
            log.flush()
            t0 = time.monotonic()
            wait_for(
                "the open log recorded",
                lambda: lv.ledger.store.get_record(lv.repo.id, b"app.log") is not None,  # type: ignore[union-attr]
                timeout=15,
            )
            assert time.monotonic() - t0 >= 1.5, "held while open, up to the hold"
            log.write(b"line 2\n")
            log.flush()
            wait_exact(lv.ledger, lv.repo, lv.root, 15)
        lv.settle()
    finally:
        lv.close()


def test_a_truncate_without_a_descriptor_is_not_held(tmp_path: Path) -> None:
    """``truncate(2)`` writes (``IN_MODIFY``) with no descriptor, so no close follows: no
    process holds the file open, and it is recorded after the debounce, not the hold."""
    lv = Live(tmp_path, debounce_s=0.3, write_hold_s=3600.0)
    try:
        lv.start(base_tree)
        os.truncate(lv.p("readme.txt"), 2)
        lv.settle(timeout=10)
    finally:
        lv.close()


def test_a_write_through_one_hard_link_refreshes_the_others(live_db: Live) -> None:
    lv = live_db

    def tree(root: Path) -> None:
        write(root / "a/x.dat", "shared content")
        (root / "b").mkdir()
        os.link(root / "a/x.dat", root / "b/y.dat")
        os.link(root / "a/x.dat", root / "a/z.dat")

    lv.start(tree)
    assert lv.repo is not None
    seq0 = lv.ledger.store.latest_seq()
    with open(lv.p("a/x.dat"), "ab") as fh:
        fh.write(b" and more")
    lv.settle()
    state = ledger_state(lv.ledger, lv.repo)
    assert state[b"b/y.dat"] == state[b"a/x.dat"] == state[b"a/z.dat"]
    assert state[b"b/y.dat"][0] == len(b"shared content and more")
    entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
    assert sorted((e.kind, e.path) for e in entries) == [
        (ChangeKind.MODIFIED, b"a/x.dat"),
        (ChangeKind.MODIFIED, b"a/z.dat"),
        (ChangeKind.MODIFIED, b"b/y.dat"),
    ]


@pytest.mark.parametrize("then", ["unlinked", "dir_removed", "replaced"])
def test_a_truncate_through_a_short_lived_hard_link_refreshes_the_recorded_name(
    tmp_path: Path, store_url: str, then: str
) -> None:
    """``ln f/g.jpg new/café && truncate -s 7 new/café``, then café goes away (unlinked, its
    directory removed, or replaced by another file) before the watcher looks at it. The
    write changed f/g.jpg (same inode), yet inotify named only café (a ``truncate(2)``: an
    IN_MODIFY without a close) and nothing at all for f/; the look at café finds it gone
    (or another inode) with no record, so its inode would be unknown. The test model's
    ``hard_link, truncate, rename, rmtree`` (tests/test_model.py) left f/g.jpg's record at
    its old size. The debounce outlasts the whole sequence, so every look comes after it."""
    lv = Live(tmp_path, debounce_s=2.0, url=store_url)
    try:

        def tree(root: Path) -> None:
            write(root / "f/g.jpg", "golf")
            write(root / "new/other.jpg", "unrelated")

        lv.start(tree)
        assert lv.repo is not None
        cafe = lv.p("new/café")
        os.link(lv.p("f/g.jpg"), cafe)
        os.truncate(cafe, 7)
        time.sleep(0.5)  # the events are read (well within the 2 s debounce)
        if then == "unlinked":
            os.unlink(cafe)
        elif then == "dir_removed":
            shutil.rmtree(lv.p("new"))
        else:
            write(lv.p("new/.café.swp"), "another file")
            os.replace(lv.p("new/.café.swp"), cafe)
        assert os.path.getsize(lv.p("f/g.jpg")) == 7
        lv.settle()
        assert ledger_state(lv.ledger, lv.repo)[b"f/g.jpg"][0] == 7
    finally:
        lv.close()


@pytest.mark.parametrize("how", ["written", "linked", "chmod"])
def test_a_hard_link_under_an_ignored_name_refreshes_the_recorded_name(
    live_db: Live, how: str
) -> None:
    """``.hidden`` (ignored: never recorded, its events not about itself) is a hard link of
    the recorded ``photo.jpg``. Writing through it changes photo.jpg, yet inotify names only
    ``.hidden``; a new link or a chmod through it changes photo.jpg's ctime. The record of
    photo.jpg follows without a rescan."""
    lv = live_db

    def tree(root: Path) -> None:
        write(root / "album/photo.jpg", "original pixels")
        write(root / "album/other.jpg", "unrelated")
        if how != "linked":
            os.link(root / "album/photo.jpg", root / "album/.hidden")

    lv.start(tree)
    assert lv.repo is not None
    seq0 = lv.ledger.store.latest_seq()
    if how == "written":
        with open(lv.p("album/.hidden"), "ab") as fh:
            fh.write(b", retouched through the hidden name")
    elif how == "linked":
        os.link(lv.p("album/photo.jpg"), lv.p("album/.hidden"))
    else:
        os.chmod(lv.p("album/.hidden"), 0o600)
    repo_id, disk = lv.repo.id, os.lstat(lv.p("album/photo.jpg"))

    def recorded() -> tuple[int, int, int] | None:
        record = lv.ledger.store.get_records(repo_id, [b"album/photo.jpg"]).get(b"album/photo.jpg")
        return None if record is None else (record.size, record.stat.mtime_ns, record.stat.ctime_ns)

    # The whole lstat key, ctime included (a new link or a chmod changes only the ctime).
    wait_for(
        "photo.jpg's record to follow the write through its ignored link",
        lambda: recorded() == (disk.st_size, disk.st_mtime_ns, disk.st_ctime_ns),
        20.0,
        detail=lambda: f"recorded {recorded()}, disk {disk}",
    )
    lv.settle()  # ledger == disk (sizes, mtimes, hashes), from events alone
    entries = lv.ledger.store.changes_since(seq0, 10_000, lv.repo.id)
    fed = [(ChangeKind.MODIFIED, b"album/photo.jpg")] if how == "written" else []
    assert [(e.kind, e.path) for e in entries] == fed  # META is not fed
    assert b"album/.hidden" not in ledger_state(lv.ledger, lv.repo)


UNPRIVILEGED_WATCHER = r"""
import logging, os, sys
from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.watch import Watcher

url, root, closed = sys.argv[1], sys.argv[2], sys.argv[3]
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
try:
    os.listdir(closed)
    print("CAN-READ", flush=True)
except PermissionError:
    print("DENIED", flush=True)
settings = Settings(database_url=url, max_concurrency=1, debounce_s=0.2)
ledger = Ledger(settings)
repo = ledger.add_repository(root)
ledger.scan(repo)
repo = ledger.store.get_repository(repo.id)
watcher = Watcher(
    ledger, settings, on_resync=lambda r, p, why: print("RESYNC", p, why, flush=True)
)
watcher.add(repo)
watcher.start()
print("READY", repo.id, flush=True)
sys.stdin.readline()
watcher.stop()
ledger.close()
"""


@contextlib.contextmanager
def unprivileged_watcher(
    store_url: str, root: Path, closed: Path
) -> Iterator[tuple[Ledger, Repository, list[str]]]:
    """A watcher of ``root`` in a child process without the capabilities that let root read
    through any mode (``closed`` is the directory it checks it cannot read); yields a ledger
    of the store, the repository and the child's log lines, and checks at the end that the
    watcher never asked for a reconciliation of the whole repository."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = [need("setpriv"), "--bounding-set=-dac_override,-dac_read_search"]
    child = subprocess.Popen(
        [*prefix, sys.executable, "-c", UNPRIVILEGED_WATCHER, store_url, root, closed],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(child.stderr or ()), daemon=True)
    reader.start()
    ledger = Ledger(Settings(database_url=store_url))
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "DENIED\n", "the watcher must not read through modes"
        ready = child.stdout.readline().split()
        assert ready[:1] == ["READY"], (ready, "".join(log))
        repo = ledger.store.get_repository(UUID(ready[1]))
        assert repo is not None
        yield ledger, repo, log
    finally:
        assert child.stdin is not None
        child.stdin.write("stop\n")
        child.stdin.close()
        rest = child.stdout.read() if child.stdout else ""
        child.wait(60)
        ledger.close()
    assert "RESYNC" not in rest, rest


def test_a_directory_readable_again_is_scanned_again(tmp_path: Path, store_url: str) -> None:
    """A directory that could not be read (``chmod 000``: one from before the watcher
    started, which it could not watch, and one closed while watched, whose files it could
    not look at) and becomes readable again (``chmod 755``): the watcher alone makes what
    changed meanwhile true. The watcher runs in a child without the capabilities that let
    root read through any mode, so the directories are really unreadable to it."""
    root = tmp_path / "lib"
    write(root / "open/old.txt", "old")
    write(root / "open/keep.txt", "keep")
    write(root / "closed/x.txt", "behind a closed door from the start")
    write(root / "other.txt", "other")
    (root / "closed").chmod(0)
    with unprivileged_watcher(store_url, root, root / "closed") as (ledger, repo, log):
        try:
            seq0 = ledger.store.latest_seq()
            assert b"closed/x.txt" not in ledger_state(ledger, repo)
            # Closed while watched: a file created and one deleted behind the closed door.
            (root / "open").chmod(0)
            write(root / "open/new.txt", "created while unreadable")
            (root / "open/old.txt").unlink()
            write(root / "closed/y.txt", "also created while unreadable")
            wait_for(
                "two failed looks logged",
                lambda: sum("cannot look at open/" in line for line in log) >= 2,
                detail=lambda: "".join(log),
            )
            (root / "open").chmod(0o755)
            (root / "closed").chmod(0o755)
            wait_exact(ledger, repo, root)
            entries = ledger.store.changes_since(seq0, 1000, repo.id)
            assert sorted((e.kind, e.path) for e in entries) == [
                (ChangeKind.CREATED, b"closed/x.txt"),
                (ChangeKind.CREATED, b"closed/y.txt"),
                (ChangeKind.CREATED, b"open/new.txt"),
                (ChangeKind.DELETED, b"open/old.txt"),
            ]
            # The directory that could not be watched is watched now.
            write(root / "closed/z.txt", "after")
            wait_exact(ledger, repo, root)
        finally:
            (root / "open").chmod(0o755)
            (root / "closed").chmod(0o755)


def test_an_exchange_with_a_directory_that_could_not_be_watched(
    tmp_path: Path, store_url: str
) -> None:
    """``renameat2(RENAME_EXCHANGE)`` of a watched directory and one the watcher could not
    watch (``chmod 000`` from before it started). The first rename pair lands on a name
    without a watch; read as a plain rename, the second pair took the watched
    directory's watches and records back to where it came from, and the closed
    directory, no longer remembered as unreadable, was not scanned when opened under its
    new name. Both sides land where they are: the records swap, the closed directory is
    scanned once opened, and new files on both sides are seen."""
    root = tmp_path / "lib"
    write(root / "open/a.txt", "a")
    write(root / "open/sub/b.txt", "b")
    write(root / "closed/x.txt", "behind a closed door from the start")
    write(root / "other.txt", "other")
    (root / "closed").chmod(0)
    with unprivileged_watcher(store_url, root, root / "closed") as (ledger, repo, _log):
        try:
            exchange(root / "open", root / "closed")
            wait_for(
                "the watched directory's records at its new name",
                lambda: b"closed/sub/b.txt" in ledger_state(ledger, repo),
                detail=lambda: str(sorted(ledger_state(ledger, repo))),
            )
            (root / "open").chmod(0o755)  # the closed directory, under its new name
            wait_exact(ledger, repo, root)
            write(root / "closed/sub/new.txt", "new below the watched directory")
            write(root / "open/new.txt", "new in the directory opened")
            wait_exact(ledger, repo, root)
        finally:
            for path in ("open", "closed"):
                (root / path).chmod(0o755)


def test_a_new_link_of_a_file_held_open_is_recorded_at_its_close(tmp_path: Path) -> None:
    """``ln y x`` while a writer holds y open: x's IN_CREATE is a write without a close
    whose inode a writer holds (``SettleRule.held``), but the close comes for y alone."""
    lv = Live(tmp_path, debounce_s=0.3, write_hold_s=3600.0)
    try:
        lv.start(base_tree)
        with open(lv.p("albums/y.dat"), "wb") as fh:
            fh.write(b"first half ")
            fh.flush()
            time.sleep(0.2)
            os.link(lv.p("albums/y.dat"), lv.p("albums/x.dat"))
            time.sleep(1.0)  # x comes due and is held: its inode is open for writing
            fh.write(b"second half")
        lv.settle(timeout=10)
    finally:
        lv.close()


def test_a_closed_directory_renamed_is_scanned_again_when_opened(
    tmp_path: Path, store_url: str
) -> None:
    """A directory closed (``chmod 000``) while files in it change, then renamed (or one of
    its ancestors is), then opened again under its new name (found by the model-based
    test: ``mv d d-aside`` of a closed ``d``): the watcher remembered it could not read
    ``d`` by its old path, so opening ``d-aside`` was not known to need a scan, and what
    changed behind the closed door (a file created, one deleted) was never recorded. A
    file renamed into the closed directory is one the watcher cannot look at either (it
    failed the whole pass, which asked for a reconciliation of the repository). The
    watcher runs without the capabilities that let root read through any mode."""
    root = tmp_path / "lib"
    write(root / "d/old.txt", "old")
    write(root / "d/keep.txt", "keep")
    write(root / "x/sub/old.txt", "old below")
    write(root / "moved.txt", "moved into a closed directory")
    write(root / "probe/p.txt", "probe")
    (root / "probe").chmod(0)
    with unprivileged_watcher(store_url, root, root / "probe") as (ledger, repo, log):
        try:
            (root / "probe").chmod(0o755)
            wait_exact(ledger, repo, root)
            for closed in ("d", "x/sub"):
                (root / closed).chmod(0)
                write(root / closed / "new.txt", "created while closed")
                (root / closed / "old.txt").unlink()
            os.rename(root / "moved.txt", root / "d/moved.txt")  # where it cannot be looked at
            wait_for(
                "the failed looks logged",
                lambda: sum("cannot look at" in line for line in log) >= 4,
                detail=lambda: "".join(log),
            )
            # The pass that failed to look ends before the renames: renamed while it ran, the
            # paths it looked at would be looked at again (and fail) under their new names.
            time.sleep(0.5)
            os.rename(root / "d", root / "d-aside")
            os.rename(root / "x", root / "y")
            time.sleep(0.5)  # the renames are written before the doors open
            (root / "d-aside").chmod(0o755)
            (root / "y/sub").chmod(0o755)
            wait_exact(ledger, repo, root)
        finally:
            for path in ("probe", "d", "d-aside", "x/sub", "y/sub"):
                if (root / path).exists():
                    (root / path).chmod(0o755)
