"""The CLI as a person reads it: the status table, human sizes and times, and progress
bars on a terminal only (a real pseudo-terminal against a pipe)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsledger.cli import main

FSLEDGER = [sys.executable, "-m", "fsledger.cli"]


def invoke(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--db", url, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def make_tree(root: Path, files: int, size: int = 1000) -> None:
    for i in range(files):
        d = root / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(bytes([i % 256]) * size)


def test_status_without_repository_is_a_table_with_reasons(store_url: str, tmp_path: Path) -> None:
    photos, nas = tmp_path / "photos", tmp_path / "nas"
    make_tree(photos, 12, size=250_000)  # 3.0 MB
    make_tree(nas, 2)
    assert invoke(store_url, "repo", "add", str(photos))[0] == 0
    assert invoke(store_url, "repo", "add", str(nas))[0] == 0
    shutil.rmtree(nas)
    code, _, err = invoke(store_url, "scan", "nas")
    assert code == 4, err

    code, out, err = invoke(store_url, "status")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "STATE", "FILES", "SIZE", "LAST", "SCAN", "REASON"]
    by_name = {row.split()[0]: row for row in rows}
    assert set(by_name) == {"photos", "nas"}
    assert by_name["photos"].split()[1:5] == ["online", "12", "3.0", "MB"]
    offline = by_name["nas"]
    assert offline.split()[1:5] == ["offline", "2", "2.0", "kB"]
    # The reason in a few words and since when (the operation's row keeps the whole error).
    assert offline.split()[6:9] == ["root", "missing", "since"], offline
    # The columns line up: every row's FILES ends where the header's does.
    end = header.index("FILES") + len("FILES")
    assert all(row[end - 1].isdigit() and row[end] == " " for row in rows)

    # --json stays exact: bytes and RFC 3339 times in UTC.
    code, out, _ = invoke(store_url, "status", "--json")
    statuses = {s["name"]: s for s in json.loads(out)}
    assert statuses["photos"]["total_bytes"] == 12 * 250_000
    assert (
        statuses["photos"]["last_scan_time"].endswith("Z")
        or "+00:00" in (statuses["photos"]["last_scan_time"])
    )
    assert statuses["nas"]["state"] == "offline"


def test_scan_and_ops_speak_in_human_units(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_tree(root, 4, size=500_000)
    code, out, err = invoke(store_url, "repo", "add", str(root))
    assert code == 0, err
    line = out.splitlines()[-1]
    assert line.startswith("photos: 4 files, 4 added, 0 updated, 0 removed, 0 moved, ")
    assert "4 hashed (2.0 MB) in " in line
    code, out, _ = invoke(store_url, "ops")
    assert "startup" in out and "scanned 4, added 4" in out
    code, out, _ = invoke(store_url, "files", "photos")
    assert out.splitlines()[0].split()[0:2] == ["500", "kB"]
    code, out, _ = invoke(store_url, "files", "photos", "--json")
    assert json.loads(out.splitlines()[0])["size"] == 500_000


def run_on(stdout: str, args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run fsledger with its stdout on a pseudo-terminal (``tty``) or a pipe; return the
    exit code and everything written to stdout."""
    if stdout == "pipe":
        done = subprocess.run([*FSLEDGER, *args], env=env, capture_output=True, timeout=120)
        return done.returncode, done.stdout
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*FSLEDGER, *args], env=env, stdout=slave, stderr=subprocess.DEVNULL, close_fds=True
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=30), out


@pytest.mark.parametrize("stdout", ["tty", pytest.param("pipe", marks=pytest.mark.slow)])
def test_a_progress_bar_on_a_terminal_only(stdout: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_tree(root, 2500, size=100)  # the reconciler reports every thousand files
    env = {
        **os.environ,
        "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "l.db"),
        "COLUMNS": "120",
    }
    code, first = run_on(stdout, ["repo", "add", str(root)], env)
    assert code == 0, first
    (root / "d0" / "new.bin").write_bytes(b"new")
    code, rescan = run_on(stdout, ["scan"], env)
    assert code == 0, rescan
    code, verify = run_on(stdout, ["scan", "--verify"], env)
    assert code == 0, verify
    code, as_json = run_on(stdout, ["scan", "--json"], env)
    assert code == 0, as_json

    bars = {
        b"indexing photos": first,
        b"scanning photos": rescan,
        b"verifying photos": verify,
    }
    for label, out in bars.items():
        if stdout == "tty":
            assert label in out, out
            # Drawn in place (carriage returns), hiding the cursor meanwhile; the rescan's
            # bar counts against the 2,500 records it holds.
            assert b"\r" in out and b"\x1b[?25l" in out, out
        else:
            assert label not in out and b"\r" not in out and b"\x1b[" not in out, out
    if stdout == "tty":
        assert b"/2500" in rescan, rescan
    assert b"2,501 files" in rescan
    # --json is JSON even on a terminal: no bar.
    assert b"scanning" not in as_json and b"\x1b[" not in as_json
    assert json.loads(as_json.decode().strip().splitlines()[-1])["files_scanned"] == 2501
