"""Security properties from docs/security.md that no other test file checks: the SQLite
database and its companion files are private to their owner, and database passwords never
reach a message, a log or a ``repr``. (Token auth, loopback-only serving, Host and Origin
checks and prefix escapes are in ``test_api.py``; webhook signatures in ``test_feed.py``;
symlinks never followed out of a root in ``test_reconcile.py``.)"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api_support import free_port, webhook_receiver
from fsledger import cli
from fsledger.api import Service, create_app
from fsledger.api.app import MAX_STREAMS
from fsledger.api.feed import Feed
from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.model import RepoSettings
from fsledger.store import open_store
from fsledger.store.redact import redact_url, scrub
from support import wait_for
from treeutil import disk_snapshot, ledger_snapshot, make_tree

FSLEDGER = str(Path(sys.executable).with_name("fsledger"))
SECRET = "Sup3rS3cretPw"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_database_is_created_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    """The ledger lists every file name a user has: the database, its WAL and shared-memory
    files, the directory fsledger creates for it and the lease files are the owner's only,
    whatever the umask."""
    data = tmp_path / "data" / "fsledger"
    db = data / "fsledger.db"
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(db)}
    for args in (["repo", "add", str(root)], ["run", "--once"]):
        done = subprocess.run(
            [FSLEDGER, *args],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=lambda: os.umask(0),  # everything fsledger creates would be 0666/0777
        )
        assert done.returncode == 0, done.stderr
    assert mode(db) == 0o600
    assert mode(data) == 0o700
    for companion in ("-wal", "-shm"):
        path = Path(str(db) + companion)
        if path.exists():
            assert mode(path) == 0o600, companion
    leases = Path(str(db) + ".leases")
    assert mode(leases) == 0o700
    for lock in leases.iterdir():
        assert mode(lock) == 0o600


def test_an_existing_directory_keeps_its_permissions(tmp_path: Path) -> None:
    """fsledger makes the directories it creates private, and leaves alone one it did not."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    store = open_store("sqlite://" + str(shared / "ledger.db"))
    store.close()
    assert mode(shared) == 0o755
    assert mode(shared / "ledger.db") == 0o600


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://ann:" + SECRET + "@db.lan:5432/photos",
            "postgresql://ann:***@db.lan:5432/photos",
        ),
        (
            "postgresql://ann:p@" + SECRET + "@db.lan/photos",
            "postgresql://ann:***@db.lan/photos",
        ),
        (
            "postgres://ann@db.lan/photos?sslmode=require&password=" + SECRET,
            "postgres://ann@db.lan/photos?sslmode=require&password=***",
        ),
        (
            "postgresql://ann@db.lan/photos?sslmode=require&sslpassword=" + SECRET,
            "postgresql://ann@db.lan/photos?sslmode=require&sslpassword=***",
        ),
        (
            "postgresql://ann@db.lan/photos?%70assword=" + SECRET + "&sslmode=require",
            "postgresql://ann@db.lan/photos?%70assword=***&sslmode=require",
        ),
        (
            f"host=db.lan user=ann password={SECRET} dbname=photos",
            "host=db.lan user=ann password=*** dbname=photos",
        ),
        (
            f"host=db.lan password = '{SECRET}' dbname=photos",
            "host=db.lan password = *** dbname=photos",
        ),
        ("sqlite:///var/lib/fsledger/ledger.db", "sqlite:///var/lib/fsledger/ledger.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    if SECRET in url:
        assert SECRET not in scrub(f"failed near {SECRET!r} in {url}", url)


# Each case is a command process that retries the unreachable database (1.5 s of backoff):
# ~2-3 s. The fast loop keeps one URL, one conninfo string and the MySQL refusal; the cases
# marked slow are shapes whose redaction test_redact_url also checks in-process.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/none?connect_timeout=1",
        pytest.param(
            f"postgresql://postgres:{SECRET}%zz@127.0.0.1:5432/none",  # libpq quotes bad escapes
            marks=_SLOW,
        ),
        pytest.param(
            f"postgresql://postgres:p@{SECRET}@127.0.0.1:5432/none?connect_timeout=1", marks=_SLOW
        ),
        pytest.param(
            f"postgresql://postgres@127.0.0.1:1/none?connect_timeout=1&password={SECRET}",
            marks=_SLOW,
        ),
        pytest.param(f"postgresql://postgres:{SECRET}@127.0.0.1:5432/none?bogus=1", marks=_SLOW),
        f"mysql://root:{SECRET}@localhost/photos",
        pytest.param(
            f"postgresql://postgres@127.0.0.1:1/none?connect_timeout=1&sslpassword={SECRET}",
            marks=_SLOW,
        ),
        pytest.param(
            f"postgresql://postgres@127.0.0.1:1/none?connect_timeout=1&%70assword={SECRET}",
            marks=_SLOW,
        ),
        pytest.param(
            f"postgresql://postgres@127.0.0.1:5432/none?%70assword={SECRET}%zz", marks=_SLOW
        ),
        f"host=127.0.0.1 port=1 connect_timeout=1 password={SECRET} dbname=none",
    ],
)
def test_database_passwords_never_reach_an_error(url: str) -> None:
    """Through the real command: the error names the database, never its password."""
    check_no_password_in_error(url, ["repo", "list"])


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(
            f"postgresql://postgres@127.0.0.1:5432/none?%70assword={SECRET}%zz", marks=_SLOW
        ),
        f"host=127.0.0.1 port=1 connect_timeout=1 sslpassword={SECRET} dbname=none",
    ],
)
@pytest.mark.parametrize("command", [["status"], pytest.param(["run", "--once"], marks=_SLOW)])
def test_database_passwords_never_reach_status_or_run(url: str, command: list[str]) -> None:
    check_no_password_in_error(url, command)


def check_no_password_in_error(url: str, command: list[str]) -> None:
    done = subprocess.run(
        [FSLEDGER, "--db", url, *command], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (1, 2)
    assert "fsledger: error:" in done.stderr
    assert SECRET not in done.stderr and SECRET not in done.stdout, done.stderr
    assert "Traceback" not in done.stderr


def test_settings_repr_shows_no_secret() -> None:
    s = Settings(
        database_url=f"postgresql://ann:{SECRET}@db/photos",
        api_token=SECRET + "-token",
        webhook_secret=SECRET + "-hmac",
    )
    assert SECRET not in repr(s)


@pytest.mark.slow  # four command processes, one a whole `run --once`, at DEBUG
def test_a_daemon_run_logs_no_password(pg_url: str, tmp_path: Path) -> None:
    """A whole ``run --once`` at DEBUG with a password in the URL (the test server trusts
    local connections, so the password is carried but never checked): not in the log."""
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    env = {**os.environ, "FSLEDGER_DATABASE_URL": url, "FSLEDGER_LOG_LEVEL": "DEBUG"}
    for args in (["repo", "add", str(root)], ["run", "--once"], ["status"], ["ops"]):
        done = subprocess.run([FSLEDGER, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stderr + done.stdout, args


# --- 1. a planted .fsledger.yaml ---------------------------------------------------------------
PLANT = "sync_settings:\n  ignore_patterns: ['*.jpg']\n"


def feed_kinds(ledger: Ledger) -> list[tuple[str, bytes]]:
    page = Feed(ledger.store).read(None, 1000)
    return [(e.kind.value, e.path) for e in page.entries]


def photo_tree(root: Path) -> None:
    make_tree(str(root), {"a.jpg": b"a", "b/c.jpg": b"c", "d.png": b"d"})


def test_a_planted_repo_config_is_not_read_unless_trusted(ledger: Ledger, tmp_path: Path) -> None:
    """By default a root's own .fsledger.yaml is never opened: the ledger equals the disk."""
    root = tmp_path / "photos"
    photo_tree(root)
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    (root / ".fsledger.yaml").write_text(PLANT)
    (root / "decoy.png").write_bytes(b"decoy")
    ledger.scan(repo)
    assert ledger_snapshot(ledger, repo) == disk_snapshot(str(root))
    assert not any(kind == "deleted" for kind, _ in feed_kinds(ledger))
    stored = ledger.store.get_repository(repo.id)
    assert stored is not None and stored.settings.file_ignore_patterns == ()


def test_planted_ignore_patterns_never_delete_records(ledger: Ledger, tmp_path: Path) -> None:
    """A trusted root's file may stop new records, but the records it would hide are kept
    (and reported) until the operator accepts; the stored copy follows the file."""
    root = tmp_path / "photos"
    photo_tree(root)
    repo = ledger.add_repository(str(root), settings=RepoSettings(trust_repo_config=True))
    ledger.scan(repo)
    before = ledger_snapshot(ledger, repo)
    assert set(before) == {b"a.jpg", b"b/c.jpg", b"d.png"}

    (root / ".fsledger.yaml").write_text(PLANT)
    (root / "decoy.png").write_bytes(b"decoy")
    (root / "new.jpg").write_bytes(b"new")
    stats = ledger.scan(repo)
    now = ledger_snapshot(ledger, repo)
    assert {p: now[p] for p in before} == before  # every record kept, unchanged
    assert b"new.jpg" not in now and b"decoy.png" in now  # the file's patterns apply to new
    assert not any(kind == "deleted" for kind, _ in feed_kinds(ledger))
    assert any("--accept-ignores" in n and "2 record(s)" in n for n in stats.notes), stats.notes
    stored = ledger.store.get_repository(repo.id)
    assert stored is not None and stored.settings.file_ignore_patterns == ("*.jpg",)
    assert stored.settings.ignore_patterns == ()  # not copied into the operator's

    # A kept record whose file really goes is deleted: records stay true to the disk.
    (root / "b" / "c.jpg").unlink()
    ledger.scan(repo)
    assert b"b/c.jpg" not in ledger_snapshot(ledger, repo)
    assert b"a.jpg" in ledger_snapshot(ledger, repo)

    # Deleting the file removes its settings: the ledger equals the disk again.
    (root / ".fsledger.yaml").unlink()
    ledger.scan(repo)
    stored = ledger.store.get_repository(repo.id)
    assert stored is not None and stored.settings.file_ignore_patterns == ()
    assert ledger_snapshot(ledger, repo) == disk_snapshot(str(root))

    # The operator's explicit consent retires them.
    (root / ".fsledger.yaml").write_text(PLANT)
    ledger.scan(repo, accept_ignores=True)
    assert ledger_snapshot(ledger, repo) == disk_snapshot(str(root), ["*.jpg"])
    assert ("deleted", b"a.jpg") in feed_kinds(ledger)


def test_operator_patterns_retire_records(ledger: Ledger, tmp_path: Path) -> None:
    """Settings the operator sets (CLI, API) are consent: their matches are retired."""
    root = tmp_path / "photos"
    photo_tree(root)
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    repo = ledger.set_settings(repo, RepoSettings(ignore_patterns=("*.jpg",)))
    ledger.scan(repo)
    assert ledger_snapshot(ledger, repo) == disk_snapshot(str(root), ["*.jpg"])


def test_the_daemon_keeps_records_a_planted_file_ignores(tmp_path: Path) -> None:
    """The reported attack end to end: a trusted repository, a planted pattern and a decoy,
    then ``fsledger run --once``: no deletion reaches the feed; ``scan --accept-ignores``
    retires them."""
    root = tmp_path / "photos"
    photo_tree(root)
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "l.db")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [FSLEDGER, *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done

    cli("repo", "add", "--trust-repo-config", str(root))
    (root / ".fsledger.yaml").write_text(PLANT)
    (root / "decoy.png").write_bytes(b"decoy")
    cli("run", "--once")
    listed = cli("files", "photos").stdout
    assert "a.jpg" in listed and "b/c.jpg" in listed
    assert "deleted" not in cli("changes").stdout
    done = cli("scan", "photos", "--accept-ignores")
    assert "2 removed" in done.stdout
    assert "a.jpg" not in cli("files", "photos").stdout


# --- 2. a FIFO named .fsledger.yaml, and SIGTERM -----------------------------------------------
def start_daemon(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FSLEDGER, "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_within(proc: subprocess.Popen[str], seconds: float) -> str:
    """SIGTERM; the process must be gone within ``seconds``. Returns its log."""
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running {seconds}s after SIGTERM") from None
    return err


@pytest.mark.slow  # a daemon started, asked over HTTP, then SIGTERM
def test_a_fifo_named_like_the_repo_config_blocks_nothing(tmp_path: Path) -> None:
    """A FIFO (or a symlink to one) named .fsledger.yaml in a trusted root: the daemon
    starts, indexes, answers, adds another such root through the API at once, and stops on
    SIGTERM."""
    first, second = tmp_path / "first", tmp_path / "second"
    make_tree(str(first), {"a.jpg": b"a"})
    make_tree(str(second), {"b.jpg": b"b"})
    os.mkfifo(first / ".fsledger.yaml")
    os.mkfifo(tmp_path / "fifo")
    (second / ".fsledger.yaml").symlink_to(tmp_path / "fifo")
    port = free_port()
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "l.db")}
    done = subprocess.run(
        [FSLEDGER, "repo", "add", "--trust-repo-config", str(first)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    proc = start_daemon(env, "--listen", f"127.0.0.1:{port}")
    try:
        base = f"http://127.0.0.1:{port}"

        def indexed(repo_name: str) -> bool:
            try:
                repos = httpx.get(f"{base}/api/v1/repositories", timeout=5).json()
            except httpx.HTTPError:
                return False
            return any(r["name"] == repo_name and r["status"]["total_files"] for r in repos)

        wait_for("the first root indexed", lambda: indexed("first") or None, timeout=30)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        added = httpx.post(
            f"{base}/api/v1/repositories",
            json={"path": str(second), "trust_repo_config": True},
            timeout=10,
        )
        assert added.status_code == 201, added.text
        wait_for("the second root indexed", lambda: indexed("second") or None, timeout=30)
    finally:
        log = stop_within(proc, 10)
    assert "is not a regular file" in log and "is a symlink" in log, log


BLOCKED_DAEMON = """
import sys
import fsledger.manager as m
from fsledger.cli import main

start = m.SyncManager.start

def start_then_block(self):
    start(self)
    open(sys.argv[1], "rb")  # a blocking open that nothing will ever satisfy

m.SyncManager.start = start_then_block
main(["run", "--no-http", "--no-watch"])
"""


@pytest.mark.slow  # a daemon blocked on a FIFO, then SIGTERM: ~6 s
def test_sigterm_ends_a_daemon_blocked_in_a_system_call(tmp_path: Path) -> None:
    """Whatever the daemon's main thread is blocked on, SIGTERM ends it within seconds."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "l.db")}
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_DAEMON, str(fifo)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def blocked() -> bool:
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
            return wchan in ("wait_for_partner", "fifo_open")

        wait_for("the daemon to block on the FIFO", lambda: blocked() or None, timeout=30)
    finally:
        t0 = time.monotonic()
        log = stop_within(proc, cli.STOP_GRACE_S + 5)
    assert time.monotonic() - t0 < cli.STOP_GRACE_S + 5
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "stopping at once" in log, log


# --- 3. no URL credentials or query strings in any log line -------------------------------------
@pytest.mark.slow  # a daemon at DEBUG delivering to a webhook
def test_a_debug_daemon_logs_no_url_secret(pg_url: str, tmp_path: Path) -> None:
    """A daemon at DEBUG with secrets in its database URL (user info and sslpassword) and in
    its webhook URL (user info and query string) delivers a batch, then stops: none of the
    secrets is in its log (httpx logs every request's full URL at INFO)."""
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    url += f"&sslpassword={SECRET}-ssl"
    root = tmp_path / "photos"
    make_tree(str(root), {"a.jpg": b"a"})
    with webhook_receiver() as receiver:
        hook = receiver.url.replace("http://", f"http://hookuser:{SECRET}-hook@")
        hook += f"?token={SECRET}-query"
        env = {
            **os.environ,
            "FSLEDGER_DATABASE_URL": url,
            "FSLEDGER_LOG_LEVEL": "DEBUG",
            "FSLEDGER_WEBHOOK_SECRET": "whsec-" + SECRET,
        }
        proc = start_daemon(env, "--no-http", "--webhook", hook)
        try:
            # Added after the daemon started: its webhook starts at the feed's head.
            done = subprocess.run(
                [FSLEDGER, "repo", "add", "--no-scan", str(root)],
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
            assert SECRET not in done.stderr + done.stdout
            wait_for("a webhook delivery", lambda: receiver.accepted or None, timeout=60)
        finally:
            log = stop_within(proc, 15)
    assert "HTTP Request: POST" in log, log  # httpx did log the request
    assert SECRET not in log, [line for line in log.splitlines() if SECRET in line]


# --- 5. held event streams, and huge duplicate groups -------------------------------------------
def open_stream(port: int) -> tuple[socket.socket, bytes]:
    """An SSE request on a raw socket; returns it with what came back first."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""

    def complete() -> bool:
        headers, sep, body = head.partition(b"\r\n\r\n")
        if not sep:
            return False
        if b" 200 " in headers.split(b"\r\n", 1)[0]:
            return b"fsledger change feed" in body
        length = re.search(rb"content-length: (\d+)", headers, re.IGNORECASE)
        return length is not None and len(body) >= int(length.group(1))

    while not complete():
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_held_event_streams_leave_healthz_and_the_api_answering(
    ledger: Ledger, settings: Settings
) -> None:
    """255 event streams asked for (the report's number): MAX_STREAMS are served, the rest
    get a clear 503 on the stream endpoint only, and /healthz and the API keep answering;
    a stream closed frees its place."""
    service = Service(ledger, None, settings, listen=f"127.0.0.1:{free_port()}")
    service.bind()
    service.start()
    held: list[socket.socket] = []
    try:
        port = service.address[1]
        base = f"http://127.0.0.1:{port}"
        refused = 0
        for _ in range(255):
            sock, head = open_stream(port)
            if b" 200 " in head.split(b"\r\n", 1)[0]:
                held.append(sock)
            else:
                assert b" 503 " in head and b"too_many_streams" in head, head
                refused += 1
                sock.close()
        assert len(held) == MAX_STREAMS and refused == 255 - MAX_STREAMS
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{base}/api/v1/repositories", timeout=5).status_code == 200
        held.pop().close()

        def reopened() -> socket.socket | None:
            sock, head = open_stream(port)
            if b" 200 " in head.split(b"\r\n", 1)[0]:
                return sock
            sock.close()
            return None

        held.append(wait_for("a stream's place to free", reopened))
    finally:
        for sock in held:
            sock.close()
        service.stop()


def test_duplicates_page_within_a_group(ledger: Ledger, tmp_path: Path) -> None:
    """One group of 1,200 identical files: /duplicates shows its first files and its count,
    /duplicates/files pages through the rest, and together they are exactly the group."""
    root = tmp_path / "photos"
    make_tree(str(root), {f"copies/{i:04d}.jpg": b"same content" for i in range(1200)})
    make_tree(str(root), {"other/a.jpg": b"x", "other/b.jpg": b"x"})
    repo = ledger.add_repository(str(root))
    ledger.scan(repo)
    app = create_app(ledger, None, ledger.settings)
    with TestClient(app, base_url="http://127.0.0.1:8750") as client:
        body = client.get("/api/v1/duplicates").json()
        big = body["groups"][0]
        assert big["count"] == 1200 and len(big["files"]) == 100
        assert len(client.get("/api/v1/duplicates").content) < 64 * 1024
        paths = [f["path"] for f in big["files"]]
        cursor = big["files_cursor"]
        while cursor:
            page = client.get(
                "/api/v1/duplicates/files",
                params={
                    "hash": big["hash"],
                    "hash_algo": big["hash_algo"],
                    "size": big["size"],
                    "cursor": cursor,
                    "limit": 500,
                },
            ).json()
            paths += [f["path"] for f in page["files"]]
            cursor = page["cursor"]
        assert paths == [f"copies/{i:04d}.jpg" for i in range(1200)]
        small = body["groups"][1]
        assert small["count"] == 2 and small["files_cursor"] is None


# --- 6. terminal and log injection --------------------------------------------------------------
EVIL_NAMES = [
    b"x\n[ERROR] FORGED.jpg",
    b"osc\x1b]0;pwned\x07.jpg",
    b"csi\x1b[2J\x1b[31mred.jpg",
    b"cr\rFORGED2.jpg",
    b"bidi\xe2\x80\xaegpj.exe",
    b"not-utf8-\xff.jpg",
]


def test_names_cannot_forge_output_or_log_lines(tmp_path: Path) -> None:
    """File names with newlines, CR, ESC/OSC/CSI sequences, bidi overrides and non-UTF-8
    bytes: ``files``, ``changes``, ``repo list`` and the daemon's DEBUG log print one line
    per record and no control character; ``--json`` keeps the exact bytes."""
    root = tmp_path / "evil\nroot"
    root.mkdir()
    for name in EVIL_NAMES:
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(b"x")
    env = {
        **os.environ,
        "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "l.db"),
        "FSLEDGER_LOG_LEVEL": "DEBUG",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([FSLEDGER, *args], env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    outputs = [
        cli("repo", "add", "--no-scan", "--name", "lib\x1b[2Jrary", str(root)),
        cli("run", "--once"),
        cli("repo", "list"),
        cli("status"),
    ]
    listed = cli("files", "lib\x1b[2Jrary")
    feed = cli("changes")
    outputs += [listed, feed]
    for done in outputs:
        for stream in (done.stdout, done.stderr):
            assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", stream), stream
            assert b"\xe2\x80\xae" not in stream
            for line in stream.splitlines():
                assert not line.startswith((b"[ERROR] FORGED", b"FORGED")), line
    assert len(listed.stdout.splitlines()) == len(EVIL_NAMES)
    assert b"x\\x0a[ERROR] FORGED.jpg" in listed.stdout
    assert b"not-utf8-\\xff.jpg" in listed.stdout
    assert len(feed.stdout.splitlines()) == len(EVIL_NAMES) + 1  # + repository_added
    log = outputs[1].stderr
    assert b"\\x0a[ERROR] FORGED" in log  # the DEBUG line of its record, escaped
    # JSON output is exact: every name round-trips through path_b64.
    exact = cli("files", "--json", "lib\x1b[2Jrary").stdout.splitlines()
    names = sorted(base64.b64decode(json.loads(line)["path_b64"]) for line in exact)
    assert names == sorted(EVIL_NAMES)


# --- 9b. the parents of the default database ----------------------------------------------------
def test_default_database_parents_are_created_private_under_umask_0(tmp_path: Path) -> None:
    """The default database lives in ~/.local/share/fsledger: each directory fsledger has to
    create on the way is 0700, even under umask 0; an existing one keeps its mode."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in ("FSLEDGER_DATABASE_URL", "XDG_DATA_HOME")
    }
    env["HOME"] = str(home)
    done = subprocess.run(
        [FSLEDGER, "repo", "list"],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for directory in (".local", ".local/share", ".local/share/fsledger"):
        assert mode(home / directory) == 0o700, directory
    assert mode(home) == 0o755
    assert mode(home / ".local/share/fsledger/fsledger.db") == 0o600


# --- 7. API docs, the token, and redirects ------------------------------------------------------
TOKEN = "t" * 24


def api_client(ledger: Ledger, **settings: Any) -> TestClient:
    conf = Settings(database_url=ledger.store.url, max_concurrency=2, **settings)
    return TestClient(create_app(ledger, None, conf), base_url="http://127.0.0.1:8750")


def test_api_docs_need_the_token_and_load_nothing_from_elsewhere(ledger: Ledger) -> None:
    with api_client(ledger, api_token=TOKEN) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert client.get(path).status_code in (401, 404), path
        auth = {"Authorization": f"Bearer {TOKEN}"}
        schema = client.get("/openapi.json", headers=auth)
        assert schema.status_code == 200 and "/api/v1/repositories" in schema.json()["paths"]
        for path in ("/docs", "/redoc"):
            page = client.get(path, headers=auth)
            assert page.status_code == 404 and b"cdn" not in page.content.lower(), path
    with api_client(ledger) as client:  # no token (loopback only): the schema is open
        assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("token", [TOKEN, None])
def test_no_redirect_is_built_from_the_host_header(ledger: Ledger, token: str | None) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    with api_client(ledger, api_token=token) as client:
        for path in ("/api/v1/repositories/", "/api/v1/duplicates/", "/healthz/"):
            response = client.get(
                path, headers={**auth, "Host": "evil.example"}, follow_redirects=False
            )
            assert not response.is_redirect, (path, response.headers)
            assert "evil.example" not in response.headers.get("location", "")


# --- 9. smaller input checks --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/repositories", '{"path": "/tmp/\\ud800"}'),
        ("/api/v1/repositories", '{"path": "/tmp/\\udc80"}'),
        ("/api/v1/repositories", '{"path": "ROOT", "name": "\\udc80"}'),
        ("/api/v1/repositories", '{"path": "ROOT", "ignore_patterns": ["\\ud83d"]}'),
    ],
)
def test_a_lone_surrogate_in_a_body_is_a_422(
    ledger: Ledger, tmp_path: Path, path: str, body: str
) -> None:
    body = body.replace("ROOT", str(tmp_path))
    with api_client(ledger) as client:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][0] == "body"


# --- 8. a killed scan ---------------------------------------------------------------------------
@pytest.mark.slow  # scans killed at three points
def test_a_killed_scan_is_marked_failed_by_the_next_scan(tmp_path: Path) -> None:
    """``fsledger scan`` killed with SIGKILL (its workers with it) as its operation starts,
    while it writes records, and while a rescan walks: the next ``scan`` marks each killed
    operation failed (interrupted) before its own, ``ops`` shows none running, and the
    ledger ends equal to the disk."""
    root = tmp_path / "photos"
    make_tree(str(root), {f"d{i % 40:02d}/f{i:05d}.jpg": b"%d" % i for i in range(20000)})
    db = tmp_path / "l.db"
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(db)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [FSLEDGER, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done

    cli("repo", "add", "--no-scan", str(root))
    store = open_store("sqlite://" + str(db))
    try:
        repo = store.list_repositories()[0]

        def running() -> bool:
            return bool(store.running_operations())

        def writing() -> bool:
            return running() and store.count_records(repo.id) > 0

        # The last point is in a rescan: records exist by then.
        for killed, point in enumerate((running, writing, running), start=1):
            scan = subprocess.Popen(
                [FSLEDGER, "scan"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_for(f"the scan to reach '{point.__name__}'", point)
            finally:
                os.killpg(scan.pid, signal.SIGKILL)
                scan.wait()
            assert running()  # left "running" by the dead process
            cli("scan")
            assert not running()
            ops = json.loads(cli("ops", "--json", "--limit", "100").stdout)
            failed = [o for o in ops if o["status"] == "failed"]
            assert len(failed) == killed and all(
                "interrupted" in o["error_message"] for o in failed
            ), ops
            assert not [o for o in ops if o["status"] == "running"]
        assert {r.path: r.size for r in store.iter_records(repo.id)} == {
            p: s for p, (s, _m, _h) in disk_snapshot(str(root), algo=None).items()
        }
    finally:
        store.close()
