"""The install: what the wheel carries, which extras a command needs (and what it says
without them), and that commands which serve no HTTP never load the web stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "fsledger"
WEB = ("fastapi", "uvicorn", "prometheus_client", "starlette", "pydantic", "httpx", "orjson")

# Runs the CLI in a fresh interpreter with some modules made unimportable (as if their
# extra were not installed: ``import x`` raises ImportError when sys.modules[x] is None),
# and writes the top-level modules loaded by the end to the file named in argv[1].
CHILD = """
import json, sys
out, hidden, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
for name in hidden:
    sys.modules[name] = None
sys.argv = ["fsledger", *args]
try:
    from fsledger.cli import main
    main()
finally:
    loaded = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None})
    fs = sorted(m for m, v in sys.modules.items() if m.startswith("fsledger") and v)
    with open(out, "w") as fh:
        json.dump({"top": loaded, "fsledger": fs}, fh)
"""


def run_cli(
    tmp_path: Path, *args: str, hidden: tuple[str, ...] = (), module: str = "fsledger.cli"
) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """``module``: the click group's (the default), or the console script's entry point
    (``fsledger.entry``)."""
    out = tmp_path / f"modules-{len(list(tmp_path.iterdir()))}.json"
    child = CHILD.replace("from fsledger.cli import main", f"from {module} import main")
    env = dict(os.environ)
    if module == "fsledger.entry":  # a setting there sends the fast path to the click CLI
        env = {k: v for k, v in env.items() if not k.startswith("FSLEDGER_")}
    done = subprocess.run(
        [sys.executable, "-c", child, str(out), json.dumps(hidden), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` would install, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("fsledger-*.whl")
    return built


@pytest.mark.slow  # builds the wheel (both wheel tests)
def test_the_wheel_carries_the_dashboard_and_the_schema(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    static = [p for p in (SRC / "api" / "static").rglob("*") if p.is_file()]
    assert static, "the dashboard has no files?"
    for path in static:
        assert f"fsledger/{path.relative_to(SRC).as_posix()}" in names
    for module in ("store/migrations.py", "store/sqlite.py", "store/postgres.py", "py.typed"):
        assert f"fsledger/{module}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fsledger = fsledger.entry:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow  # builds the wheel (both wheel tests)
def test_the_core_install_is_four_packages_and_the_rest_extras(wheel: Path) -> None:
    metadata_name = next(
        n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")
    )
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(metadata_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    core = sorted(r.split(">")[0].split("[")[0] for r in requires if "extra ==" not in r)
    assert core == ["blake3", "click", "inotify-simple", "pyyaml"]
    assert {"postgres", "server", "all", "dev"} <= set(meta.get_all("Provides-Extra") or [])

    def extra(name: str) -> set[str]:
        marker = f'extra == "{name}"'
        return {r.split(">")[0].split(";")[0].strip() for r in requires if marker in r}

    assert extra("postgres") == {"psycopg[binary]", "psycopg-pool"}
    # Every web package the server imports directly is declared (pydantic and starlette
    # were not).
    assert {"fastapi", "uvicorn", "prometheus-client", "httpx", "pydantic", "starlette"} <= (
        extra("server")
    )
    (everything,) = extra("all")
    assert {"postgres", "server"} <= set(everything.removeprefix("fsledger[")[:-1].split(","))
    assert not any(r.startswith(("pytest", "mypy", "playwright")) for r in extra("all"))
    assert meta["Version"] == __import__("fsledger").__version__


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite ledger with one small repository ``photos`` (its URL)."""
    base = tmp_path_factory.mktemp("lib")
    root = base / "photos"
    root.mkdir()
    for i in range(10):
        (root / f"{i}.jpg").write_bytes(b"x" * i)
    url = "sqlite://" + str(base / "l.db")
    subprocess.run(
        [sys.executable, "-m", "fsledger.cli", "--db", url, "repo", "add", str(root)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return url


@pytest.mark.parametrize(
    "args",
    [
        ("files", "photos", "--json"),
        ("files", "photos"),
        ("changes", "--json"),
        ("status",),
        ("status", "photos", "--json"),
        ("scan", "--json"),
        ("scan", "photos", "--verify"),
        ("duplicates",),
        ("ops", "--json"),
        ("doctor", "--json"),
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_that_serve_nothing_load_no_web_stack(
    library: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done, modules = run_cli(tmp_path, "--db", library, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout or done.stderr
    assert not set(WEB) & set(modules["top"]), modules["top"]
    assert "psycopg" not in modules["top"]  # a SQLite ledger needs no PostgreSQL driver
    assert not [m for m in modules["fsledger"] if m.startswith("fsledger.api")]
    if args[0] not in ("scan", "doctor"):  # reading needs none of the scanning machinery
        assert "fsledger.reconcile" not in modules["fsledger"]
        assert "fsledger.hashing" not in modules["fsledger"]


def test_version_loads_click_and_nothing_of_the_ledger(tmp_path: Path) -> None:
    done, modules = run_cli(tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fsledger, version {__import__('fsledger').__version__}"
    assert modules["fsledger"] == [
        "fsledger",
        "fsledger.cli",
        "fsledger.entry",
        "fsledger.errors",
        "fsledger.human",
    ]


@pytest.mark.parametrize(
    "args",
    [("files", "photos"), ("status",), ("scan",), ("repo", "add", "/tmp"), ("doctor",)],
    ids=lambda a: " ".join(a),
)
def test_postgresql_without_its_extra_says_which_to_install(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    done, modules = run_cli(
        tmp_path,
        "--db",
        "postgresql://postgres@127.0.0.1:5432/test",
        *args,
        hidden=("psycopg", "psycopg_pool"),
    )
    message = "a postgresql:// database needs the 'postgres' extra (psycopg is not installed)"
    if args == ("doctor",):  # a finding, not an error line
        assert done.returncode == 1
        assert message in done.stdout
    else:
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"fsledger: error: {message}: pip install 'fsledger[postgres]' (or fsledger[all])"
        ]
    assert "Traceback" not in done.stderr


def test_run_without_the_server_extra_says_which_to_install(library: str, tmp_path: Path) -> None:
    done, _ = run_cli(tmp_path, "--db", library, "run", "--no-watch", hidden=("fastapi",))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(
        "fsledger: error: 'fsledger run' (its HTTP API, dashboard and webhooks) needs the "
        "'server' extra (fastapi is not installed): pip install 'fsledger[server]' "
        "(or fsledger[all])"
    )
    # --once serves nothing: it runs without the extra.
    done, modules = run_cli(tmp_path, "--db", library, "run", "--once", hidden=WEB)
    assert done.returncode == 0, done.stderr
    assert not set(WEB) & set(modules["top"])


# What the console script's fast path (fsledger.entry) loads: the standard library's
# sqlite3 and json's C encoder, and none of click, dataclasses, typing, uuid or the model.
# (CHILD itself loads json, and re with it: tests/test_cli_fast.py checks those, with a
# harness that loads nothing.)
HEAVY = {"click", "dataclasses", "typing", "uuid", "inspect", "yaml", "blake3", "base64"}


def test_the_console_script_says_its_version_with_nothing_loaded(tmp_path: Path) -> None:
    done, modules = run_cli(tmp_path, "--version", module="fsledger.entry")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"fsledger, version {__import__('fsledger').__version__}\n"
    assert modules["fsledger"] == ["fsledger", "fsledger.entry"]
    assert not HEAVY & set(modules["top"]), modules["top"]


def test_the_console_script_lists_files_as_json_with_sqlite3_only(
    library: str, tmp_path: Path
) -> None:
    done, modules = run_cli(
        tmp_path, "--db", library, "files", "photos", "--json", module="fsledger.entry"
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 10
    assert modules["fsledger"] == [
        "fsledger",
        "fsledger.entry",
        "fsledger.jsonform",
        "fsledger.leanread",
    ]
    assert not HEAVY & set(modules["top"]), modules["top"]
    assert "sqlite3" in modules["top"]


@pytest.mark.parametrize(
    "args", [("status",), ("files", "photos"), ("--help",)], ids=lambda a: " ".join(a)
)
def test_the_console_script_hands_the_rest_to_the_click_cli(
    library: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done, modules = run_cli(tmp_path, "--db", library, *args, module="fsledger.entry")
    assert done.returncode == 0, done.stderr
    assert done.stdout
    assert "fsledger.cli" in modules["fsledger"]
