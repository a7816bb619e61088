"""Running a command and measuring it: wall time, exit status and peak RSS from ``wait4``.

Commands are started through ``spawn.py``, a tiny helper that forks, execs and reaps the
command with ``wait4`` and reports the time from fork to reaping and ``ru_maxrss``. Linux
reports as ``ru_maxrss`` the largest resident set of the command *or any descendant it
reaped* (hashing workers included): the biggest single process of the tree, not their
sum. It includes the few MiB of the helper that the command was forked from (see
``spawn.py`` for why there is a helper at all).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPAWN = Path(__file__).with_name("spawn.py")


@dataclass(frozen=True)
class Run:
    """One finished command."""

    seconds: float
    peak_rss_bytes: int
    stdout: str


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; the message carries its stderr."""


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    cwd: Path | None = None,
) -> Run:
    """Run ``argv`` to completion and measure it. Raises ``CommandFailed`` on a non-zero exit."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        helper = [sys.executable, "-S", str(SPAWN), str(report), *argv]
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(
                helper, stdout=out, stderr=errors, env=dict(env) if env else None, cwd=cwd
            )
            stdout_b, _ = proc.communicate()
            if proc.returncode != 0:
                errors.seek(0)
                raise CommandFailed(
                    f"{shlex.join(argv)} exited {proc.returncode}: "
                    + errors.read().decode(errors="replace")[-4000:]
                )
        measured = json.loads(report.read_text())
    return Run(
        measured["seconds"],
        measured["peak_rss_bytes"],
        (stdout_b or b"").decode(errors="surrogateescape"),
    )


def shell(script: str) -> Run:
    """Run a shell pipeline with bash (``set -o pipefail``)."""
    return run(["bash", "-c", "set -o pipefail; " + script])


@dataclass
class Timing:
    """Repeated measurements of one thing."""

    seconds: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0

    def add(self, r: Run) -> None:
        self.seconds.append(r.seconds)
        self.peak_rss_bytes = max(self.peak_rss_bytes, r.peak_rss_bytes)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def to_json(self) -> dict[str, object]:
        return {
            "median_s": round(self.median, 4),
            "best_s": round(self.best, 4),
            "runs_s": [round(s, 4) for s in self.seconds],
            "peak_rss_bytes": self.peak_rss_bytes or None,
        }


def interleaved(
    repeats: int,
    reference: Callable[[], Run],
    subject: Callable[[], Run],
    before_each: Callable[[], None] | None = None,
) -> tuple[Timing, Timing]:
    """Time ``reference`` and ``subject`` alternately ``repeats`` times each.

    The reference runs once untimed first, so the page cache is warm for both; the
    alternation spreads the noise of a shared machine evenly over the two.
    """
    reference()
    ref, sub = Timing(), Timing()
    for _ in range(repeats):
        ref.add(reference())
        if before_each is not None:
            before_each()
        sub.add(subject())
    return ref, sub


def require_tool(name: str, apt_package: str) -> str:
    """Path of ``name``; installs Debian's ``apt_package`` when it is missing and we are root."""
    found = shutil.which(name)
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit(f"{name} is missing: install it with 'apt-get install {apt_package}'")
    print(f"{name} is missing: running apt-get install -y {apt_package}", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", apt_package], check=False)
    found = shutil.which(name)
    if not found:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", apt_package], check=True)
        found = shutil.which(name)
    if not found:
        sys.exit(f"{name} is still missing after installing {apt_package}")
    return found
