"""``fsledger doctor``: each check against a real database (both stores), a real tree, and
the system files it reads, with limits and mount tables of the test's own where the real
ones cannot be changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from fsledger.cli import main
from fsledger.doctor import Finding, Level, System, diagnose, exit_code
from fsledger.ledger import Ledger, count_directories
from fsledger.model import OperationType, utcnow
from scenario_support import unprivileged_prefix


def doctor(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--db", url, "doctor", *args], catch_exceptions=False)
    return result.exit_code, result.stdout


def by_check(findings: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {f["check"]: f for f in findings}


def make_tree(root: Path) -> int:
    """A tree of files in nested directories, and one empty directory (no record: no
    watch counted); returns the directories that hold files, the root included, counted
    from the tree itself."""
    for rel in ("a.jpg", "x/b.jpg", "x/y/c.jpg", "x/y/z/d.jpg", "w/e.jpg", "w/f.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "empty").mkdir()
    holding = {os.path.dirname(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}
    return len(holding | {str(root)})


def test_a_healthy_setup_passes_every_check(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    dirs = make_tree(root)
    assert dirs == 5
    assert CliRunner().invoke(main, ["--db", store_url, "repo", "add", str(root)]).exit_code == 0

    code, out = doctor(store_url, "--json")
    found = by_check(json.loads(out))
    assert code == 0, out
    assert all(f["level"] == "ok" for f in found.values()), out
    kind = "SQLite" if store_url.startswith("sqlite") else "PostgreSQL"
    assert found["database"]["detail"].startswith(kind + " ")
    assert found["permissions"]["detail"] == "this user can write the ledger"
    assert "free space" in found and "clock" in found
    with open("/proc/sys/fs/inotify/max_user_watches") as fh:
        limit = int(fh.read())
    assert found["inotify watches"]["detail"] == (
        f"the trees need {dirs:,} watches (one per directory); the limit is {limit:,}"
    )
    assert found["root photos"]["detail"].startswith(f"{root} is on ")
    if kind == "PostgreSQL":  # the server's clock against ours: same host, no skew
        assert "ahead of the database server's" in found["clock"]["detail"] or (
            "behind the database server's" in found["clock"]["detail"]
        )
    else:
        assert str(tmp_path) in found["free space"]["detail"]

    code, text = doctor(store_url)
    assert code == 0 and text.splitlines()[0].startswith("ok    database")


def test_the_watch_limit_against_the_trees(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    dirs = make_tree(root)
    ledger.scan(ledger.add_repository(str(root)))
    limits = tmp_path / "max_user_watches"

    def watches(limit: int) -> Finding:
        limits.write_text(f"{limit}\n")
        found = [f for f in diagnose(lambda: ledger, System(str(limits))) if "inotify" in f.check]
        assert len(found) == 1
        return found[0]

    ok, warn, fail = watches(100), watches(dirs), watches(dirs - 1)
    assert ok.level is Level.OK
    assert warn.level is Level.WARN and "other programs" in warn.detail
    assert fail.level is Level.FAIL and f"need {dirs} watches" in fail.detail
    assert fail.advice is not None
    assert f"sysctl fs.inotify.max_user_watches={524288}" in fail.advice
    assert "/etc/sysctl.d/" in fail.advice
    assert exit_code([fail]) == 1 and exit_code([ok, warn]) == 0


def test_a_network_root_is_reported_as_polled(ledger: Ledger, tmp_path: Path) -> None:
    root = tmp_path / "nas"
    make_tree(root)
    ledger.scan(ledger.add_repository(str(root)))
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"98 22 0:51 /export {root} rw,relatime shared:60 - nfs4 nas:/export rw\n"
    )
    found = {f.check: f for f in diagnose(lambda: ledger, System(mountinfo=str(table)))}
    assert found["root nas"].level is Level.OK
    assert found["root nas"].detail == (
        f"{root} is on nfs4, a network filesystem: polled by scans, since inotify does not "
        "see other clients' changes"
    )
    # Not watched, so it takes no inotify watch.
    assert "the trees need 0 watches" in found["inotify watches"].detail


def test_a_missing_root_fails_with_what_to_do(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_tree(root)
    assert CliRunner().invoke(main, ["--db", store_url, "repo", "add", str(root)]).exit_code == 0
    root.rename(tmp_path / "elsewhere")
    code, out = doctor(store_url)
    assert code == 1
    line = next(i for i, text in enumerate(out.splitlines()) if "root photos" in text)
    assert out.splitlines()[line].startswith("FAIL  root photos")
    assert "fsledger repo remove photos" in out.splitlines()[line + 1]
    assert "-> mount it again" in out.splitlines()[line + 1]


def test_a_clock_that_went_back_fails(ledger: Ledger, store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_tree(root)
    repo = ledger.add_repository(str(root))
    ledger.store.start_operation(
        repo.id, OperationType.RECONCILIATION, "elsewhere:1", utcnow() + timedelta(hours=1)
    )
    code, out = doctor(store_url, "--json")
    clock = [f for f in json.loads(out) if f["check"] == "clock" and f["level"] == "fail"]
    assert code == 1
    assert len(clock) == 1 and "in this host's future" in clock[0]["detail"]
    assert "NTP" in clock[0]["advice"]


def test_an_unreachable_database_fails_and_the_system_checks_still_run() -> None:
    code, out = doctor("postgresql://postgres@127.0.0.1:1/test", "--json")
    found = by_check(json.loads(out))
    assert code == 1
    assert found["database"]["level"] == "fail"
    assert "cannot open the database" in found["database"]["detail"]
    assert "FSLEDGER_DATABASE_URL" in found["database"]["advice"]
    assert found["inotify watches"]["level"] == "ok"


def test_a_role_that_cannot_write_fails_the_permissions_check(pg_url: str, tmp_path: Path) -> None:
    """A role that may only read cannot even open the ledger (the schema check creates
    what is missing); one that may create in the schema opens it, and the check names the
    table privileges it lacks."""
    root = tmp_path / "photos"
    make_tree(root)
    assert CliRunner().invoke(main, ["--db", pg_url, "repo", "add", str(root)]).exit_code == 0
    role = f"fsl_reader_{uuid.uuid4().hex[:8]}"
    schema = pg_url.rsplit("search_path%3D", 1)[1]
    admin = psycopg.connect(pg_url, autocommit=True)
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
        reader = pg_url.replace("postgresql://postgres@", f"postgresql://{quote(role)}@")
        code, out = doctor(reader, "--json")
        found = by_check(json.loads(out))
        assert code == 1, out
        assert "database" not in found
        assert found["permissions"]["level"] == "fail"
        assert "permission denied for schema" in found["permissions"]["detail"]
        assert "INSERT/UPDATE/DELETE" in found["permissions"]["advice"]

        admin.execute(f'GRANT CREATE ON SCHEMA "{schema}" TO "{role}"')
        code, out = doctor(reader, "--json")
        found = by_check(json.loads(out))
        assert code == 1, out
        assert found["database"]["level"] == "ok"
        assert found["permissions"]["level"] == "fail"
        assert f"the role {role} lacks INSERT/UPDATE/DELETE" in found["permissions"]["detail"]
    finally:
        admin.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE "{role}"')
        admin.close()


def test_a_sqlite_file_this_user_cannot_write_fails(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_tree(root)
    db = tmp_path / "ledger.db"
    url = "sqlite://" + str(db)
    assert CliRunner().invoke(main, ["--db", url, "repo", "add", str(root)]).exit_code == 0
    db.chmod(0o444)
    done = subprocess.run(
        [*unprivileged_prefix(), sys.executable, "-m", "fsledger.cli", "--db", url, "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("FAIL  permissions") and str(db) in first, done.stdout
    assert "Permission denied" in first


def test_the_store_reports_itself_and_its_totals(
    ledger: Ledger, store_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    make_tree(root)
    repo = ledger.add_repository(str(root))
    assert ledger.store.record_totals(repo.id) == (0, 0)
    ledger.scan(repo)
    on_disk = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    assert ledger.store.record_totals(repo.id) == (len(on_disk), sum(on_disk))
    assert ledger.status(repo).total_bytes == sum(on_disk)
    # The ledger keeps the totals by the repository's feed head: a file that grew moves it.
    with open(root / "x" / "b.jpg", "ab") as fh:
        fh.write(b"+" * 1000)
    ledger.scan(repo)
    assert ledger.status(repo).total_bytes == sum(on_disk) + 1000
    assert ledger.status(repo).total_files == len(on_disk)

    info = ledger.server_info()
    assert ledger.write_problem() is None
    if store_url.startswith("sqlite"):
        assert (info.kind, info.now) == ("SQLite", None)
        assert info.path == str(tmp_path / "ledger.db")
    else:
        assert info.kind == "PostgreSQL" and info.path is None
        assert info.version.split(".")[0].isdigit()
        assert info.now is not None and abs(info.now - utcnow()) < timedelta(seconds=5)


@given(
    st.lists(
        st.lists(st.sampled_from([b"a", b"b", b"a!", b"a0", b"c"]), min_size=1, max_size=5),
        max_size=30,
    )
)
def test_directories_are_counted_in_one_pass_over_sorted_paths(parts: list[list[bytes]]) -> None:
    """``count_directories`` against the set of every file's ancestors (a file and a
    directory may not share a name: such a tree cannot exist)."""
    paths = sorted({b"/".join(p) for p in parts})
    dirs = {b"/".join(p.split(b"/")[:i]) for p in paths for i in range(1, p.count(b"/") + 1)}
    assume(not dirs & set(paths))
    assert count_directories(paths) == len(dirs) + 1
