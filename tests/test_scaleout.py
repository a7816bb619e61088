"""Several agents on one store: each repository has one owner; a standby takes over when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fsledger.config import Settings
from fsledger.errors import LeaseLost
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import Change, ChangeKind
from support import wait_for


def make_photos(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    return root


def test_one_owner_and_takeover_when_it_stops(settings: Settings, tmp_path: Path) -> None:
    root = make_photos(tmp_path / "lib")
    with Ledger(settings) as first, Ledger(settings) as second:
        repo = first.add_repository(os.fsencode(root))
        a = SyncManager(first, settings)
        a.start()
        b = SyncManager(second, settings)
        b.start()
        try:
            assert a.wait_idle(30)
            assert [r.id for r in a.repositories()] == [repo.id]
            assert b.repositories() == []  # standing by
            assert first.store.count_records(repo.id) == 3
            a.stop()
            # The owner's writer is fenced: it may not write any more.
            with pytest.raises(LeaseLost):
                first.writer(repo).apply([Change(ChangeKind.DELETED, b"a/0.jpg")])
            wait_for(
                "agent b to own the repository",
                lambda: [r.id for r in b.repositories()] == [repo.id],
            )
            (root / "a" / "new.jpg").write_bytes(b"n")
            b.trigger_reconciliation(repo.id)
            assert b.wait_idle(30)
            assert second.store.count_records(repo.id) == 4
        finally:
            a.stop()
            b.stop()


@pytest.mark.slow  # an agent process killed, its lease waited out
def test_standby_takes_over_from_a_killed_agent(settings: Settings, tmp_path: Path) -> None:
    root = make_photos(tmp_path / "lib")
    with Ledger(settings) as ledger:
        repo = ledger.add_repository(os.fsencode(root))
    exe = Path(sys.executable).with_name("fsledger")
    env = {**os.environ, "FSLEDGER_DATABASE_URL": settings.database_url}
    agent = subprocess.Popen(
        [exe, "run", "--no-watch", "--no-http"]
        if _has_http_flag(exe)
        else [exe, "run", "--no-watch"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Ledger(settings) as ledger:
            wait_for("the agent's first index", lambda: ledger.store.count_records(repo.id) == 3)
            standby = SyncManager(ledger, settings)
            standby.start()
            try:
                wait_for("the standby to wait for the lease", lambda: repo.id in standby._standby)
                agent.send_signal(signal.SIGKILL)
                agent.wait(10)
                wait_for(
                    "the standby to take over",
                    lambda: [r.id for r in standby.repositories()] == [repo.id],
                )
                (root / "a" / "after.jpg").write_bytes(b"a")
                standby.trigger_reconciliation(repo.id)
                assert standby.wait_idle(30)
                assert ledger.store.count_records(repo.id) == 4
            finally:
                standby.stop()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def _has_http_flag(exe: Path) -> bool:
    out = subprocess.run([exe, "run", "--help"], capture_output=True, text=True).stdout
    return "--no-http" in out
