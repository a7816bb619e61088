"""Repositories mirrored to buckets (fsledger.s3.mirror), against a real S3 server
(SeaweedFS, tests/s3_support.py), on both stores: the bucket is compared with the disk by
listing it and hashing every object's downloaded bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from click.testing import CliRunner

from fsledger.cli import main
from fsledger.ledger import Ledger
from fsledger.errors import RootUnavailable
from fsledger.model import MirrorState, RepoState
from fsledger.s3.keys import encode, path_of
from fsledger.s3.mirror import MirrorRunner, compare, plan, deletions_refused, groups
from fsledger.s3.mirrors import Mirrors


# --- helpers -------------------------------------------------------------------------------
def disk_state(root: Path) -> dict[bytes, str]:
    """Every regular file below ``root`` (names starting with "." skipped, as the ledger's
    ignore rules do): path bytes -> blake3 of its content."""
    out: dict[bytes, str] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
        for name in filenames:
            if name.startswith(b"."):
                continue
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, base)] = blake3.blake3(f.read()).hexdigest()
    return out


def bucket_listing(client: Any, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


def bucket_state(client: Any, bucket: str, prefix: str = "") -> dict[bytes, str]:
    """Every object below ``prefix``: decoded path -> blake3 of its downloaded bytes."""
    out = {}
    for key in bucket_listing(client, bucket, prefix):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        out[path_of(prefix, key)] = blake3.blake3(body).hexdigest()
    return out


def wait_until(what: str, check: Any, timeout: float = 90.0, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def aws_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = s3_server.env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return env


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "2024" / "trip").mkdir(parents=True)
    for i in range(12):
        (root / "2024" / "trip" / f"img{i:02}.jpg").write_bytes(os.urandom(1000 + i))
    (root / "2024" / "b.jpg").write_bytes(b"B" * 2000)
    (root / "notes.txt").write_bytes(b"")
    return root


def _setup(
    ledger: Ledger, root: Path, bucket: str, endpoint: str, prefix: str = "", **kw: Any
) -> tuple[Any, MirrorRunner]:
    repo = ledger.add_repository(str(root), "photos")
    ledger.scan(repo)
    mirror = Mirrors(ledger).add("photos", f"s3://{bucket}/{prefix}", endpoint, **kw)
    return repo, MirrorRunner(ledger.store, mirror.id, concurrency=2)


# --- pure decisions ------------------------------------------------------------------------
def test_deletion_guard_and_grouping_rules() -> None:
    assert deletions_refused(0, 100, 1) is None
    assert deletions_refused(5, 0, None) is None
    assert deletions_refused(5, 5, 10) is None
    assert "more than --max-delete 10" in (deletions_refused(6, 5, 10) or "")
    from fsledger.s3.mirror import Delete, DirMove, Move, Upload

    acts = [
        Upload(b"a"),
        Upload(b"b"),
        Delete(b"c"),
        Delete(b"d"),
        Move(b"e", b"f"),
        Move(b"g", b"h"),
        DirMove(b"i", b"j"),
        Upload(b"k"),
    ]
    assert [len(g) for g in groups(acts)] == [2, 2, 1, 1, 1, 1]
    from fsledger.s3.mirror import BucketObject, LedgerFile

    cmp = compare(
        [
            (b"a", LedgerFile(1, "blake3", "h1")),
            (b"b", LedgerFile(2, "blake3", "h2")),
            (b"c", LedgerFile(3, "blake3", "h3")),
        ],
        {
            b"a": BucketObject("a", 1, "h1"),
            b"b": BucketObject("b", 2, "zz"),
            b"x": BucketObject("x", 9, None),
        },
    )
    assert (cmp.checked, cmp.missing, cmp.wrong, cmp.extra) == (3, [b"c"], [b"b"], ["x"])


# --- in-process: the runner against the real server, both stores ---------------------------
def test_mirror_follows_scans_moves_and_deletes_with_server_side_copies(
    ledger: Ledger, photos: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    client = s3_server.client()
    repo, runner = _setup(ledger, photos, s3_bucket, s3_server.endpoint, "backup/")
    try:
        m = runner.sync(60)
        assert m.cursor_seq is not None and m.counters.uploaded == 14
        assert bucket_state(client, s3_bucket, "backup/") == disk_state(photos)
        head = client.head_object(Bucket=s3_bucket, Key="backup/2024/b.jpg")
        assert head["Metadata"] == {"blake3": blake3.blake3(b"B" * 2000).hexdigest()}
        # moves (a file, a directory), a modification, a deletion, a new file
        (photos / "2024" / "b.jpg").rename(photos / "b-moved.jpg")
        (photos / "2024" / "trip").rename(photos / "trip-2024")
        (photos / "notes.txt").write_bytes(b"changed")
        (photos / "trip-2024" / "img00.jpg").unlink()
        (photos / "new.jpg").write_bytes(b"new")
        ledger.scan(repo)
        m = runner.sync(60)
        assert bucket_state(client, s3_bucket, "backup/") == disk_state(photos)
        # 11 photos + b.jpg came by server-side copy; notes.txt and new.jpg by upload
        assert m.counters.copied == 12, m.counters
        assert m.counters.uploaded == 16
        assert m.counters.deleted == 1
        assert runner.verify().exact
    finally:
        runner.stop()


def test_max_delete_pauses_until_accepted_and_offline_repositories_delete_nothing(
    ledger: Ledger,
    photos: Path,
    s3_server: Any,
    s3_bucket: str,
    aws_env: dict[str, str],
    store_url: str,
) -> None:
    client = s3_server.client()
    repo, runner = _setup(ledger, photos, s3_bucket, s3_server.endpoint, max_delete=5)
    env = {"FSLEDGER_DATABASE_URL": store_url, **aws_env}
    try:
        runner.sync(60)
        assert len(bucket_listing(client, s3_bucket)) == 14
        shutil.rmtree(photos / "2024" / "trip")  # 12 deletions
        ledger.scan(repo)
        m = runner.sync(60)
        assert m.state is MirrorState.PAUSED
        assert "12 deletions pending" in (m.reason or "")
        assert len(bucket_listing(client, s3_bucket)) == 14  # nothing deleted
        out = CliRunner().invoke(main, ["mirror", "status", "--json"], env=env)
        assert out.exit_code == 0, out.output
        status = json.loads(out.stdout)["mirrors"][0]
        assert status["state"] == "paused" and "--max-delete 5" in status["reason"]
        # resuming without accepting pauses again; accepting lets them through
        out = CliRunner().invoke(main, ["mirror", "resume", f"s3://{s3_bucket}"], env=env)
        assert out.exit_code == 0, out.output
        assert runner.sync(60).state is MirrorState.PAUSED
        out = CliRunner().invoke(main, ["mirror", "resume", str(m.id), "--accept-deletes"], env=env)
        assert out.exit_code == 0, out.output
        m = runner.sync(60)
        assert m.state is MirrorState.ACTIVE and m.counters.deleted == 12
        assert bucket_state(client, s3_bucket) == disk_state(photos)
        # A deletion is in the feed, then the root goes away: while the repository is
        # offline the mirror acts on nothing, the deletion included.
        (photos / "notes.txt").unlink()
        ledger.scan(repo)
        moved = photos.with_name("elsewhere")
        photos.rename(moved)
        with pytest.raises(RootUnavailable):
            ledger.scan(repo)
        assert ledger.store.get_repository(repo.id).state is RepoState.OFFLINE  # type: ignore[union-attr]
        assert runner.sync(10).state is MirrorState.ACTIVE
        assert runner.stats.state == "waiting: repository offline"
        assert "notes.txt" in bucket_listing(client, s3_bucket)
        moved.rename(photos)
        ledger.scan(repo)
        runner.sync(60)
        assert bucket_state(client, s3_bucket) == disk_state(photos)
    finally:
        runner.stop()


def test_verify_repair_after_objects_were_deleted_or_corrupted_behind_its_back(
    ledger: Ledger,
    photos: Path,
    s3_server: Any,
    s3_bucket: str,
    aws_env: dict[str, str],
    store_url: str,
) -> None:
    client = s3_server.client()
    repo, runner = _setup(ledger, photos, s3_bucket, s3_server.endpoint)
    env = {"FSLEDGER_DATABASE_URL": store_url, **aws_env}
    try:
        runner.sync(60)
    finally:
        runner.stop()
    client.delete_object(Bucket=s3_bucket, Key="2024/trip/img01.jpg")
    client.put_object(Bucket=s3_bucket, Key="2024/trip/img02.jpg", Body=os.urandom(1002))
    client.put_object(Bucket=s3_bucket, Key="2024/b.jpg", Body=b"B" * 10)
    client.put_object(Bucket=s3_bucket, Key="stray.bin", Body=b"stray")
    client.put_object(Bucket=s3_bucket, Key="bad\u241bzz", Body=b"not ours")
    out = CliRunner().invoke(main, ["mirror", "verify", "photos", "--json"], env=env)
    assert out.exit_code == 3, out.output
    report = json.loads(out.stdout)["mirrors"][0]
    assert report["missing"] == ["2024/trip/img01.jpg"]
    assert sorted(report["wrong"]) == ["2024/b.jpg", "2024/trip/img02.jpg"]
    assert sorted(report["extra"]) == ["bad\u241bzz", "stray.bin"]
    out = CliRunner().invoke(main, ["mirror", "verify", "photos", "--repair"], env=env)
    assert out.exit_code == 0, out.output
    assert bucket_state(client, s3_bucket) == disk_state(photos)
    out = CliRunner().invoke(main, ["mirror", "verify", "photos", "--json"], env=env)
    assert out.exit_code == 0 and json.loads(out.stdout)["mirrors"][0]["exact"]


def test_non_utf8_and_control_names_round_trip(
    ledger: Ledger, tmp_path: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    base = os.fsencode(root)
    names = [
        b"caf\xe9.jpg",
        b"tab\there.jpg",
        "x\u241by.jpg".encode(),
        "été.jpg".encode(),
        b"d\xff\xfe/inner\x01.jpg",
    ]
    for name in names:
        full = os.path.join(base, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(name * 3)
    client = s3_server.client()
    repo, runner = _setup(ledger, root, s3_bucket, s3_server.endpoint, "odd/")
    try:
        runner.sync(60)
        keys = set(bucket_listing(client, s3_bucket, "odd/"))
        assert keys == {"odd/" + encode(n) for n in names}
        assert "odd/été.jpg" in keys and "odd/caf\u241bE9.jpg" in keys
        assert bucket_state(client, s3_bucket, "odd/") == disk_state(root)
        assert runner.verify().exact
    finally:
        runner.stop()
