"""Three consumers of the change feed written only against docs/api.md, with stock client
libraries, as a photo server would write them: a poller (httpx), an SSE client (httpx-sse)
and a webhook receiver (verifying with the ``standardwebhooks`` package).

Each keeps a mirror ``(repository id, path bytes) -> (size, hash)`` and a cursor, and
follows the documented recipes: bootstrap by listing (the head first, then every
repository's files, then follow from the head), apply changes in order, resync on
``resync_needed``. A consumer counts its resyncs, so a test can tell that it was told.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import standardwebhooks
from httpx_sse import connect_sse

Key = tuple[str, bytes]
Mirror = dict[Key, tuple[int | None, str | None]]


def path_of(change: dict[str, Any], field: str = "path") -> bytes:
    return base64.b64decode(change[f"{field}_b64"])


def apply(mirror: Mirror, change: dict[str, Any]) -> None:
    """One change, with the semantics docs/api.md gives consumers."""
    kind, repo = change["kind"], change["repository_id"]
    if kind in ("created", "modified"):
        mirror[(repo, path_of(change))] = (change["size"], change["hash"])
    elif kind == "deleted":
        mirror.pop((repo, path_of(change)), None)
    elif kind == "moved":
        mirror.pop((repo, path_of(change, "old_path")), None)
        mirror[(repo, path_of(change))] = (change["size"], change["hash"])
    elif kind == "dir_moved":
        old = path_of(change, "old_path") + b"/"
        new = path_of(change) + b"/"
        below_old = [k for k in mirror if k[0] == repo and k[1].startswith(old)]
        if below_old:  # nothing below old/: a replay of what the listing already shows
            for k in [k for k in mirror if k[0] == repo and k[1].startswith(new)]:
                del mirror[k]
            for k in below_old:
                mirror[(repo, new + k[1][len(old) :])] = mirror.pop(k)
    elif kind == "repository_removed":
        for k in [k for k in mirror if k[0] == repo]:
            del mirror[k]
    # repository_added (its files follow as created), repository_offline/online: no file


def bootstrap(http: httpx.Client) -> tuple[Mirror, str]:
    """The documented race-free start: the head first, then every repository's files; the
    caller then follows the feed from the head (replaying what the listing already holds)."""
    head = http.get("/healthz").json()["cursor"]
    mirror: Mirror = {}
    for repo in http.get("/api/v1/repositories").json():
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after:
                params["cursor"] = after
            r = http.get(f"/api/v1/repositories/{repo['id']}/files", params=params)
            if r.status_code == 404:  # removed meanwhile: its removal follows in the feed
                break
            page = r.json()
            for f in page["files"]:
                mirror[(repo["id"], base64.b64decode(f["path_b64"]))] = (f["size"], f["hash"])
            after = page["cursor"]
            if after is None:
                break
    return mirror, head


class Poller:
    """Polls ``GET /api/v1/changes`` with the cursor it was given last."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=10)
        self.mirror: Mirror = {}
        self.cursor: str | None = None  # from the start of the feed
        self.resyncs = 0
        self.errors = 0

    def poll(self) -> None:
        """Read until caught up; a daemon that is down is tried again at the next poll."""
        try:
            while True:
                params: dict[str, Any] = {"limit": 1000}
                if self.cursor is not None:
                    params["since"] = self.cursor
                r = self.http.get("/api/v1/changes", params=params)
                if r.status_code == 410:
                    self.resyncs += 1
                    self.mirror, self.cursor = bootstrap(self.http)
                    continue
                r.raise_for_status()
                page = r.json()
                for change in page["changes"]:
                    apply(self.mirror, change)
                self.cursor = page["cursor"]
                if not page["has_more"]:
                    return
        except httpx.TransportError:
            self.errors += 1

    def close(self) -> None:
        self.http.close()


class SseClient:
    """Follows ``GET /api/v1/events`` in a thread with httpx-sse, resuming with
    ``Last-Event-ID``; reconnects when the daemon goes away."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.mirror: Mirror = {}
        self.cursor = ""
        self.resyncs = 0
        self.connects = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as http:
            self.mirror, self.cursor = bootstrap(http)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def snapshot(self) -> Mirror:
        with self.lock:
            return dict(self.mirror)

    def _run(self) -> None:
        while not self._stop.is_set():
            with suppress(httpx.TransportError, httpx.HTTPStatusError):
                self._follow()
            self._stop.wait(0.1)  # the daemon is restarting: try again shortly

    def _follow(self) -> None:
        # A read timeout longer than the heartbeat interval: an idle stream is alive.
        with (
            httpx.Client(base_url=self.base, timeout=httpx.Timeout(5, read=30)) as http,
            connect_sse(
                http, "GET", "/api/v1/events", headers={"Last-Event-ID": self.cursor}
            ) as source,
        ):
            if source.response.status_code == 410:
                self._resync(http)
                return
            source.response.raise_for_status()
            self.connects += 1
            for event in source.iter_sse():
                if self._stop.is_set():
                    return
                if event.event == "resync":
                    self._resync(http)
                    return
                if event.event != "change":
                    continue
                with self.lock:
                    apply(self.mirror, json.loads(event.data))
                    self.cursor = event.id

    def _resync(self, http: httpx.Client) -> None:
        mirror, cursor = bootstrap(http)
        with self.lock:
            self.resyncs += 1
            self.mirror, self.cursor = mirror, cursor


class WebhookReceiver:
    """Receives ``fsledger run --webhook`` deliveries: verifies each with the
    ``standardwebhooks`` package, applies a batch that follows its cursor, and asks the API
    when one does not (``since`` is not its cursor): a 410 there means resync."""

    def __init__(self, secret: str, api_base: str) -> None:
        self.verifier = standardwebhooks.Webhook(secret)
        self.api_base = api_base
        self.mirror: Mirror = {}
        self.cursor: str | None = None
        self.resyncs = 0
        self.rejected = 0
        self.seen_ids: set[str] = set()
        self.down = False
        self.refused_while_down = 0
        self.lock = threading.Lock()
        self.url = ""

    def snapshot(self) -> Mirror:
        with self.lock:
            return dict(self.mirror)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        """The HTTP status to answer one delivery with."""
        with self.lock:
            if self.down:
                self.refused_while_down += 1
                return 503
            try:
                payload = self.verifier.verify(body, headers)
            except standardwebhooks.WebhookVerificationError:
                self.rejected += 1
                return 400
            self.seen_ids.add(headers["webhook-id"])
            if payload["type"] == "resync_needed":
                self._resync()
                return 204
            if self.cursor is not None and payload["since"] != self.cursor:
                with httpx.Client(base_url=self.api_base, timeout=10) as http:
                    r = http.get("/api/v1/changes", params={"since": self.cursor, "limit": 1})
                if r.status_code == 410:
                    self._resync()
            mine = int(self.cursor.split(":")[1]) if self.cursor else 0
            for change in payload["changes"]:
                if change["seq"] > mine:  # a redelivery holds what the mirror has already
                    apply(self.mirror, change)
            if int(payload["cursor"].split(":")[1]) >= mine or self.cursor is None:
                self.cursor = payload["cursor"]
            return 204

    def _resync(self) -> None:
        with httpx.Client(base_url=self.api_base, timeout=10) as http:
            self.mirror, self.cursor = bootstrap(http)
        self.resyncs += 1


@contextmanager
def serve_receiver(receiver: WebhookReceiver) -> Iterator[WebhookReceiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
