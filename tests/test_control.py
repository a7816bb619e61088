"""``fsledger scan`` while ``fsledger run`` keeps the repository: the daemon runs the scan
(its writer stays the only one) and the command prints what it would have printed.

Real daemons and real commands, both stores; the ledger is compared with the disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsledger.control import socket_path
from fsledger.manager import REPO_POLL_S
from fsledger.store import open_store
from support import assert_exact, wait_for

EXE = str(Path(sys.executable).with_name("fsledger"))
ASKED = "asked for by 'fsledger scan'"


def cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, exe: str = EXE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, *args],
        env=env,
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def env(store_url: str, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FSLEDGER_")}
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    return {
        **base,
        "FSLEDGER_DATABASE_URL": store_url,
        "RECONCILIATION_MAX_CONCURRENCY": "2",
        "XDG_RUNTIME_DIR": str(runtime),
    }


@pytest.fixture
def library(tmp_path: Path, env: dict[str, str]) -> Path:
    root = tmp_path / "lib"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(5):
            (root / f"d{d}" / f"{i}.jpg").write_bytes(b"%d-%d" % (d, i) * 100)
    done = cli(env, "repo", "add", str(root), "--name", "lib", "--json")
    assert done.returncode == 0, done.stderr
    return root


class Daemon:
    """``fsledger run`` without its watcher: what changes on disk is found by the scans."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [EXE, "run", "--no-http", "--no-watch"],
                env={**env, "FSLEDGER_LOG_LEVEL": "INFO"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("the control socket", lambda: "Control socket at" in self.text(), 60)
        wait_for("the startup scan", lambda: "Reconciliation completed" in self.text(), 60)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def asked(self) -> int:
        return self.text().count(ASKED)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def daemon(env: dict[str, str], tmp_path: Path, library: Path) -> Iterator[Daemon]:
    d = Daemon(env, tmp_path / "run.log")
    try:
        yield d
    finally:
        d.stop()


def _exact(env: dict[str, str], root: Path, name: str = "lib") -> None:
    """The records of repository ``name`` equal the disk below ``root``."""
    store = open_store(env["FSLEDGER_DATABASE_URL"])
    try:
        (repo,) = [r for r in store.list_repositories() if r.name == name]
        assert_exact(store, repo, root)
    finally:
        store.close()


def test_scan_is_run_by_the_daemon_and_printed_as_the_command_prints_it(
    env: dict[str, str], daemon: Daemon, library: Path
) -> None:
    (library / "d0" / "0.jpg").unlink()
    (library / "d1" / "new.jpg").write_bytes(b"new")
    os.rename(library / "d2", library / "moved")
    served = cli(env, "scan", "lib", "--json")
    assert served.returncode == 0, served.stderr
    assert daemon.asked() == 1
    data = json.loads(served.stdout)
    assert data["repository"] == "lib"
    assert data["files_removed"] >= 1 and data["files_added"] >= 1
    assert data["files_moved"] + data["files_added"] >= 6  # the renamed folder's files
    _exact(env, library)

    # The text form, and the command's own scan once the daemon is gone: the same lines
    # but the figures (a file written within the racy window is hashed again by a scan).
    text_served = cli(env, "scan", "lib")
    assert daemon.asked() == 2
    daemon.stop()
    alone = cli(env, "scan", "lib", "--json")
    text_alone = cli(env, "scan", "lib")
    assert daemon.asked() == 2
    assert alone.returncode == text_alone.returncode == text_served.returncode == 0
    assert json.loads(alone.stdout).keys() == data.keys()
    figures = re.compile(r"[0-9][0-9,.]*( ?[kMG]?B| ?m?s)?")
    assert figures.sub("N", text_served.stdout) == figures.sub("N", text_alone.stdout)
    assert re.fullmatch(
        r"lib: N files, N added, N updated, N removed, N moved, N hashed \(N\) in N\n",
        figures.sub("N", text_served.stdout),
    )
    assert text_served.stderr == text_alone.stderr == ""
    _exact(env, library)


def test_every_form_of_the_command_is_served(
    env: dict[str, str], daemon: Daemon, library: Path, tmp_path: Path
) -> None:
    """By name, id, root path relative to the command's directory, every repository (no
    REPO), --verify; through the fast entry and through click (a setting in the
    environment sends the command to click, which asks the daemon too)."""
    repo_id = json.loads(cli(env, "status", "lib", "--json").stdout)["repository_id"]
    forms: list[tuple[list[str], dict[str, str], Path | None]] = [
        (["scan", repo_id, "--json"], env, None),
        (["scan", "lib", "--json"], env, library / "d1"),
        (["scan", "..", "--json"], env, library / "d1"),
        (["scan", "--json"], env, None),
        (["scan", "--verify", "--json", "lib"], env, None),
        (["scan", "lib", "--json"], {**env, "FSLEDGER_HASH_ALGO": "blake3"}, None),
        (["--db", env["FSLEDGER_DATABASE_URL"], "scan", "lib", "--json"], env, tmp_path),
    ]
    for n, (args, form_env, cwd) in enumerate(forms, start=1):
        out = cli(form_env, *args, cwd=cwd)
        assert out.returncode == 0, (args, out.stderr)
        assert json.loads(out.stdout)["files_scanned"] == 15, args
        assert daemon.asked() == n, args
    verified = json.loads(cli(env, "scan", "--verify", "lib", "--json").stdout)
    assert verified["files_hashed"] == 15 and not verified["corrupt"]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a terminal")
def test_on_a_terminal_the_command_says_the_daemon_runs_its_scan(
    env: dict[str, str], daemon: Daemon
) -> None:
    from fsledger.control import ACCEPTED_NOTE

    shown = subprocess.run(
        ["script", "-qec", f"{EXE} scan lib", "/dev/null"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown
    assert ACCEPTED_NOTE in shown.stdout and "lib: 15 files" in shown.stdout
    assert daemon.asked() == 1
    piped = cli(env, "scan", "lib")
    assert ACCEPTED_NOTE not in piped.stderr + piped.stdout


def test_errors_of_a_served_scan_are_the_commands_errors(
    env: dict[str, str], daemon: Daemon, library: Path
) -> None:
    """The root gone: the daemon's scan fails as the command's would (same line, same exit
    code), and the records are kept."""
    shutil.move(library, library.with_name("away"))
    served = cli(env, "scan", "lib", "--json")
    assert daemon.asked() == 1
    daemon.stop()
    alone = cli(env, "scan", "lib", "--json")
    assert served.returncode == alone.returncode != 0
    assert served.stderr == alone.stderr
    assert "fsledger: error:" in served.stderr
    assert json.loads(served.stdout) == json.loads(alone.stdout)
    shutil.move(library.with_name("away"), library)
    _exact(env, library)


def _operations(env: dict[str, str], name: str) -> list[str]:
    """The operation types of repository ``name``, oldest first."""
    store = open_store(env["FSLEDGER_DATABASE_URL"])
    try:
        (repo,) = [r for r in store.list_repositories() if r.name == name]
        return [op.operation_type.value for op in reversed(store.recent_operations(repo.id, 50))]
    finally:
        store.close()


def _tree(root: Path, files: int) -> None:
    for i in range(files):
        (root / f"e{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"e{i % 3}" / f"{i}.jpg").write_bytes(b"%d" % i * 50)


def test_a_repository_added_while_the_daemon_runs_is_indexed_by_the_daemon_once(
    env: dict[str, str], daemon: Daemon, tmp_path: Path
) -> None:
    """``repo add`` hands its first index to the daemon, which would otherwise pick the new
    repository up at its next poll and index it a second time beside the command's own
    index; the command prints what it prints when it indexes by itself."""
    second, third = tmp_path / "second", tmp_path / "third"
    _tree(second, 20)
    _tree(third, 7)
    added = cli(env, "repo", "add", str(second), "--name", "second", "--json")
    assert added.returncode == 0, added.stderr
    data = json.loads(added.stdout)
    assert data["name"] == "second" and data["path"] == str(second)
    assert data["scan"]["files_added"] == 20 and data["scan"]["files_hashed"] == 20
    assert daemon.text().count("asked for by 'fsledger repo add'") == 1
    _exact(env, second, "second")

    shown = cli(env, "repo", "add", str(third), "--name", "third")
    assert shown.returncode == 0 and shown.stderr == "", shown
    assert daemon.text().count("asked for by 'fsledger repo add'") == 2
    # Past the daemon's poll of the repository list: no second index of either.
    time.sleep(REPO_POLL_S + 1.5)
    assert _operations(env, "second") == _operations(env, "third") == ["startup"]

    # Without the daemon, the command's own index prints the same lines.
    daemon.stop()
    alone = tmp_path / "alone"
    _tree(alone, 7)
    by_itself = cli(env, "repo", "add", str(alone), "--name", "alone")
    assert by_itself.returncode == 0 and by_itself.stderr == "", by_itself
    figures = re.compile(r"[0-9a-f-]{36}|/[^ )]*|[0-9][0-9,.]*( ?[kMG]?B| ?m?s)?")
    assert figures.sub("N", shown.stdout).replace("third", "X") == figures.sub(
        "N", by_itself.stdout
    ).replace("alone", "X")
    alone_json = cli(env, "repo", "add", str(tmp_path / "lib"), "--if-missing", "--json")
    assert alone_json.returncode == 0, alone_json.stderr
    assert json.loads(alone_json.stdout)["scan"].keys() == data["scan"].keys()
    _exact(env, third, "third")


def test_what_the_daemon_cannot_serve_is_scanned_by_the_command(
    env: dict[str, str], daemon: Daemon, library: Path, tmp_path: Path
) -> None:
    # An unknown repository: the command's own error, exit 2.
    unknown = cli(env, "scan", "nosuch")
    assert unknown.returncode == 2 and "no repository 'nosuch'" in unknown.stderr
    # --force and --accept-ignores are the command's own.
    assert cli(env, "scan", "lib", "--force").returncode == 0
    assert daemon.asked() == 0
    # A socket directory others could enter is not trusted: the command scans by itself.
    runtime = Path(env["XDG_RUNTIME_DIR"])
    os.chmod(runtime / "fsledger", 0o755)
    try:
        assert cli(env, "scan", "lib", "--json").returncode == 0
        assert daemon.asked() == 0
    finally:
        os.chmod(runtime / "fsledger", 0o700)
    assert cli(env, "scan", "lib", "--json").returncode == 0
    assert daemon.asked() == 1


def test_a_socket_left_by_a_killed_daemon_is_passed_over_then_replaced(
    env: dict[str, str], daemon: Daemon, library: Path, tmp_path: Path
) -> None:
    daemon.stop(signal.SIGKILL)
    path = socket_path(env["FSLEDGER_DATABASE_URL"], env)
    assert path is not None and os.path.exists(path)
    (library / "d0" / "late.jpg").write_bytes(b"late")
    alone = cli(env, "scan", "lib", "--json")
    assert alone.returncode == 0 and json.loads(alone.stdout)["files_added"] == 1
    _exact(env, library)
    again = Daemon(env, tmp_path / "run2.log")
    try:
        (library / "d0" / "later.jpg").write_bytes(b"later")
        served = cli(env, "scan", "lib", "--json")
        assert served.returncode == 0 and again.asked() == 1
        _exact(env, library)
    finally:
        again.stop()
    assert not os.path.exists(path), "a clean stop removes the daemon's socket"


def test_a_second_daemon_leaves_the_first_ones_socket(
    env: dict[str, str], daemon: Daemon, tmp_path: Path
) -> None:
    log = tmp_path / "second.log"
    with open(log, "wb") as out:
        second = subprocess.Popen(
            [EXE, "run", "--no-http"],
            env={**env, "FSLEDGER_LOG_LEVEL": "INFO"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("the second daemon", lambda: "served by another daemon" in log.read_text(), 60)
        assert cli(env, "scan", "lib", "--json").returncode == 0
        assert daemon.asked() == 1
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=30)
    assert cli(env, "scan", "lib", "--json").returncode == 0
    assert daemon.asked() == 2, "the first daemon still serves its socket"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another uid to connect as (root)")
def test_another_user_is_refused_even_through_an_open_socket(
    env: dict[str, str], library: Path, tmp_path: Path
) -> None:
    """The directory keeps other users out; if it were opened, the daemon still checks the
    peer's uid."""
    import tempfile

    runtime = Path(tempfile.mkdtemp(prefix="fsl-rt-"))  # below /tmp: others can reach it
    try:
        env = {**env, "XDG_RUNTIME_DIR": str(runtime)}
        daemon = Daemon(env, tmp_path / "run.log")
        try:
            _refused(env, daemon, runtime)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(runtime)


def _refused(env: dict[str, str], daemon: Daemon, runtime: Path) -> None:
    path = socket_path(env["FSLEDGER_DATABASE_URL"], env)
    assert path is not None
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except OSError as e:\n print('refused', e.errno); sys.exit()\n"
        "try:\n"
        " s.sendall(b'scan\\0' + sys.argv[2].encode() + b'\\0/\\0j\\0lib'); s.shutdown(1)\n"
        " print('answer', s.recv(100))\n"
        "except OSError:\n print('answer', b'')\n"  # closed unanswered: a reset, a pipe
    )
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    args = [*nobody, "/usr/bin/python3", "-c", probe, path, env["FSLEDGER_DATABASE_URL"]]
    os.chmod(runtime, 0o711)  # nobody may pass through to fsledger/ (itself 0700)
    closed = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert closed.stdout.startswith("refused 13"), closed  # EACCES: the 0700 directory
    os.chmod(runtime / "fsledger", 0o711)
    os.chmod(path, 0o666)
    try:
        opened = subprocess.run(args, capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(runtime / "fsledger", 0o700)
    assert opened.stdout.strip() == "answer b''", opened
    wait_for("the refusal", lambda: "refused a connection of uid 65534" in daemon.text(), 10)
    assert daemon.asked() == 0


# --- the native launcher (native/fsledger.c) ---------------------------------------------
PYTHON_SCRIPT = Path(sys.executable).parent.parent / "libexec" / "fsledger"
"""Where native/install.sh moves pip's console script, which the launcher execs."""


def _native() -> bool:
    with open(EXE, "rb") as f:
        return f.read(4) == b"\x7fELF"


def test_the_command_is_the_native_launcher() -> None:
    """``make install`` puts it in front of the Python console script (native/install.sh);
    only a machine without a C compiler keeps the script, never CI."""
    if not _native() and os.environ.get("CI") != "true" and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine: the command is the Python script")
    assert _native()
    assert PYTHON_SCRIPT.read_bytes().startswith(b"#!")


needs_native = pytest.mark.skipif(
    not _native(), reason="no native launcher (see test_the_command_is_the_native_launcher)"
)


def _both(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The command through the native launcher, then through the Python console script."""
    return cli(env, *args, cwd=cwd), cli(env, *args, cwd=cwd, exe=str(PYTHON_SCRIPT))


FIGURES = re.compile(r"[0-9][0-9,.]*( ?[kMG]?B| ?m?s)?")


def _alike(a: subprocess.CompletedProcess[str], b: subprocess.CompletedProcess[str]) -> None:
    """Same exit code and stderr; same stdout but the figures (two scans one after the
    other: the first may hash files written within the racy window, the second not)."""
    assert a.returncode == b.returncode, (a.stderr, b.stderr)
    assert a.stderr == b.stderr
    assert FIGURES.sub("N", a.stdout) == FIGURES.sub("N", b.stdout)


@needs_native
def test_the_native_launcher_answers_as_the_python_client(
    env: dict[str, str], daemon: Daemon, library: Path, tmp_path: Path
) -> None:
    """Every form the launcher serves, against the Python client's answer to the same
    command (both served by the daemon: it counts two requests a form), then its errors."""
    clean = {k: v for k, v in env.items() if not k.startswith("RECONCILIATION_")}
    url = clean["FSLEDGER_DATABASE_URL"]
    repo_id = json.loads(cli(env, "status", "lib", "--json").stdout)["repository_id"]
    forms: list[tuple[list[str], Path | None]] = [
        (["scan", "lib", "--json"], None),
        (["scan", "lib"], None),
        (["scan"], None),
        (["scan", "..", "--verify"], library / "d1"),
        ([f"--db={url}", "scan", repo_id, "--json"], tmp_path),
        (["--db", url, "scan", "--json", "--verify", "lib"], tmp_path),
    ]
    (library / "d0" / "new.jpg").write_bytes(b"new")
    first = cli(clean, "scan", "lib", "--json", cwd=tmp_path)
    assert first.returncode == 0 and json.loads(first.stdout)["files_added"] == 1
    assert daemon.asked() == 1
    _exact(env, library)
    for n, (args, cwd) in enumerate(forms):
        native, python = _both(clean, *args, cwd=cwd)
        assert daemon.asked() == 2 * n + 3, (args, native.stderr, python.stderr)
        assert native.returncode == 0, (args, native.stderr)
        _alike(native, python)

    # The root gone: both print the daemon's error and exit with its code.
    shutil.move(library, library.with_name("away"))
    native, python = _both(clean, "scan", "lib", "--json")
    assert daemon.asked() == 2 * len(forms) + 3
    assert native.returncode != 0 and "fsledger: error:" in native.stderr
    _alike(native, python)
    shutil.move(library.with_name("away"), library)


@needs_native
def test_what_the_native_launcher_does_not_serve_goes_to_python(
    env: dict[str, str], daemon: Daemon, library: Path
) -> None:
    """Declined requests, options and settings it does not know, other commands, a socket
    directory others could enter, no daemon: the Python command's own answer."""
    clean = {k: v for k, v in env.items() if not k.startswith("RECONCILIATION_")}
    for args, env_ in [
        (["scan", "nosuch"], clean),  # declined by the daemon
        (["scan", "lib", "--force", "--json"], clean),
        (["--version"], clean),
        (["scan", "--help"], clean),
        (["--db="], clean),
    ]:
        native, python = _both(env_, *args)
        _alike(native, python)
    assert daemon.asked() == 0
    # A setting in the environment: the click CLI, which asks the daemon too.
    native, python = _both({**clean, "FSLEDGER_HASH_ALGO": "blake3"}, "scan", "lib", "--json")
    assert native.returncode == 0 and daemon.asked() == 2
    _alike(native, python)
    # A socket directory others could enter is not trusted: each scans by itself.
    runtime = Path(clean["XDG_RUNTIME_DIR"])
    os.chmod(runtime / "fsledger", 0o755)
    try:
        native, python = _both(clean, "scan", "lib", "--json")
        _alike(native, python)
        assert native.returncode == 0 and daemon.asked() == 2
    finally:
        os.chmod(runtime / "fsledger", 0o700)
    # A socket left by a killed daemon: the command scans by itself.
    daemon.stop(signal.SIGKILL)
    (library / "d0" / "late.jpg").write_bytes(b"late")
    native = cli(clean, "scan", "lib", "--json")
    assert native.returncode == 0 and json.loads(native.stdout)["files_added"] == 1
    _exact(env, library)
