"""``python -m benchmarks.ab``: two versions of fsledger's sources, interleaved on one tree.

For a change to the hot paths, measured on a shared machine: each round runs the reference
(``b3sum -P2`` for the first index, ``find -printf`` for the rescan) and then each version,
so all of them meet the same load. Besides wall time it reports the CPU time of each
command's process tree (``wait4``: the CLI and its worker processes, not a PostgreSQL
server), which a loaded machine disturbs far less than wall time. (Peak RSS is
``python -m benchmarks``'s: forked from here it would include this process's.)

Example (the sources of main copied aside, so that both are byte-compiled alike)::

    cp -r /work/main/src /tmp/base-src && python -m compileall -q /tmp/base-src src
    python -m benchmarks.ab TREE --rounds 3 --src base=/tmp/base-src --src new=src
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

FSLEDGER = Path(sys.executable).parent / "fsledger"


@dataclass
class Figures:
    """Every round's wall seconds and CPU seconds of one line."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def timed(argv: list[str], env: dict[str, str] | None, into: Figures) -> None:
    """Run ``argv`` (a shell line when it is one string), adding its figures to ``into``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    into.wall.append(time.perf_counter() - start)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {shlex.join(argv)}")
    into.cpu.append(usage.ru_utime + usage.ru_stime)


def database(store: str, name: str, pg_url: str) -> str:
    """A fresh empty database for version ``name``: a SQLite file, or a PostgreSQL schema."""
    if store == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"/tmp/ab-{name}.db{suffix}").unlink(missing_ok=True)
        return f"sqlite:////tmp/ab-{name}.db"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS ab_{name} CASCADE")
        conn.execute(f"CREATE SCHEMA ab_{name}")
        conn.execute("CHECKPOINT")
    return f"{pg_url}?options=-csearch_path%3Dab_{name}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    p.add_argument("tree", type=Path)
    p.add_argument("--src", action="append", required=True, help="NAME=DIR of fsledger sources")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args(argv)
    versions = dict(s.split("=", 1) for s in args.src)
    tree = str(args.tree.resolve())
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FSLEDGER_", "RECONCILIATION_"))
    }
    envs = {name: dict(base_env, PYTHONPATH=str(Path(d).resolve())) for name, d in versions.items()}
    b3sum = ["sh", "-c", f"find {shlex.quote(tree)} -type f -print0 | xargs -0 -P2 -n 500 b3sum"]
    find = ["find", tree, "-type", "f", "-printf", "%s %T@ %p\\n"]
    lines: dict[str, Figures] = {}
    subprocess.run(b3sum, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    urls = {}
    for _round in range(args.rounds):
        timed(b3sum, None, lines.setdefault("b3sum -P2", Figures()))
        for name, env in envs.items():
            urls[name] = url = database(args.store, name, args.pg_url)
            add = [str(FSLEDGER), "--db", url, "repo", "add", tree, "--name", "ab", "--json"]
            timed(add, env, lines.setdefault(f"first index {name}", Figures()))
    for _round in range(args.rounds):
        timed(find, None, lines.setdefault("find", Figures()))
        for name, env in envs.items():
            scan = [str(FSLEDGER), "--db", urls[name], "scan", "ab", "--json"]
            timed(scan, env, lines.setdefault(f"rescan {name}", Figures()))
    med = statistics.median
    refs = {"first": lines["b3sum -P2"], "rescan": lines["find"]}
    print(f"{'line':22s} {'wall':>8s} {'cpu':>8s} {'×ref wall':>10s} {'×ref cpu':>9s}")
    for label, f in lines.items():
        ref = refs.get(label.split()[0])
        ratios = (
            f"{med(f.wall) / med(ref.wall):9.2f}× {med(f.cpu) / med(ref.cpu):8.2f}×"
            if ref is not None
            else f"{'':10s} {'':9s}"
        )
        print(f"{label:22s} {med(f.wall):7.2f}s {med(f.cpu):7.2f}s {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
