"""Large buckets listed in key ranges: by threads of the owner, and by other agents on one
PostgreSQL (distributed scans), against a real S3 server (SeaweedFS, which does not list in
byte order: ``a/`` before ``a.txt``). Every ledger is checked against the bucket itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import fsledger.distscan as distscan
from fsledger.config import Settings
from fsledger.errors import RootUnavailable
from fsledger.ignore import IgnoreRules
from fsledger.ledger import Ledger
from fsledger.merge import RangeResult
from fsledger.model import RelPath, RepoSettings, Repository
from fsledger.s3 import bucket as s3bucket
from support import wait_for
from test_distscan import Helper, left_over
from test_s3_bucket import add_bucket, aws, bucket_truth, feed_kinds, gets, ledger_view

pytestmark = pytest.mark.slow

__all__ = ["aws"]  # the fixture, imported to be used here

TOPS = 20
SUBS = 5
PER = 20  # 20 x 5 x 20 = 2000 objects, plus the awkward ones
AWKWARD = ["a.txt", "a/x.jpg", "a/b/c.jpg", "a0.jpg", "a-b/d.jpg", "top.bin", "é/ü.txt", "z"]


def _put_all(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()
            )
        )


def _many(client: Any, bucket: str) -> dict[str, bytes]:
    objects = {
        f"p{t:02d}/s{s}/f{i:03d}.jpg": b"%d-%d-%d;" % (t, s, i) * (1 + i % 7)
        for t in range(TOPS)
        for s in range(SUBS)
        for i in range(PER)
    }
    objects.update({k: k.encode() * 3 for k in AWKWARD})
    _put_all(client, bucket, objects)
    client.put_object(Bucket=bucket, Key="p03/", Body=b"")  # a folder marker
    return objects


@pytest.fixture
def in_ranges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RelPath, RelPath | None]]:
    """Every scan of a whole bucket lists in key ranges; the ranges computed are noted."""
    monkeypatch.setattr(s3bucket, "RANGE_MIN_RECORDS", 0)
    monkeypatch.setattr(s3bucket, "RANGE_MIN_FOLDERS", 2)
    seen: list[tuple[RelPath, RelPath | None]] = []
    compute = s3bucket.compute_bucket_range

    def noted(task: Any, store: Any, bucket: Any) -> RangeResult:
        seen.append((task.lo, task.hi))
        return compute(task, store, bucket)

    monkeypatch.setattr(s3bucket, "compute_bucket_range", noted)
    return seen


def test_range_listings_partition_the_bucket_in_byte_order(aws: Any, s3_bucket: str) -> None:
    """Whatever the cut points (folders at any depth, points that are no folder at all), the
    ranges' listings are disjoint, each in byte order, and together the whole listing."""
    client = aws.client()
    _many(client, s3_bucket)
    bucket = s3bucket.Bucket.at(f"s3://{s3_bucket}", aws.endpoint)
    rules = IgnoreRules((), False)
    whole = list(bucket.listing(rules))
    assert [p for p, _ in whole] == sorted(p for p, _ in whole)
    assert len(whole) == TOPS * SUBS * PER + len(AWKWARD)
    planned = bucket.plan_cuts(12)
    assert 8 <= len(planned) <= 11 and planned == sorted(planned)
    assert all(c.endswith(b"/") for c in planned)
    deep = bucket.plan_cuts(200)
    assert any(c.count(b"/") == 2 for c in deep)  # second-level folders: p00/s1/
    for cuts in (planned, deep, [b"a", b"a.", b"a/b/", b"a0", b"p07/s3/f010", b"\xc3"]):
        bounds: list[RelPath | None] = [b"", *cuts, None]
        pieces: list[tuple[RelPath, Any]] = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            assert lo is not None
            part = list(bucket.range_listing(rules, lo, hi))
            assert [p for p, _ in part] == sorted(p for p, _ in part)
            assert all(lo <= p and (hi is None or p < hi) for p, _ in part)
            pieces += part
        assert pieces == whole


def test_a_bucket_reconciled_in_ranges_equals_the_bucket(
    ledger: Ledger, aws: Any, s3_bucket: str, in_ranges: list[Any]
) -> None:
    """A first index, changes and moves across ranges, each scan in ranges, each ledger the
    bucket's truth and what a one-pass scan finds nothing to change in."""
    client = aws.client()
    objects = _many(client, s3_bucket)
    repo = add_bucket(ledger, aws, s3_bucket)
    t0 = time.monotonic()
    stats = ledger.scan(repo)
    first = time.monotonic() - t0
    assert len(in_ranges) >= 8, in_ranges
    assert stats.files_added == len(objects) and stats.files_scanned == len(objects)
    truth = bucket_truth(client, s3_bucket)
    assert ledger_view(ledger, repo) == truth
    head = ledger.feed_head()

    # No change: no GET, nothing written; and a one-pass scan agrees.
    before = gets()
    stats = ledger.scan(repo)
    assert gets() == before and stats.files_scanned == len(objects)
    assert stats.files_added + stats.files_updated + stats.files_removed == 0
    assert feed_kinds(ledger, repo, head) == []

    # Changes all over, and a folder renamed the S3 way into another range (p02/s1/ is in
    # an early range, q/ after every p..).
    time.sleep(1.1)
    client.put_object(Bucket=s3_bucket, Key="a.txt", Body=b"other")
    client.delete_object(Bucket=s3_bucket, Key="p10/s2/f003.jpg")
    client.put_object(Bucket=s3_bucket, Key="p15/s4/new.jpg", Body=b"new")
    moved = [f"p02/s1/f{i:03d}.jpg" for i in range(PER)]
    for key in moved:
        new = "q/" + key
        client.copy_object(Bucket=s3_bucket, Key=new, CopySource={"Bucket": s3_bucket, "Key": key})
        client.delete_object(Bucket=s3_bucket, Key=key)
    in_ranges.clear()
    before = gets()
    stats = ledger.scan(repo)
    assert len(in_ranges) >= 8
    assert gets() - before == 2, "only a.txt and new.jpg are downloaded; moves are not"
    assert stats.files_moved == PER
    assert (stats.files_added, stats.files_updated, stats.files_removed) == (1, 1, 1)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    kinds = feed_kinds(ledger, repo, head)
    assert sorted(k for k in kinds if k[0] == "moved") == sorted(
        ("moved", b"q/" + k.encode(), k.encode()) for k in moved
    )

    # The one-pass listing finds nothing to change.
    in_ranges.clear()
    s3bucket.RANGE_MIN_RECORDS = 10**9
    try:
        stats = ledger.scan(repo)
    finally:
        s3bucket.RANGE_MIN_RECORDS = 0
    assert in_ranges == []
    assert stats.files_added + stats.files_updated + stats.files_removed + stats.files_moved == 0
    print(f"S3-RANGES first index of {len(objects)} objects in ranges: {first:.2f}s")


def test_a_range_that_cannot_be_listed_deletes_nothing(
    ledger: Ledger,
    aws: Any,
    s3_bucket: str,
    in_ranges: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Objects deleted everywhere, and one range's listing fails part way: the scan fails
    (exit 4), every record is kept; the next scan deletes them."""
    client = aws.client()
    _many(client, s3_bucket)
    repo = add_bucket(ledger, aws, s3_bucket)
    ledger.scan(repo)
    records = ledger_view(ledger, repo)
    gone = [f"p{t:02d}/s0/f000.jpg" for t in range(TOPS)]
    for key in gone:
        client.delete_object(Bucket=s3_bucket, Key=key)
    listing = s3bucket.Bucket._list

    def failing(self: s3bucket.Bucket, rules: Any, folder: RelPath, *a: Any, **kw: Any) -> Any:
        if folder.startswith(b"p12/"):
            raise RootUnavailable("bucket could not be listed (InternalError); nothing deleted")
        return listing(self, rules, folder, *a, **kw)

    monkeypatch.setattr(s3bucket.Bucket, "_list", failing)
    head = ledger.feed_head()
    with pytest.raises(RootUnavailable) as caught:
        ledger.scan(repo)
    assert caught.value.exit_code == 4
    assert ledger_view(ledger, repo) == records
    assert all(k != "deleted" for k, _, _ in feed_kinds(ledger, repo, head))
    monkeypatch.setattr(s3bucket.Bucket, "_list", listing)
    stats = ledger.scan(repo)
    assert stats.files_removed == len(gone)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)


@contextmanager
def bucket_owner(
    url: str, aws: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, pause: float
) -> Iterator[tuple[Ledger, Repository]]:
    """This process as the owning agent of a bucket repository (``test_distscan.owner``)."""
    compute = distscan.DistributedMerge._compute

    def slow(self: distscan.DistributedMerge, claim: Any) -> RangeResult:
        time.sleep(pause)
        return compute(self, claim)

    monkeypatch.setattr(distscan.DistributedMerge, "_compute", slow)
    monkeypatch.setattr(distscan.LocalWorkers, "start", lambda self, job_ids: None)
    settings = Settings(database_url=url, max_concurrency=2, distributed=True)
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(
            f"s3://{bucket}", None, RepoSettings(endpoint_url=aws.endpoint)
        )
        lease = ledger.store.acquire_lease(repo.id)
        assert lease is not None
        ledger.writer(repo).lease = lease
        try:
            yield ledger, repo
        finally:
            lease.release()
            ledger.reconciler.close()


def test_two_agents_list_a_bucket_in_ranges(
    pg_url: str, aws: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distributed scan of a bucket: the owner (this process, slowed down) and a helper
    agent (``fsledger run --distributed``, which reaches the bucket with its own credentials)
    compute the ranges; the ledger equals the bucket, moves are paired without a GET."""
    client = aws.client()
    objects = _many(client, s3_bucket)
    with bucket_owner(pg_url, aws, s3_bucket, monkeypatch, 0.3) as (ledger, repo):
        helper = Helper(pg_url, tmp_path / "helper.log")
        try:
            stats = ledger.scan(repo)
            assert stats.files_added == len(objects)
            assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
            wait_for("the helper took items", lambda: helper.helped() > 0, 30)
            first = helper.helped()
            time.sleep(1.1)
            moved = [f"p05/s3/f{i:03d}.jpg" for i in range(PER)]
            for key in moved:
                client.copy_object(
                    Bucket=s3_bucket, Key="r/" + key, CopySource={"Bucket": s3_bucket, "Key": key}
                )
                client.delete_object(Bucket=s3_bucket, Key=key)
            client.put_object(Bucket=s3_bucket, Key="a.txt", Body=b"changed")
            stats = ledger.scan(repo)
            assert stats.files_moved == PER and stats.files_updated == 1
            assert stats.files_added == stats.files_removed == 0
            assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
            assert left_over(pg_url)[:2] == (0, 0)
            print(f"S3-RANGES helper items: first index {first}, rescan {helper.helped() - first}")
        finally:
            helper.stop()
    assert "Traceback" not in helper.text()
