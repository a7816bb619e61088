"""The console script's fast path (``fsledger.entry``): ``--version`` and
``files REPO --json`` on SQLite without click, byte for byte what the click CLI prints, and
every case it does not serve left to the click CLI (which then prints what it always did).

Each case runs two scripts as pip writes them: ``fast/fsledger`` (the entry point,
``fsledger.entry:main``) and ``full/fsledger`` (the click group, ``fsledger.cli:main``), and
compares stdout, stderr and the exit code; the fast one also reports the modules it loaded,
which tells whether it answered itself (no click) or handed over.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsledger import jsonform, leanread
from fsledger.entry import default_database_url
from fsledger.store import migrations

SCRIPT = """#!{python}
import atexit, os, sys


def _modules():
    out = os.environ.get("CLI_TEST_MODULES_OUT")
    if out:
        with open(out, "w") as fh:
            fh.write("\\n".join(sorted(m for m, v in sys.modules.items() if v is not None)))


atexit.register(_modules)
from {module} import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""

HEAVY = (
    *("click", "dataclasses", "typing", "uuid", "inspect", "enum", "re", "json", "base64"),
    *("fsledger.model", "fsledger.config", "fsledger.store"),
)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("scripts")
    out = {}
    for kind, module in (("fast", "fsledger.entry"), ("full", "fsledger.cli")):
        path = base / kind / "fsledger"
        path.parent.mkdir()
        path.write_text(SCRIPT.format(python=sys.executable, module=module))
        path.chmod(0o755)
        out[kind] = path
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without fsledger's settings (they send the fast path away)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FSLEDGER_", "RECONCILIATION_", "FILE_WATCHER_", "_FSLEDGER_"))
    }
    env.update(extra)
    return env


class Run:
    def __init__(self, done: subprocess.CompletedProcess[bytes], modules: list[str]) -> None:
        self.code, self.out, self.err = done.returncode, done.stdout, done.stderr
        self.modules = modules

    @property
    def result(self) -> tuple[int, bytes, bytes]:
        return self.code, self.out, self.err

    @property
    def fast(self) -> bool:
        """It answered without the click CLI (nor anything heavy)."""
        return not set(HEAVY) & set(self.modules)


def run(script: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    out = script.parent / f"modules-{uuid.uuid4().hex}"
    environment = {**(env if env is not None else clean_env()), "CLI_TEST_MODULES_OUT": str(out)}
    done = subprocess.run([str(script), *args], capture_output=True, env=environment, timeout=120)
    modules = out.read_text().split("\n") if out.exists() else []
    out.unlink(missing_ok=True)
    return Run(done, modules)


def both(scripts: dict[str, Path], *args: str, env: dict[str, str] | None = None) -> Run:
    """Run the fast and the full script; assert the same bytes and exit code; the fast run."""
    fast = run(scripts["fast"], *args, env=env)
    full = run(scripts["full"], *args, env=env)
    assert fast.result == full.result
    assert "click" in full.modules
    return fast


def add(scripts: dict[str, Path], url: str, root: Path, *extra: str) -> None:
    done = run(scripts["full"], "--db", url, "repo", "add", str(root), *extra)
    assert done.code == 0, done.err


def scan(scripts: dict[str, Path], url: str, name: str) -> None:
    done = run(scripts["full"], "--db", url, "scan", name)
    assert done.code == 0, done.err


@pytest.fixture
def library(scripts: dict[str, Path], tmp_path: Path) -> tuple[str, Path]:
    """A ledger (its URL) with repository ``photos``, whose names are awkward."""
    root = tmp_path / "photos"
    (root / "sub dir").mkdir(parents=True)
    names = [
        b"plain.jpg",
        b"caf\xc3\xa9 \xe2\x82\xac.jpg",  # UTF-8
        b"latin1-\xe9\xff.jpg",  # not UTF-8
        b"new\nline.jpg",
        b"ctrl\x1b[31m\x07\x7f.jpg",
        b'quote"back\\slash\ttab.jpg',
        b"sub dir/\xf0\x9f\x93\xb7 emoji.jpg",
    ]
    for i, name in enumerate(names):
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(b"x" * i)
    (root / "empty.bin").write_bytes(b"")
    url = "sqlite://" + str(tmp_path / "ledger" / "l.db")
    add(scripts, url, root)
    return url, root


def test_version(scripts: dict[str, Path]) -> None:
    fast = both(scripts, "--version")
    assert fast.fast, fast.modules
    assert fast.out == f"fsledger, version {__import__('fsledger').__version__}\n".encode()
    assert [m for m in fast.modules if m.startswith("fsledger")] == ["fsledger", "fsledger.entry"]


def test_files_json_of_awkward_names(scripts: dict[str, Path], library: tuple[str, Path]) -> None:
    url, _ = library
    fast = both(scripts, "--db", url, "files", "photos", "--json")
    assert fast.fast, fast.modules
    assert fast.code == 0
    lines = [json.loads(line) for line in fast.out.decode("ascii").splitlines()]
    assert len(lines) == 8
    assert b"latin1-\xe9\xff.jpg" in {__import__("base64").b64decode(x["path_b64"]) for x in lines}
    # The other spellings of the same command.
    for args in (("--db=" + url, "files", "--json", "photos"), ("files", "photos", "--json")):
        env = clean_env(FSLEDGER_DATABASE_URL=url) if args[0] == "files" else None
        again = both(scripts, *args, env=env)
        assert again.fast and again.result == fast.result


def test_the_default_database(scripts: dict[str, Path], tmp_path: Path) -> None:
    env = clean_env(XDG_DATA_HOME=str(tmp_path / "data"))
    url = default_database_url(env)
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    add(scripts, url, root)
    fast = both(scripts, "files", "photos", "--json", env=env)
    assert fast.fast and fast.code == 0 and fast.out.count(b"\n") == 1


def test_empty_repository(scripts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    url = "sqlite://" + str(tmp_path / "l.db")
    add(scripts, url, tmp_path / "empty")
    fast = both(scripts, "--db", url, "files", "empty", "--json")
    assert fast.fast and fast.result == (0, b"", b"")


def test_moved_and_deleted_files(scripts: dict[str, Path], library: tuple[str, Path]) -> None:
    url, root = library
    before = both(scripts, "--db", url, "files", "photos", "--json")
    (root / "plain.jpg").rename(root / "sub dir" / "moved.jpg")
    (root / "empty.bin").unlink()
    scan(scripts, url, "photos")
    fast = both(scripts, "--db", url, "files", "photos", "--json")
    assert fast.fast and fast.out != before.out
    paths = [json.loads(line)["path"] for line in fast.out.splitlines()]
    assert "sub dir/moved.jpg" in paths and "plain.jpg" not in paths and "empty.bin" not in paths


@pytest.mark.parametrize(
    "args",
    [
        ("files", "nope", "--json"),  # unknown repository
        ("files", "-x", "--json"),  # an option it does not know
        ("files", "photos", "--json", "--prefix", "sub dir"),
        ("files", "photos"),
        ("files", "photos", "--json", "--help"),
        ("--help",),
        ("--version", "files"),
        ("--log-level", "DEBUG", "files", "photos", "--json"),
        ("files", "--json"),
        ("files", "photos", "--json", "--json"),
    ],
    ids=lambda a: " ".join(a),
)
def test_what_it_does_not_serve_goes_to_click(
    scripts: dict[str, Path], library: tuple[str, Path], args: tuple[str, ...]
) -> None:
    url, _ = library
    fast = both(scripts, "--db", url, *args)
    assert not fast.fast


def test_a_repository_by_id_or_root_goes_to_click(
    scripts: dict[str, Path], library: tuple[str, Path]
) -> None:
    url, root = library
    by_name = both(scripts, "--db", url, "files", "photos", "--json")
    listed = run(scripts["full"], "--db", url, "repo", "list", "--json")
    (repo,) = json.loads(listed.out)
    rid = repo["id"]
    for ref in (rid, rid.upper(), "{" + rid + "}", "urn:uuid:" + rid, rid.replace("-", "")):
        fast = both(scripts, "--db", url, "files", ref, "--json")
        assert not fast.fast and fast.result == by_name.result
    fast = both(scripts, "--db", url, "files", str(root), "--json")
    assert not fast.fast and fast.result == by_name.result


def test_settings_in_the_environment_go_to_click(
    scripts: dict[str, Path], library: tuple[str, Path]
) -> None:
    url, _ = library
    for name, value in (
        ("FSLEDGER_LOG_LEVEL", "LOUD"),  # an error there
        ("RECONCILIATION_BATCH_SIZE", "0"),
        ("FSLEDGER_HASH_ALGO", "md5"),
        ("FSLEDGER_LOG_LEVEL", "DEBUG"),
    ):
        fast = both(
            scripts, "--db", url, "files", "photos", "--json", env=clean_env(**{name: value})
        )
        assert not fast.fast
    fast = both(scripts, "--version", env=clean_env(_FSLEDGER_COMPLETE="bash_source"))
    assert not fast.fast


def test_a_database_that_does_not_exist(scripts: dict[str, Path], tmp_path: Path) -> None:
    # Each script gets its own (the click CLI creates it); the output names no path.
    fast = run(scripts["fast"], "--db", f"sqlite://{tmp_path}/a/l.db", "files", "x", "--json")
    full = run(scripts["full"], "--db", f"sqlite://{tmp_path}/b/l.db", "files", "x", "--json")
    assert fast.result == full.result and fast.code == 2
    assert not fast.fast
    assert (tmp_path / "a" / "l.db").exists()


def test_urls_it_does_not_read(scripts: dict[str, Path], tmp_path: Path) -> None:
    for url in ("sqlite:///:memory:", "mysql://x/y", "", "sqlite://relative.db"):
        fast = both(scripts, "--db", url, "files", "x", "--json")
        assert not fast.fast


def test_a_read_only_database(scripts: dict[str, Path], library: tuple[str, Path]) -> None:
    url, _ = library
    path = Path(url.removeprefix("sqlite://"))
    path.chmod(0o400)
    try:
        fast = both(scripts, "--db", url, "files", "photos", "--json")
    finally:
        path.chmod(0o600)
    # root may write anyway: then both list the files; anyone else gets the store's error.
    assert fast.fast == (os.geteuid() == 0)


@pytest.mark.slow  # holds a write lock 1.5 s for both paths
def test_a_database_locked_by_a_writer(scripts: dict[str, Path], library: tuple[str, Path]) -> None:
    url, _ = library
    unlocked = both(scripts, "--db", url, "files", "photos", "--json")
    path = url.removeprefix("sqlite://")

    def held(script: Path) -> Run:
        writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(1.5, writer.commit)
        timer.start()
        try:
            return run(script, "--db", url, "files", "photos", "--json")
        finally:
            timer.join()
            writer.close()

    fast, full = held(scripts["fast"]), held(scripts["full"])
    # The writer's lock sends the fast path to the store, which waits for it (30 s at most).
    assert not fast.fast
    assert fast.result == full.result == unlocked.result


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM schema_migrations WHERE version = 9",
        "INSERT INTO schema_migrations (version) VALUES (1000)",
        "DROP INDEX idx_file_records_dup",
        "PRAGMA journal_mode=DELETE",
    ],
    ids=["older schema", "newer schema", "index dropped", "not WAL"],
)
def test_a_database_the_store_would_change(
    scripts: dict[str, Path], library: tuple[str, Path], tmp_path: Path, change: str
) -> None:
    url, _ = library
    path = Path(url.removeprefix("sqlite://"))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(change)
    conn.close()
    # The click CLI migrates (or refuses): each script gets a fresh copy, at the same path
    # (an error names it).
    copies = []
    copy = tmp_path / "copy" / "l.db"
    copy.parent.mkdir()
    for kind in ("fast", "full"):
        for side in ("", "-wal", "-shm"):
            Path(f"{copy}{side}").unlink(missing_ok=True)
        shutil.copy(path, copy)
        copies.append(run(scripts[kind], "--db", f"sqlite://{copy}", "files", "photos", "--json"))
    fast, full = copies
    assert fast.result == full.result
    assert not fast.fast


@pytest.mark.slow  # 5003 records written, both paths read them
def test_more_than_a_page_and_a_broken_pipe(scripts: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(leanread.FILES_PAGE + 3):
        (root / f"{i:05d}").write_bytes(b"")
    url = "sqlite://" + str(tmp_path / "l.db")
    add(scripts, url, root)
    fast = both(scripts, "--db", url, "files", "many", "--json")
    assert fast.fast and fast.out.count(b"\n") == leanread.FILES_PAGE + 3
    # A reader that goes away (``| head``): exit 1, nothing on stderr, as click has it.
    results = []
    for kind in ("fast", "full"):
        proc = subprocess.Popen(
            [str(scripts[kind]), "--db", url, "files", "many", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(100)
        proc.stdout.close()
        err = proc.stderr.read()
        results.append((proc.wait(timeout=60), err))
    assert results[0] == results[1]


# --- the pieces ------------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.text(), st.integers(), st.none(), st.booleans(), st.integers(min_value=-(2**80))
)


@given(st.dictionaries(st.text(), JSON_VALUES))
def test_dumps_is_json_dumps(obj: dict[str, object]) -> None:
    assert jsonform.dumps(obj) == json.dumps(obj, ensure_ascii=True)


@given(st.one_of(st.lists(JSON_VALUES), st.dictionaries(st.text(), st.lists(st.floats()))))
def test_dumps_of_anything_else_is_json_dumps(obj: object) -> None:
    assert jsonform.dumps(obj) == json.dumps(obj, ensure_ascii=True)


@given(st.binary())
def test_path_b64_is_base64(path: bytes) -> None:
    import base64

    assert jsonform.path_to_json(path)["path_b64"] == base64.b64encode(path).decode("ascii")


def test_the_reader_knows_the_schema_the_store_writes() -> None:
    assert len(migrations.SQLITE) == leanread.SCHEMA_VERSION
    made = leanread.DUP_INDEX.replace(" IF NOT EXISTS", "")
    assert any(made in m for m in migrations.SQLITE)


@given(st.uuids())
def test_every_uuid_spelling_could_be_one(value: uuid.UUID) -> None:
    for text in (
        str(value),
        str(value).upper(),
        value.hex,
        "{" + str(value) + "}",
        "urn:uuid:" + str(value),
        " " + str(value) + " ",
    ):
        if text.strip() == text or _parses(text):
            assert leanread.could_be_uuid(text), text


@given(st.text())
def test_what_uuid_takes_could_be_one(text: str) -> None:
    if _parses(text):
        assert leanread.could_be_uuid(text)


def _parses(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
