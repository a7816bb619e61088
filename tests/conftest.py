"""Shared fixtures: one store per backend (SQLite and PostgreSQL), settings and a ledger.

Every test that takes ``store``, ``store_url``, ``settings`` or ``ledger`` runs twice, once
per backend. PostgreSQL is the real server at 127.0.0.1:5432 (user ``postgres``, trust
auth, database ``test``); each test gets a fresh schema, dropped afterwards. When the
server cannot be reached the PostgreSQL half is skipped locally, and fails under CI
(``CI=true``), where a silently skipped backend would hide regressions.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.store import Store, open_store

PG_ADMIN_URL = os.environ.get("FSLEDGER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(autouse=True)
def calm_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SyncManager's default pressure source reports none: tests share a busy machine,
    whose real /proc/pressure would hold their scheduled runs at random. Tests of the
    scheduler pass a pressure source of their own."""
    monkeypatch.setattr("fsledger.manager.default_pressure", lambda: None)


def make_settings(url: str, **overrides: Any) -> Settings:
    """Settings for tests: the given database, two hashing workers, plus ``overrides``."""
    kw: dict[str, Any] = {"database_url": url, "max_concurrency": 2}
    kw.update(overrides)
    return Settings(**kw)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The PostgreSQL admin URL, once it is known to answer (checked once per session)."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the PostgreSQL store must be tested)")
        pytest.skip(message)
    return PG_ADMIN_URL


def _pg_schema_url(admin_url: str, schema: str) -> str:
    sep = "&" if "?" in admin_url else "?"
    return f"{admin_url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty database: a SQLite file in ``tmp_path``, or a fresh PostgreSQL
    schema (dropped with everything in it at teardown)."""
    if request.param == "sqlite":
        yield "sqlite://" + str(tmp_path / "ledger.db")
        return
    yield from _fresh_pg_schema(request.getfixturevalue("pg_admin_url"))


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema only, for tests that mean PostgreSQL in particular."""
    yield from _fresh_pg_schema(pg_admin_url)


def _fresh_pg_schema(admin: str) -> Iterator[str]:
    schema = f"fsl_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _pg_schema_url(admin, schema)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open, migrated store of the backend ``store_url`` names (parametrized through it:
    ``[sqlite]`` and ``[postgres]``)."""
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def settings(store_url: str) -> Settings:
    return make_settings(store_url)


@pytest.fixture
def ledger(settings: Settings, store: Store) -> Iterator[Ledger]:
    """A ledger on ``store``. Its hashing workers are stopped at teardown; the store is
    closed by its own fixture."""
    led = Ledger(settings, store)
    try:
        yield led
    finally:
        led.reconciler.close()


@pytest.fixture
def tree(tmp_path: Path) -> bytes:
    """An empty directory for a repository root, as bytes."""
    root = tmp_path / "tree"
    root.mkdir()
    return os.fsencode(str(root))


def pytest_configure(config: pytest.Config) -> None:
    """The daemons the tests start put their control sockets (``fsledger.control``) in a
    directory of the run's own, not in the user's ``~/.local/share/fsledger/run``."""
    import atexit
    import shutil
    import tempfile

    if "FSL_TEST_RUNTIME" not in os.environ:
        runtime = tempfile.mkdtemp(prefix="fsl-rt-")
        atexit.register(shutil.rmtree, runtime, ignore_errors=True)
        os.environ["FSL_TEST_RUNTIME"] = os.environ["XDG_RUNTIME_DIR"] = runtime


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-examples",
        type=int,
        default=None,
        help="examples of the model-based test (tests/test_model.py) per backend; a longer "
        "run that also shrinks a failure (default: FSLEDGER_MODEL_EXAMPLES, else a short run)",
    )


@pytest.fixture
def model_examples(request: pytest.FixtureRequest) -> int | None:
    """The number of model-based examples asked for (``--model-examples`` or
    ``FSLEDGER_MODEL_EXAMPLES``), None for the short default run."""
    value = request.config.getoption("--model-examples")
    if value is None and (env := os.environ.get("FSLEDGER_MODEL_EXAMPLES")):
        value = int(env)
    return int(value) if value is not None else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A scenario on PostgreSQL is ``slow``: ``make test`` runs every scenario four ways (live
    and offline, on each store), ``make test-fast`` runs the two on SQLite. A scenario checks
    the watcher and the scan, which are the same on both stores, and on PostgreSQL it pays a
    fresh migrated schema (~0.3 s) and its server's round trips: the offline half on
    PostgreSQL alone took 70 s of the fast loop's 650 s. The stores have tests of their own,
    on both, in the fast loop (tests/test_store.py, test_reconcile.py, test_feed.py).

    The same goes for the modules in ``_FAST_ON_SQLITE`` (the model-based run, a bucket as a
    repository, a mirror to a bucket, the live watcher, scans handed to a daemon): what they
    test is above the store,
    and their PostgreSQL half costs seconds."""
    for item in items:
        params = getattr(item, "callspec", None)
        store = params.params.get("store_url", params.params.get("backend")) if params else None
        if params is None or store != "postgres":
            continue
        if "scenario" in params.params or item.path.name in _FAST_ON_SQLITE:
            item.add_marker(pytest.mark.slow)

    # The live peer scenarios on SQLite cost ~0.8 s each (a watcher process each): the fast
    # loop replays every sixth of them live (and every one offline); ``make test`` all.
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None or params.params.get("scenario") != "live":
            continue
        index = params.indices.get("peer_case")
        if index is not None and index % 6:
            item.add_marker(pytest.mark.slow)


_FAST_ON_SQLITE = frozenset(
    {
        "test_control.py",
        "test_model.py",
        "test_s3_bucket.py",
        "test_s3_mirror.py",
        "test_watch_inotify.py",
    }
)


def _encodable(text: str) -> str:
    """``text`` with lone surrogates (a file name's undecodable bytes) spelt ``\\udcff``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test's report may hold a non-UTF-8 file name decoded with surrogateescape
    (captured logs, an assertion naming the path): pytest-xdist sends reports as UTF-8 and
    crashed the whole run on one (INTERNALERROR) instead of reporting that test's failure.
    Such text is made encodable here; everything else is left as it is."""
    outcome: Any = yield
    report = outcome.get_result()
    report.sections = [(title, _encodable(body)) for title, body in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        if _encodable(text) != text:
            report.longrepr = _encodable(text)


@pytest.fixture(params=("live", "offline"))
def scenario(
    request: pytest.FixtureRequest, ledger: Ledger, store_url: str, tmp_path: Path
) -> Iterator[Any]:
    """A ``scenario_support.Scenario`` on ``tmp_path``: ``[live]`` (the watcher alone, in a
    process of its own) and ``[offline]`` (one scan), on each backend."""
    from scenario_support import Scenario

    sc = Scenario(ledger, store_url, tmp_path, request.param)
    yield sc
    sc.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real S3 server (SeaweedFS ``weed mini``, tests/s3_support.py) for the session.
    Tests that stop or restart a server take ``own_s3_server`` instead."""
    from s3_support import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=2.0)  # its data goes with the session: no 10 s orderly shutdown


@pytest.fixture
def own_s3_server(tmp_path: Path) -> Iterator[Any]:
    """A real S3 server of this test's own, free to stop and restart."""
    from s3_support import SeaweedServer

    server = SeaweedServer(tmp_path / "seaweed")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: Any) -> Iterator[str]:
    """A fresh, empty bucket on the session's S3 server, removed with its objects afterwards."""
    name = s3_server.new_bucket()
    try:
        yield name
    finally:
        s3_server.drop_bucket(name)
