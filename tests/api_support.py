"""Helpers for the HTTP API tests: a database per backend, a server on a real loopback
socket, an SSE reader, a webhook receiver, and a deadline to poll against."""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from support import wait_for

PG_ADMIN_URL = os.environ.get("FSLEDGER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty database: SQLite in ``tmp_path`` or a fresh PostgreSQL schema
    (dropped afterwards). PostgreSQL being down skips locally and fails under CI."""
    if backend == "sqlite":
        yield "sqlite://" + str(tmp_path / "ledger.db")
        return
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable under CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}")
    schema = f"fsl_api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in PG_ADMIN_URL else "?"
        yield f"{PG_ADMIN_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app on a real loopback socket in a thread; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for("the test server to start", lambda: server.started or not thread.is_alive())
        assert thread.is_alive(), "the test server died on startup"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        app.state.hub.stop()  # ends open event streams
        thread.join(10)
        sock.close()


@dataclass
class SseEvent:
    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SseReader:
    """Reads Server-Sent Events from an open httpx streaming response, comments included."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        self.comments: list[str] = []

    def comment(self) -> str | None:
        """Read one line; the comment text if it was a comment line."""
        line = next(self.lines)
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return line[1:].strip()
        return None

    def next(self) -> SseEvent:
        event: str = "message"
        ident: str | None = None
        data: list[str] = []
        for line in self.lines:
            if line == "":
                if data:
                    return SseEvent(event, ident, "\n".join(data))
                event, ident, data = "message", None, []
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                ident = value
        raise AssertionError("the event stream ended")

    def changes(self, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < count:
            ev = self.next()
            assert ev.event == "change", ev
            body = ev.json()
            assert ev.id == body["cursor"]
            out.append(body)
        return out


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on loopback: records what it acknowledged; can fail on purpose."""

    url: str
    accepted: list[Delivery] = field(default_factory=list)
    refused: list[Delivery] = field(default_factory=list)
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            rec = holder[0]
            delivery = Delivery({k.lower(): v for k, v in self.headers.items()}, body)
            with rec.lock:
                refuse = rec.fail_next > 0
                if refuse:
                    rec.fail_next -= 1
                    rec.refused.append(delivery)
                else:
                    rec.accepted.append(delivery)
            self.send_response(500 if refuse else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- backups: what an operator restores after losing the database ---------------------------
def _pg_schema(url: str) -> str:
    """The schema a ``backend_url`` PostgreSQL URL names (its search_path)."""
    return url.rsplit("csearch_path%3D", 1)[1].split("&", 1)[0]


def backup_database(url: str, dest: Path) -> None:
    """Back the database up as an operator would: SQLite's online backup API, or ``pg_dump``
    of the schema (custom format)."""
    if url.startswith("sqlite://"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite://")) as src, sqlite3.connect(dest) as dst:
            src.backup(dst)
        return
    import subprocess

    subprocess.run(
        ["pg_dump", "-Fc", "-n", _pg_schema(url), "-f", str(dest), PG_ADMIN_URL],
        check=True,
        timeout=120,
    )


def restore_database(url: str, backup: Path) -> None:
    """Put a backup back in place of the database (nothing may be using it meanwhile)."""
    if url.startswith("sqlite://"):
        import sqlite3

        with sqlite3.connect(backup) as src, sqlite3.connect(url.removeprefix("sqlite://")) as dst:
            src.backup(dst)
        return
    import subprocess

    schema = _pg_schema(url)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    subprocess.run(["pg_restore", "-d", PG_ADMIN_URL, str(backup)], check=True, timeout=120)
