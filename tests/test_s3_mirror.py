"""Repositories mirrored to buckets (fsledger.s3.mirror), against a real S3 server
(SeaweedFS, tests/s3_support.py), on both stores: the bucket is compared with the disk by
listing it and hashing every object's downloaded bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from click.testing import CliRunner

from api_support import free_port
from fsledger.cli import main
from fsledger.errors import RootUnavailable
from fsledger.ledger import Ledger
from fsledger.model import (
    ChangeKind,
    FeedEntry,
    MirrorCounters,
    MirrorState,
    RepoState,
    utcnow,
)
from fsledger.s3.keys import encode, path_of
from fsledger.s3.mirror import (
    Delete,
    DirMove,
    MirrorRunner,
    Move,
    Pause,
    Upload,
    compare,
    deletions_refused,
    groups,
    plan,
)
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
    repo_id = uuid.uuid4()

    def entry(kind: ChangeKind, path: bytes, old: bytes | None = None) -> FeedEntry:
        return FeedEntry(1, repo_id, kind, path, old, 1, "h", "blake3", utcnow())

    assert plan(entry(ChangeKind.CREATED, b"a")) == Upload(b"a")
    assert plan(entry(ChangeKind.MODIFIED, b"a")) == Upload(b"a")
    assert plan(entry(ChangeKind.MOVED, b"b", b"a")) == Move(b"a", b"b")
    assert plan(entry(ChangeKind.DIR_MOVED, b"d", b"c")) == DirMove(b"c", b"d")
    assert plan(entry(ChangeKind.DELETED, b"a")) == Delete(b"a")
    assert plan(entry(ChangeKind.REPO_OFFLINE, b"")) is None
    assert isinstance(plan(entry(ChangeKind.REPO_REMOVED, b"")), Pause)
    assert deletions_refused(0, 100, 1) is None
    assert deletions_refused(5, 0, None) is None
    assert deletions_refused(5, 5, 10) is None
    assert "more than --max-delete 10" in (deletions_refused(6, 5, 10) or "")
    acts: list[Upload | Move | DirMove | Delete | Pause] = [
        Upload(b"a"),
        Upload(b"b"),
        Delete(b"c"),
        Delete(b"d"),
        Move(b"e", b"f"),
        Move(b"g", b"h"),
        DirMove(b"i", b"j"),
        Upload(b"k"),
    ]
    assert [len(g) for g in groups(acts)] == [6, 1, 1]
    # the same path twice: the second action waits for the first
    assert [len(g) for g in groups([Upload(b"a"), Delete(b"a")])] == [1, 1]
    assert list(groups([Upload(b"a"), Upload(b"b"), Upload(b"a")])) == [
        [Upload(b"a"), Upload(b"b")]
    ]
    assert [len(g) for g in groups([Delete(b"a"), Upload(b"b"), Upload(b"a")])] == [2, 1]
    # a chain and a swap split the moves: each reads what the one before wrote
    chain = [Move(b"a", b"b"), Move(b"c", b"d"), Move(b"b", b"e"), Move(b"x", b"a")]
    assert [len(g) for g in groups(chain)] == [2, 2]
    swap = [Move(b"a", b"t"), Move(b"c", b"a"), Move(b"t", b"c")]
    assert [len(g) for g in groups(swap)] == [1, 1, 1]
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
        # Moved by server-side copies: the escaped keys as copy sources too.
        os.rename(os.path.join(base, b"caf\xe9.jpg"), os.path.join(base, b"m caf\xe9 +%&.jpg"))
        os.rename(os.path.join(base, "été.jpg".encode()), os.path.join(base, b"d\xff\xfe/\x02.jpg"))
        ledger.scan(repo)
        m = runner.sync(60)
        assert m.counters.copied == 2, m.counters
        assert runner._lean is not None and runner._lean._refused == 0  # signed as botocore
        assert bucket_state(client, s3_bucket, "odd/") == disk_state(root)
        assert runner.verify().exact
    finally:
        runner.stop()


# --- the daemon: `fsledger run` keeps the mirror -------------------------------------------
EXE = str(Path(sys.executable).with_name("fsledger"))


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def disk_listing(root: Path) -> dict[bytes, int]:
    base = os.fsencode(root)
    out = {}
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, base)] = os.lstat(full).st_size
    return out


def listing_paths(client: Any, bucket: str) -> dict[bytes, int]:
    return {path_of("", k): int(o["Size"]) for k, o in bucket_listing(client, bucket).items()}


@pytest.fixture
def daemon_env(store_url: str, s3_server: Any, tmp_path: Path) -> dict[str, str]:
    return s3_server.env(
        FSLEDGER_DATABASE_URL=store_url,
        RECONCILIATION_MAX_CONCURRENCY="2",
        XDG_DATA_HOME=str(tmp_path / "xdg"),
    )


@pytest.fixture
def daemon(daemon_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"run{len(procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [EXE, "run", *(args or ("--no-http",))],
            env=daemon_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _make_library(at: Path, dirs: int, per_dir: int, seed: int) -> None:
    for d in range(dirs):
        sub = at / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_dir):
            (sub / f"f{i:03}.jpg").write_bytes(f"{seed}/{d}/{i}".encode() * (50 + i))


@pytest.mark.slow  # a real daemon through tar, rsync, mv and rm: 10-20 s
def test_mirror_kept_exact_by_the_daemon_through_tar_rsync_mv_and_rm(
    daemon_env: dict[str, str], daemon: Any, tmp_path: Path, s3_server: Any, s3_bucket: str
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    cli(daemon_env, "repo", "add", str(root), "--name", "lib")
    cli(
        daemon_env,
        "mirror",
        "add",
        "lib",
        f"s3://{s3_bucket}",
        "--endpoint-url",
        s3_server.endpoint,
    )
    port = free_port()
    proc = daemon("--listen", f"127.0.0.1:{port}")
    client = s3_server.client()

    def settle(step: str) -> None:
        wait_until(
            f"the bucket to equal the disk after {step}",
            lambda: listing_paths(client, s3_bucket) == disk_listing(root),
            timeout=120,
        )
        assert bucket_state(client, s3_bucket) == disk_state(root), step
        assert proc.poll() is None

    # tar: a library extracted into the root
    src = tmp_path / "src"
    _make_library(src, dirs=4, per_dir=15, seed=1)
    archive = tmp_path / "lib.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="photos")
    subprocess.run(["tar", "-xf", str(archive), "-C", str(root)], check=True)
    settle("tar -x")
    # rsync --delete: another version of the library (changed, new, removed files)
    src2 = tmp_path / "src2"
    _make_library(src2, dirs=3, per_dir=18, seed=2)
    subprocess.run(["rsync", "-a", "--delete", f"{src2}/", f"{root}/photos/"], check=True)
    settle("rsync --delete")
    # mv of a directory: server-side copies
    status = json.loads(cli(daemon_env, "mirror", "status", "--json"))["mirrors"][0]
    copied_before = status["counters"]["copied"]
    (root / "photos" / "d1").rename(root / "moved")
    settle("mv")
    status = json.loads(cli(daemon_env, "mirror", "status", "--json"))["mirrors"][0]
    assert status["counters"]["copied"] - copied_before == 18
    # rm -rf
    shutil.rmtree(root / "photos")
    settle("rm -rf")
    assert len(listing_paths(client, s3_bucket)) == 18
    status = json.loads(cli(daemon_env, "mirror", "status", "--json"))["mirrors"][0]
    assert status["counters"]["errors"] == 0, status
    assert status["state"] == "active"
    # the API and /metrics say the same
    api = httpx.get(f"http://127.0.0.1:{port}/api/v1/mirrors", timeout=10).json()["mirrors"][0]
    assert api["counters"] == status["counters"] and api["backlog"] == status["backlog"]
    assert api["live"]["state"] in ("idle", "syncing")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert (
        f'fsledger_mirror_objects_total{{action="copied",mirror="s3://{s3_bucket}"}} '
        f"{float(status['counters']['copied'])}" in text
    )
    assert f'fsledger_mirror_paused{{mirror="s3://{s3_bucket}"}} 0.0' in text


@pytest.mark.slow  # a daemon killed mid-upload, then a 1.5 s hold for LastModified
def test_kill_9_mid_upload_then_resume_uploads_nothing_twice(
    daemon_env: dict[str, str], daemon: Any, tmp_path: Path, s3_server: Any, s3_bucket: str
) -> None:
    root = tmp_path / "big"
    root.mkdir()
    cli(daemon_env, "repo", "add", str(root), "--name", "big")
    cli(
        daemon_env,
        "mirror",
        "add",
        "big",
        f"s3://{s3_bucket}",
        "--endpoint-url",
        s3_server.endpoint,
    )
    cli(daemon_env, "mirror", "sync", "big")  # synced while empty: from now on, the feed
    n = 160
    for i in range(n):
        (root / f"p{i:03}.raw").write_bytes(os.urandom(1 << 20))
    (root / "video.mp4").write_bytes(os.urandom(40 << 20))  # multipart (8 MiB parts)
    client = s3_server.client()
    proc = daemon()
    wait_until("some uploads", lambda: len(bucket_listing(client, s3_bucket)) >= 15, every=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)  # a re-upload would show a later LastModified
    before = bucket_listing(client, s3_bucket)
    assert len(before) < n + 1, "the kill came too late to test a resume"
    status = json.loads(cli(daemon_env, "mirror", "status", "--json"))["mirrors"][0]
    counters_before = status["counters"]
    daemon()
    wait_until(
        "the bucket to equal the disk",
        lambda: listing_paths(client, s3_bucket) == disk_listing(root),
        timeout=180,
    )
    assert bucket_state(client, s3_bucket) == disk_state(root)
    after = bucket_listing(client, s3_bucket)
    for key, obj in before.items():
        assert after[key]["LastModified"] == obj["LastModified"], f"{key} was uploaded again"
        assert after[key]["ETag"] == obj["ETag"]
    status = json.loads(cli(daemon_env, "mirror", "status", "--json"))["mirrors"][0]
    uploaded = status["counters"]["uploaded"] - counters_before["uploaded"]
    skipped = status["counters"]["skipped"] - counters_before["skipped"]
    assert uploaded == n + 1 - len(before), status
    assert skipped == len(before), status


def test_a_file_changed_since_recorded_is_never_uploaded_as_verified(
    ledger: Ledger, tmp_path: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    """The ledger says one content, the disk holds another (not rescanned yet): neither the
    small file's PUT nor the big file's multipart upload is completed; the entry that
    records the change uploads it."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "small.bin").write_bytes(b"s" * 5000)
    (root / "big.bin").write_bytes(b"b" * (20 << 20))
    repo = ledger.add_repository(str(root), "r")
    mirror = Mirrors(ledger).add("r", f"s3://{s3_bucket}", s3_server.endpoint)
    runner = MirrorRunner(ledger.store, mirror.id, concurrency=2)
    client = s3_server.client()
    try:
        runner.sync(30)  # synced while nothing is recorded
        ledger.scan(repo)
        for name in ("small.bin", "big.bin"):  # same size, other content, unrecorded
            with open(root / name, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                f.write(b"X")
        m = runner.sync(60)
        assert m.counters.deferred == 2 and m.counters.uploaded == 0, m.counters
        assert bucket_listing(client, s3_bucket) == {}
        uploads = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert uploads == []
        ledger.scan(repo)
        m = runner.sync(60)
        assert m.counters.uploaded == 2
        assert bucket_state(client, s3_bucket) == disk_state(root)
    finally:
        runner.stop()


@pytest.mark.slow  # an S3 server of its own, stopped and started again
def test_a_server_outage_fails_the_step_and_nothing_is_lost(
    ledger: Ledger,
    photos: Path,
    own_s3_server: Any,
    aws_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = own_s3_server
    for name, value in server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    bucket = server.new_bucket()
    client = server.client()
    repo, runner = _setup(ledger, photos, bucket, server.endpoint)
    try:
        runner.sync(60)
        (photos / "later.jpg").write_bytes(b"later")
        (photos / "notes.txt").unlink()
        ledger.scan(repo)
        cursor = runner.refresh().cursor_seq
        server.stop()
        with pytest.raises(Exception):  # noqa: B017 - botocore's connection error
            runner.step()
        assert runner.refresh().cursor_seq == cursor  # nothing recorded as done
        server.start()
        m = runner.sync(60)
        assert m.cursor_seq is not None and m.cursor_seq > (cursor or 0)
        assert bucket_state(client, bucket) == disk_state(photos)
    finally:
        runner.stop()


def test_cli_add_list_remove_and_a_removed_repository_pauses_its_mirror(
    ledger: Ledger,
    photos: Path,
    s3_server: Any,
    s3_bucket: str,
    aws_env: dict[str, str],
    store_url: str,
) -> None:
    env = {"FSLEDGER_DATABASE_URL": store_url, **aws_env}

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(main, list(args), env=env)

    repo = ledger.add_repository(str(photos), "photos")
    ledger.scan(repo)
    assert invoke("mirror", "add", "photos", "http://x/y").exit_code == 2
    assert invoke("mirror", "add", "photos", "s3://user:pw@bucket").exit_code == 2
    assert invoke("mirror", "add", "nope", f"s3://{s3_bucket}").exit_code == 2
    missing = invoke("mirror", "add", "photos", "s3://no-such-bucket-fsl")
    assert missing.exit_code == 2 and "does not answer" in missing.output
    out = invoke("mirror", "add", "photos", f"s3://{s3_bucket}/a", "--json")
    assert out.exit_code == 0, out.output
    added = json.loads(out.stdout)
    assert added["url"] == f"s3://{s3_bucket}/a" and added["endpoint_url"] is None
    overlap = invoke("mirror", "add", "photos", f"s3://{s3_bucket}/a/b")
    assert overlap.exit_code == 2 and "overlaps" in overlap.output
    assert invoke("mirror", "add", "photos", f"s3://{s3_bucket}/a").exit_code == 2  # exists
    listed = json.loads(invoke("mirror", "list", "--json").stdout)["mirrors"]
    assert [m["id"] for m in listed] == [added["id"]] and listed[0]["synced"] is False
    assert invoke("mirror", "sync", added["id"]).exit_code == 0
    runner = MirrorRunner(ledger.store, uuid.UUID(added["id"]), concurrency=2)
    try:
        ledger.remove_repository(repo)
        m = runner.sync(30)
    finally:
        runner.stop()
    assert m.state is MirrorState.PAUSED
    assert m.reason in ("the repository was removed", "the repository is gone")
    assert invoke("mirror", "remove", f"s3://{s3_bucket}/a").exit_code == 0
    assert json.loads(invoke("mirror", "list", "--json").stdout)["mirrors"] == []
    assert invoke("mirror", "remove", added["id"]).exit_code == 2


def test_running_mirror_wakes_on_the_feed_hub(
    ledger: Ledger, photos: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    """Under ``fsledger run`` an idle runner waits on the feed hub: a change is mirrored as
    soon as the hub hears of it, not at the next poll (HUB_WAIT_S); stopping wakes it."""
    from fsledger.feed import FeedHub
    from fsledger.s3.mirror import HUB_WAIT_S

    client = s3_server.client()
    repo = ledger.add_repository(str(photos), "photos")
    ledger.scan(repo)
    mirror = Mirrors(ledger).add("photos", f"s3://{s3_bucket}/live", s3_server.endpoint)
    hub = FeedHub(ledger, poll_s=60.0)  # no poll: only the writers' news wakes readers
    hub.start()
    runner = Mirrors(ledger).runner(mirror, concurrency=2, hub=hub)
    runner.start()
    try:
        wait_until("the first sync", lambda: runner.stats.state == "idle", timeout=60)
        time.sleep(0.3)  # waiting on the hub now
        (photos / "late.jpg").write_bytes(b"late")
        t0 = time.monotonic()
        ledger.scan(repo)  # this process's writer: the hub hears of it at once
        head = ledger.store.latest_seq()
        wait_until(
            "the cursor at the head",
            lambda: (ledger.store.get_mirror(mirror.id).cursor_seq or 0) >= head,  # type: ignore[union-attr]
            timeout=HUB_WAIT_S - 1,
            every=0.05,
        )
        assert time.monotonic() - t0 < HUB_WAIT_S - 1
        assert bucket_state(client, s3_bucket, "live/") == disk_state(photos)
    finally:
        t1 = time.monotonic()
        runner.stop()
        hub.stop()
    assert time.monotonic() - t1 < HUB_WAIT_S - 1  # stop wakes the waiting runner


def test_a_move_copies_only_an_old_object_with_the_files_bytes_and_lean_requests_fall_back(
    ledger: Ledger, photos: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    """A moved file is copied with x-amz-copy-source-if-match (the MD5 of its checked bytes):
    an old object with other content (changed behind the mirror's back, or a file modified
    then moved while the mirror lagged) is not copied; the file is uploaded. The lean
    requests sign keys botocore would, and any refusal goes through botocore again."""
    client = s3_server.client()
    repo, runner = _setup(ledger, photos, s3_bucket, s3_server.endpoint, "m/")
    try:
        assert runner._lean is not None  # plain http, no proxy: the lean path is used
        runner.sync(60)
        client.put_object(Bucket=s3_bucket, Key="m/2024/b.jpg", Body=b"stale content")
        (photos / "2024" / "b.jpg").rename(photos / "b-moved.jpg")
        (photos / "2024" / "trip" / "img01.jpg").rename(photos / "img01.jpg")
        ledger.scan(repo)
        before = runner.refresh().counters
        m = runner.sync(60)
        assert m.counters.copied - before.copied == 1, m.counters  # img01 by copy
        assert m.counters.uploaded - before.uploaded == 1, m.counters  # b-moved by upload
        assert bucket_state(client, s3_bucket, "m/") == disk_state(photos)
        # Keys that need escaping in the URL and the signature.
        lean = runner._lean
        for key in ("m/a b+c%d~e/é ␛1F (1).jpg", "m/x=y&z;?#.jpg"):
            body = os.urandom(100)
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            assert lean.put(key, body, md5, {"blake3": "ab"}) == hashlib.md5(body).hexdigest()
            head = client.head_object(Bucket=s3_bucket, Key=key)
            assert head["ContentLength"] == 100 and head["Metadata"] == {"blake3": "ab"}
            assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == body
            client.delete_object(Bucket=s3_bucket, Key=key)

        # Refused lean requests (a wrong secret) are made again through botocore.
        class Wrong:
            def get_frozen_credentials(self) -> Any:
                from botocore.credentials import ReadOnlyCredentials

                return ReadOnlyCredentials(aws_env["AWS_ACCESS_KEY_ID"], "wrong", None)

        lean._credentials = Wrong()
        (photos / "fresh.jpg").write_bytes(b"fresh")
        (photos / "img01.jpg").rename(photos / "2024" / "img01.jpg")
        ledger.scan(repo)
        m = runner.sync(60)
        assert m.last_error is None, m.last_error
        assert bucket_state(client, s3_bucket, "m/") == disk_state(photos)
        assert lean._refused == 2 and lean.usable  # a PUT and a copy refused, then botocore
        (photos / "fresh.jpg").write_bytes(b"fresher")
        ledger.scan(repo)
        runner.sync(60)
        assert not lean.usable  # refused 3 times in a row: botocore only from now on
        assert bucket_state(client, s3_bucket, "m/") == disk_state(photos)
    finally:
        runner.stop()


def test_a_waves_deletions_run_beside_its_uploads_and_old_keys_go_after_their_copies(
    ledger: Ledger, photos: Path, s3_server: Any, s3_bucket: str, aws_env: dict[str, str]
) -> None:
    """One wave: the DeleteObjects of its deleted paths is its first request (beside the
    copies and uploads, not after them); the moves' old keys are deleted only once every
    copy is made, and not for a move that failed. A connection the server closed while idle
    is opened afresh by ``warm`` before the next step needs it."""
    client = s3_server.client()
    repo, runner = _setup(ledger, photos, s3_bucket, s3_server.endpoint, "w/")
    events: list[tuple[str, Any]] = []
    lock = threading.Lock()
    deleting, waited = threading.Event(), []
    delete_keys, move_one, upload_one = runner.delete_keys, runner._move_one, runner._upload_one

    def logged_delete(keys: list[str], count: bool = True) -> Any:
        with lock:
            events.append(("delete", sorted(keys)))
        deleting.set()
        return delete_keys(keys, count)

    def waiting_upload(record: Any, below: Any, check_first: bool) -> Any:
        # An upload does not end before the wave's deletion started (it did not, when the
        # deletions waited for the uploads).
        waited.append(deleting.wait(30))
        return upload_one(record, below, check_first)

    def logged_move(old: bytes, record: Any, below: Any) -> Any:
        if old.endswith(b"img05.jpg"):
            with lock:
                events.append(("move failed", old))
            return MirrorCounters(errors=1), "refused"
        done = move_one(old, record, below)
        with lock:
            events.append(("moved", old))
        return done

    try:
        runner.sync(60)
        runner.delete_keys = logged_delete  # type: ignore[method-assign]
        runner._move_one = logged_move  # type: ignore[method-assign]
        runner._upload_one = waiting_upload  # type: ignore[method-assign]
        (photos / "notes.txt").unlink()
        for i in (3, 4, 5):
            (photos / "2024" / "trip" / f"img{i:02}.jpg").rename(photos / f"moved{i}.jpg")
        for i in range(6):
            (photos / f"new{i}.jpg").write_bytes(os.urandom(500 + i))
        ledger.scan(repo)
        m = runner.sync(60)
        assert waited == [True] * 6, waited
        deletes = [i for i, e in enumerate(events) if e[0] == "delete"]
        assert [events[i][1] for i in deletes] == [
            ["w/notes.txt"],
            ["w/2024/trip/img03.jpg", "w/2024/trip/img04.jpg"],
        ], events
        moves = [i for i, e in enumerate(events) if e[0] in ("moved", "move failed")]
        assert len(moves) == 3 and max(moves) < deletes[1], events
        assert m.last_error == "refused" and m.counters.deleted == 1
        keys = set(bucket_state(client, s3_bucket, "w/"))
        assert b"2024/trip/img05.jpg" in keys and b"moved5.jpg" not in keys  # left as it was
        assert b"2024/trip/img03.jpg" not in keys and b"moved3.jpg" in keys
        assert b"notes.txt" not in keys and b"new5.jpg" in keys

        # A kept-alive connection closed (here from our side: the server's close looks the
        # same to the client, readable at EOF) is replaced by warm, not by a failed request.
        lean = runner._lean
        assert lean is not None
        lean.warm()
        conn = lean._conn()
        assert conn.sock is not None
        conn.sock.shutdown(socket.SHUT_RDWR)
        lean.warm()
        assert lean._conn() is not conn and lean._conn().sock is not None
        body = b"after warm"
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        assert lean.put("w/warm.jpg", body, md5, {}) == hashlib.md5(body).hexdigest()
    finally:
        runner.stop()
