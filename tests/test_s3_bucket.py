"""A bucket (or a prefix of one) as a repository, against a real S3 server (SeaweedFS).

Every ledger is checked against the bucket itself: each object downloaded here, with the
stock client, and hashed with blake3 here. Both stores (the ``ledger`` fixture).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from conftest import make_settings
from fsledger import errors
from fsledger.ledger import Ledger
from fsledger.model import Change, ChangeKind, RepoSettings, Repository, RepoState
from fsledger.s3 import bucket as s3bucket

# Each test below is marked slow (a bucket scanned, a daemon, a server stopped) but two: the
# event bodies (no server) and the sorted listing, on the session's server (tests/conftest.py),
# which keep the module in `make test-fast`.


@pytest.fixture
def aws(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process finds the server's credentials the standard way (AWS variables); the
    endpoint is given to each repository (``--endpoint-url``)."""
    for name, value in s3_server.env().items():
        if name.startswith("AWS_") and name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def bucket_truth(client: Any, bucket: str, prefix: str = "") -> dict[bytes, tuple[int, str]]:
    """What the bucket holds below ``prefix``: path -> (size, blake3 of its content), each
    object downloaded and hashed here (folder markers are not files)."""
    out: dict[bytes, tuple[int, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/"):
                continue
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            out[key[len(prefix) :].encode()] = (len(data), blake3.blake3(data).hexdigest())
    return out


def ledger_view(ledger: Ledger, repo: Repository) -> dict[bytes, tuple[int, str | None]]:
    return {r.path: (r.size, r.content_hash) for r in ledger.files(repo)}


def feed_kinds(ledger: Ledger, repo: Repository, since: Any = None) -> list[tuple[str, bytes, Any]]:
    page = ledger.changes(since, 10_000, repo)
    return [(e.kind.value, e.path, e.old_path) for e in page.entries]


def add_bucket(ledger: Ledger, server: Any, bucket: str, prefix: str = "") -> Repository:
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return ledger.add_repository(url, None, RepoSettings(endpoint_url=server.endpoint))


def gets() -> int:
    return s3bucket.CALLS["GetObject"]


@pytest.mark.slow
def test_puts_overwrites_deletes_copies_and_prefix_renames(
    ledger: Ledger, aws: Any, s3_bucket: str
) -> None:
    client = aws.client()
    objects = {
        "a.txt": b"alpha",
        "a/b.jpg": b"B" * 3000,
        "a/c/d.bin": os.urandom(70_000),
        "photos/2024/x.jpg": b"x" * 10,
        "photos/2024/y.jpg": b"y" * 20,
        "photos-old/z.jpg": b"z" * 30,
        "é/ü.txt": b"unicode",
        "big.bin": os.urandom(3 * 1024 * 1024 + 17),  # streamed in 1 MiB pieces
    }
    for key, body in objects.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    client.put_object(Bucket=s3_bucket, Key="photos/", Body=b"")  # a folder marker
    repo = add_bucket(ledger, aws, s3_bucket)
    assert repo.root == f"s3://{s3_bucket}".encode()
    stats = ledger.scan(repo)
    assert stats.files_added == len(objects)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    head = ledger.feed_head()

    # A rescan with no change downloads nothing.
    before = gets()
    stats = ledger.scan(repo)
    assert gets() == before
    assert stats.files_scanned == len(objects) and stats.files_hashed == 0
    assert stats.files_added + stats.files_updated + stats.metadata_updated == 0
    assert feed_kinds(ledger, repo, head) == []

    # Overwrite (same size, other content), delete, a copy, a new object.
    client.put_object(Bucket=s3_bucket, Key="a.txt", Body=b"ALPHA")
    client.delete_object(Bucket=s3_bucket, Key="a/b.jpg")
    client.copy_object(
        Bucket=s3_bucket,
        Key="copy/x.jpg",
        CopySource={"Bucket": s3_bucket, "Key": "photos/2024/x.jpg"},
    )
    client.put_object(Bucket=s3_bucket, Key="new.txt", Body=b"new")
    before = gets()
    stats = ledger.scan(repo)
    assert gets() - before == 3  # a.txt, copy/x.jpg, new.txt: nothing else is downloaded
    assert (stats.files_added, stats.files_updated, stats.files_removed) == (2, 1, 1)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    kinds = feed_kinds(ledger, repo, head)
    assert ("modified", b"a.txt", None) in kinds
    assert ("deleted", b"a/b.jpg", None) in kinds
    assert ("created", b"copy/x.jpg", None) in kinds
    head = ledger.feed_head()

    # A prefix renamed the S3 way: copy every object to the new prefix, delete the old.
    time.sleep(1.1)  # the copies get another LastModified than the originals
    for key in ("photos/2024/x.jpg", "photos/2024/y.jpg"):
        new = "renamed/" + key.partition("/")[2]
        client.copy_object(Bucket=s3_bucket, Key=new, CopySource={"Bucket": s3_bucket, "Key": key})
        client.delete_object(Bucket=s3_bucket, Key=key)
    before = gets()
    stats = ledger.scan(repo)
    assert gets() == before, "moved objects must not be downloaded"
    assert stats.files_moved == 2 and stats.files_added == 0 and stats.files_removed == 0
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    assert sorted(feed_kinds(ledger, repo, head)) == [
        ("moved", b"renamed/2024/x.jpg", b"photos/2024/x.jpg"),
        ("moved", b"renamed/2024/y.jpg", b"photos/2024/y.jpg"),
    ]
    # The duplicates query sees the copy and its original.
    groups = ledger.duplicates(repo)
    assert any({f.path for f in g.files} == {b"copy/x.jpg", b"renamed/2024/x.jpg"} for g in groups)


@pytest.mark.slow
def test_a_prefix_is_a_repository_of_its_own(ledger: Ledger, aws: Any, s3_bucket: str) -> None:
    client = aws.client()
    for key in ("lib/a.jpg", "lib/sub/b.jpg", "library/c.jpg", "other/d.jpg", "lib.txt"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    repo = add_bucket(ledger, aws, s3_bucket, "lib")
    assert repo.root == f"s3://{s3_bucket}/lib".encode() and repo.name == "lib"
    ledger.scan(repo)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket, "lib/")
    assert set(ledger_view(ledger, repo)) == {b"a.jpg", b"sub/b.jpg"}
    with pytest.raises(errors.RepositoryExists):
        add_bucket(ledger, aws, s3_bucket, "lib/sub")


def _fill(client: Any, bucket: str, n: int = 5, prefix: str = "") -> None:
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"{prefix}f{i}.jpg", Body=b"%d" % i * 100)


def _refused(ledger: Ledger, repo: Repository, records: dict[bytes, Any]) -> None:
    """The scan is refused (exit code 4), nothing is deleted, the repository is offline."""
    head = ledger.feed_head()
    with pytest.raises(errors.RootUnavailable) as caught:
        ledger.scan(repo)
    assert caught.value.exit_code == 4
    assert ledger_view(ledger, repo) == records
    assert (ledger.repository(repo.id) or repo).state is RepoState.OFFLINE
    assert [k for k, _, _ in feed_kinds(ledger, repo, head)] == ["repository_offline"]


@pytest.mark.slow
def test_guard_bucket_deleted(ledger: Ledger, aws: Any) -> None:
    client = aws.client()
    name = aws.new_bucket()
    _fill(client, name)
    repo = add_bucket(ledger, aws, name)
    ledger.scan(repo)
    records = ledger_view(ledger, repo)
    assert len(records) == 5
    aws.drop_bucket(name)
    _refused(ledger, repo, records)


@pytest.mark.slow
def test_guard_prefix_emptied(ledger: Ledger, aws: Any, s3_bucket: str) -> None:
    client = aws.client()
    _fill(client, s3_bucket, prefix="lib/")
    repo = add_bucket(ledger, aws, s3_bucket, "lib")
    ledger.scan(repo)
    records = ledger_view(ledger, repo)
    for i in range(5):
        client.delete_object(Bucket=s3_bucket, Key=f"lib/f{i}.jpg")
    _refused(ledger, repo, records)
    with pytest.raises(errors.GuardRefused):
        ledger.scan(repo)
    # The operator says the objects really are gone: deleted, and online again.
    stats = ledger.scan(repo, force=True)
    assert stats.files_removed == 5 and ledger_view(ledger, repo) == {}
    assert (ledger.repository(repo.id) or repo).state is RepoState.ONLINE


@pytest.mark.slow
def test_guard_wrong_credentials(
    ledger: Ledger, aws: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(aws.client(), s3_bucket)
    repo = add_bucket(ledger, aws, s3_bucket)
    ledger.scan(repo)
    records = ledger_view(ledger, repo)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = Ledger(ledger.settings, ledger.store)  # a new process's clients
    try:
        _refused(wrong, repo, records)
        with pytest.raises(errors.RootUnavailable, match="SignatureDoesNotMatch|AccessDenied"):
            wrong.add_repository(
                "s3://fsl-not-this-one", None, RepoSettings(endpoint_url=aws.endpoint)
            )
    finally:
        wrong.reconciler.close()


@pytest.mark.slow
def test_guard_server_stopped_then_back(
    ledger: Ledger, own_s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = own_s3_server
    for name, value in server.env().items():
        if name.startswith("AWS_") and name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    name = server.new_bucket()
    _fill(server.client(), name)
    repo = add_bucket(ledger, server, name)
    ledger.scan(repo)
    records = ledger_view(ledger, repo)
    server.stop()
    _refused(ledger, repo, records)
    server.start()
    server.client().put_object(Bucket=name, Key="while-away.jpg", Body=b"w")
    stats = ledger.scan(repo)
    assert stats.files_added == 1 and stats.files_removed == 0
    assert ledger_view(ledger, repo) == bucket_truth(server.client(), name)
    assert (ledger.repository(repo.id) or repo).state is RepoState.ONLINE


def _fsledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("fsledger")
    return subprocess.run(
        [str(exe), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_cli_repo_add_files_json_and_exit_4(s3_server: Any, s3_bucket: str, store_url: str) -> None:
    """The CLI as a user runs it, configured by the standard AWS variables only."""
    client = s3_server.client()
    _fill(client, s3_bucket, prefix="photos/")
    client.put_object(Bucket=s3_bucket, Key="photos/sub/é.jpg", Body=b"e" * 77)
    env = s3_server.env(FSLEDGER_DATABASE_URL=store_url, RECONCILIATION_MAX_CONCURRENCY="2")
    env.pop("AWS_PROFILE", None)
    done = _fsledger(env, "repo", "add", f"s3://{s3_bucket}/photos", "--json")
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout)
    assert added["path"] == f"s3://{s3_bucket}/photos" and added["scan"]["files_added"] == 6
    assert "secret" not in done.stdout.lower()
    done = _fsledger(env, "files", "photos", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    listed = {base64.b64decode(r["path_b64"]): (r["size"], r["hash"]) for r in rows}
    assert listed == bucket_truth(client, s3_bucket, "photos/")
    # Wrong credentials: exit code 4, nothing deleted.
    bad = dict(env, AWS_SECRET_ACCESS_KEY="wrong")
    done = _fsledger(bad, "scan", "photos")
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "wrong" not in done.stderr
    done = _fsledger(env, "files", "photos", "--json")
    assert len(done.stdout.splitlines()) == 6


def _record(bucket: str, key: str, event: str, minio: bool = False) -> dict[str, Any]:
    """One record of the AWS S3 event message structure (the key URL-encoded, as S3 does)."""
    from urllib.parse import quote_plus

    return {
        "eventVersion": "2.1",
        "eventSource": "minio:s3" if minio else "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": ("s3:" if minio else "") + event,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "fsledger",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": quote_plus(key), "size": 1, "eTag": "x", "sequencer": "0"},
        },
    }


@pytest.mark.slow
def test_daemon_applies_event_hints_and_polls(
    s3_server: Any, store_url: str, tmp_path: Path
) -> None:
    """``fsledger run`` as a user runs it: S3 event notifications POSTed to its API (bare AWS
    messages, SNS envelopes, MinIO webhooks) are applied at once through the writer; a
    bucket without notifications is polled at its quick interval."""
    import httpx

    from api_support import free_port, wait_for

    client = s3_server.client()
    hinted, polled = s3_server.new_bucket(), s3_server.new_bucket()
    try:
        client.put_object(Bucket=hinted, Key="a.jpg", Body=b"a" * 10)
        client.put_object(Bucket=hinted, Key="b.jpg", Body=b"b" * 10)
        token = "t0ken-for-the-s3-hints-test"
        port = free_port()
        env = s3_server.env(
            FSLEDGER_DATABASE_URL=store_url,
            RECONCILIATION_MAX_CONCURRENCY="2",
            FSLEDGER_LISTEN=f"127.0.0.1:{port}",
            FSLEDGER_API_TOKEN=token,
            FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE="100",
            FSLEDGER_SCHEDULE_BUSY_CPU_PRESSURE="100",
        )
        done = _fsledger(env, "repo", "add", f"s3://{hinted}", "--quick-interval", "3600")
        assert done.returncode == 0, done.stderr
        exe = Path(sys.executable).with_name("fsledger")
        log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([str(exe), "run"], env=env, stderr=log, stdout=log)
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        ledger = Ledger(make_settings(store_url))
        try:
            wait_for("the API", lambda: _get_ok(f"{base}/healthz"), 60)
            repo = ledger.resolve(hinted)
            # The daemon's startup reconciliation is done (the one of repo add came first).
            wait_for(
                "the startup reconciliation",
                lambda: (
                    sum(o.status.value == "completed" for o in ledger.operations(repo)) >= 2 or None
                ),
                60,
            )
            head = ledger.feed_head()
            client.put_object(Bucket=hinted, Key="a.jpg", Body=b"A" * 12)
            client.put_object(Bucket=hinted, Key="new photo+1.jpg", Body=b"n" * 5)
            client.delete_object(Bucket=hinted, Key="b.jpg")
            message = {
                "Records": [
                    _record(hinted, "a.jpg", "ObjectCreated:Put"),
                    _record(hinted, "new photo+1.jpg", "ObjectCreated:Put"),
                    _record(hinted, "b.jpg", "ObjectRemoved:Delete"),
                ]
            }
            assert httpx.post(f"{base}/api/v1/s3/events", json=message).status_code == 401
            t0 = time.monotonic()
            resp = httpx.post(f"{base}/api/v1/s3/events", json=message, headers=auth, timeout=30)
            took = time.monotonic() - t0
            assert resp.status_code == 200, resp.text
            assert resp.json()["applied"] == 3
            print(f"hint of 3 objects applied in {took * 1000:.0f} ms")
            assert took < 5.0
            assert ledger_view(ledger, repo) == bucket_truth(client, hinted)
            kinds = feed_kinds(ledger, repo, head)
            assert sorted(kinds) == [
                ("created", b"new photo+1.jpg", None),
                ("deleted", b"b.jpg", None),
                ("modified", b"a.jpg", None),
            ], kinds
            # The same message again: nothing changed, nothing downloaded or written.
            resp = httpx.post(f"{base}/api/v1/s3/events", json=message, headers=auth, timeout=30)
            assert resp.json()["applied"] == 0
            # An SNS HTTP subscription's envelope, authenticated as SNS can (Basic, in the URL).
            client.put_object(Bucket=hinted, Key="sns/c.jpg", Body=b"c")
            envelope = {
                "Type": "Notification",
                "MessageId": "1",
                "TopicArn": "arn:aws:sns:us-east-1:1:t",
                "Message": json.dumps(
                    {"Records": [_record(hinted, "sns/c.jpg", "ObjectCreated:Copy")]}
                ),
            }
            resp = httpx.post(
                f"{base}/api/v1/s3/events", json=envelope, auth=("sns", token), timeout=30
            )
            assert resp.status_code == 200 and resp.json()["applied"] == 1, resp.text
            # A MinIO webhook target's body.
            client.delete_object(Bucket=hinted, Key="sns/c.jpg")
            minio = {
                "EventName": "s3:ObjectRemoved:Delete",
                "Key": f"{hinted}/sns/c.jpg",
                "Records": [_record(hinted, "sns/c.jpg", "ObjectRemoved:Delete", minio=True)],
            }
            resp = httpx.post(f"{base}/api/v1/s3/events", json=minio, headers=auth, timeout=30)
            assert resp.status_code == 200 and resp.json()["applied"] == 1, resp.text
            assert ledger_view(ledger, repo) == bucket_truth(client, hinted)
            # The API shows the bucket repository and its files as it shows a directory's.
            repos = httpx.get(f"{base}/api/v1/repositories", headers=auth).json()
            [shown] = [r for r in repos if r["id"] == str(repo.id)]
            assert shown["path"] == f"s3://{hinted}" and shown["status"]["state"] == "online"
            page = httpx.get(f"{base}/api/v1/repositories/{repo.id}/files", headers=auth).json()
            files = {base64.b64decode(f["path_b64"]): (f["size"], f["hash"]) for f in page["files"]}
            assert files == bucket_truth(client, hinted)
            # A subscription confirmation is fetched only from AWS's SNS.
            confirm = {"Type": "SubscriptionConfirmation", "SubscribeURL": "http://127.0.0.1:1/x"}
            resp = httpx.post(f"{base}/api/v1/s3/events", json=confirm, headers=auth)
            assert resp.status_code == 400

            # Polling: a bucket added while the daemon runs, with a short quick interval.
            client.put_object(Bucket=polled, Key="p.jpg", Body=b"p")
            done = _fsledger(env, "repo", "add", f"s3://{polled}", "--quick-interval", "2")
            assert done.returncode == 0, done.stderr
            other = ledger.resolve(polled)
            client.put_object(Bucket=polled, Key="q/r.jpg", Body=b"r" * 3)
            client.delete_object(Bucket=polled, Key="p.jpg")
            wait_for(
                "the poll",
                lambda: ledger_view(ledger, other) == bucket_truth(client, polled) or None,
                30,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            ledger.close()
    finally:
        s3_server.drop_bucket(hinted)
        s3_server.drop_bucket(polled)


def _get_ok(url: str) -> bool | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200 or None
    except httpx.HTTPError:
        return None


@pytest.mark.slow
def test_hints_in_process_and_no_change_announced_twice(
    ledger: Ledger, aws: Any, s3_bucket: str
) -> None:
    """``Ledger.object_hints`` (what the endpoint calls): HEAD, GET only if changed; and a
    change decided on records that another look has since written (a poll and a hint that
    both saw one new object) is not announced twice."""
    client = aws.client()
    client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"k" * 9)
    client.put_object(Bucket=s3_bucket, Key="ignored/.hidden", Body=b"h")
    repo = add_bucket(ledger, aws, s3_bucket)
    head = ledger.feed_head()
    before = gets()
    done = ledger.object_hints(s3_bucket, ["k.jpg", "ignored/.hidden", "folder/"])
    assert [len(a.changes) for _, a in done] == [1] and gets() - before == 1
    assert ledger.object_hints("some-other-bucket", ["k.jpg"]) == []
    before = gets()
    assert [len(a.changes) for _, a in ledger.object_hints(s3_bucket, ["k.jpg"])] == [0]
    assert gets() == before  # unchanged: HEAD only
    record = ledger.store.get_record(repo.id, b"k.jpg")
    assert record is not None
    applied = ledger.writer(repo).apply([Change(ChangeKind.CREATED, b"k.jpg", record)])
    assert applied.changes == () and len(applied.dropped) == 1
    stats = ledger.scan(repo)
    assert stats.files_added == 0 and stats.files_hashed == 0
    assert feed_kinds(ledger, repo, head) == [("created", b"k.jpg", None)]
    assert ledger_view(ledger, repo) == {b"k.jpg": (9, blake3.blake3(b"k" * 9).hexdigest())}


def test_listing_sorted_in_spilled_runs(
    ledger: Ledger, aws: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS lists a folder ``a/`` before ``a.txt`` (not byte order): the listing is
    sorted in runs spilled to temporary files (here 3 keys a run) and merged, so the merge
    with the records sees byte order whatever the server's."""
    monkeypatch.setattr(s3bucket, "RUN_ENTRIES", 3)
    client = aws.client()
    keys = ["a/x", "a.txt", "a-b/y", "a/z/1", "b", "a!", "A", "é", "a/y", "a0"]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    server_order = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    repo = add_bucket(ledger, aws, s3_bucket)
    listed = [p for p, _ in ledger.writer(repo).bucket.listing(ledger.rules(repo))]  # type: ignore[attr-defined]
    assert listed == sorted(k.encode() for k in keys)
    # The reason for the sort: this server's own order is not byte order.
    assert [k.encode() for k in server_order] != listed
    stats = ledger.scan(repo)
    assert stats.files_added == len(keys)
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    stats = ledger.scan(repo)
    assert stats.files_hashed == 0 and stats.files_removed == 0 and stats.files_added == 0


def test_event_message_forms() -> None:
    """The bodies the endpoint reads (pure: no server). A real SNS envelope, Ceph RGW's
    push body (the AWS record structure), MinIO's webhook body, S3's test event."""
    from fsledger.api.s3events import parse_s3_event, sns_url_allowed

    records = {"Records": [_record("b", "dir/a b+c%.jpg", "ObjectCreated:Put")]}
    assert parse_s3_event(json.dumps(records).encode()).objects == [("b", "dir/a b+c%.jpg")]
    sns = {"Type": "Notification", "Message": json.dumps(records)}
    assert parse_s3_event(json.dumps(sns).encode()).objects == [("b", "dir/a b+c%.jpg")]
    minio = {"EventName": "s3:ObjectRemoved:Delete", "Key": "b/x", **records}
    assert parse_s3_event(json.dumps(minio).encode()).objects == [("b", "dir/a b+c%.jpg")]
    assert parse_s3_event(b'{"Event": "s3:TestEvent", "Bucket": "b"}').test
    confirm = {
        "Type": "SubscriptionConfirmation",
        "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
    }
    assert parse_s3_event(json.dumps(confirm).encode()).subscribe_url == confirm["SubscribeURL"]
    assert sns_url_allowed(confirm["SubscribeURL"])
    for bad_url in (
        "http://sns.eu-west-1.amazonaws.com/x",
        "https://sns.evil.example/x",
        "https://sns.x.amazonaws.com.evil.example/",
        "https://user@sns.us-east-1.amazonaws.com/",
        "https://127.0.0.1/",
    ):
        assert not sns_url_allowed(bad_url), bad_url
    for bad in (b"", b"[]", b"not json", b'{"Records": [{"s3": {}}]}', b'{"Records": 1}'):
        with pytest.raises(ValueError):
            parse_s3_event(bad)


@pytest.mark.slow
def test_a_run_checks_its_view_of_keys_a_hint_wrote(
    ledger: Ledger, aws: Any, s3_bucket: str
) -> None:
    """A reconciliation's change is HEADed only for keys a hint wrote since the run began:
    there it is the older view and is dropped, not written over the hint's newer one."""
    client = aws.client()
    client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"one")
    client.put_object(Bucket=s3_bucket, Key="other.jpg", Body=b"other")
    repo = add_bucket(ledger, aws, s3_bucket)
    ledger.scan(repo)
    writer = ledger.writer(repo)
    older = ledger.store.get_record(repo.id, b"k.jpg")
    other = ledger.store.get_record(repo.id, b"other.jpg")
    assert older is not None and other is not None
    writer.run_started = time.monotonic()  # type: ignore[attr-defined]
    try:
        time.sleep(1.1)
        client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"two")
        [(_, hinted)] = ledger.object_hints(s3_bucket, ["k.jpg"])
        assert [c.kind for c in hinted.changes] == [ChangeKind.MODIFIED]
        newer = ledger.store.get_record(repo.id, b"k.jpg")
        heads = s3bucket.CALLS["HeadObject"]
        # The run's stale view of k.jpg (as if its GET had read "one"): HEADed, dropped.
        stale = Change(ChangeKind.MODIFIED, b"k.jpg", older)
        applied = writer.apply([stale, Change(ChangeKind.META, b"other.jpg", other)])
        assert applied.changes == ()
        assert s3bucket.CALLS["HeadObject"] - heads == 1  # k.jpg only
        assert ledger.store.get_record(repo.id, b"k.jpg") == newer
    finally:
        writer.run_started = None  # type: ignore[attr-defined]
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)


@pytest.mark.slow
def test_versioned_bucket(ledger: Ledger, aws: Any, s3_bucket: str) -> None:
    """With versioning on, the VersionId is part of the change key: a new version with the
    same content (same ETag) is looked at and found unchanged
    (``meta``, not in the feed); a delete marker deletes the record; older versions are not
    files."""
    client = aws.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"same")
    client.put_object(Bucket=s3_bucket, Key="d.jpg", Body=b"doomed")
    client.put_object(Bucket=s3_bucket, Key="m.jpg", Body=b"first")
    repo = add_bucket(ledger, aws, s3_bucket)
    assert ledger.scan(repo).files_added == 3
    head = ledger.feed_head()
    before = gets()
    assert ledger.scan(repo).files_hashed == 0 and gets() == before
    client.put_object(Bucket=s3_bucket, Key="k.jpg", Body=b"same")  # a new version, same bytes
    client.delete_object(Bucket=s3_bucket, Key="d.jpg")  # a delete marker
    client.put_object(Bucket=s3_bucket, Key="m.jpg", Body=b"second")
    stats = ledger.scan(repo)
    assert (stats.metadata_updated, stats.files_removed, stats.files_updated) == (1, 1, 1)
    assert sorted(feed_kinds(ledger, repo, head)) == [
        ("deleted", b"d.jpg", None),
        ("modified", b"m.jpg", None),
    ]
    assert ledger_view(ledger, repo) == bucket_truth(client, s3_bucket)
    before = gets()
    assert ledger.scan(repo).files_hashed == 0 and gets() == before
    # A hint agrees with the listing's key (HEAD carries the VersionId too): nothing to do.
    assert [len(a.changes) for _, a in ledger.object_hints(s3_bucket, ["k.jpg", "m.jpg"])] == [0]
