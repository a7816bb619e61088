"""The command line, through click's CliRunner and once as a real subprocess."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fsledger.cli import main
from fsledger.config import Settings
from fsledger.errors import StoreUnavailable
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "FSLEDGER_DATABASE_URL": "sqlite://" + str(tmp_path / "cli.db"),
        "RECONCILIATION_MAX_CONCURRENCY": "2",
    }


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "2024" / "trip").mkdir(parents=True)
    (root / "2024" / "trip" / "a.jpg").write_bytes(b"A" * 1000)
    (root / "2024" / "b.jpg").write_bytes(b"B" * 2000)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"x")
    (root / "Thumbs.db").write_bytes(b"t")
    os.mkfifo(root / "pipe")
    return root


def invoke(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def files_json(env: dict[str, str], repo: str) -> dict[bytes, dict[str, Any]]:
    code, out, err = invoke(env, "files", repo, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    return {base64.b64decode(r["path_b64"]): r for r in rows}


def test_repo_add_indexes_and_files_lists_exactly_what_is_on_disk(env, photos):
    code, out, err = invoke(env, "repo", "add", str(photos), "--json")
    assert code == 0, err
    repo = json.loads(out)
    assert repo["name"] == "photos"
    assert repo["scan"]["files_added"] == 2
    assert repo["scan"]["skipped_special"] == 1
    listed = files_json(env, "photos")
    assert set(listed) == {b"2024/b.jpg", b"2024/trip/a.jpg"}
    assert listed[b"2024/b.jpg"]["size"] == 2000
    assert listed[b"2024/b.jpg"]["hash_algo"] == "blake3"


def test_scan_json_reports_changes_and_status_and_ops(env, photos):
    assert invoke(env, "repo", "add", str(photos), "--no-scan")[0] == 0
    (photos / "2024" / "new.jpg").write_bytes(b"N" * 10)
    code, out, err = invoke(env, "scan", "--json")
    assert code == 0, err
    stats = json.loads(out.splitlines()[0])
    for key in (
        "files_scanned",
        "files_added",
        "files_updated",
        "files_removed",
        "files_hashed",
        "bytes_hashed",
        "errors",
        "corrupt",
        "duration_ms",
    ):
        assert key in stats
    assert stats["files_added"] == 3
    code, out, _ = invoke(env, "status", "photos", "--json")
    status = json.loads(out)
    assert status["total_files"] == 3
    assert status["last_sync_operation"]["status"] == "completed"
    code, out, _ = invoke(env, "ops", "--json")
    assert [o["operation_type"] for o in json.loads(out)] == ["reconciliation"]


def test_awkward_names_round_trip_through_files_json(env, tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    names = [b"\xff\xfe.jpg", b"new\nline.jpg", b"x" * 255, "caf\u00e9 \u2603.jpg".encode()]
    for name in names:
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(name)
    assert invoke(env, "repo", "add", str(root))[0] == 0
    listed = files_json(env, "odd")
    assert set(listed) == set(names)
    for raw, row in listed.items():
        # path_b64 is exact; the text form always encodes (U+FFFD for bytes that are not
        # UTF-8: a lone surrogate made strict JSON parsers, and the API, fail).
        assert base64.b64decode(row["path_b64"]) == raw
        assert row["path"] == raw.decode("utf-8", "replace")
        assert row["size"] == len(raw)


def test_errors_are_one_line_with_documented_exit_codes(env, photos, tmp_path):
    code, _, err = invoke(env, "scan", "nope")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = invoke(env, "repo", "add", str(tmp_path / "missing"))
    assert code == 4 and "missing" in err
    file_root = tmp_path / "file"
    file_root.write_text("x")
    code, _, err = invoke(env, "repo", "add", str(file_root))
    assert code == 4 and "not a directory" in err
    code, _, err = invoke({**env, "RECONCILIATION_BATCH_SIZE": "many"}, "repo", "list")
    assert code == 2 and "RECONCILIATION_BATCH_SIZE" in err
    code, _, err = invoke(env, "--db", "mysql://x", "repo", "list")
    assert code == 2 and "not supported" in err


def test_guard_refuses_emptied_root_then_force_deletes(env, photos):
    assert invoke(env, "repo", "add", str(photos))[0] == 0
    for p in (photos / "2024").rglob("*.jpg"):
        p.unlink()
    for d in sorted((photos / "2024").rglob("*"), reverse=True):
        d.rmdir()
    (photos / "2024").rmdir()
    (photos / "pipe").unlink()
    (photos / "Thumbs.db").unlink()
    code, _, err = invoke(env, "scan", "photos")
    assert code == 4 and "empty" in err
    assert len(files_json(env, "photos")) == 2  # nothing deleted
    code, out, err = invoke(env, "scan", "photos", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["files_removed"] == 2
    assert files_json(env, "photos") == {}


def test_verify_exit_code_3_on_silent_corruption(env, photos, tmp_path):
    target = photos / "2024" / "b.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
    assert invoke(env, "repo", "add", str(photos))[0] == 0
    # Bitrot changes bytes without the kernel noticing (size, mtime, ctime, inode all stay);
    # every write from user space moves ctime, so the test rots the stored side instead.
    bitrot_stored_hash(tmp_path / "cli.db", b"2024/b.jpg")
    code, out, _ = invoke(env, "scan", "photos", "--json")
    assert code == 0 and json.loads(out)["corrupt"] == []
    code, out, err = invoke(env, "scan", "photos", "--verify", "--json")
    assert code == 3
    assert json.loads(out)["corrupt"] == ["2024/b.jpg"]
    assert "CORRUPT" not in err  # --json keeps stderr for logs
    # The stored hash is kept: the ledger still says what the file should contain.
    assert files_json(env, "photos")[b"2024/b.jpg"]["hash"] == "0" * 64


def bitrot_stored_hash(db: Path, path: bytes) -> None:
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE file_records SET content_hash = ? WHERE file_path = ?", ("0" * 64, path)
        )


def test_repo_remove_keeps_records_unless_purge(env, photos):
    assert invoke(env, "repo", "add", str(photos), "--name", "lib")[0] == 0
    code, out, _ = invoke(env, "repo", "list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["lib"]
    assert invoke(env, "repo", "add", str(photos), "--if-missing", "--no-scan")[0] == 0
    code, _, err = invoke(env, "repo", "add", str(photos))
    assert code == 2 and "already" in err
    assert invoke(env, "repo", "remove", str(photos), "--purge")[0] == 0
    code, out, _ = invoke(env, "repo", "list", "--json")
    assert json.loads(out) == []


def test_unreachable_postgres_is_a_clear_error(env):
    code, _, err = invoke(
        env, "--db", "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", "repo", "list"
    )
    assert code == 1
    assert "PostgreSQL" in err and "Traceback" not in err


@pytest.mark.slow  # a whole `run --once` process (test_security keeps one in the fast loop)
def test_real_subprocess_run_once(env, photos, tmp_path):
    """The installed entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("fsledger")
    full_env = {**os.environ, **env}
    subprocess.run([exe, "repo", "add", str(photos), "--no-scan"], env=full_env, check=True)
    done = subprocess.run(
        [exe, "run", "--once"], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Reconciliation completed: scanned=2 added=2" in done.stderr
    out = subprocess.run(
        [exe, "files", "photos", "--json"], env=full_env, capture_output=True, check=True
    ).stdout
    assert len(out.splitlines()) == 2


@pytest.mark.slow  # a daemon on a pseudo-terminal, its startup scan, then Ctrl-C: ~5 s
def test_ctrl_c_in_a_terminal_stops_run_cleanly(env, tmp_path):
    """Ctrl-C reaches the whole foreground process group, hashing workers included: the daemon
    must still stop, exit 0, print no traceback and leave no process behind."""
    import signal
    import time

    root = tmp_path / "many"
    root.mkdir()
    for i in range(400):  # more than one hashing chunk: the worker processes are started
        (root / f"{i}.jpg").write_bytes(b"%d" % i * 50)
    exe = Path(sys.executable).with_name("fsledger")
    full_env = {**os.environ, **env}
    subprocess.run([exe, "repo", "add", str(root), "--no-scan"], env=full_env, check=True)
    proc = subprocess.Popen(
        [exe, "run", "--no-http"],
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [exe, "status", "many", "--json"], env=full_env, capture_output=True, text=True
            ).stdout
            if out and json.loads(out)["total_files"] == 400:
                break
            assert time.monotonic() < deadline, "the startup scan did not finish"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "Sync manager stopped" in err
        # The forkserver and resource tracker see the parent gone and end on their own.
        deadline = time.monotonic() + 20
        while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout:
            assert time.monotonic() < deadline, "processes of the daemon outlived it"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_briefly_unreachable_database_is_retried(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Opening the store is tried three times, 0.5 s then 1 s apart: a database that
    answers by the third try serves the command; one that never answers fails it with
    its one error line and exit code 1."""
    import fsledger.cli
    import fsledger.ledger

    real = fsledger.ledger.Ledger
    tries: list[float] = []
    waits: list[float] = []

    def flaky(*args: object, **kw: object) -> fsledger.ledger.Ledger:
        tries.append(0)
        if len(tries) < down:
            raise StoreUnavailable("PostgreSQL at ... is unreachable")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fsledger.ledger, "Ledger", flaky)
    monkeypatch.setattr(time, "sleep", waits.append)  # the time module fsledger.cli uses
    down = 3
    code, out, _err = invoke(env, "repo", "list", "--json")
    assert (code, json.loads(out), len(tries), waits) == (0, [], 3, [0.5, 1.0])
    tries.clear()
    waits.clear()
    down = 4
    code, _out, err = invoke(env, "repo", "list", "--json")
    assert (code, len(tries), waits) == (1, 3, [0.5, 1.0])
    assert err.strip() == "fsledger: error: PostgreSQL at ... is unreachable"


def test_quiet_for_holds_the_running_managers_scheduled_runs_and_status_says_why(env, photos):
    code, out, _ = invoke(env, "repo", "add", str(photos), "--json")
    assert code == 0
    repo_id = json.loads(out)["id"]
    code, out, _ = invoke(env, "quiet", "--for", "2h", "--by", "pipeline", "--json")
    assert code == 0
    until = datetime.fromisoformat(json.loads(out)["until"])
    assert timedelta(hours=1, minutes=59) < until - datetime.now(UTC) <= timedelta(hours=2)
    assert invoke(env, "quiet", "--for", "8d")[0] == 2  # a courtesy, not an off switch
    settings = Settings.from_env(env, reconciliation_interval_s=1.0, daily_at=None)
    with Ledger(settings) as ledger:
        manager = SyncManager(ledger, replace(settings, daily_at=None), pressure=lambda: None)
        manager.start()
        try:
            assert manager.wait_idle(30)

            def waiting() -> str | None:
                code, out, _ = invoke(env, "status", repo_id, "--json")
                sched = json.loads(out)["schedule"]
                return sched and sched["waiting_reason"]

            deadline = time.monotonic() + 20
            while not waiting():
                assert time.monotonic() < deadline, "no waiting run shown"
                time.sleep(0.05)
            assert "quiet requested by pipeline" in (waiting() or "")
            code, out, _ = invoke(env, "status", repo_id)
            assert "waiting since" in out and "quiet requested by pipeline" in out
            assert invoke(env, "quiet", "--off")[0] == 0
            deadline = time.monotonic() + 20
            while waiting():
                assert time.monotonic() < deadline, "the run still waits after --off"
                time.sleep(0.05)
            code, out, _ = invoke(env, "ops", repo_id, "--json")
            waits = [o for o in json.loads(out) if o["operation_type"] == "deferral"]
        finally:
            manager.stop()
    assert waits and "quiet requested by pipeline" in waits[0]["error_message"]
