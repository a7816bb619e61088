"""The daemon's figures: live-watcher latency and burst, and the change feed over HTTP.

The daemon is the real ``fsledger run`` in a subprocess, serving its HTTP API. The
benchmark observes it the way other clients would, two ways at once: through its own
connection to the same database (polling ``Store.get_record`` / ``count_records`` every
millisecond), so close-to-row is "file closed" to "row visible to a reader", commit
included; and as a subscriber of ``GET /api/v1/events``, so close-to-SSE is "file closed"
to "a Server-Sent Event naming it received".
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import statistics
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.library import ContentSource, plan
from benchmarks.proc import Timing, run
from benchmarks.scenarios import REPO, Measurement, StoreRun

LATENCY_FILES = 200
BURST_FILES = 10_000
"""The issue's burst; ``--quick`` uses ``QUICK_BURST_FILES`` to stay under a minute."""
QUICK_BURST_FILES = 1_000
POLL_S = 0.001
API_PAGE = 10_000
"""The API's largest page of changes: a client catching up asks for as much as it may."""
WARMUP_FILES = 5


def watcher_missing() -> str | None:
    """Why the live watcher cannot be measured yet, or None."""
    try:
        from fsledger.watch import Watcher  # noqa: F401
    except ImportError as exc:
        return f"the live watcher (fsledger.watch.Watcher) is not importable yet: {exc}"
    return None


def api_missing() -> str | None:
    """Why the HTTP API cannot be measured yet, or None."""
    try:
        import fsledger.api  # noqa: F401
    except ImportError as exc:
        return f"the HTTP API (fsledger.api) is not importable yet: {exc}"
    return None


def _wait(
    condition: Callable[[], bool], deadline_s: float, what: str, poll_s: float = POLL_S
) -> float:
    """Poll ``condition`` until true; return the perf_counter time it became true."""
    end = time.perf_counter() + deadline_s
    while True:
        if condition():
            return time.perf_counter()
        if time.perf_counter() > end:
            raise TimeoutError(f"{what}: not seen within {deadline_s:.0f} s")
        time.sleep(poll_s)


class Daemon:
    """``fsledger run`` in a subprocess; stopped with SIGTERM, reaped with ``wait4``."""

    def __init__(self, runner: StoreRun, *extra: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            runner.cli.argv(runner.url, "run", *extra),
            env={**runner.cli.env, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.peak_rss_bytes = 0

    def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        _pid, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_bytes = usage.ru_maxrss * 1024


@contextmanager
def daemon(runner: StoreRun, *extra: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = Daemon(runner, *extra, env=env)
    try:
        yield d
    finally:
        d.stop()


class SseListener:
    """A subscriber of the daemon's ``/api/v1/events``, reading on its own thread: when each
    path was first named by a change event (``perf_counter``, taken as the event's line
    arrives).

    Example:
        >>> with SseListener("http://127.0.0.1:8080/api/v1/events") as sse:  # doctest: +SKIP
        ...     received = sse.wait_for("a/b.jpg", 30)
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[str, float] = {}
        self._per_top: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._open = False
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sse-listener", daemon=True)

    def __enter__(self) -> SseListener:
        self._thread.start()
        self._until(lambda: self._open, 120, "the SSE stream to open")
        return self

    def __exit__(self, *exc: object) -> None:
        # The stream ends when the daemon stops; this thread then returns.
        self._stop.set()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set():
            try:
                with httpx.stream("GET", self.url, timeout=httpx.Timeout(10.0, read=None)) as r:
                    r.raise_for_status()
                    with self._cond:
                        self._open = True
                        self._cond.notify_all()
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            self._received(line, time.perf_counter())
                return
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    self._fail("the daemon's HTTP API did not answer within 120 s")
                    return
                time.sleep(0.05)  # the daemon is still starting
            except httpx.HTTPError as exc:
                if not self._stop.is_set():
                    self._fail(f"the SSE stream failed: {exc!r}")
                return

    def _received(self, line: str, at: float) -> None:
        path = json.loads(line[len("data:") :])["path"]
        with self._cond:
            if path not in self.seen:
                self.seen[path] = at
                self._per_top[path.partition("/")[0]] += 1
                self._cond.notify_all()

    def _fail(self, error: str) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _until(self, condition: Callable[[], bool], deadline_s: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: condition() or self._error, deadline_s):
                raise TimeoutError(f"{what}: not seen within {deadline_s:.0f} s")
            if self._error and not condition():
                raise OSError(self._error)

    def wait_for(self, path: str, deadline_s: float) -> float:
        """When an event first named ``path`` (waiting for it)."""
        self._until(lambda: path in self.seen, deadline_s, f"SSE event for {path}")
        return self.seen[path]

    def wait_under(self, top: str, count: int, deadline_s: float) -> float:
        """When the last of ``count`` distinct paths in top-level directory ``top`` was first
        named (waiting for them)."""
        self._until(lambda: self._per_top[top] >= count, deadline_s, f"{count} SSE events")
        with self._cond:
            return max(t for p, t in self.seen.items() if p.startswith(top + "/"))


def _burst_tarball(runner: StoreRun, files: int) -> Path:
    """A tar of the library's first ``files`` files (made once, beside the library)."""
    lib = runner.library
    tar_path = lib.tree.parent / f"burst-{files}.tar"
    if not tar_path.exists():
        tmp = tar_path.with_suffix(".partial")
        with tarfile.open(tmp, "w") as tar:
            for f in plan(lib.spec):
                if f.index >= files:
                    break
                tar.add(lib.tree / f.path, arcname=f.path)
        tmp.rename(tar_path)
    return tar_path


def measure_watcher(runner: StoreRun, burst_files: int = BURST_FILES) -> list[Measurement]:
    """Close-to-row and close-to-SSE latency over files written one at a time, then a
    ``tar -x`` burst."""
    from fsledger.model import OperationStatus, OperationType, utcnow
    from fsledger.store import open_store

    store = open_store(runner.url)
    port = _free_port()
    events_url = f"http://127.0.0.1:{port}/api/v1/events"
    shown = runner.cli.shown("run", "--listen", "HOST:PORT")
    try:
        repo = next(r for r in store.list_repositories() if r.name == REPO)
        content = ContentSource(runner.library.spec.seed + 2)
        live = runner.work / "9998" / "live"
        launched = utcnow()

        def startup_over() -> bool:
            return any(
                op.operation_type is OperationType.STARTUP
                and op.start_time >= launched
                and op.status is not OperationStatus.RUNNING
                for op in store.recent_operations(repo.id, 10)
            )

        with (
            daemon(runner, "--listen", f"127.0.0.1:{port}") as d,
            SseListener(events_url) as sse,
        ):
            # Measured once the daemon is in its steady state: its startup reconciliation
            # (a rescan of the whole library, seconds long) is over, and the watcher sees
            # a new folder and a file in it; a few more files are not counted.
            _wait(startup_over, 300, "the startup reconciliation", poll_s=0.1)
            live.mkdir(parents=True)
            content.write(live / "READY.jpg", 0, 4096, time.time_ns())
            ready = b"9998/live/READY.jpg"
            _wait(lambda: store.get_record(repo.id, ready) is not None, 300, "watcher start")

            def write_and_wait(name: str) -> tuple[float, float]:
                rel = f"9998/live/{name}"
                with open(live / name, "wb") as f:
                    f.write(os.urandom(8192))
                closed = time.perf_counter()
                row = _wait(lambda: store.get_record(repo.id, rel.encode()) is not None, 30, name)
                return row - closed, sse.wait_for(rel, 30) - closed

            for i in range(WARMUP_FILES):
                write_and_wait(f"WARM_{i:04d}.jpg")
            to_row, to_sse = zip(
                *(write_and_wait(f"LIVE_{i:04d}.jpg") for i in range(LATENCY_FILES)), strict=True
            )

            before = store.count_records(repo.id)
            tarball = _burst_tarball(runner, burst_files)
            target = runner.work / "9997-burst"
            target.mkdir()
            started = time.perf_counter()
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(target)], check=True)
            ended = time.perf_counter()
            want = before + burst_files
            applied = _wait(lambda: store.count_records(repo.id) >= want, 120, "burst")
            streamed = sse.wait_under(target.name, burst_files, 120)
    finally:
        store.close()

    burst = Timing([applied - started], d.peak_rss_bytes)
    name = runner.store.name
    return [
        _latency("watch_latency", name, list(to_row), d, shown),
        _latency("watch_sse", name, list(to_sse), d, f"GET /api/v1/events under {shown}"),
        Measurement(
            "watch_burst",
            name,
            burst,
            None,
            "",
            f"tar -xf burst.tar ({burst_files} files) under {shown}",
            {
                "burst_files": burst_files,
                "tar_seconds": ended - started,
                "applied_after_end": applied - ended,
                "streamed_after_end": streamed - ended,
            },
        ),
    ]


def _latency(
    scenario: str, store: str, samples: list[float], d: Daemon, command: str
) -> Measurement:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Measurement(
        scenario,
        store,
        Timing(samples, d.peak_rss_bytes),
        None,
        "",
        command,
        {"p50": statistics.median(samples), "p99": p99, "samples": len(samples)},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def watchman_watch(root: Path) -> str:
    """Have Watchman watch ``root`` (its crawl done) and return its clock: the reference's
    cursor, taken before the changes as the feed's is."""
    subprocess.run(["watchman", "watch", str(root)], check=True, capture_output=True, timeout=600)
    out = subprocess.run(
        ["watchman", "clock", str(root)], check=True, capture_output=True, timeout=600
    )
    clock: str = json.loads(out.stdout)["clock"]
    return clock


def watchman_unwatch(root: Path) -> None:
    subprocess.run(["watchman", "watch-del", str(root)], capture_output=True, timeout=60)


def measure_changes_api(runner: StoreRun, clock: str | None = None) -> Measurement:
    """``GET /api/v1/changes?since=CURSOR`` for the changes of the changed rescan, read the
    way a client reads them: pages of ``limit=10000`` following ``cursor`` until
    ``has_more`` is false, each body parsed. One reading is the time for all of its pages.

    With ``clock`` (Watchman's, taken before the same changes), each reading is paired
    with Watchman's ``since`` query for them, run right after it: the reference."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/v1/changes?limit={API_PAGE}&since="

    def get(cursor: str) -> dict[str, Any]:
        with urllib.request.urlopen(base + urllib.parse.quote(cursor), timeout=30) as resp:
            body: dict[str, Any] = json.loads(resp.read())
        return body

    def read_all() -> tuple[float, int]:
        start = time.perf_counter()
        cursor, count, more = runner.cursor_before_changes, 0, True
        while more:
            page = get(cursor)
            count += len(page["changes"])
            cursor, more = page["cursor"], page["has_more"]
        return time.perf_counter() - start, count

    def answers() -> bool:
        try:
            get(runner.cursor_before_changes)
        except OSError:
            return False
        return True

    since = ["watchman", "since", str(runner.work), clock or ""]
    timing = Timing()
    reference = Timing() if clock else None
    watchman_files = 0
    with daemon(runner, "--no-watch", "--listen", f"127.0.0.1:{port}") as d:
        _wait(answers, 120, "HTTP API start")
        read_all()  # untimed: warms the daemon's caches and the database's
        if reference is not None:
            run(since, capture=True)  # untimed, as the feed's first reading
        for _ in range(runner.repeats):
            seconds, count = read_all()
            timing.seconds.append(seconds)
            if reference is not None:
                answer = run(since, capture=True)
                reference.add(answer)
                watchman_files = len(json.loads(answer.stdout)["files"])
    timing.peak_rss_bytes = d.peak_rss_bytes
    return Measurement(
        "api_changes",
        runner.store.name,
        timing,
        reference,
        "watchman since ROOT CLOCK (the same changes; its clock taken before them)"
        if reference
        else "",
        f"GET /api/v1/changes?since=CURSOR&limit={API_PAGE} (following cursor) under "
        + runner.cli.shown("run", "--no-watch", "--listen", "HOST:PORT"),
        {
            "changes_read": count,
            "pages": -(-count // API_PAGE),
            "page_limit": API_PAGE,
            "watchman_files": watchman_files if reference else None,
        },
    )


SCHEDULED_AFTER = "15s"
"""The daemon's RECONCILIATION_INTERVAL here: its first scheduled run comes this long after
the start (the startup run, never gentle, is over by then on the benchmark's libraries)."""
API_PROBE_S = 0.02
API_MIN_SAMPLES = 200
"""Probes that must fall during scheduled runs for the p99 to mean something."""
API_MAX_RUNS = 8
"""...or this many scheduled runs probed, whichever comes first."""


def measure_api_during_scheduled_scan(runner: StoreRun) -> Measurement:
    """``GET /api/v1/repositories/ID/status`` every 20 ms while the daemon runs *scheduled*
    (gentle: nice 10, idle I/O, paced batches) reconciliations of the whole library (as many
    as it takes to gather ``API_MIN_SAMPLES`` probes during them): the
    issue's bound is a p99 under 100 ms. The same probe while the daemon is idle is the
    baseline (``idle_p99``)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    env = {
        "RECONCILIATION_INTERVAL": SCHEDULED_AFTER,
        "RECONCILIATION_DAILY_AT": "off",
        # The benchmark measures the scheduled run: a busy machine may delay it, not skip it.
        "FSLEDGER_SCHEDULE_MAX_DEFERRAL": "30s",
        # Clean runs would lengthen the interval past the benchmark's patience.
        "FSLEDGER_ADAPTIVE_INTERVAL": "false",
    }
    idle: list[float] = []
    during: list[float] = []
    waited = False
    with (
        daemon(runner, "--no-watch", "--listen", f"127.0.0.1:{port}", env=env) as d,
        httpx.Client(timeout=30) as http,
    ):

        def answers() -> bool:
            try:
                return http.get(f"{base}/repositories").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(answers, 120, "HTTP API start")
        repo_id = http.get(f"{base}/repositories").json()[0]["id"]
        url = f"{base}/repositories/{repo_id}/status"

        def last_op() -> dict[str, Any]:
            op: dict[str, Any] = http.get(url).json()["last_sync_operation"] or {}
            return op

        _wait(
            lambda: (
                last_op().get("operation_type") == "startup"
                and last_op().get("status") == "completed"
            ),
            600,
            "the startup reconciliation",
        )
        # A no-change reconciliation of 100k files lasts a second or two: one gives too few
        # probes for a p99, so the probes go on through further scheduled runs (the interval
        # kept fixed) until enough of them fell during one.
        runs: set[int] = set()
        end = time.perf_counter() + 900
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            body = http.get(url).json()
            elapsed = time.perf_counter() - t0
            op = body["last_sync_operation"] or {}
            kind, status = op.get("operation_type"), op.get("status")
            waited = waited or kind == "deferral"
            if kind == "reconciliation" and status == "running":
                runs.add(op["id"])
                during.append(elapsed)
            elif runs and (len(during) >= API_MIN_SAMPLES or len(runs) >= API_MAX_RUNS):
                break
            else:
                idle.append(elapsed)
            time.sleep(API_PROBE_S)
        else:
            raise TimeoutError("the scheduled reconciliations did not run within 15 minutes")
    if not during:
        raise TimeoutError("the scheduled reconciliation ended before a probe saw it running")
    measurement = _latency(
        "api_scheduled_scan",
        runner.store.name,
        during,
        d,
        f"GET /api/v1/repositories/ID/status every {API_PROBE_S * 1000:.0f} ms during a "
        "scheduled reconciliation under "
        + runner.cli.shown("run", "--no-watch", "--listen", "HOST:PORT")
        + f" (RECONCILIATION_INTERVAL={SCHEDULED_AFTER})",
    )
    ordered = sorted(idle) or [0.0]
    measurement.details["idle_p99"] = ordered[
        min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    ]
    measurement.details["deferred_first"] = waited
    return measurement
