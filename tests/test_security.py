"""Security properties from docs/security.md that no other test file checks: the SQLite
database and its companion files are private to their owner, and database passwords never
reach a message, a log or a ``repr``. (Token auth, loopback-only serving, Host and Origin
checks and prefix escapes are in ``test_api.py``; webhook signatures in ``test_feed.py``;
symlinks never followed out of a root in ``test_reconcile.py``.)"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fsledger.config import Settings
from fsledger.store import open_store
from fsledger.store.redact import redact_url, scrub

FSLEDGER = str(Path(sys.executable).with_name("fsledger"))
SECRET = "Sup3rS3cretPw"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_database_is_created_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    """The ledger lists every file name a user has: the database, its WAL and shared-memory
    files, the directory fsledger creates for it and the lease files are the owner's only,
    whatever the umask."""
    data = tmp_path / "data" / "fsledger"
    db = data / "fsledger.db"
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    env = {**os.environ, "FSLEDGER_DATABASE_URL": "sqlite://" + str(db)}
    for args in (["repo", "add", str(root)], ["run", "--once"]):
        done = subprocess.run(
            [FSLEDGER, *args],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=lambda: os.umask(0),  # everything fsledger creates would be 0666/0777
        )
        assert done.returncode == 0, done.stderr
    assert mode(db) == 0o600
    assert mode(data) == 0o700
    for companion in ("-wal", "-shm"):
        path = Path(str(db) + companion)
        if path.exists():
            assert mode(path) == 0o600, companion
    leases = Path(str(db) + ".leases")
    assert mode(leases) == 0o700
    for lock in leases.iterdir():
        assert mode(lock) == 0o600


def test_an_existing_directory_keeps_its_permissions(tmp_path: Path) -> None:
    """fsledger makes the directories it creates private, and leaves alone one it did not."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    store = open_store("sqlite://" + str(shared / "ledger.db"))
    store.close()
    assert mode(shared) == 0o755
    assert mode(shared / "ledger.db") == 0o600


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://ann:" + SECRET + "@db.lan:5432/photos",
            "postgresql://ann:***@db.lan:5432/photos",
        ),
        (
            "postgresql://ann:p@" + SECRET + "@db.lan/photos",
            "postgresql://ann:***@db.lan/photos",
        ),
        (
            "postgres://ann@db.lan/photos?sslmode=require&password=" + SECRET,
            "postgres://ann@db.lan/photos?sslmode=require&password=***",
        ),
        ("sqlite:///var/lib/fsledger/ledger.db", "sqlite:///var/lib/fsledger/ledger.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    if SECRET in url:
        assert SECRET not in scrub(f"failed near {SECRET!r} in {url}", url)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:{SECRET}@127.0.0.1:1/none?connect_timeout=1",
        f"postgresql://postgres:{SECRET}%zz@127.0.0.1:5432/none",  # libpq quotes bad escapes
        f"postgresql://postgres:p@{SECRET}@127.0.0.1:5432/none?connect_timeout=1",
        f"postgresql://postgres@127.0.0.1:1/none?connect_timeout=1&password={SECRET}",
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/none?bogus=1",
        f"mysql://root:{SECRET}@localhost/photos",
    ],
)
def test_database_passwords_never_reach_an_error(url: str) -> None:
    """Through the real command: the error names the database, never its password."""
    done = subprocess.run(
        [FSLEDGER, "--db", url, "repo", "list"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (1, 2)
    assert "fsledger: error:" in done.stderr
    assert SECRET not in done.stderr and SECRET not in done.stdout, done.stderr
    assert "Traceback" not in done.stderr


def test_settings_repr_shows_no_secret() -> None:
    s = Settings(
        database_url=f"postgresql://ann:{SECRET}@db/photos",
        api_token=SECRET + "-token",
        webhook_secret=SECRET + "-hmac",
    )
    assert SECRET not in repr(s)


def test_a_daemon_run_logs_no_password(pg_url: str, tmp_path: Path) -> None:
    """A whole ``run --once`` at DEBUG with a password in the URL (the test server trusts
    local connections, so the password is carried but never checked): not in the log."""
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    env = {**os.environ, "FSLEDGER_DATABASE_URL": url, "FSLEDGER_LOG_LEVEL": "DEBUG"}
    for args in (["repo", "add", str(root)], ["run", "--once"], ["status"], ["ops"]):
        done = subprocess.run([FSLEDGER, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stderr + done.stdout, args
