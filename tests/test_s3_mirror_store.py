"""The mirrors table: the Store protocol's mirror methods, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from fsledger.errors import MirrorExists
from fsledger.model import Mirror, MirrorCounters, MirrorState, Repository
from fsledger.store import Store, open_store


def _repo(store: Store) -> Repository:
    repo = Repository(id=uuid.uuid4(), name="photos", root=b"/srv/photos")
    store.add_repository(repo)
    return repo


def test_mirror_round_trip_and_uniqueness(store: Store) -> None:
    repo = _repo(store)
    m = Mirror(uuid.uuid4(), repo.id, "s3://b/p", "http://127.0.0.1:9", max_delete=10)
    store.add_mirror(m)
    got = store.get_mirror(m.id)
    assert got is not None
    assert (got.repository_id, got.url, got.endpoint_url, got.max_delete) == (
        repo.id,
        "s3://b/p",
        "http://127.0.0.1:9",
        10,
    )
    assert got.state is MirrorState.ACTIVE and got.cursor_seq is None
    assert got.counters == MirrorCounters()
    with pytest.raises(MirrorExists):
        store.add_mirror(Mirror(uuid.uuid4(), repo.id, "s3://b/p", "http://127.0.0.1:9"))
    # Another endpoint is another bucket; no endpoint is stored as none.
    other = Mirror(uuid.uuid4(), repo.id, "s3://b/p")
    store.add_mirror(other)
    assert store.get_mirror(other.id).endpoint_url is None  # type: ignore[union-attr]
    assert [x.id for x in store.list_mirrors()] == [m.id, other.id]
    assert [x.id for x in store.list_mirrors(repo.id)] == [m.id, other.id]
    assert store.list_mirrors(uuid.uuid4()) == []
    assert store.remove_mirror(other.id) is True
    assert store.remove_mirror(other.id) is False
    assert [x.id for x in store.list_mirrors()] == [m.id]


def test_advance_state_and_counters_survive_a_reopen(store_url: str, store: Store) -> None:
    repo = _repo(store)
    m = Mirror(uuid.uuid4(), repo.id, "s3://b")
    store.add_mirror(m)
    store.advance_mirror(m.id, None, MirrorCounters(), inflight_seq=40)
    store.advance_mirror(m.id, (40, 0xDEADBEEF), MirrorCounters(uploaded=3, uploaded_bytes=300))
    store.advance_mirror(
        m.id, (45, 7), MirrorCounters(uploaded=1, uploaded_bytes=5, skipped=2, errors=1), "boom"
    )
    store.set_mirror_state(m.id, MirrorState.PAUSED, "12 deletions > --max-delete 10")
    again = open_store(store_url)
    try:
        got = again.get_mirror(m.id)
    finally:
        again.close()
    assert got is not None
    assert (got.cursor_seq, got.cursor_tag, got.inflight_seq) == (45, 7, 40)
    assert got.counters == MirrorCounters(uploaded=4, uploaded_bytes=305, skipped=2, errors=1)
    assert got.last_error == "boom" and got.last_error_at is not None
    assert got.state is MirrorState.PAUSED and got.reason == "12 deletions > --max-delete 10"
    store.set_mirror_state(m.id, MirrorState.ACTIVE, None, accept_deletes_through=99)
    got = store.get_mirror(m.id)
    assert got is not None
    assert (got.state, got.reason, got.accept_deletes_through) == (MirrorState.ACTIVE, None, 99)
    assert got.to_json()["counters"]["uploaded"] == 4
