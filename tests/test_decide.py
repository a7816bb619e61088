"""Property tests of the decision core: what fsledger decides about a file.

Both tiers and every scan strategy call these functions, so their rules are pinned here,
once, instead of in each caller's tests.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fsledger import decide
from fsledger.decide import RACY_WINDOW_NS, LookRule, SettleRule
from fsledger.model import (
    NS_PER_S,
    Change,
    ChangeKind,
    Digest,
    FileRecord,
    FileStat,
    RecordRow,
    ScanStats,
    datetime_to_ns,
    ns_to_datetime,
)

NOW = 1_750_000_000 * NS_PER_S

small = st.integers(0, 3)
stats = st.builds(
    FileStat,
    size=small,
    mtime_ns=st.sampled_from([NOW - 100 * NS_PER_S, NOW - NS_PER_S, NOW]),
    ctime_ns=small,
    inode=small,
)
digests = st.none() | st.builds(
    Digest, algo=st.sampled_from(["blake3", "sha256"]), hex=st.sampled_from(["aa", "bb"])
)
rules = st.builds(
    LookRule,
    algo=st.sampled_from(["blake3", "sha256"]),
    hashing=st.booleans(),
    verify=st.booleans(),
    racy=st.booleans(),
)
scanned = st.sampled_from([NOW - 50 * NS_PER_S, NOW, NOW + NS_PER_S])


@st.composite
def records(draw: st.DrawFn) -> FileRecord:
    return FileRecord(b"a/b.jpg", draw(stats), draw(digests), ns_to_datetime(draw(scanned)))


def _row(rec: FileRecord) -> RecordRow:
    return RecordRow(
        rec.path,
        *rec.stat,
        rec.digest.hex if rec.digest else None,
        rec.digest.algo if rec.digest else None,
        datetime_to_ns(rec.last_scanned),
    )


@given(records(), stats, rules)
def test_the_merge_fast_path_is_needs_look(old: FileRecord, now: FileStat, rule: LookRule) -> None:
    """``row_settled`` (the merge's per-file question on flat rows) is ``not needs_look``."""
    settled = decide.row_settled(
        _row(old), (*now,), rule.algo, rule.hashing, rule.verify, rule.racy
    )
    assert settled == (not decide.needs_look(old, now, rule))


@given(stats, digests, rules)
def test_a_path_without_record_is_created(now: FileStat, digest: Digest | None, rule: LookRule):
    assert decide.classify(None, now, digest, rule) is ChangeKind.CREATED
    assert decide.needs_look(None, now, rule)


@given(records(), stats, digests, rules)
def test_classify(old: FileRecord, now: FileStat, digest: Digest | None, rule: LookRule) -> None:
    kind = decide.classify(old, now, digest, rule)
    assert kind is not ChangeKind.CREATED
    if old.stat.size != now.size:
        assert kind is ChangeKind.MODIFIED  # a size change is always a content change
    comparable = digest is not None and old.digest is not None and old.digest.algo == digest.algo
    if comparable and old.stat.size == now.size:
        # Hashes of one algorithm decide: equal hashes are never a modification.
        assert (kind is ChangeKind.MODIFIED) == (old.digest != digest)
    if (
        digest is not None
        and old.digest is not None
        and old.digest.algo != digest.algo
        and old.stat.size == now.size
    ):
        # After an algorithm switch, an unchanged size is never announced as modified
        # (issue 13, item 8: both tiers call a touched file META).
        assert kind is ChangeKind.META
    if old.stat == now and old.digest == digest and not decide.record_is_racy(old):
        assert kind is None
    if old.stat != now:
        assert kind is not None  # the record must follow the disk


@given(records(), stats, rules)
def test_a_record_that_does_not_match_is_always_looked_at(
    old: FileRecord, now: FileStat, rule: LookRule
) -> None:
    if old.stat != now or rule.verify:
        assert decide.needs_look(old, now, rule)
    if rule.hashing and (old.digest is None or old.digest.algo != rule.algo):
        assert decide.needs_look(old, now, rule)


def test_racy_records_are_rehashed_on_content_hints_only() -> None:
    key = FileStat(5, NOW, NOW, 7)
    rule = LookRule("blake3")
    racy = FileRecord(b"x", key, Digest("blake3", "aa"), ns_to_datetime(NOW + NS_PER_S))
    calm = FileRecord(b"x", key, Digest("blake3", "aa"), ns_to_datetime(NOW + 3 * NS_PER_S))
    assert decide.needs_look(racy, key, rule)
    assert not decide.needs_look(racy, key, rule, content_hint=False)
    assert not decide.needs_look(calm, key, rule)
    assert decide.is_racy(NOW, NOW + RACY_WINDOW_NS)
    assert not decide.is_racy(NOW, NOW + RACY_WINDOW_NS + 1)
    # A confirmed racy record is refreshed, so the next look does not hash it again.
    assert decide.classify(racy, key, Digest("blake3", "aa"), rule) is ChangeKind.META
    assert decide.classify(calm, key, Digest("blake3", "aa"), rule) is None


def test_corruption_needs_a_verify_and_an_unchanged_key() -> None:
    key = FileStat(5, NOW, NOW, 7)
    old = FileRecord(b"x", key, Digest("blake3", "aa"), datetime.now(UTC))
    other = Digest("blake3", "bb")
    assert decide.corrupted(old, key, other, LookRule("blake3", verify=True))
    assert not decide.corrupted(old, key, other, LookRule("blake3"))
    assert not decide.corrupted(
        old, key._replace(ctime_ns=NOW + 1), other, LookRule("blake3", True, True)
    )
    assert not decide.corrupted(old, key, Digest("sha256", "bb"), LookRule("sha256", True, True))


appeared = st.lists(
    st.tuples(st.sampled_from([b"n1", b"n2", b"n3"]), stats), max_size=4, unique_by=lambda t: t[0]
)
candidates = st.lists(
    st.builds(
        FileRecord,
        path=st.sampled_from([b"o1", b"o2", b"n1"]),
        stat=stats,
        digest=st.just(Digest("blake3", "aa")),
        last_scanned=st.just(ns_to_datetime(NOW)),
    ),
    max_size=4,
    unique_by=lambda r: r.path,
)


@given(appeared, candidates, st.sets(st.sampled_from([b"o1", b"o2", b"n1"])))
def test_pair_moves(
    new: list[tuple[bytes, FileStat]], recs: list[FileRecord], gone_paths: set[bytes]
) -> None:
    rule = LookRule("blake3")
    asked: list[bytes] = []

    def gone(rec: FileRecord) -> bool:
        asked.append(rec.path)
        return rec.path in gone_paths

    taken: set[bytes] = set()
    pairs = decide.pair_moves(new, recs, rule, gone, taken)
    sources = [r.path for r in pairs.values()]
    assert len(sources) == len(set(sources))  # a record moves to one path at most
    assert len(asked) == len(set(asked))  # the disk is asked once per record
    assert set(sources) == taken
    stats_of = dict(new)
    for path, rec in pairs.items():
        assert rec.path in gone_paths and rec.path != path
        now = stats_of[path]
        assert (rec.stat.inode, rec.stat.size, rec.stat.mtime_ns) == (
            now.inode,
            now.size,
            now.mtime_ns,
        )
    # Nothing already claimed is paired again.
    assert decide.pair_moves(new, recs, rule, gone, set(taken) | set(gone_paths)) == {}


@given(appeared, candidates, st.sets(st.sampled_from([b"o1", b"o2", b"n1"])))
def test_pair_moves_of_objects(
    new: list[tuple[bytes, FileStat]], recs: list[FileRecord], gone_paths: set[bytes]
) -> None:
    """A bucket's rename is a copy (a new LastModified) and a delete: the ETag (in the inode
    slot) and the size pair it, whatever the mtime."""
    rule = LookRule("blake3", racy=False)
    pairs = decide.pair_moves(
        new, recs, rule, lambda r: r.path in gone_paths, match=decide.is_object_move_of
    )
    stats_of = dict(new)
    for path, rec in pairs.items():
        assert rec.path in gone_paths and rec.path != path
        assert (rec.stat.inode, rec.stat.size) == (stats_of[path].inode, stats_of[path].size)
    copied = FileRecord(b"o", FileStat(5, NOW, NOW, 9), Digest("blake3", "aa"), ns_to_datetime(NOW))
    later = FileStat(5, NOW + 7 * NS_PER_S, NOW + 7 * NS_PER_S, 9)
    assert decide.is_object_move_of(copied, b"n", later, rule)
    assert not decide.is_move_of(copied, b"n", later, rule)
    assert not decide.is_object_move_of(copied, b"n", later._replace(inode=8), rule)
    assert not decide.is_object_move_of(copied, b"n", later._replace(size=6), rule)


def test_racy_rule_is_off_for_objects() -> None:
    key = FileStat(5, NOW, NOW, 7)
    racy = FileRecord(b"x", key, Digest("blake3", "aa"), ns_to_datetime(NOW + NS_PER_S))
    assert decide.needs_look(racy, key, LookRule("blake3"))
    assert not decide.needs_look(racy, key, LookRule("blake3", racy=False))
    assert (
        decide.classify(racy, key, Digest("blake3", "aa"), LookRule("blake3", racy=False)) is None
    )


def test_count() -> None:
    rec = FileRecord(b"a", FileStat(1, 1, 1, 1), None, datetime.now(UTC))
    s = ScanStats()
    decide.count(
        s,
        [
            Change(ChangeKind.CREATED, b"a", rec),
            Change(ChangeKind.MODIFIED, b"a", rec),
            Change(ChangeKind.META, b"a", rec),
            Change(ChangeKind.MOVED, b"a", rec, old_path=b"b"),
            Change(ChangeKind.DIR_MOVED, b"d", old_path=b"e"),
            Change(ChangeKind.DELETED, b"c"),
        ],
    )
    assert (s.files_added, s.files_updated, s.metadata_updated, s.files_moved) == (1, 1, 1, 2)
    assert s.files_removed == 1


@given(
    st.lists(st.sampled_from([b"a", b"b", b"c", b"d/e", b"f"]), min_size=1, unique=True),
    st.randoms(use_true_random=False),
)
def test_order_moves_lands_every_record_where_it_moved(
    sources: list[bytes], rnd: random.Random
) -> None:
    """Any set of moves (a permutation of some paths, with cycles, plus moves onto paths
    that hold a record that stays behind) written in ``order_moves``'s order, each
    replacing what is at its target as the store and the feed do, leaves every moved
    record at its target; the parking names are used only on the way."""
    paths = [b"a", b"b", b"c", b"d/e", b"f"]
    targets = rnd.sample(paths, len(sources))  # other records' paths, some not moving
    state = {p: p for p in paths}  # path -> whose record is there
    key, at = FileStat(1, 1, 1, 1), ns_to_datetime(NOW)
    moves = [
        Change(ChangeKind.MOVED, dst, FileRecord(dst, key, None, at), src)
        for src, dst in zip(sources, targets, strict=True)
    ]
    parked: list[bytes] = []

    def park(near: bytes) -> bytes:
        parked.append(b".park-%d" % len(parked))
        return parked[-1]

    for m in decide.order_moves(moves, park):
        assert m.old_path is not None and m.kind is ChangeKind.MOVED
        assert m.old_path in state, f"{m.old_path!r} moved away before its move"
        state[m.path] = state.pop(m.old_path)
    want = {dst: src for src, dst in zip(sources, targets, strict=True)}
    for dst, src in want.items():
        assert state[dst] == src
    assert not any(p in state for p in parked)


def test_settle_rule_holds_an_unclosed_write_only_while_open_and_within_the_hold() -> None:
    """``SettleRule.held``: a file written and not closed since ``open_since`` waits while
    a writer holds it open, up to ``max_hold_s``; a closed one (``None``), one nobody holds
    open (``truncate(2)``, a writer gone) or one past its hold is looked at. A file written
    on and on is due no later than its hold; without a hold the debounce alone decides."""
    rule = SettleRule(0.01, 0.5, 30.0)
    assert rule.held(100.0, 101.0, writer_open=True)
    assert not rule.held(100.0, 101.0, writer_open=False)
    assert not rule.held(None, 101.0, writer_open=True)
    assert not rule.held(100.0, 130.0, writer_open=True)
    assert rule.after_unclosed_write(101.0, 100.0) == 101.5
    assert rule.after_unclosed_write(129.9, 100.0) == 130.0
    assert SettleRule(0.01, 0.5).after_unclosed_write(500.0, 100.0) == 500.5
    assert not SettleRule(0.01, 0.5).held(100.0, 100.1, writer_open=True)


def test_open_for_writing_sees_writers_not_readers(tmp_path: Path) -> None:
    """``openfiles.open_for_writing``: the files some process (this one too) has open
    with ``O_WRONLY`` or ``O_RDWR``; a reader does not count."""
    from fsledger.watch.openfiles import open_for_writing

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for f in (a, b, c):
        f.write_bytes(b"x")
    keys = {f: (os.stat(f).st_dev, os.stat(f).st_ino) for f in (a, b, c)}
    with open(a, "ab"), open(b, "rb"), open(c, "r+b"):
        assert open_for_writing(keys.values()) == {keys[a], keys[c]}
    assert open_for_writing(keys.values()) == set()
