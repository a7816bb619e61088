"""The measured scenarios. Each times fsledger (the real CLI, in a subprocess) and its
reference tool over the same files in the same run:

- ``initial_index``: ``fsledger repo add ROOT`` on an empty database, against
  ``find ROOT -type f -print0 | xargs -0 -P2 -n 500 b3sum`` (two hashing jobs);
- ``rescan_nochange``: ``fsledger scan``, against ``find ROOT -type f -printf '%s %T@ %p\\n'``;
- ``rescan_served``: the same command while ``fsledger run`` keeps the repository (the
  daemon runs the scan), against the same ``find``;
- ``rescan_changes``: ``fsledger scan`` after ``mutate.apply_changes``, against the same
  ``find``; then the ledger is compared with an independent walk (``verify``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import sysconfig
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import verify
from benchmarks.library import Library
from benchmarks.mutate import apply_changes
from benchmarks.proc import Run, Timing, interleaved, run, shell
from benchmarks.stores import BenchStore

REPO = "bench"


def find_command(root: Path) -> str:
    return f"find {shlex.quote(str(root))} -type f -printf '%s %T@ %p\\n' > /dev/null"


def b3sum_command(root: Path) -> str:
    return f"find {shlex.quote(str(root))} -type f -print0 | xargs -0 -P2 -n 500 b3sum > /dev/null"


@dataclass
class Measurement:
    """One line of the results: fsledger against its reference, on one store."""

    scenario: str
    store: str
    subject: Timing
    reference: Timing | None
    reference_command: str
    command: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference is None:
            return None
        return self.subject.median / self.reference.median

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "store": self.store,
            "ratio": round(self.ratio, 3) if self.ratio is not None else None,
            "fsledger": self.subject.to_json(),
            "reference": self.reference.to_json() if self.reference else None,
            "command": self.command,
            "reference_command": self.reference_command,
            "details": self.details,
        }


class Cli:
    """The ``fsledger`` command line, run as a user would run it."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        # Measure the defaults: no setting inherited from the caller's environment.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FSLEDGER_", "RECONCILIATION_", "FILE_WATCHER_"))
        }
        self.env["FSLEDGER_LOG_LEVEL"] = "WARNING"

    def argv(self, url: str, *args: str) -> list[str]:
        return [self.executable, "--db", url, *args]

    def __call__(self, url: str, *args: str) -> Run:
        return run(self.argv(url, *args), env=self.env, capture=True)

    def shown(self, *args: str) -> str:
        """The command as the doc shows it."""
        return shlex.join(["fsledger", "--db", "URL", *args])


def _scan_stats(out: Run) -> dict[str, Any]:
    """The stats object of ``repo add --json`` or ``scan --json`` output."""
    line = out.stdout.strip().splitlines()[-1]
    data = json.loads(line)
    stats: dict[str, Any] = data.get("scan", data)
    return stats


def _counts(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("files_scanned", "files_added", "files_updated", "files_removed", "files_moved")
    out = {k: stats[k] for k in keys}
    out["files_hashed"] = stats["files_hashed"]
    out["errors"] = len(stats["errors"])
    return out


def _peak_rss(pid: int) -> int:
    """A running process's peak resident set (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _changed(counts: dict[str, Any]) -> bool:
    return any(v for k, v in counts.items() if k != "files_scanned")


class StoreRun:
    """All scenarios on one store, in order, sharing one working copy and database."""

    def __init__(
        self,
        cli: Cli,
        store: BenchStore,
        library: Library,
        work: Path,
        repeats: int,
        log: Callable[[str], None],
    ) -> None:
        self.cli = cli
        self.store = store
        self.library = library
        self.work = work
        self.repeats = repeats
        self.log = log
        self.url = ""
        self.cursor_before_changes = ""
        """The change-feed cursor (``FEED_ID:SEQ``) just before ``rescan_changes``."""
        self._dbs = ExitStack()

    def close(self) -> None:
        self._dbs.close()

    # --- 1. initial index vs b3sum -P2 -------------------------------------------------
    def initial_index(self) -> Measurement:
        args = ("repo", "add", str(self.work), "--name", REPO, "--json")
        runs: list[Run] = []

        def index_once() -> Run:
            self._dbs.close()  # drop the previous repeat's database
            self.url = self._dbs.enter_context(self.store.fresh())
            out = self.cli(self.url, *args)
            runs.append(out)
            return out

        ref, sub = interleaved(self.repeats, lambda: shell(b3sum_command(self.work)), index_once)
        stats = _scan_stats(runs[-1])
        if stats["files_scanned"] != self.library.files or stats["errors"]:
            raise RuntimeError(f"initial index saw something else than the library: {stats}")
        return Measurement(
            "initial_index",
            self.store.name,
            sub,
            ref,
            b3sum_command(Path("ROOT")),
            self.cli.shown(*args[:2], "ROOT", *args[3:]),
            {"counts": _counts(stats), "bytes": self.library.bytes},
        )

    def index_untimed(self) -> None:
        """Index the working copy without measuring it (when initial_index is not selected)."""
        self.url = self._dbs.enter_context(self.store.fresh())
        self.cli(self.url, "repo", "add", str(self.work), "--name", REPO, "--json")

    # --- 2. no-change rescan vs find ---------------------------------------------------
    def rescan_nochange(self) -> Measurement:
        """The rescan against ``find``; beside each, the Python floor of the line
        (``benchmarks.floor``, the least a Python command must do for it), in the details."""
        args = ("scan", REPO, "--json")
        runs: list[Run] = []
        floor = Timing()
        floor_argv = self._floor_argv()

        def scan_once() -> Run:
            floor.add(run(floor_argv, env=self._floor_env()))
            out = self.cli(self.url, *args)
            runs.append(out)
            return out

        ref, sub = interleaved(self.repeats, lambda: shell(find_command(self.work)), scan_once)
        unexpected = [c for c in (_counts(_scan_stats(r)) for r in runs) if _changed(c)]
        return Measurement(
            "rescan_nochange",
            self.store.name,
            sub,
            ref,
            find_command(Path("ROOT")),
            self.cli.shown(*args),
            {
                "counts": _counts(_scan_stats(runs[-1])),
                "unexpected_changes": unexpected,
                "floor": floor.to_json(),
                "floor_ratio": round(floor.median / ref.median, 3),
                "floor_command": "python -I -S benchmarks/floor.py URL REPO_ID ROOT",
            },
        )

    def _floor_argv(self) -> list[str]:
        listed = json.loads(self.cli(self.url, "repo", "list", "--json").stdout)
        repo_id = next(r["id"] for r in listed if r["name"] == REPO)
        script = Path(__file__).with_name("floor.py")
        return [sys.executable, "-I", "-S", str(script), self.url, repo_id, str(self.work)]

    @staticmethod
    def _floor_env() -> dict[str, str]:
        return {"FLOOR_SITE": sysconfig.get_paths()["purelib"]}

    # --- 2b. the same rescan, run by the daemon that keeps the repository ---------------
    def rescan_served(self) -> Measurement:
        """``fsledger scan`` while ``fsledger run`` (watching, no HTTP) keeps the
        repository: the command hands the scan to the daemon (``fsledger.control``). Timed
        at the command, as ``rescan_nochange``; the scan's own time in the daemon
        (``duration_ms``) and the daemon's peak RSS go in the details."""
        import signal
        import subprocess
        import tempfile
        import time

        args = ("scan", REPO, "--json")
        runs: list[Run] = []
        with tempfile.TemporaryDirectory(prefix="fsl-rt-") as runtime:
            env = {**self.cli.env, "XDG_RUNTIME_DIR": runtime}
            log_path = Path(runtime) / "run.log"
            with open(log_path, "wb") as log_file:
                daemon = subprocess.Popen(
                    [*self.cli.argv(self.url, "run", "--no-http")],
                    env={**env, "FSLEDGER_LOG_LEVEL": "INFO"},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                deadline = time.monotonic() + 600
                while "Reconciliation completed" not in log_path.read_text(errors="replace"):
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the daemon did not start: " + log_path.read_text())
                    time.sleep(0.05)

                def scan_once() -> Run:
                    out = run(self.cli.argv(self.url, *args), env=env, capture=True)
                    runs.append(out)
                    return out

                ref, sub = interleaved(
                    self.repeats, lambda: shell(find_command(self.work)), scan_once
                )
                asked = log_path.read_text(errors="replace").count("asked for by 'fsledger scan'")
                hwm = _peak_rss(daemon.pid)
            finally:
                os.killpg(daemon.pid, signal.SIGTERM)
                daemon.wait(60)
        if asked != len(runs):
            raise RuntimeError(f"{len(runs)} scans, {asked} served by the daemon")
        in_daemon = sorted(_scan_stats(r)["duration_ms"] for r in runs)
        unexpected = [c for c in (_counts(_scan_stats(r)) for r in runs) if _changed(c)]
        sub.peak_rss_bytes = max(sub.peak_rss_bytes, hwm)
        return Measurement(
            "rescan_served",
            self.store.name,
            sub,
            ref,
            find_command(Path("ROOT")),
            self.cli.shown(*args) + "  # served by 'fsledger run'",
            {
                "counts": _counts(_scan_stats(runs[-1])),
                "unexpected_changes": unexpected,
                "in_daemon_ms": in_daemon,
                "in_daemon_ratio": round(in_daemon[len(in_daemon) // 2] / 1000 / ref.median, 3),
                "daemon_peak_rss_bytes": hwm,
            },
        )

    # --- 3. rescan after a day of edits, then exactness --------------------------------
    def rescan_changes(self) -> Measurement:
        args = ("scan", REPO, "--json")
        self.cursor_before_changes = self._feed_cursor()
        changes = apply_changes(self.work, self.library)
        self.log(
            f"  changed the tree: {changes.modified} modified, {changes.deleted} deleted, "
            f"{changes.added} added, {changes.renamed_files} files in a renamed folder"
        )
        runs: list[Run] = []

        def scan_once() -> Run:
            out = self.cli(self.url, *args)
            runs.append(out)
            return out

        ref, sub = interleaved(1, lambda: shell(find_command(self.work)), scan_once)
        exact = self.check_exact()
        return Measurement(
            "rescan_changes",
            self.store.name,
            sub,
            ref,
            find_command(Path("ROOT")),
            self.cli.shown(*args),
            {
                "changes": changes.to_json(),
                "counts": _counts(_scan_stats(runs[-1])),
                "exactness": exact.to_json(),
            },
        )

    def _feed_cursor(self) -> str:
        from fsledger.feed import Feed
        from fsledger.store import open_store

        store = open_store(self.url)
        try:
            return str(Feed(store).head())
        finally:
            store.close()

    def check_exact(self) -> verify.Comparison:
        listed = self.cli(self.url, "files", REPO, "--json")
        result = verify.compare(verify.disk_state(self.work), verify.ledger_state(listed.stdout))
        self.log(f"  exactness: {json.dumps(result.to_json())}")
        return result
