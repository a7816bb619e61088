"""``fsledger changes`` and ``fsledger duplicates``: the feed and duplicate groups for scripts."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fsledger.api.feed import Feed, Retention
from fsledger.cli import main
from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.model import Repository


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return "sqlite://" + str(tmp_path / "ledger.db")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "one.txt").write_bytes(b"same content")
    (tree / "dir" / "two.txt").write_bytes(b"same content")
    (tree / "three.txt").write_bytes(b"different")
    return tree


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    led = Ledger(Settings(database_url=db_url, max_concurrency=2))
    try:
        yield led
    finally:
        led.close()


@pytest.fixture
def repo(ledger: Ledger, root: Path) -> Repository:
    r = ledger.add_repository(str(root), "tree")
    ledger.scan(r)
    return r


def fsl(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--db", db_url, *args])


def test_changes_json_then_exactly_what_follows(
    db_url: str, ledger: Ledger, repo: Repository, root: Path
) -> None:
    result = fsl(db_url, "changes", "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    assert first["changes"][0]["kind"] == "repository_added"
    assert sorted(c["path"] for c in first["changes"][1:]) == [
        "dir/two.txt",
        "one.txt",
        "three.txt",
    ]
    assert first["has_more"] is False

    (root / "four.txt").write_bytes(b"4")
    (root / "one.txt").unlink()
    ledger.scan(repo)
    result = fsl(db_url, "changes", "--since", first["cursor"], "--json")
    after = json.loads(result.stdout)
    assert [(c["kind"], c["path"]) for c in after["changes"]] == [
        ("created", "four.txt"),
        ("deleted", "one.txt"),
    ]
    again = json.loads(fsl(db_url, "changes", "--since", after["cursor"], "--json").stdout)
    assert again == {"changes": [], "cursor": after["cursor"], "has_more": False}


def test_changes_text_and_limit(db_url: str, repo: Repository) -> None:
    result = fsl(db_url, "changes", "--limit", "3")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("tree: " in line for line in lines)
    assert "repository_added" in lines[0] and all("created" in line for line in lines[1:])
    cursor = stderr_cursor(result.stderr)
    rest = fsl(db_url, "changes", "--since", cursor)
    assert len(rest.stdout.splitlines()) == 1
    assert "more" not in rest.stderr


def stderr_cursor(stderr: str) -> str:
    line = next(x for x in stderr.splitlines() if x.startswith("cursor: "))
    return line.split()[1]


def test_changes_filtered_by_repository(
    db_url: str, ledger: Ledger, repo: Repository, tmp_path: Path
) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    (other_root / "x").write_bytes(b"x")
    ledger.scan(ledger.add_repository(str(other_root), "other"))
    out = json.loads(fsl(db_url, "changes", "--repo", "other", "--json").stdout)
    assert [(c["kind"], c["path"]) for c in out["changes"]] == [
        ("repository_added", ""),
        ("created", "x"),
    ]


def test_changes_past_retention_exits_5_with_the_cursor_to_resume(
    db_url: str, ledger: Ledger, repo: Repository, root: Path
) -> None:
    old = Feed(ledger.store).oldest()
    (root / "new.txt").write_bytes(b"new")
    ledger.scan(repo)
    Retention(max_age_s=0, max_entries=1).prune(ledger.store)
    result = fsl(db_url, "changes", "--since", str(old))
    assert result.exit_code == 5
    head = str(Feed(ledger.store).head())
    assert "resync needed" in result.stderr and "retention" in result.stderr
    assert result.stderr.rstrip().endswith(f"follow the feed from {head}")
    # Without --since the CLI shows what is kept.
    kept = json.loads(fsl(db_url, "changes", "--json").stdout)
    assert [c["path"] for c in kept["changes"]] == ["new.txt"]
    assert fsl(db_url, "changes", "--since", "garbage").exit_code == 2


def test_changes_follow_prints_changes_as_they_happen(
    db_url: str, ledger: Ledger, repo: Repository, root: Path
) -> None:
    head = str(Feed(ledger.store).head())
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsledger.cli", "--db", db_url, "changes", "--follow", "--json"]
        + ["--since", head],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        (root / "live.txt").write_bytes(b"live")
        ledger.scan(repo)  # another process writes the feed
        line: Any = json.loads(lines.get(timeout=30))
        assert (line["kind"], line["path"]) == ("created", "live.txt")
        assert f":{line['seq']}:" in line["cursor"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")


def test_duplicates_text_and_json(db_url: str, repo: Repository) -> None:
    out = json.loads(fsl(db_url, "duplicates", "--json").stdout)
    assert out["wasted_bytes"] == len(b"same content")
    [group] = out["groups"]
    assert [f["path"] for f in group["files"]] == ["dir/two.txt", "one.txt"]
    text = fsl(db_url, "duplicates", "tree")
    assert text.exit_code == 0
    assert "tree: dir/two.txt" in text.stdout and "tree: one.txt" in text.stdout
    assert "1 group(s), 12 B wasted" in text.stderr
    assert fsl(db_url, "duplicates", "nonesuch").exit_code == 2


def test_changes_loads_no_web_stack(db_url: str, repo: Repository) -> None:
    """The feed is in the core: ``fsledger changes`` imports neither FastAPI, uvicorn nor
    prometheus (it paid 0.56 s of imports for them through ``fsledger.api``)."""
    probe = (
        "import sys\n"
        "from fsledger.cli import main\n"
        f"main(['--db', {db_url!r}, 'changes', '--json'], standalone_mode=False)\n"
        "web = [m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'orjson')"
        " if m in sys.modules]\n"
        "print('WEB', web)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "WEB []" in out.stdout, out.stdout + out.stderr
