"""The change feed on SQLite and PostgreSQL: exactly the changes after a cursor, across a
restart, over SSE (resumable), to webhooks (signed, once, resumed), and retention."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
import standardwebhooks
from click.testing import CliRunner
from fastapi.testclient import TestClient
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from api_support import (
    Receiver,
    SseReader,
    backend_url,
    backup_database,
    restore_database,
    serve,
    webhook_receiver,
)
from fsledger.api import create_app
from fsledger.api.webhooks import WebhookDispatcher
from fsledger.cli import main
from fsledger.config import Settings
from fsledger.errors import ResyncNeeded, RootUnavailable
from fsledger.feed import Cursor, Feed, FeedHub, Retention, entry_cursor
from fsledger.ledger import Ledger
from fsledger.model import ChangeKind, FeedEntry, Repository, RepoState
from support import wait_for

SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret, 32 bytes...").decode()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from backend_url(request.param, tmp_path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for rel, content in {
        "a.txt": b"alpha",
        "b.txt": b"bravo",
        "sub/x.jpg": b"x-ray",
        "sub/deeper/y.jpg": b"yankee",
    }.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return tree


def open_ledger(url: str) -> Ledger:
    return Ledger(Settings(database_url=url, max_concurrency=2))


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    led = open_ledger(url)
    try:
        yield led
    finally:
        led.close()


def mutate(root: Path) -> None:
    """Create, modify, delete, and move a directory: the four kinds a consumer must see."""
    (root / "c.txt").write_bytes(b"charlie")
    (root / "a.txt").write_bytes(b"alpha, longer now")
    (root / "b.txt").unlink()
    os.rename(root / "sub", root / "moved")


def summary(changes: list[dict[str, Any]]) -> set[tuple[str, str, str | None]]:
    return {(c["kind"], c["path"], c.get("old_path")) for c in changes}


EXPECTED = {
    ("created", "c.txt", None),
    ("modified", "a.txt", None),
    ("deleted", "b.txt", None),
    ("moved", "moved/x.jpg", "sub/x.jpg"),
    ("moved", "moved/deeper/y.jpg", "sub/deeper/y.jpg"),
}


def read_all(http: TestClient, since: str | None) -> tuple[list[Any], str]:
    """Every change after ``since``, two per request, and the cursor at the end."""
    changes: list[Any] = []
    params = {"since": since} if since else {}
    while True:
        r = http.get("/api/v1/changes", params={**params, "limit": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        changes += body["changes"]
        params = {"since": body["cursor"]}
        if not body["has_more"]:
            return changes, body["cursor"]


def api(ledger: Ledger) -> TestClient:
    """The app in-process, without its lifespan (no hub thread): plain request/response."""
    return TestClient(create_app(ledger, None, ledger.settings), base_url="http://localhost")


def test_feed_returns_exactly_the_changes_after_a_cursor(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    with api(ledger) as http:
        history, cursor = read_all(http, None)
        assert history[0]["kind"] == "repository_added"
        assert {(c["kind"], c["path"]) for c in history[1:]} == {
            ("created", p) for p in ("a.txt", "b.txt", "sub/x.jpg", "sub/deeper/y.jpg")
        }
        assert [c["seq"] for c in history] == sorted(c["seq"] for c in history)

        mutate(root)
        ledger.scan(repo)
        after, newest = read_all(http, cursor)
        assert summary(after) == EXPECTED
        assert all(c["repository_id"] == str(repo.id) for c in after)
        for c in after:
            assert base64.b64decode(c["path_b64"]) == c["path"].encode()
            parsed = Cursor.parse(c["cursor"])
            assert (parsed.feed_id, parsed.seq) == (Cursor.parse(cursor).feed_id, c["seq"])
        moved = next(c for c in after if c["path"] == "moved/x.jpg")
        assert base64.b64decode(moved["old_path_b64"]) == b"sub/x.jpg"

        # At the newest cursor: nothing, and the cursor stays put.
        r = http.get("/api/v1/changes", params={"since": newest})
        assert r.json() == {"changes": [], "cursor": newest, "has_more": False}


def test_feed_filters_by_repository_and_still_advances(
    ledger: Ledger, root: Path, tmp_path: Path
) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    (other_root / "o.txt").write_bytes(b"other")
    repo = ledger.add_repository(str(root))
    other = ledger.add_repository(str(other_root))
    ledger.scan(repo)
    ledger.scan(other)
    with api(ledger) as http:
        r = http.get("/api/v1/changes", params={"repository": str(other.id)})
        body = r.json()
        assert [(c["kind"], c["path"]) for c in body["changes"]] == [
            ("repository_added", ""),
            ("created", "o.txt"),
        ]
        # The filtered cursor moves past the other repository's entries too.
        assert Cursor.parse(body["cursor"]).seq == ledger.store.latest_seq()


def test_feed_resumes_after_a_restart(url: str, root: Path) -> None:
    first = open_ledger(url)
    repo = first.add_repository(str(root))
    first.scan(repo)
    with api(first) as http:
        _, cursor = read_all(http, None)
    first.close()

    mutate(root)
    second = open_ledger(url)  # a new process: new store connection, same database
    try:
        stored = second.store.get_repository(repo.id)
        assert stored is not None
        second.scan(stored)
        with api(second) as http:
            after, _ = read_all(http, cursor)
        assert summary(after) == EXPECTED
    finally:
        second.close()


def test_old_cursor_gets_resync_needed_not_silence(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    feed = Feed(ledger.store)
    start = feed.oldest()
    (root / "new.txt").write_bytes(b"new")
    ledger.scan(repo)
    head = feed.head()

    removed = Retention(max_age_s=0, max_entries=1).prune(ledger.store)
    assert removed == head.seq - 1
    with api(ledger) as http:
        r = http.get("/api/v1/changes", params={"since": str(start)})
        assert r.status_code == 410
        body = r.json()
        assert body["error"] == "resync_needed"
        assert body["cursor"] == str(head)
        # From the cursor it names, the feed answers again.
        r = http.get("/api/v1/changes", params={"since": body["cursor"]})
        assert r.status_code == 200 and r.json()["changes"] == []
        # No cursor means "from the beginning", which is gone too.
        assert (http.get("/api/v1/changes")).status_code == 410
        # The last cursor still held is answered.
        r = http.get("/api/v1/changes", params={"since": f"{head.feed_id}:{head.seq - 1}"})
        assert [c["path"] for c in r.json()["changes"]] == ["new.txt"]
        # A cursor of another database is refused the same way; garbage is a 400.
        r = http.get("/api/v1/changes", params={"since": f"0000{head.feed_id}:1"})
        assert r.status_code == 410
        r = http.get("/api/v1/changes", params={"since": "not-a-cursor"})
        assert r.status_code == 422

    # Pruning by age: everything recorded before now goes; the head survives as a number.
    Retention(max_age_s=1e-6, max_entries=0).prune(ledger.store)
    assert ledger.store.changes_since(0, 10) == []
    assert feed.head() == head
    with pytest.raises(ResyncNeeded):
        feed.read(Cursor(head.feed_id, head.seq - 1), 10)


def test_repository_going_offline_and_back_is_in_the_feed(
    ledger: Ledger, root: Path, tmp_path: Path
) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    head = Feed(ledger.store).head()
    parked = tmp_path / "parked"
    os.rename(root, parked)
    with pytest.raises(RootUnavailable):
        ledger.scan(repo)
    os.rename(parked, root)
    ledger.scan(repo)
    with api(ledger) as http:
        after, _ = read_all(http, str(head))
    assert [(c["kind"], c["path"], c["repository_id"]) for c in after] == [
        ("repository_offline", "", str(repo.id)),
        ("repository_online", "", str(repo.id)),
    ]
    stored = ledger.store.get_repository(repo.id)
    assert stored is not None and stored.state is RepoState.ONLINE


# --- Server-Sent Events ----------------------------------------------------------------------
def test_sse_delivers_changes_and_resumes_with_last_event_id(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    app = create_app(ledger, None, ledger.settings, heartbeat_s=0.2)
    with serve(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        with http.stream("GET", "/api/v1/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            reader = SseReader(response)
            mutate(root)
            ledger.scan(repo)
            events = reader.changes(len(EXPECTED))
        assert summary(events) == EXPECTED
        last = events[-1]["cursor"]

        # While disconnected: more changes. Reconnecting after the last id gets exactly those.
        (root / "later.txt").write_bytes(b"later")
        (root / "c.txt").unlink()
        ledger.scan(repo)
        with http.stream("GET", "/api/v1/events", headers={"Last-Event-ID": last}) as response:
            reader = SseReader(response)
            resumed = reader.changes(2)
            assert summary(resumed) == {("created", "later.txt", None), ("deleted", "c.txt", None)}
            # Idle: heartbeats keep the connection alive (the read times out if none comes).
            wait_for("a heartbeat", lambda: reader.comment() == "heartbeat")

        # since= works too, and the first event is exactly the next change.
        first = events[0]
        with http.stream("GET", "/api/v1/events", params={"since": first["cursor"]}) as response:
            assert SseReader(response).changes(1)[0]["seq"] == events[1]["seq"]

        assert http.get("/api/v1/events", params={"since": "bogus"}).status_code == 422
        r = http.get("/api/v1/events", headers={"Last-Event-ID": "bogus"})
        assert r.status_code == 400 and r.json()["error"] == "bad_request"


def test_sse_wakes_on_writer_listener(ledger: Ledger, root: Path) -> None:
    """A change written by this process's writer reaches the stream through the listener."""
    repo = ledger.add_repository(str(root))
    hub = FeedHub(ledger, poll_s=3600)  # no polling: only the listener can wake the stream
    hub.start()
    app = create_app(ledger, None, ledger.settings, hub=hub, heartbeat_s=3600)
    app.state.hub = hub
    try:
        with serve(app) as base, httpx.Client(base_url=base, timeout=20) as http:
            with http.stream("GET", "/api/v1/events") as response:
                reader = SseReader(response)
                ledger.scan(repo)
                got = reader.changes(4)
            assert {c["path"] for c in got} == {"a.txt", "b.txt", "sub/x.jpg", "sub/deeper/y.jpg"}
    finally:
        hub.stop()


# --- webhooks --------------------------------------------------------------------------------
def dispatcher(ledger: Ledger, hub: FeedHub, receiver: Receiver) -> WebhookDispatcher:
    return WebhookDispatcher(
        receiver.url, SECRET, ledger.store, hub, batch_size=3, backoff_s=0.05, max_backoff_s=0.2
    )


def delivered_seqs(receiver: Receiver) -> list[int]:
    with receiver.lock:
        return [c["seq"] for d in receiver.accepted for c in d.json().get("changes", [])]


def test_webhook_gets_every_batch_once_signed_and_resumes_after_restart(
    url: str, root: Path
) -> None:
    first = open_ledger(url)
    repo = first.add_repository(str(root))
    with webhook_receiver() as receiver:
        hub = FeedHub(first, poll_s=0.05)
        hub.start()
        hook = dispatcher(first, hub, receiver)
        hook.start()
        # A new webhook starts at the present; everything after it is delivered.
        wait_for("the webhook's cursor", lambda: first.store.get_consumer_cursor(hook.name) == 1)
        receiver.fail_next = 1  # the first delivery is refused once and retried
        first.scan(repo)
        mutate(root)
        first.scan(repo)
        total = first.store.latest_seq()
        wait_for("every change delivered", lambda: delivered_seqs(receiver)[-1:] == [total])
        hook.stop()
        hub.stop()
        first.close()

        assert delivered_seqs(receiver) == list(range(2, total + 1))  # each once, in order
        ids = [d.headers["webhook-id"] for d in receiver.accepted]
        assert len(ids) == len(set(ids))
        assert len(receiver.refused) == 1
        refused = receiver.refused[0]
        assert refused.body == receiver.accepted[0].body  # the same batch, again
        assert refused.headers["webhook-id"] == ids[0]  # with the same id
        hook_lib = standardwebhooks.Webhook(SECRET)  # a stock verifier of the specification
        other = standardwebhooks.Webhook(base64.b64encode(b"another secret, 32 bytes long..."))
        for d in receiver.accepted:
            assert hook_lib.verify(d.body, d.headers)["type"] == "changes"
            with pytest.raises(standardwebhooks.WebhookVerificationError):
                other.verify(d.body, d.headers)
            # The id is signed: changing it breaks the signature.
            with pytest.raises(standardwebhooks.WebhookVerificationError):
                hook_lib.verify(d.body, {**d.headers, "webhook-id": "msg_forged"})
            assert len(d.json()["changes"]) <= 3
        cursors = [(d.json()["since"], d.json()["cursor"]) for d in receiver.accepted]
        assert all(a[1] == b[0] for a, b in zip(cursors, cursors[1:], strict=False))

        # Changes while fsledger is down are delivered after the restart, and nothing again.
        (root / "while-down.txt").write_bytes(b"down")
        second = open_ledger(url)
        try:
            stored = second.store.get_repository(repo.id)
            assert stored is not None
            second.scan(stored)
            hub = FeedHub(second, poll_s=0.05)
            hub.start()
            hook = dispatcher(second, hub, receiver)
            hook.start()
            newest = second.store.latest_seq()
            wait_for("the change made while down", lambda: delivered_seqs(receiver)[-1] == newest)
            hook.stop()
            hub.stop()
        finally:
            second.close()
        assert delivered_seqs(receiver) == list(range(2, newest + 1))
        last = receiver.accepted[-1].json()
        assert [(c["kind"], c["path"]) for c in last["changes"]] == [("created", "while-down.txt")]


def test_webhook_behind_retention_gets_a_resync_notice(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    with webhook_receiver() as receiver:
        hub = FeedHub(ledger, poll_s=0.05)
        name = "webhook:" + receiver.url
        ledger.store.set_consumer_cursor(name, 0)
        Retention(max_age_s=0, max_entries=1).prune(ledger.store)
        hook = dispatcher(ledger, hub, receiver)
        hub.start()
        hook.start()
        try:
            wait_for("a resync notice", lambda: receiver.accepted)
        finally:
            hook.stop()
            hub.stop()
        notice = receiver.accepted[0].json()
        assert notice["type"] == "resync_needed"
        assert notice["cursor"] == str(Feed(ledger.store).head())
        assert ledger.store.get_consumer_cursor(name) == ledger.store.latest_seq()


def test_removed_and_readded_repository_keeps_waking_the_hub(ledger: Ledger, root: Path) -> None:
    """Writers are replaced when a repository is removed; the hub attaches to the new one."""
    repo = ledger.add_repository(str(root))
    hub = FeedHub(ledger, poll_s=0.05)
    hub.start()
    try:
        ledger.remove_repository(repo)
        again: Repository = ledger.add_repository(str(root))
        wait_for("the hub to attach", lambda: hub.on_applied in ledger.writer(again).listeners)
        ledger.scan(again)
        assert hub.wait(0, 5.0)
    finally:
        hub.stop()


def test_removing_a_root_tree_is_reported_per_file(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    head = Feed(ledger.store).head()
    shutil.rmtree(root / "sub")
    ledger.scan(repo)
    page = Feed(ledger.store).read(head, 100)
    assert {(e.kind.value, e.path) for e in page.entries} == {
        ("deleted", b"sub/x.jpg"),
        ("deleted", b"sub/deeper/y.jpg"),
    }


# --- issue 14: the feed as a contract ----------------------------------------------------------
ODD_NAMES = (b"caf\xe9.jpg", b"\xff\xfe-\xed\xa0\x80.txt")
"""A Latin-1 name, and one with invalid bytes and an encoded surrogate: neither is UTF-8."""


def write_odd_names(root: Path) -> None:
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(b"odd: " + name)


def strict_json(response: httpx.Response) -> Any:
    """The body as a strict consumer parses it: valid UTF-8, no escaped lone surrogates."""
    assert response.status_code == 200, response.text
    text = response.content.decode("utf-8")
    assert "\\ud8" not in text.lower() and "\\udc" not in text.lower()
    return response.json()


def test_a_non_utf8_name_never_jams_a_page(ledger: Ledger, root: Path) -> None:
    """Item 1: every page holding such names answers 200 with the exact bytes in path_b64
    and an always-encodable text; the CLI's JSON too."""
    write_odd_names(root)
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    want = {b"a.txt", b"b.txt", b"sub/x.jpg", b"sub/deeper/y.jpg", *ODD_NAMES}
    app = create_app(ledger, None, ledger.settings)
    with serve(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        changes = strict_json(http.get("/api/v1/changes", params={"limit": 3}))
        cursor = changes["cursor"]
        while True:  # small pages: one of them holds both names, none fails
            page = strict_json(http.get("/api/v1/changes", params={"since": cursor}))
            changes["changes"] += page["changes"]
            cursor = page["cursor"]
            if not page["has_more"]:
                break
        created = {base64.b64decode(c["path_b64"]) for c in changes["changes"] if c["path"]}
        assert created == want
        texts = {c["path"] for c in changes["changes"]}
        assert "caf\ufffd.jpg" in texts
        files = strict_json(http.get(f"/api/v1/repositories/{repo.id}/files"))
        assert {base64.b64decode(f["path_b64"]) for f in files["files"]} == want
        with http.stream("GET", "/api/v1/events", params={"since": str(Cursor("0", 0))}) as r:
            assert r.status_code == 410  # (a cursor of another feed: refused, not streamed)
        first = Feed(ledger.store).oldest()
        with http.stream("GET", "/api/v1/events", params={"since": str(first)}) as r:
            streamed = SseReader(r).changes(len(want) + 1)
        assert {base64.b64decode(c["path_b64"]) for c in streamed if c["path"]} == want


def test_an_unexpected_error_closes_the_connection_and_says_so(
    ledger: Ledger, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1: a bug answers 500 in the API's shape with ``Connection: close``, so a
    keep-alive client's next request goes out on a fresh connection and succeeds."""
    repo = ledger.add_repository(str(root))

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ledger, "files_page", broken)
    app = create_app(ledger, None, ledger.settings)
    with serve(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        r = http.get(f"/api/v1/repositories/{repo.id}/files")
        assert r.status_code == 500
        assert r.headers["connection"] == "close"
        assert r.json()["error"] == "internal_error"
        assert http.get("/api/v1/changes").status_code == 200


def read_to_head(ledger: Ledger, cursor: str | None = None) -> tuple[list[Any], str]:
    entries: list[Any] = []
    while True:
        page = ledger.changes(cursor, 1000)
        entries += page.entries
        cursor = str(page.cursor)
        if not page.has_more:
            return entries, cursor


def test_a_restored_database_or_a_cursor_beyond_the_head_needs_a_resync(
    url: str, root: Path, tmp_path: Path
) -> None:
    """Item 2: after a restore from backup the same seqs name other entries under the same
    feed id; a cursor issued before is answered 410 (API) / exit 5 (CLI), before and after
    the disk changes again, and so is any cursor beyond the head."""
    backup = tmp_path / "backup.db"
    first = open_ledger(url)
    repo = first.add_repository(str(root))
    first.scan(repo)
    backup_database(url, backup)
    for name in ("a2.txt", "b2.txt", "c2.txt"):
        (root / name).write_bytes(name.encode())
        first.scan(repo)
    _, cursor = read_to_head(first)
    first.close()

    restore_database(url, backup)
    second = open_ledger(url)
    try:
        head = second.feed_head()
        assert head.feed_id == Cursor.parse(cursor).feed_id  # the same feed, as restored
        with pytest.raises(ResyncNeeded, match="beyond the newest entry"):
            second.changes(cursor)
        (root / "d2.txt").write_bytes(b"d2")
        stored = second.repository(repo.id)
        assert stored is not None
        second.scan(stored)  # a2, b2, c2 and d2 take the seqs a2, b2 and c2 had
        head = second.feed_head()
        assert head.seq > Cursor.parse(cursor).seq
        with pytest.raises(ResyncNeeded, match="no longer names the entry"):
            second.changes(cursor)
        with api(second) as http:
            r = http.get("/api/v1/changes", params={"since": cursor})
            assert r.status_code == 410
            assert r.json()["error"] == "resync_needed" and r.json()["cursor"] == str(head)
            beyond = Cursor(head.feed_id, head.seq + 1000, 0)
            r = http.get("/api/v1/changes", params={"since": str(beyond)})
            assert r.status_code == 410 and "beyond" in r.json()["detail"]
            r = http.get("/api/v1/changes", params={"since": f"{head.feed_id}:999999999"})
            assert r.status_code == 410
            # The cursor it names is answered, with nothing before it lost.
            r = http.get("/api/v1/changes", params={"since": r.json()["cursor"]})
            assert r.status_code == 200 and r.json()["changes"] == []
        result = CliRunner().invoke(main, ["--db", url, "changes", "--since", cursor])
        assert result.exit_code == 5 and "resync needed" in result.stderr
    finally:
        second.close()


def test_deleted_entries_carry_the_last_size_and_hash(ledger: Ledger, root: Path) -> None:
    """Item 4: a consumer can pair a deletion with a later creation of the same content."""
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    head = ledger.feed_head()
    (root / "b.txt").unlink()
    shutil.rmtree(root / "sub")
    ledger.scan(repo)
    page = ledger.changes(head)
    deleted = {e.path: (e.size, e.content_hash, e.hash_algo) for e in page.entries}
    assert deleted == {
        b"b.txt": (5, blake3.blake3(b"bravo").hexdigest(), "blake3"),
        b"sub/x.jpg": (5, blake3.blake3(b"x-ray").hexdigest(), "blake3"),
        b"sub/deeper/y.jpg": (6, blake3.blake3(b"yankee").hexdigest(), "blake3"),
    }
    assert {e.kind.value for e in page.entries} == {"deleted"}
    with api(ledger) as http:
        body = http.get("/api/v1/changes", params={"since": str(head)}).json()
        b = next(c for c in body["changes"] if c["path"] == "b.txt")
        assert (b["size"], b["hash"]) == (5, blake3.blake3(b"bravo").hexdigest())


def test_repository_lifecycle_is_in_the_feed_and_the_head_never_moves_back(
    ledger: Ledger, root: Path, tmp_path: Path
) -> None:
    """Item 3: added, offline, online and removed are events; a purge blanks the
    repository's entries but the head (``/healthz``, the feed) only moves forward."""
    other_root = tmp_path / "other"
    other_root.mkdir()
    (other_root / "o.txt").write_bytes(b"other")
    start = ledger.feed_head()
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    other = ledger.add_repository(str(other_root))
    ledger.scan(other)
    parked = tmp_path / "parked"
    os.rename(other_root, parked)
    with pytest.raises(RootUnavailable):
        ledger.scan(other)
    os.rename(parked, other_root)
    ledger.scan(other)
    events = [(e.kind.value, e.repository_id) for e in read_to_head(ledger, str(start))[0]]
    assert [e for e in events if e[0].startswith("repository_")] == [
        ("repository_added", repo.id),
        ("repository_added", other.id),
        ("repository_offline", other.id),
        ("repository_online", other.id),
    ]
    with api(ledger) as http:
        before = http.get("/healthz").json()["cursor"]
        ledger.remove_repository(other, purge=True)  # its entries were the newest
        after = http.get("/healthz").json()["cursor"]
        assert Cursor.parse(after).seq > Cursor.parse(before).seq
        # A reader still at the old head is answered: the purge did not invalidate it.
        r = http.get("/api/v1/changes", params={"since": before})
        assert r.status_code == 200
        assert [(c["kind"], c["repository_id"]) for c in r.json()["changes"]] == [
            ("repository_removed", str(other.id))
        ]
        ledger.remove_repository(repo)  # records kept: still an event
        history, _ = read_all(http, str(start))
    # The purged repository's history is blanked, events included: only its removal stays.
    kinds = [(c["kind"], c["repository_id"]) for c in history if not c["path"]]
    assert kinds == [
        ("repository_added", str(repo.id)),
        ("repository_removed", str(other.id)),
        ("repository_removed", str(repo.id)),
    ]
    # The purged repository's files are gone from the history; the other's stay.
    paths = {(c["repository_id"], c["path"]) for c in history if c["path"]}
    assert {p for r, p in paths if r == str(other.id)} == set()
    assert {p for r, p in paths if r == str(repo.id)} == {
        "a.txt",
        "b.txt",
        "sub/x.jpg",
        "sub/deeper/y.jpg",
    }


@pytest.mark.parametrize("start", ["start", "cursor", "now"])
def test_where_a_new_webhook_starts_is_explicit(ledger: Ledger, root: Path, start: str) -> None:
    """Item 5: ``--webhook-from start`` delivers the history first, a cursor what follows
    it, ``now`` only what happens next; a webhook with a stored cursor resumes from it."""
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    history, head = read_to_head(ledger)
    middle = str(entry_cursor(history[2], head.split(":")[0]))
    (root / "next.txt").write_bytes(b"next")
    with webhook_receiver() as receiver:
        hub = FeedHub(ledger, poll_s=0.05)
        hub.start()
        given = {"start": "start", "cursor": middle, "now": "now"}[start]
        hook = WebhookDispatcher(
            receiver.url, SECRET, ledger.store, hub, batch_size=100, backoff_s=0.05, start=given
        )
        hook.start()
        try:
            wait_for("the webhook's cursor", lambda: ledger.store.get_consumer_cursor(hook.name))
            ledger.scan(repo)
            newest = ledger.store.latest_seq()
            wait_for("the delivery", lambda: delivered_seqs(receiver)[-1:] == [newest])
        finally:
            hook.stop()
            hub.stop()
    first = {"start": 1, "cursor": history[2].seq + 1, "now": newest}[start]
    assert delivered_seqs(receiver) == list(range(first, newest + 1))
    body = receiver.accepted[0].json()
    assert body["since"] == {"start": f"{head.split(':')[0]}:0:00000000", "cursor": middle}.get(
        start, head
    )


def test_timestamps_have_one_rfc3339_form(ledger: Ledger, root: Path) -> None:
    """Item 6: microseconds always, even when they are zero (strict parsers with a fixed
    layout refused the shorter form)."""
    moment = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    entry = FeedEntry(1, uuid.uuid4(), ChangeKind.CREATED, b"x", None, 1, "ab", "blake3", moment)
    assert entry.to_json()["recorded_at"] == "2025-01-02T03:04:05.000000+00:00"
    ledger.scan(ledger.add_repository(str(root)))
    layout = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")
    with api(ledger) as http:
        for change in http.get("/api/v1/changes").json()["changes"]:
            assert layout.fullmatch(change["recorded_at"]), change


def metric_count(http: httpx.Client, name: str) -> float:
    families = text_string_to_metric_families(http.get("/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == name + "_count")


def test_sse_starts_clean_and_latency_counts_live_deliveries_only(
    ledger: Ledger, root: Path
) -> None:
    """Item 6: a stock SSE client (httpx-sse) yields no empty first message, and a replay
    of older changes adds nothing to the delivery-latency histogram; a live change does."""
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    app = create_app(ledger, None, ledger.settings, heartbeat_s=0.2)
    with serve(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        start = str(Cursor(ledger.feed_head().feed_id, 0, 0))
        with connect_sse(http, "GET", "/api/v1/events", params={"since": start}) as source:
            events = source.iter_sse()
            replayed = [next(events) for _ in range(5)]  # the repository and its 4 files
            assert all(e.event == "change" and e.data for e in replayed)
            assert replayed[0].retry == 2000
            assert metric_count(http, "fsledger_feed_delivery_latency_seconds") == 0
            (root / "live.txt").write_bytes(b"live")
            ledger.scan(repo)
            live = next(events)
            assert json.loads(live.data)["path"] == "live.txt"
            assert metric_count(http, "fsledger_feed_delivery_latency_seconds") == 1
