"""The HTTP API in-process (the ASGI app through httpx) and once over a real socket with
``fsledger run``: repositories, status, reconcile, files paging, duplicates, metrics,
security rules, and the OpenAPI schema under schemathesis."""

from __future__ import annotations

import base64
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import standardwebhooks
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api_support import SseReader, free_port, webhook_receiver
from fsledger.api import Service, create_app
from fsledger.api.security import is_loopback_host
from fsledger.cli import main
from fsledger.config import Settings
from fsledger.errors import ConfigError
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import OperationStatus, Repository
from fsledger.store import open_store
from support import wait_for

TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return "sqlite://" + str(tmp_path / "ledger.db")


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    led = Ledger(Settings(database_url=db_url, max_concurrency=2))
    try:
        yield led
    finally:
        led.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "photos"
    for rel, content in {
        "2024/a.jpg": b"A" * 100,
        "2024/copy-of-a.jpg": b"A" * 100,
        "2025/b.jpg": b"B" * 10,
        "2025/deep/copy-of-b.jpg": b"B" * 10,
        "2025/deep/third-b.jpg": b"B" * 10,
        "notes.txt": b"unique",
    }.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return tree


def client(ledger: Ledger, manager: SyncManager | None = None, **settings: Any) -> TestClient:
    conf = Settings(database_url=ledger.store.url, max_concurrency=2, **settings)
    app = create_app(ledger, manager, conf)
    return TestClient(app, base_url="http://127.0.0.1:8750")


@pytest.fixture
def http(ledger: Ledger) -> Iterator[TestClient]:
    with client(ledger) as c:
        yield c


@pytest.fixture
def scanned(ledger: Ledger, root: Path) -> Repository:
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    return repo


def cli_json(db_url: str, *args: str) -> Any:
    result = CliRunner().invoke(main, ["--db", db_url, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- repositories ------------------------------------------------------------------------------
def test_repositories_add_list_status_remove(http: TestClient, root: Path) -> None:
    r = http.post("/api/v1/repositories", json={"path": str(root), "name": "photos"})
    assert r.status_code == 201, r.text
    repo = r.json()
    assert repo["name"] == "photos" and repo["path"] == str(root)
    assert base64.b64decode(repo["path_b64"]) == os.fsencode(str(root))

    assert http.post("/api/v1/repositories", json={"path": str(root)}).status_code == 409
    assert http.post("/api/v1/repositories", json={"path": "relative/dir"}).status_code == 422
    r = http.post("/api/v1/repositories", json={"path": str(root / "missing")})
    assert r.status_code == 400 and r.json()["error"] == "root_unavailable"
    assert http.post("/api/v1/repositories", json={}).status_code == 422

    listed = http.get("/api/v1/repositories").json()
    assert [x["id"] for x in listed] == [repo["id"]]
    assert listed[0]["status"]["total_files"] == 0

    status = http.get(f"/api/v1/repositories/{repo['id']}/status").json()
    assert status["repository_id"] == repo["id"]
    assert status["is_watching"] is False and status["last_scan_time"] is None

    r = http.delete(f"/api/v1/repositories/{repo['id']}")
    assert r.json() == {"id": repo["id"], "name": "photos", "purged": False}
    assert http.get("/api/v1/repositories").json() == []
    assert http.get(f"/api/v1/repositories/{repo['id']}/status").status_code == 404


def test_malformed_and_unknown_ids_are_4xx(http: TestClient) -> None:
    for path in ("status", "operations", "files"):
        assert http.get(f"/api/v1/repositories/not-a-uuid/{path}").status_code == 422
        r = http.get(f"/api/v1/repositories/{'0' * 8}-0000-0000-0000-{'0' * 12}/{path}")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert http.delete("/api/v1/repositories/..%2F..%2Fetc").status_code in (404, 422)
    assert http.get("/api/v1/duplicates", params={"repository": "x"}).status_code == 422
    assert http.get("/api/v1/changes", params={"limit": 100_000}).status_code == 422
    r = http.get("/api/v1/changes", params={"sinse": "typo"})
    assert r.status_code == 400 and "sinse" in r.json()["detail"]


def test_status_and_operations_after_a_scan(http: TestClient, scanned: Repository) -> None:
    status = http.get(f"/api/v1/repositories/{scanned.id}/status").json()
    assert status["total_files"] == 6
    assert status["last_sync_operation"]["status"] == "completed"
    ops = http.get(f"/api/v1/repositories/{scanned.id}/operations").json()
    assert [o["files_added"] for o in ops] == [6]
    assert ops[0]["duration_ms"] is not None


def test_reconcile_queues_through_the_manager(ledger: Ledger, scanned: Repository) -> None:
    manager = SyncManager(ledger, ledger.settings)
    manager.start()
    try:
        assert manager.wait_idle(60)
        before = len(ledger.operations(scanned, 100))
        with client(ledger, manager) as http:
            r = http.post(f"/api/v1/repositories/{scanned.id}/reconcile")
            assert r.status_code == 202, r.text
            body = r.json()
            assert body["status"] == "queued" and len(body["request_id"]) == 32
            assert body["operations"] == f"/api/v1/repositories/{scanned.id}/operations"

            def done() -> list[Any] | None:
                ops = http.get(body["operations"]).json()
                finished = [o for o in ops if o["status"] != OperationStatus.RUNNING.value]
                return ops if len(finished) > before else None

            ops = wait_for("the requested reconciliation", done)
            assert ops[0]["operation_type"] == "reconciliation"
            assert ops[0]["status"] == "completed"
            status = http.get(f"/api/v1/repositories/{scanned.id}/status").json()
            assert status["last_sync_operation"]["id"] == ops[0]["id"]
    finally:
        manager.stop()


def test_reconcile_without_a_manager_is_503(http: TestClient, scanned: Repository) -> None:
    r = http.post(f"/api/v1/repositories/{scanned.id}/reconcile")
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


# --- files -------------------------------------------------------------------------------------
def pages(http: TestClient, repo: Repository, **params: Any) -> Iterator[list[dict[str, Any]]]:
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = http.get(f"/api/v1/repositories/{repo.id}/files", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        yield body["files"]
        cursor = body["cursor"]
        if cursor is None:
            return


def test_files_are_paged_in_path_byte_order(http: TestClient, scanned: Repository) -> None:
    listed = [f["path"] for page in pages(http, scanned, limit=2) for f in page]
    expected = [
        "2024/a.jpg",
        "2024/copy-of-a.jpg",
        "2025/b.jpg",
        "2025/deep/copy-of-b.jpg",
        "2025/deep/third-b.jpg",
        "notes.txt",
    ]
    assert listed == expected
    below = [f["path"] for page in pages(http, scanned, prefix="2025/deep") for f in page]
    assert below == expected[3:5]
    b64 = base64.b64encode(b"2024").decode()
    below = [f["path"] for page in pages(http, scanned, prefix_b64=b64) for f in page]
    assert below == expected[:2]


def test_files_paging_is_stable_under_concurrent_writes(
    http: TestClient, ledger: Ledger, scanned: Repository, root: Path
) -> None:
    """Every file present from the first page to the last is listed exactly once."""
    seen: list[str] = []
    it = pages(http, scanned, limit=2)
    seen += [f["path"] for f in next(it)]  # 2024/a.jpg, 2024/copy-of-a.jpg
    (root / "2024" / "aa-before-cursor.jpg").write_bytes(b"new")  # sorts before the cursor
    (root / "2025" / "c-after.jpg").write_bytes(b"new, after the cursor")
    (root / "2025" / "deep" / "copy-of-b.jpg").unlink()  # ahead of the cursor, gone
    ledger.scan(scanned)
    for page in it:
        seen += [f["path"] for f in page]
    survivors = {"2024/a.jpg", "2024/copy-of-a.jpg", "2025/b.jpg", "2025/deep/third-b.jpg"}
    assert survivors <= set(seen)
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, key=os.fsencode)
    assert "2025/deep/copy-of-b.jpg" not in seen


@pytest.mark.parametrize(
    "prefix", ["..", "2024/../..", "../etc", "/../x", "a/./b", "a//b", "x\x00y"]
)
def test_prefix_cannot_leave_the_repository(
    http: TestClient, scanned: Repository, prefix: str
) -> None:
    r = http.get(f"/api/v1/repositories/{scanned.id}/files", params={"prefix": prefix})
    assert r.status_code == 422  # the schema's pattern says so
    b64 = base64.b64encode(prefix.encode()).decode()
    r = http.get(f"/api/v1/repositories/{scanned.id}/files", params={"prefix_b64": b64})
    assert r.status_code == 400


def test_bad_cursor_is_400(http: TestClient, scanned: Repository) -> None:
    r = http.get(f"/api/v1/repositories/{scanned.id}/files", params={"cursor": "!!!"})
    assert r.status_code == 422
    r = http.get(f"/api/v1/repositories/{scanned.id}/files", params={"prefix_b64": "!!!!"})
    assert r.status_code == 422


# --- duplicates and the feed, API == CLI ------------------------------------------------------
def test_duplicates_largest_waste_first_and_same_as_cli(
    http: TestClient, scanned: Repository, db_url: str
) -> None:
    body = http.get("/api/v1/duplicates").json()
    groups = body["groups"]
    assert [(g["size"], g["count"], g["wasted_bytes"]) for g in groups] == [
        (100, 2, 100),
        (10, 3, 20),
    ]
    assert [f["path"] for f in groups[1]["files"]] == [
        "2025/b.jpg",
        "2025/deep/copy-of-b.jpg",
        "2025/deep/third-b.jpg",
    ]
    assert body["wasted_bytes"] == 120
    assert http.get("/api/v1/duplicates", params={"repository": str(scanned.id)}).json() == body
    assert body.pop("next_offset") is None  # the API pages (offset), the CLI lists at once
    assert cli_json(db_url, "duplicates") == body
    assert cli_json(db_url, "duplicates", str(scanned.id)) == body
    assert http.get("/api/v1/duplicates", params={"min_size": 11}).json()["wasted_bytes"] == 100


def test_changes_same_as_cli(http: TestClient, scanned: Repository, db_url: str) -> None:
    api = http.get("/api/v1/changes").json()
    assert len(api["changes"]) == 7  # the repository was added, then its six files
    assert cli_json(db_url, "changes", "--limit", "100") == api
    first = api["changes"][0]["cursor"]
    rest = http.get("/api/v1/changes", params={"since": first}).json()
    assert cli_json(db_url, "changes", "--since", first) == rest
    assert rest["changes"] == api["changes"][1:]


# --- metrics and health -----------------------------------------------------------------------
def test_metrics_parse_as_prometheus_text(ledger: Ledger, scanned: Repository, root: Path) -> None:
    manager = SyncManager(ledger, ledger.settings)
    manager.start()
    try:
        assert manager.wait_idle(60)
        os.rename(root / "notes.txt", root / "2025" / "notes.txt")  # a move, for "moved"
        manager.trigger_reconciliation(scanned.id, reason="test")
        wait_for(
            "the move recorded", lambda: ledger.store.get_record(scanned.id, b"2025/notes.txt")
        )
        assert manager.wait_idle(60)
        with client(ledger, manager) as http:
            r = http.get("/metrics")
    finally:
        manager.stop()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "fsledger_repositories",
        "fsledger_watched_repositories",
        "fsledger_watched_directories",
        "fsledger_events_processed",
        "fsledger_events_ignored",
        "fsledger_event_latency_seconds",
        "fsledger_reconciliation_duration_seconds",
        "fsledger_reconciliation_files",
        "fsledger_reconciliation_errors",
        "fsledger_reconciliation_queue_depth",
        "fsledger_event_queue_depth",
        "fsledger_feed_sequence",
        "fsledger_sse_clients",
    ):
        assert name in families, name
    assert families["fsledger_event_latency_seconds"].type == "histogram"
    assert families["fsledger_reconciliation_files"].type == "counter"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("fsledger_repositories", (("state", "online"),))] == 1
    assert samples[("fsledger_feed_sequence", ())] == 8
    assert samples[("fsledger_reconciliation_files_total", (("action", "scanned"),))] >= 6
    assert samples[("fsledger_reconciliation_files_total", (("action", "moved"),))] == 1


class FakeWatcherMetrics:
    def __init__(self) -> None:
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=3)
        self.latency_count = 0
        self.watched_repositories = 1
        self.watched_directories = 7
        self.events_processed = 42
        self.events_ignored = 5
        self.queue_depth = 2

    def add(self, ms: float) -> None:
        self.latency_ms.append(ms)
        self.latency_count += 1

    def latency_p50(self) -> float:
        return sorted(self.latency_ms)[len(self.latency_ms) // 2] if self.latency_ms else 0.0


class FakeLive:
    """A LiveSource with the watcher's metrics, to see them come out of /metrics."""

    def __init__(self) -> None:
        self.metrics = FakeWatcherMetrics()

    def add(self, repo: Repository) -> None: ...
    def remove(self, repo_id: Any) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_watching(self, repo_id: Any) -> bool:
        return True

    def degraded(self, repo_id: Any) -> bool:
        return False

    def check(self, repo_id: Any, path: bytes) -> None: ...


def test_metrics_export_the_watchers_latency_histogram(ledger: Ledger) -> None:
    live = FakeLive()
    manager = SyncManager(ledger, ledger.settings, live_factory=lambda *_: live)

    def scrape(http: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = http.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    with client(ledger, manager) as http:
        for ms in (3.0, 40.0):
            live.metrics.add(ms)
        first = scrape(http)
        assert first[("fsledger_event_latency_seconds_count", ())] == 2
        assert first[("fsledger_event_latency_seconds_bucket", (("le", "0.005"),))] == 1
        assert first[("fsledger_event_latency_seconds_bucket", (("le", "0.05"),))] == 2
        assert first[("fsledger_watched_directories", ())] == 7
        assert first[("fsledger_events_processed_total", ())] == 42
        assert first[("fsledger_event_queue_depth", ())] == 2
        # Four more samples through a window of three: the three still held are counted,
        # and nothing is counted twice.
        for ms in (200.0, 300.0, 400.0, 2000.0):
            live.metrics.add(ms)
        second = scrape(http)
        assert second[("fsledger_event_latency_seconds_count", ())] == 5
        assert second[("fsledger_event_latency_seconds_bucket", (("le", "0.5"),))] == 4
        assert scrape(http)[("fsledger_event_latency_seconds_count", ())] == 5


def test_healthz(http: TestClient) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_served_connections_send_without_waiting_for_acks(ledger: Ledger) -> None:
    """Every accepted connection has TCP_NODELAY: uvicorn writes a response's head and body
    apart, and under Nagle a kept-alive client (httpx, a browser) waited out its delayed ACK
    (40 ms) on every response. Checked on the server's own accepted socket."""
    import socket

    import httpx

    service = Service(ledger, None, ledger.settings, listen="127.0.0.1:0")
    service.bind()
    service.start()
    try:
        host, port = service.address
        with httpx.Client(base_url=f"http://{host}:{port}") as client:
            assert client.get("/healthz").status_code == 200
            accepted = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    sock = socket.socket(fileno=os.dup(int(fd)))
                except OSError:
                    continue
                with sock:
                    if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                        continue
                    try:
                        local, peer = sock.getsockname(), sock.getpeername()
                    except OSError:
                        continue  # the listener: no peer
                    if local[1] == port and peer[1] != port:
                        accepted.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            assert accepted and all(accepted), accepted
    finally:
        service.stop()


# --- security ---------------------------------------------------------------------------------
def test_beyond_loopback_needs_a_token(ledger: Ledger) -> None:
    for listen in ("0.0.0.0:8750", "192.0.2.1:80", "[::]:8750", "example.com:8750"):
        with pytest.raises(ConfigError, match="FSLEDGER_API_TOKEN"):
            Service(ledger, None, ledger.settings, listen=listen)
    for listen in ("127.0.0.1:0", "[::1]:0", "localhost:0", "127.8.9.10:0"):
        Service(ledger, None, ledger.settings, listen=listen)
    tokened = Settings(database_url=ledger.store.url, api_token=TOKEN)
    Service(ledger, None, tokened, listen="0.0.0.0:0")
    Service(ledger, None, ledger.settings, listen="0.0.0.0:0", http=False)  # nothing served
    assert is_loopback_host("::1") and not is_loopback_host("10.0.0.1")


def test_run_refuses_to_listen_beyond_loopback_without_a_token(db_url: str) -> None:
    result = CliRunner().invoke(
        main, ["--db", db_url, "run", "--no-watch", "--listen", "0.0.0.0:0"]
    )
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0:0 without FSLEDGER_API_TOKEN" in result.stderr


def test_webhooks_need_a_secret(ledger: Ledger) -> None:
    with pytest.raises(ConfigError, match="FSLEDGER_WEBHOOK_SECRET"):
        Service(ledger, None, ledger.settings, webhooks=("http://127.0.0.1:9/hook",))
    # At least 16 bytes of key, as the API token: refused at the edge and by the service.
    short = replace(ledger.settings, webhook_secret="fifteen bytes..")
    with pytest.raises(ConfigError, match="too short"):
        Service(ledger, None, short, webhooks=("http://127.0.0.1:9/hook",))
    with pytest.raises(ConfigError, match="too short"):
        Settings.from_env(
            {"FSLEDGER_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"x" * 15).decode()}
        )
    ok = replace(ledger.settings, webhook_secret="sixteen bytes..!", webhook_from="then")
    with pytest.raises(ConfigError, match="--webhook-from"):
        Service(ledger, None, ok, webhooks=("http://127.0.0.1:9/hook",))
    with pytest.raises(ConfigError, match="http"):
        Service(ledger, None, ledger.settings, webhooks=("file:///etc/passwd",))


def test_token_is_required_when_set(ledger: Ledger, scanned: Repository) -> None:
    with client(ledger, api_token=TOKEN) as http:
        for path in ("/api/v1/repositories", "/api/v1/changes", "/metrics"):
            r = http.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            r = http.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
            assert r.status_code == 401
            r = http.get(path, headers={"Authorization": "Basic " + TOKEN})
            assert r.status_code == 401
            assert http.get(path, headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
        assert http.get("/healthz").status_code == 200
        # With a token, any Host is fine (the token is the guard).
        r = http.get(
            "/api/v1/repositories",
            headers={"Authorization": "Bearer " + TOKEN, "Host": "ledger.example"},
        )
        assert r.status_code == 200


def test_without_token_only_loopback_hosts_are_answered(http: TestClient) -> None:
    assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 421
    assert http.get("/healthz", headers={"Host": "localhost:8750"}).status_code == 200
    assert http.get("/healthz", headers={"Host": "[::1]:8750"}).status_code == 200


def test_cross_origin_writes_and_large_bodies_are_refused(
    http: TestClient, scanned: Repository, root: Path
) -> None:
    r = http.post(
        f"/api/v1/repositories/{scanned.id}/reconcile", headers={"Origin": "http://evil.example"}
    )
    assert r.status_code == 403
    r = http.post(
        "/api/v1/repositories",
        json={"path": str(root) + "/x" * 40_000},
    )
    assert r.status_code == 413
    r = http.post(
        "/api/v1/repositories",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    assert r.status_code == 413


def test_dashboard_page_and_assets(http: TestClient) -> None:
    r = http.get("/")
    assert r.status_code == 200 and "<title>fsledger</title>" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/static/../app.py").status_code == 404
    assert http.get("/static/index.html").status_code == 404


def test_openapi_asks_for_bearer_auth_only_when_a_token_is_set(ledger: Ledger) -> None:
    """Item 6: a loopback server without a token answers every route without one, and its
    OpenAPI document says so (schemathesis reported ST201 on the routes that claimed it)."""
    with client(ledger) as http:
        doc = http.get("/openapi.json").json()
    secured = [
        (path, method)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    ]
    assert secured == []
    with client(ledger, api_token=TOKEN) as http:
        doc = http.get("/openapi.json", headers={"Authorization": "Bearer " + TOKEN}).json()
    assert doc["paths"]["/api/v1/changes"]["get"]["security"] == [{"HTTPBearer": []}]
    # The webhook deliveries are documented too.
    assert "changes" in doc["webhooks"]


# --- schemathesis -----------------------------------------------------------------------------
@pytest.mark.slow  # generated requests to every operation
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_schema_holds(ledger: Ledger, root: Path, mode: GenerationMode) -> None:
    """No 5xx, and every response conforms to /openapi.json, for generated requests to every
    operation (valid ones, then invalid ones that must be refused with a 4xx)."""
    ledger.scan(ledger.add_repository(str(root)))
    conf = Settings(database_url=ledger.store.url, api_token=TOKEN)
    app = create_app(ledger, None, conf)
    auth = {"Authorization": "Bearer " + TOKEN}
    # The event stream never ends by itself: it is tested over a socket in test_feed. The
    # schema is behind the token, like the API it describes.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth).exclude(
        path="/api/v1/events"
    )
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        # Derandomized: a negative case whose only flaws are a missing Authorization header
        # (put back by ``headers=auth`` below) and an extra query property that does not
        # survive serialisation is a valid request, rightly answered 200, which schemathesis
        # then reports as "accepted" (seen once in ~40 runs). Fixed examples keep CI honest.
        @settings(
            max_examples=15,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            # Schema-valid is not always acceptable here: a well-formed cursor of another
            # database is answered 410 (resync), a well-formed path that is no directory 400.
            case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters has no invalid requests to generate.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc


# --- once over a real socket --------------------------------------------------------------------
def test_fsledger_run_serves_over_a_real_socket(tmp_path: Path, root: Path) -> None:
    """``fsledger run`` as a user starts it: HTTP on a real port, a webhook, a change written
    by another process (``fsledger scan``) reaching both an open SSE stream and the webhook,
    and SIGTERM ending it all with exit 0 while the stream is still open."""
    db = "sqlite://" + str(tmp_path / "run.db")
    secret = "whsec_" + base64.b64encode(b"s3cret of at least sixteen bytes").decode()
    env = {**os.environ, "FSLEDGER_DATABASE_URL": db, "FSLEDGER_WEBHOOK_SECRET": secret}
    env.pop("FSLEDGER_API_TOKEN", None)
    fsledger = [sys.executable, "-m", "fsledger.cli"]
    subprocess.run([*fsledger, "repo", "add", str(root)], env=env, check=True, timeout=120)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with webhook_receiver() as receiver:
        proc = subprocess.Popen(
            [*fsledger, "run", "--no-watch", "--listen", f"127.0.0.1:{port}"]
            + ["--webhook", receiver.url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        events: queue.Queue[Any] = queue.Queue()
        stream_ended = threading.Event()
        try:
            with httpx.Client(base_url=base, timeout=5) as http:

                def healthy() -> bool:
                    assert proc.poll() is None, "fsledger run exited early"
                    try:
                        return http.get("/healthz").status_code == 200
                    except httpx.TransportError:
                        return False

                wait_for("fsledger run to answer /healthz", healthy, timeout=60)
                r = http.get("/api/v1/changes")
                assert r.status_code == 200
                assert {c["path"] for c in r.json()["changes"] if c["kind"] == "created"} == {
                    "2024/a.jpg",
                    "2024/copy-of-a.jpg",
                    "2025/b.jpg",
                    "2025/deep/copy-of-b.jpg",
                    "2025/deep/third-b.jpg",
                    "notes.txt",
                }
                head = r.json()["cursor"]
                store = open_store(db)
                try:
                    wait_for(
                        "the webhook to take its cursor",
                        lambda: store.get_consumer_cursor("webhook:" + receiver.url) is not None,
                    )
                finally:
                    store.close()

            def listen() -> None:
                with (
                    httpx.Client(base_url=base, timeout=30) as sse,
                    sse.stream("GET", "/api/v1/events", params={"since": head}) as response,
                ):
                    reader = SseReader(response)
                    try:
                        while True:
                            events.put(reader.next().json())
                    except (AssertionError, httpx.HTTPError):
                        stream_ended.set()

            threading.Thread(target=listen, daemon=True).start()
            (root / "from-another-process.jpg").write_bytes(b"scan")
            subprocess.run([*fsledger, "scan"], env=env, check=True, timeout=120)
            change = events.get(timeout=30)
            assert (change["kind"], change["path"]) == ("created", "from-another-process.jpg")
            wait_for("the webhook delivery", lambda: receiver.accepted)
            delivered = receiver.accepted[0].json()["changes"]
            assert [c["path"] for c in delivered] == ["from-another-process.jpg"]
            standardwebhooks.Webhook(secret).verify(
                receiver.accepted[0].body, receiver.accepted[0].headers
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert proc.returncode == 0, err.decode(errors="replace")
        assert stream_ended.wait(10), "the event stream did not end with the server"


# --- the schedule ---------------------------------------------------------------------------
def test_quiet_request_over_http_holds_scheduled_runs_visibly(ledger: Ledger, root: Path) -> None:
    repo = ledger.add_repository(os.fsencode(root))
    conf = Settings(
        database_url=ledger.store.url,
        max_concurrency=2,
        reconciliation_interval_s=1.0,
        daily_at=None,
    )
    manager = SyncManager(ledger, conf, pressure=lambda: None)
    manager.start()
    try:
        assert manager.wait_idle(60)
        with client(ledger, manager) as http:
            assert (
                http.post(
                    "/api/v1/schedule/quiet", params={"until": "2099-01-01T00:00"}
                ).status_code
                == 400
            )
            until = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
            r = http.post("/api/v1/schedule/quiet", params={"until": until, "by": "thumbnailer"})
            assert r.status_code == 200 and r.json()["by"] == "thumbnailer"
            assert http.get("/api/v1/schedule/quiet").json()["until"] == r.json()["until"]

            def waiting() -> str | None:
                sched = http.get(f"/api/v1/repositories/{repo.id}/status").json()["schedule"]
                return sched and sched["waiting_reason"]

            assert "quiet requested by thumbnailer" in wait_for("a waiting run", waiting)
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(http.get("/metrics").text)
                for s in f.samples
            }
            assert samples[("fsledger_schedule_deferrals_total", (("reason", "quiet"),))] == 1
            assert samples[("fsledger_schedule_waiting", ())] == 1
            (root / "while-quiet.jpg").write_bytes(b"q")
            assert http.delete("/api/v1/schedule/quiet").json()["until"] is None
            wait_for(
                "the held run",
                lambda: any(r.path == b"while-quiet.jpg" for r in ledger.files(repo)),
            )
            wait_for("no waiting run", lambda: not waiting())
    finally:
        manager.stop()
