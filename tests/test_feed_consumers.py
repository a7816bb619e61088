"""Issue 14, done means: three consumers written against docs/api.md with stock libraries (a
poller on httpx, an SSE client on httpx-sse, a webhook receiver verifying with
``standardwebhooks``) follow the real daemon (``fsledger run`` in its own process, with its
live watcher) on both stores, and keep mirrors exactly equal to the disk through a
non-UTF-8 name, a daemon restart, a receiver outage, a restore from backup (each consumer
is told to resync, and is exact after it) and a purge."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from api_support import backend_url, backup_database, free_port, restore_database
from feed_consumers import Mirror, Poller, SseClient, WebhookReceiver, serve_receiver
from oracle import oracle_files
from support import wait_for

SRC = str(Path(__file__).resolve().parent.parent / "src")
SECRET = "whsec_" + base64.b64encode(b"consumer-test secret of 32 bytes").decode()
ODD = b"\xe9t\xe9-\xff.jpg"
"""A name that is not UTF-8 (Latin-1 and a stray byte)."""
MIRROR_TIMEOUT_S = 90.0
"""How long three consumers may take to follow a change: they poll, stream and receive."""


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from backend_url(request.param, tmp_path)


class Daemon:
    """``fsledger run`` from this checkout's sources, as an operator starts it."""

    def __init__(self, db: str, port: int, hook: str, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.args = [sys.executable, "-m", "fsledger.cli", "run", "--listen", f"127.0.0.1:{port}"]
        self.args += ["--webhook", hook, "--webhook-from", "start"]
        self.env = {
            **os.environ,
            "PYTHONPATH": SRC,
            "FSLEDGER_DATABASE_URL": db,
            "FSLEDGER_WEBHOOK_SECRET": SECRET,
            "FSLEDGER_LOG_LEVEL": "WARNING",
        }
        self.env.pop("FSLEDGER_API_TOKEN", None)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._out, stderr=self._out)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(self.base + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("fsledger run to answer", healthy, timeout=60)

    def stop(self) -> None:
        assert self.proc is not None and self._out is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.log.read_text()[-3000:]
        self._out.close()


def populate(root: Path, files: dict[bytes, bytes]) -> None:
    for rel, content in files.items():
        path = os.path.join(os.fsencode(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


@pytest.mark.slow
def test_three_consumers_stay_exact_through_restart_outage_restore_and_purge(
    url: str, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    populate(
        root,
        {
            b"2024/a.jpg": b"alpha",
            b"2024/b.jpg": b"bravo",
            b"2024/trip/c.jpg": b"charlie",
            b"notes.txt": b"notes",
            ODD: b"odd from the start",
        },
    )
    roots: dict[str, Path] = {}
    receiver = WebhookReceiver(SECRET, "")
    with serve_receiver(receiver):
        daemon = Daemon(url, free_port(), receiver.url, tmp_path / "daemon.log")
        receiver.api_base = daemon.base
        daemon.start()
        http = httpx.Client(base_url=daemon.base, timeout=20)
        poller = Poller(daemon.base)
        sse = SseClient(daemon.base)
        try:
            r = http.post("/api/v1/repositories", json={"path": str(root)})
            assert r.status_code == 201, r.text
            roots[r.json()["id"]] = root
            sse.start()

            def want() -> Mirror:
                return {
                    (rid, path): value
                    for rid, tree in roots.items()
                    for path, value in oracle_files(tree).items()
                }

            def wrong_mirrors() -> list[str]:
                poller.poll()
                expected = want()
                mirrors = {
                    "poller": poller.mirror,
                    "sse": sse.snapshot(),
                    "webhook": receiver.snapshot(),
                }
                return [name for name, m in mirrors.items() if m != expected]

            def exact(what: str) -> None:
                wait_for(
                    what,
                    lambda: not wrong_mirrors(),
                    MIRROR_TIMEOUT_S,
                    detail=lambda: f"mirrors that differ: {wrong_mirrors()}",
                )

            exact("three exact mirrors after the first index")

            # Live changes, one of them a name that is not UTF-8.
            (root / "2024/a.jpg").write_bytes(b"alpha, edited")
            (root / "2024/b.jpg").unlink()
            os.rename(root / "2024/trip", root / "2024/holiday")
            populate(root, {b"new/" + ODD: b"odd, new", b"new/d.jpg": b"delta"})
            os.rename(os.path.join(os.fsencode(root), ODD), os.fsencode(root / "renamed.jpg"))
            exact("exact mirrors after live changes")

            # A daemon restart, with changes made while it is down.
            daemon.stop()
            (root / "down.jpg").write_bytes(b"made while down")
            (root / "notes.txt").unlink()
            daemon.start()
            exact("exact mirrors after a restart")
            assert sse.connects >= 2

            # A receiver outage: deliveries are refused, then retried until acknowledged.
            receiver.down = True
            populate(root, {b"outage/1.jpg": b"one", b"outage/2.jpg": b"two"})
            wait_for("a refused delivery", lambda: receiver.refused_while_down > 0)
            receiver.down = False
            exact("exact mirrors after the receiver's outage")

            # A restore from a backup: the changes after it are lost to the database (the
            # disk still has them); each consumer must be told, and be exact after.
            backup = tmp_path / "backup"
            backup_database(url, backup)
            populate(root, {b"after-backup/a2.jpg": b"a2", b"after-backup/b2.jpg": b"b2"})
            (root / "down.jpg").unlink()
            exact("exact mirrors after the backup")
            before = (poller.resyncs, sse.resyncs, receiver.resyncs)
            assert before == (0, 0, 0)
            daemon.stop()
            restore_database(url, backup)
            daemon.start()
            (root / "after-restore.jpg").write_bytes(b"restored, then written")
            exact("exact mirrors after the restore")
            assert poller.resyncs >= 1, "the poller was not told to resync"
            assert sse.resyncs >= 1, "the SSE client was not told to resync"
            assert receiver.resyncs >= 1, "the webhook receiver was not told to resync"

            # A second repository, then purged: every mirror drops it.
            other = tmp_path / "other"
            populate(other, {b"o/1.jpg": b"other one", b"o/2.jpg": b"other two"})
            r = http.post("/api/v1/repositories", json={"path": str(other)})
            assert r.status_code == 201, r.text
            roots[r.json()["id"]] = other
            exact("exact mirrors with a second repository")
            head = http.get("/healthz").json()["cursor"]
            r = http.delete(f"/api/v1/repositories/{r.json()['id']}", params={"purge": "true"})
            assert r.status_code == 200, r.text
            del roots[r.json()["id"]]
            exact("exact mirrors after the purge")
            assert int(http.get("/healthz").json()["cursor"].split(":")[1]) > int(
                head.split(":")[1]
            )
            assert receiver.rejected == 0  # every delivery verified
            shutil.rmtree(other)
        finally:
            sse.stop()
            poller.close()
            http.close()
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
