"""Distributed scanning: throughput of one reconciliation with 1, 2 and 4 agents.

``python -m benchmarks.distributed --tree DIR [--agents 1 2 4] [--workers 2]``

For each agent count, in a fresh PostgreSQL schema: this process is the owner (it holds the
repository's lease, as ``fsledger run`` would, and runs the reconciliation with
``distributed=True``); the other agents are real ``fsledger run --distributed --no-watch
--no-http`` processes, started first and standing by (the lease is taken), so they only help.
Measured: a first index (every file hashed) and a no-change rescan, in files per second,
and the ledger checked against the tree (file count) after each. ``--baseline`` adds the
local (non-distributed) reconciliation for comparison. The tree is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from benchmarks.stores import DEFAULT_PG_URL
from fsledger.config import Settings
from fsledger.ledger import Ledger


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def schema_url(admin: str, schema: str) -> str:
    sep = "&" if "?" in admin else "?"
    return f"{admin}{sep}options=-csearch_path%3D{schema}"


def count_files(tree: str) -> int:
    total = 0
    for _dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        total += sum(1 for f in filenames if not f.startswith("."))
    return total


def start_helpers(n: int, url: str, workers: int, logdir: Path) -> list[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).with_name("fsledger")
    env = {
        **os.environ,
        "FSLEDGER_DATABASE_URL": url,
        "RECONCILIATION_MAX_CONCURRENCY": str(workers),
        "RECONCILIATION_DISTRIBUTED": "true",
    }
    procs = []
    for i in range(n):
        err = open(logdir / f"helper-{i}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [str(exe), "run", "--no-watch", "--no-http"],
                env=env,
                stderr=err,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + 60
    for i in range(n):
        path = logdir / f"helper-{i}.log"
        while b"Sync manager started" not in path.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"helper {i} did not start: {path.read_text()[-2000:]}")
            time.sleep(0.1)
    return procs


def measure(
    admin: str, tree: str, agents: int, workers: int, distributed: bool, logdir: Path
) -> dict[str, object]:
    schema = f"fsl_dist_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = schema_url(admin, schema)
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(database_url=url, max_concurrency=workers, distributed=distributed)
        with Ledger(settings) as ledger:
            repo = ledger.add_repository(tree)
            lease = ledger.store.acquire_lease(repo.id)
            assert lease is not None
            ledger.writer(repo).lease = lease
            helpers = start_helpers(agents - 1, url, workers, logdir)
            out: dict[str, object] = {"agents": agents, "distributed": distributed}
            for name in ("first_index", "rescan_nochange"):
                t0 = time.perf_counter()
                stats = ledger.scan(repo)
                seconds = time.perf_counter() - t0
                records = ledger.store.count_records(repo.id)
                out[name] = {
                    "seconds": round(seconds, 2),
                    "files": stats.files_scanned,
                    "files_per_s": round(stats.files_scanned / seconds),
                    "hashed": stats.files_hashed,
                    "records": records,
                }
                log(f"  {agents} agent(s) {name}: {seconds:.1f}s {out[name]}")
            lease.release()
            ledger.reconciler.close()
        return out
    finally:
        for p in helpers:
            p.terminate()
        for p in helpers:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    p.add_argument("--tree", required=True, help="the library (only read)")
    p.add_argument("--agents", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--workers", type=int, default=2, help="worker processes per agent")
    p.add_argument("--baseline", action="store_true", help="also the local reconciliation")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every line")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--logs", type=Path, default=Path("/tmp/fsledger-bench-distributed"))
    args = p.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the helper agents are stopped and the schema dropped.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    args.logs.mkdir(parents=True, exist_ok=True)
    files = count_files(args.tree)
    log(f"{args.tree}: {files} files; {os.cpu_count()} cores")
    configs = [(1, False)] if args.baseline else []
    configs += [(n, True) for n in args.agents]
    runs = []
    for repeat in range(args.repeats):
        # Interleaved: a burst of load from elsewhere on a shared machine spreads over every
        # configuration instead of landing on one.
        for n, distributed in configs:
            log(f"repeat {repeat + 1}/{args.repeats}: {n} agent(s), distributed={distributed}")
            runs.append(measure(args.pg_url, args.tree, n, args.workers, distributed, args.logs))
    for run in runs:
        for key in ("first_index", "rescan_nochange"):
            got = run[key]
            assert isinstance(got, dict)
            if got["records"] != files:
                log(f"WARNING: {run['agents']} agent(s) {key}: {got['records']} records != {files}")
    print(json.dumps({"files": files, "cores": os.cpu_count(), "runs": runs}, indent=1))
    log(table(runs, configs, args.workers))
    return 0


def table(runs: list[dict[str, object]], configs: list[tuple[int, bool]], workers: int) -> str:
    """A Markdown table: median files/s and the range over the repeats, per configuration."""
    lines = [
        "| agents | reconciliation | first index (files/s) | no-change rescan (files/s) |",
        "|---:|---|---:|---:|",
    ]
    for n, distributed in configs:
        mine = [r for r in runs if r["agents"] == n and r["distributed"] == distributed]
        cells = []
        for key in ("first_index", "rescan_nochange"):
            rates = sorted(int(r[key]["files_per_s"]) for r in mine)  # type: ignore[index]
            cells.append(f"{statistics.median(rates):,.0f} ({rates[0]:,}–{rates[-1]:,})")
        how = f"distributed, {workers} workers each" if distributed else "local (not distributed)"
        lines.append(f"| {n} | {how} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
