"""Issue 13, item by item: each scenario live (the watcher alone) and offline (one scan).

Every test runs on both stores and in both modes (see ``scenario_support``): after the
operations the ledger must equal the descriptor-walking oracle, and the change feed
replayed from its beginning must equal the ledger. Items about the feed (3, 4, 8) also
assert the feed rows themselves.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import make_settings
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, Repository
from fsledger.store import Store
from fsledger.writer import Applied
from oracle import digest_at, oracle_files
from scenario_support import (
    Scenario,
    exchange,
    feed_rows,
    mkdirs_at,
    open_dir_at,
    unlink_at,
    write_at,
)
from support import wait_for
from treeutil import describe_diff, hash_bytes
from watch_support import write

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/sys/fs/inotify"), reason="inotify is Linux-only"
)


def no_records_below(sc: Scenario, prefix: bytes) -> None:
    stale = [p for p in sc.files() if p.startswith(prefix + b"/")]
    assert not stale, f"[{sc.mode}] records below {prefix!r} remain: {stale[:5]}"


# === 1. a directory replaced by a symlink ===================================================
SECRET = b"root:$6$not-really-a-shadow-file:19000:0:99999:7:::\n" * 15


def _two_dirs(root: Path, outside: Path) -> None:
    for d, tag in (("foo", b"foo"), ("bar", b"bar-longer")):
        write(root / d / "a.jpg", tag * 10)
        write(root / d / "b.jpg", tag * 20)
        write(root / d / "sub" / "c.jpg", tag * 30)


def _shadow(root: Path, outside: Path) -> None:
    write(root / "zz" / "shadow", b"an ordinary photo " * 4)
    write(root / "zz" / "keep.jpg", b"keep me")
    write(outside / "etc" / "shadow", SECRET)
    os.symlink(outside / "etc", root / "link")


@pytest.mark.parametrize("variant", ["rm_r_then_ln_s", "mv_then_ln_s", "exchange_outside_link"])
def test_item1_directory_replaced_by_symlink(scenario: Scenario, variant: str) -> None:
    """Issue 13 item 1: ``rm -r foo && ln -s bar foo``, ``mv foo x && ln -s x foo``, and a
    RENAME_EXCHANGE of a directory with a symlink to a directory outside the root (standing
    in for /etc): the records below the old directory go, nothing is read through the link,
    and no record or feed entry carries the outside file's size, inode or hash."""
    sc = scenario
    if variant == "exchange_outside_link":
        sc.start(_shadow)
        exchange(sc.p("zz"), sc.p("link"))  # zz -> outside/etc, link = the real directory
        # A write in the real directory: its watch must follow it to "link".
        with open(sc.p("link/shadow"), "ab") as fh:
            fh.write(b"appended after the swap\n")
        gone = b"zz"
    else:
        sc.start(_two_dirs)
        if variant == "rm_r_then_ln_s":
            shutil.rmtree(sc.p("foo"))
            os.symlink("bar", sc.p("foo"))
        else:
            os.rename(sc.p("foo"), sc.p("x"))
            os.symlink("x", sc.p("foo"))
        gone = b"foo"
    sc.check(variant)
    no_records_below(sc, gone)
    if variant == "exchange_outside_link":
        secret = os.lstat(sc.outside / "etc" / "shadow")
        secret_hash = hash_bytes(SECRET)
        assert sc.repo is not None
        for r in sc.ledger.files(sc.repo):
            assert r.stat.inode != secret.st_ino, f"{r.path!r} carries the outside file's inode"
            assert r.content_hash != secret_hash, f"{r.path!r} carries the outside file's hash"
            assert r.size != secret.st_size, f"{r.path!r} carries the outside file's size"
        leaked = [
            row
            for e, row in zip(sc.feed(0), feed_rows(sc.feed(0)), strict=True)
            if e.content_hash == secret_hash or e.size == secret.st_size
        ]
        assert not leaked, f"the feed published the outside file: {leaked}"


# === 2. RENAME_EXCHANGE of two directories =================================================
def _pair(root: Path, outside: Path) -> None:
    write(root / "A" / "same.jpg", b"A's version of same")
    write(root / "A" / "a1.jpg", b"a1" * 50)
    write(root / "A" / "sub" / "a2.jpg", b"a2" * 70)
    write(root / "B" / "same.jpg", b"B has a longer version of same")
    write(root / "B" / "b1.jpg", b"b1" * 11)
    write(root / "B" / "other" / "deep" / "b2.jpg", b"b2" * 13)


def test_item2_exchange_of_two_directories(scenario: Scenario) -> None:
    """Issue 13 item 2: ``renameat2(A, B, RENAME_EXCHANGE)`` of two directories: every
    record ends under the name its file now has, with its own content; the watches follow
    (a file written afterwards below each swapped directory is seen)."""
    sc = scenario
    sc.start(_pair)
    exchange(sc.p("A"), sc.p("B"))
    sc.check("after the exchange")
    write(sc.p("A/other/deep/after.jpg"), b"written below the old B, now A")
    write(sc.p("B/sub/after.jpg"), b"written below the old A, now B")
    sc.check("after writes below the swapped directories")


# === 3. chained directory renames ==========================================================
def _chain_tree(root: Path, outside: Path) -> None:
    write(root / "D0" / "x" / "f.jpg", b"f" * 100)
    write(root / "D0" / "g.jpg", b"g" * 200)
    (root / "C").mkdir()
    write(root / "a" / "f1.jpg", b"f1" * 30)
    write(root / "a" / "s" / "f2.jpg", b"f2" * 40)
    write(root / "b" / "f3.jpg", b"f3" * 50)


@pytest.mark.parametrize("chain", ["D0_C-D1_D2_D3", "a_b-c_then_b_c2"])
def test_item3_chained_directory_renames_reach_the_feed_as_moves(
    scenario: Scenario, chain: str
) -> None:
    """Issue 13 item 3: ``mv D0 C/D1 && mv C/D1 D2 && mv D2 D3`` and ``mv a b/c && mv b c2``
    in quick succession: the ledger ends exact, and the feed carries moves whose old paths
    are the ones its consumers have; never a deletion plus a creation of a file that only
    moved."""
    sc = scenario
    sc.start(_chain_tree)
    if chain == "D0_C-D1_D2_D3":
        os.rename(sc.p("D0"), sc.p("C/D1"))
        os.rename(sc.p("C/D1"), sc.p("D2"))
        os.rename(sc.p("D2"), sc.p("D3"))
    else:
        os.rename(sc.p("a"), sc.p("b/c"))
        os.rename(sc.p("b"), sc.p("c2"))
    sc.check(chain)  # includes: the feed replayed from seq 0 == the ledger
    entries = sc.feed()
    bad = [
        r
        for e, r in zip(entries, feed_rows(entries), strict=True)
        if e.kind in (ChangeKind.DELETED, ChangeKind.CREATED, ChangeKind.MODIFIED)
    ]
    assert not bad, f"[{sc.mode}] files that only moved reached the feed as: {bad}"


# === 4. the first file of a brand-new directory, written in two halves =====================
HALF = 64 * 1024


def write_in_two_halves(path: Path, data: bytes) -> None:
    """The writer program of item 4: half, flush, 50 ms pause, the other half, close."""
    with open(path, "wb") as fh:
        fh.write(data[:HALF])
        fh.flush()
        time.sleep(0.05)  # the workload itself: a writer pausing with the file open
        fh.write(data[HALF:])


def test_item4_first_file_in_a_new_directory_is_recorded_once_complete(
    scenario: Scenario,
) -> None:
    """Issue 13 item 4: ``mkdir new`` and at once its first file written as 64 KiB, flush,
    50 ms, 64 KiB, close: the feed has exactly one ``created`` at 131072 bytes with the
    hash of the whole content (no partial size, no following ``modified``)."""
    sc = scenario

    def one_file(root: Path, outside: Path) -> None:
        write(root / "old.jpg", b"old")

    sc.start(one_file)
    data = os.urandom(2 * HALF)
    sc.p("new").mkdir()
    write_in_two_halves(sc.p("new/rec.wav"), data)
    sc.check()
    rows = [(e.kind, e.path, e.size, e.content_hash) for e in sc.feed()]
    want = [(ChangeKind.CREATED, b"new/rec.wav", 2 * HALF, hash_bytes(data))]
    assert rows == want, f"[{sc.mode}] feed: {feed_rows(sc.feed())}"


# === 5. hard links ========================================================================
def test_item5_write_through_one_hard_link_refreshes_the_other(scenario: Scenario) -> None:
    """Issue 13 item 5: two names of one inode in different directories; a write through
    one name must refresh the other name's record (size and hash), live too."""
    sc = scenario

    def linked(root: Path, outside: Path) -> None:
        write(root / "a" / "photo.jpg", b"original pixels" * 10)
        (root / "b").mkdir()
        os.link(root / "a" / "photo.jpg", root / "b" / "photo-link.jpg")

    sc.start(linked)
    with open(sc.p("a/photo.jpg"), "r+b") as fh:  # in place, as an editor saving in place
        fh.truncate(0)
        fh.write(b"edited through a/photo.jpg, longer than before" * 5)
    sc.check("write through the first name")
    with open(sc.p("b/photo-link.jpg"), "r+b") as fh:  # same size, other content
        data = fh.read()
        fh.seek(0)
        fh.write(data.upper())
    sc.check("same-size write through the second name")


# === 6. paths longer than PATH_MAX ========================================================
def level(i: int) -> bytes:
    return b"d%03d_" % i + b"n" * 44  # 49 bytes a name, 50 with its slash


def test_item6_paths_longer_than_4096_bytes(scenario: Scenario) -> None:
    """Issue 13 item 6: a chain of 100 directories of 49-byte names (paths ~5,000 bytes):
    files beyond PATH_MAX are created, rewritten, moved with a directory rename and
    deleted, and every one is recorded exactly."""
    sc = scenario
    names = [level(i) for i in range(100)]
    shallow: list[bytes] = []

    def deep_tree(root: Path, outside: Path) -> None:
        shallow.extend(mkdirs_at(root, names[:70]))  # 3,500 bytes: within PATH_MAX
        write_at(root, shallow[-1] + b"/at70.jpg", b"level 70")

    sc.start(deep_tree)
    deep = mkdirs_at(sc.root, names)  # extends the chain to 100 levels
    assert len(deep[-1]) > 4096
    write_at(sc.root, deep[84] + b"/at85.jpg", b"level 85" * 100)
    write_at(sc.root, deep[-1] + b"/at100.jpg", b"level 100" * 100)
    write_at(sc.root, deep[-1] + b"/gone.jpg", b"deleted again")
    write_at(sc.root, deep[69] + b"/at70.jpg", b"level 70 rewritten, longer")
    sc.check("the chain extended past 4096 bytes")
    # Rename a directory at level 90 (its path > 4096) and delete a file below it.
    fd = open_dir_at(sc.root, deep[88])
    try:
        os.rename(names[89], b"renamed_" + b"r" * 40, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    moved = deep[88] + b"/renamed_" + b"r" * 40 + b"/" + b"/".join(names[90:])
    unlink_at(sc.root, moved + b"/gone.jpg")
    sc.check("a directory renamed and a file deleted beyond 4096 bytes")
    assert any(len(p) > 4096 for p in sc.files()), "no path beyond 4096 bytes was recorded"


# === 7. a directory unreadable, then readable again =======================================
def test_item7_directory_readable_again_is_looked_at_again(
    scenario: Scenario, tmp_path: Path
) -> None:
    """Issue 13 item 7: ``chmod 000 locked``, files created, changed and deleted in it (and
    a subdirectory made), ``chmod 755 locked``: the ledger catches up without a
    reconciliation of the repository. fsledger runs without root's DAC bypass here (the
    watcher's process, and the scans of the offline mode), so the mode bits are real."""
    sc = scenario
    sc.unprivileged_scans = True

    def locked_tree(root: Path, outside: Path) -> None:
        write(root / "locked" / "a.jpg", b"a" * 10)
        write(root / "locked" / "b.jpg", b"b" * 20)
        write(root / "locked" / "inner" / "c.jpg", b"c" * 30)
        write(root / "open.jpg", b"open")

    sc.start(locked_tree)
    locked = sc.p("locked")
    locked.chmod(0)
    try:
        write(locked / "new.jpg", b"created while unreadable")
        (locked / "a.jpg").unlink()
        write(locked / "b.jpg", b"b changed while unreadable, longer")
        write(locked / "sub" / "deep.jpg", b"in a directory made while unreadable")
        write(locked / "inner" / "c2.jpg", b"next to c")
        if sc.live:
            # A barrier, not a sleep: a file written after all of the above is recorded once
            # the watcher has processed what came before it.
            write(sc.p("marker.jpg"), b"marker")
            wait_for("the watcher to record marker.jpg", lambda: b"marker.jpg" in sc.files(), 15.0)
        else:
            errors = sc.scan()
            assert any("ermission denied" in e for e in errors), errors
            assert b"locked/a.jpg" in sc.files(), (
                "a record behind an unreadable directory was deleted (what cannot be seen "
                "is not gone)"
            )
    finally:
        locked.chmod(0o755)
    sc.check("after chmod 755")


# === 8. both tiers agree on one disk transition ===========================================
def _photos(root: Path, outside: Path) -> None:
    write(root / "photo.jpg", b"unchanged content" * 40)
    write(root / "other.jpg", b"other")


def test_item8_touch_after_hash_algo_change_same_kind_in_both_tiers(
    store_url: str, store: Store, ledger: Ledger, tmp_path: Path
) -> None:
    """Issue 13 item 8: records hashed with sha256, then FSLEDGER_HASH_ALGO=blake3, then
    ``touch`` of an unchanged file: the scanner and the watcher report the same change kind
    for it, which is not ``modified`` (the content did not change) and so does not reach
    the feed as one; its record's hash is right for the algorithm it names."""
    sha = Ledger(make_settings(store_url, hash_algo="sha256"), store)
    try:
        off = Scenario(sha, store_url, tmp_path, "offline", name="off", algo="sha256")
        live = Scenario(
            sha,
            store_url,
            tmp_path,
            "live",
            name="live",
            algo="sha256",
            env={"FSLEDGER_HASH_ALGO": "blake3"},
        )
        off_repo = off.start(_photos)
        live_repo = live.start(_photos)
        try:
            # The scanner, through a ledger configured with blake3 now.
            scanned: list[tuple[ChangeKind, bytes]] = []

            def listen(repo: Repository, applied: Applied) -> None:
                scanned.extend((c.kind, c.path) for c in applied.changes)

            writer = ledger.writer(off_repo)
            writer.listeners = [*writer.listeners, listen]
            os.utime(off.p("photo.jpg"))
            ledger.scan(off_repo)
            scan_kinds = [k for k, p in scanned if p == b"photo.jpg"]
            # The watcher, configured with blake3 too.
            os.utime(live.p("photo.jpg"))
            assert live.watcher is not None
            watcher = live.watcher

            def seen() -> list[str]:
                return [r["kind"] for r in watcher.applied() if r["path"] == b"photo.jpg"]

            wait_for("the watcher to apply the touch", seen, 15.0)
            watch_kinds = [ChangeKind(k) for k in seen()]
            assert scan_kinds == watch_kinds, (
                f"the tiers disagree on touch of an unchanged file: scanner {scan_kinds}, "
                f"watcher {watch_kinds}"
            )
            assert ChangeKind.MODIFIED not in scan_kinds + watch_kinds
            for sc, repo in ((off, off_repo), (live, live_repo)):
                rows = feed_rows(sc.feed())
                assert not [r for r in rows if r.startswith("modified")], (
                    f"[{sc.mode}] an unchanged file reached the feed as modified: {rows}"
                )
                want = oracle_files(sc.root, algo="blake3")
                got: dict[bytes, tuple[int, str | None]] = {}
                for r in ledger.files(repo):
                    algo = r.hash_algo or "blake3"
                    fd = os.open(sc.root, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        disk_hash, _ = digest_at(fd, r.path, algo)
                    finally:
                        os.close(fd)
                    assert r.content_hash == disk_hash, (
                        f"[{sc.mode}] {r.path!r}: hash {r.content_hash} is not the {algo} of "
                        "its content"
                    )
                    got[r.path] = (r.size, want.get(r.path, (0, None))[1])
                assert got == want, f"[{sc.mode}] {describe_diff(want, got)}"
        finally:
            live.close()
    finally:
        sha.reconciler.close()
