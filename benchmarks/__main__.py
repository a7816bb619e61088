"""``python -m benchmarks``: generate (or reuse) the library, measure, print and record.

Examples:
    python -m benchmarks                       # every profile (100k photos), both stores, recorded
    python -m benchmarks --quick               # smaller libraries, printed only (make bench-quick)
    python -m benchmarks --profiles photos,video --stores sqlite
    python -m benchmarks --files 1000000 --profile tiny --stores sqlite \\
        --only initial_index rescan_nochange   # the 1M-file run
"""

from __future__ import annotations

import argparse
import compileall
import shlex
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import live, mirror, report
from benchmarks.library import PROFILES, LibrarySpec, ensure_library, working_copy
from benchmarks.proc import CommandFailed, require_tool
from benchmarks.scenarios import Cli, Measurement, StoreRun
from benchmarks.stores import DEFAULT_PG_URL, make_store

SCENARIOS = (
    "initial_index",
    "rescan_nochange",
    "rescan_served",
    "rescan_changes",
    "api",
    "api_scheduled",
    "watch",
    "mirror",
)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILES = ("photos", "flat", "deep", "video", "mixed", "wide", "single")
"""What ``make bench`` measures; ``tiny`` is the 1M-file run's, asked for by name."""
COMPARED = ["initial_index", "rescan_nochange", "rescan_served"]
"""The lines measured on a profile other than ``photos`` unless ``--only`` says otherwise:
the two with a reference (``find``, ``b3sum``); the rest does not depend on the tree's
shape, and would make a full run last an hour."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--files", type=int, default=None, help="library size [each profile's own; see --help]"
    )
    p.add_argument("--quick", action="store_true", help="smaller libraries, printed, not recorded")
    p.add_argument(
        "--profiles",
        default=",".join(DEFAULT_PROFILES),
        help="comma-separated library shapes, measured one after the other: "
        + "; ".join(
            f"{name}: {prof.about.replace('%', '%%')} "
            f"({prof.files:,} files; --quick {prof.quick_files:,})"
            for name, prof in PROFILES.items()
        ),
    )
    p.add_argument("--profile", choices=sorted(PROFILES), help="one profile (--profiles NAME)")
    p.add_argument("--stores", default="sqlite,postgres", help="comma-separated store names")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL admin URL")
    p.add_argument("--data-dir", type=Path, default=ROOT / "bench-data", help="library home")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        help="scenarios [all on photos; initial_index rescan_nochange on the others]",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each line")
    p.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append to docs/benchmarks.md and benchmarks/results/runs.jsonl, write latest.json "
        "[default: yes, except with --quick]",
    )
    args = p.parse_args(argv)
    if args.profile:
        args.profiles = args.profile
    args.profiles = [name.strip() for name in args.profiles.split(",") if name.strip()]
    for name in args.profiles:
        if name not in PROFILES:
            p.error(f"unknown profile {name!r} (one of {', '.join(PROFILES)})")
    if args.record is None:
        args.record = not args.quick
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pg_version(url: str) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error:
        return None
    return f"PostgreSQL {row[0]}" if row else None


def compile_bytecode() -> None:
    """Byte-compile fsledger, as installing a package does. An editable install leaves that
    to the first import, which never writes it where ``PYTHONDONTWRITEBYTECODE`` is set (as
    on these machines): every timed command would compile the sources again, ~0.1 s."""
    import fsledger

    compileall.compile_dir(Path(fsledger.__file__).parent, quiet=1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    require_tool("b3sum", "b3sum")
    executable = shutil.which("fsledger", path=str(Path(sys.executable).parent))
    if executable is None:
        sys.exit("fsledger is not installed in this Python's environment: run 'make install'")
    compile_bytecode()
    cli = Cli(executable)
    for profile in args.profiles:
        measure_profile(args, argv, cli, profile)
    return 0


def measure_profile(args: argparse.Namespace, argv: list[str], cli: Cli, profile: str) -> None:
    """Generate (or reuse) one profile's library, measure it on every store, print and
    record its section."""
    prof = PROFILES[profile]
    files = args.files or (prof.quick_files if args.quick else prof.files)
    only = args.only or (list(SCENARIOS) if profile == "photos" else COMPARED)
    data_dir = args.data_dir.resolve()
    library = ensure_library(LibrarySpec(files, profile), data_dir, log)
    log(f"library: {library.files:,} files, {library.bytes / (1 << 20):,.0f} MiB in {library.tree}")

    results: list[Measurement] = []
    skipped: list[str] = []
    pg_version = None
    for name in args.stores.split(","):
        store = make_store(name.strip(), data_dir, args.pg_url)
        if reason := store.unavailable():
            skipped.append(f"{store.name}: {reason}")
            log(f"skipping {store.name}: {reason}")
            continue
        if store.name == "postgres":
            pg_version = _pg_version(args.pg_url)
        log(f"[{store.name}] preparing a working copy")
        work = working_copy(library, data_dir)
        runner = StoreRun(cli, store, library, work, args.repeats, log)
        try:
            run_store(runner, only, skipped, args.quick, results)
        except (CommandFailed, psycopg.Error) as exc:
            # A database that went away mid-run (a server restart) costs that store's
            # remaining lines, not the run: what was measured is still reported.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            skipped.append(f"{store.name}: the rest of its lines, after a failure: {first_line}")
            log(f"[{store.name}] failed: {exc}")
        finally:
            runner.close()
            shutil.rmtree(work, ignore_errors=True)

    when = datetime.now(UTC)
    command = "python -m benchmarks " + shlex.join(argv) if argv else "python -m benchmarks"
    info = report.machine(pg_version)
    # Judged on the library a profile is defined at: a smaller one weighs the CLI's fixed
    # start-up more (ratios are printed, not judged).
    full_size = files >= prof.files
    section = report.markdown(
        results, library, info, command, args.repeats, sorted(set(skipped)), when, full_size
    )
    print(section)
    if args.record and not results:
        log("nothing was measured: nothing recorded")
    elif args.record:
        payload: dict[str, Any] = {
            "date": when.isoformat(timespec="seconds"),
            "command": command,
            "machine": info,
            "library": {
                **library.spec.to_json(),
                "bytes": library.bytes,
                "directories": library.directories,
            },
            "repeats": args.repeats,
            "results": [m.to_json() for m in results],
            "targets": report.judge(results, library.files, full_size),
            "not_measured": sorted(set(skipped)),
        }
        results_dir = ROOT / "benchmarks" / "results"
        # latest.json: the last recorded run; runs.jsonl: every recorded run, one a line,
        # as the sections of docs/benchmarks.md are.
        report.write_json(results_dir / "latest.json", payload)
        report.append_jsonl(results_dir / "runs.jsonl", payload)
        report.append_markdown(ROOT / "docs" / "benchmarks.md", section)
        log(f"recorded in docs/benchmarks.md and {results_dir}/")


def run_store(
    runner: StoreRun, only: list[str], skipped: list[str], quick: bool, out: list[Measurement]
) -> None:
    """The selected scenarios on one store, in the order they build on each other; each
    measurement is appended to ``out`` as soon as it is taken."""
    name = runner.store.name
    log(f"[{name}] initial index")
    index = runner.initial_index() if "initial_index" in only else None
    if index is None:
        runner.index_untimed()
    else:
        out.append(index)
    if "rescan_nochange" in only:
        log(f"[{name}] no-change rescan")
        out.append(runner.rescan_nochange())
    if "rescan_served" in only:
        log(f"[{name}] no-change rescan, run by the daemon ('fsledger run')")
        out.append(runner.rescan_served())
    if "mirror" in only:
        if reason := mirror.rclone_missing():
            skipped.append(f"mirror to a bucket vs rclone sync: {reason}")
        else:
            log(f"[{name}] mirror to a bucket (SeaweedFS) vs rclone sync")
            try:
                out += mirror.measure_mirror(runner, runner.work.parent.parent)
            except (RuntimeError, OSError, CommandFailed) as exc:
                skipped.append(f"mirror on {name}: failed: {exc}")
                log(f"  mirror failed: {exc}")
    clock = None
    if "rescan_changes" in only:
        if "api" in only and shutil.which("watchman"):
            # The feed's reference: Watchman's since-query on the same changes, so its
            # clock is taken before them (after its crawl of the tree).
            log(f"[{name}] watchman crawls the tree (the change feed's reference)")
            clock = live.watchman_watch(runner.work)
        log(f"[{name}] rescan after changes")
        out.append(runner.rescan_changes())
    if "api" in only:
        if reason := live.api_missing():
            # Skipped with its reason on a checkout without the HTTP API.
            skipped.append(f"GET /api/v1/changes: {reason}")
        elif "rescan_changes" not in only:
            skipped.append("GET /api/v1/changes: needs the rescan_changes scenario's changes")
        else:
            log(f"[{name}] change feed over HTTP")
            if clock is None:
                skipped.append("watchman since (the feed's reference): watchman is missing")
            try:
                out.append(live.measure_changes_api(runner, clock))
            except (TimeoutError, OSError, CommandFailed, KeyError) as exc:
                skipped.append(f"GET /api/v1/changes on {name}: failed: {exc}")
                log(f"  change feed over HTTP failed: {exc}")
    if "api_scheduled" in only:
        if reason := live.api_missing():
            skipped.append(f"API during a scheduled scan: {reason}")
        else:
            log(f"[{name}] API latency during a scheduled reconciliation")
            try:
                out.append(live.measure_api_during_scheduled_scan(runner))
            except (TimeoutError, OSError, CommandFailed, KeyError) as exc:
                skipped.append(f"API during a scheduled scan on {name}: failed: {exc}")
                log(f"  API during a scheduled scan failed: {exc}")
    if clock is not None:
        live.watchman_unwatch(runner.work)
    # Last: it adds files to the tree (200 written one by one, then a 10k-file burst).
    if "watch" in only:
        if reason := live.watcher_missing():
            # Skipped with its reason on a checkout without the live watcher.
            skipped.append(f"live watcher latency and burst: {reason}")
        else:
            log(f"[{name}] live watcher")
            try:
                burst = live.QUICK_BURST_FILES if quick else live.BURST_FILES
                out += live.measure_watcher(runner, burst)
                out[-1].details["exactness"] = runner.check_exact().to_json()
            except (TimeoutError, OSError, CommandFailed) as exc:
                skipped.append(f"live watcher on {name}: failed: {exc}")
                log(f"  live watcher failed: {exc}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
