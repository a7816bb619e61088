"""A hash that hangs (a dead network mount) is abandoned with a warning; the scan goes on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fsledger import hashing
from fsledger.config import Settings
from fsledger.ledger import Ledger


def test_hung_read_is_abandoned_and_the_scan_completes(tmp_path: Path, monkeypatch, caplog):
    root = tmp_path / "nfs"
    root.mkdir()
    (root / "stuck.mov").write_bytes(b"v" * 100)
    (root / "fine.jpg").write_bytes(b"j" * 10)
    release = threading.Event()
    real = hashing.hash_many

    def hanging(root, paths, algo):
        if any(p.endswith(b"stuck.mov") for p in paths):
            release.wait(30)  # what a read on a dead NFS server looks like
        return real(root, paths, algo)

    monkeypatch.setattr(hashing, "hash_many", hanging)
    settings = Settings(
        database_url="sqlite://" + str(tmp_path / "db"), max_concurrency=1, hash_timeout_s=0.3
    )
    try:
        with Ledger(settings) as ledger:
            repo = ledger.add_repository(os.fsencode(root))
            stats = ledger.scan(repo)
            assert any("timed out" in e for e in stats.errors)
            assert "Failed to calculate hash" in caplog.text
            # The files are recorded (they exist); the unhashed one is retried next scan.
            assert {r.path for r in ledger.files(repo)} == {b"fine.jpg", b"stuck.mov"}
    finally:
        release.set()


@pytest.mark.parametrize("bad", ["/proc/forbidden/db.sqlite", "/dev/null/x.db"])
def test_unusable_sqlite_location_is_a_clear_error(tmp_path: Path, bad: str):
    from click.testing import CliRunner

    from fsledger.cli import main

    result = CliRunner().invoke(main, ["--db", "sqlite://" + bad, "repo", "list"])
    assert result.exit_code == 1
    assert "cannot be created" in result.stderr and "Traceback" not in result.stderr
