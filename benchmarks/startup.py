"""``python -m benchmarks.startup``: how long the CLI takes to start, against Python's own.

A command that reads (``fsledger files REPO --json`` on a 10-file repository) or does
nothing (``fsledger --version``) should cost little more than the interpreter starting
plus the work itself: the target is 3 × (``python -c pass`` + the work). The work is timed
in one process with every module already imported (opening the ledger, reading the
records, printing them), so what remains of a command's time is its start: the
interpreter, the imports, the setup.

Run by ``make bench-quick``; prints a Markdown table (the figures in docs/benchmarks.md
were taken with it).
"""

from __future__ import annotations

import argparse
import compileall
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

TARGET_RATIO = 3.0


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``argv`` to completion: its wall time and its CPU time (user + system, from
    ``wait4``: on a shared machine the CPU time is the steadier of the two)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


IN_PROCESS = """
import io, sys
from contextlib import redirect_stdout
from fsledger.cli import main
for _ in range(int(sys.argv[2])):
    with redirect_stdout(io.StringIO()):
        main(["--db", sys.argv[1], "files", "photos", "--json"], standalone_mode=False)
"""


def instructions(argv: list[str], env: dict[str, str]) -> int | None:
    """The user-space instructions ``argv`` executes, counted by valgrind (callgrind): a
    figure no other load on the machine changes. None without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    return int(found.group(1)) if found else None


def measure_work(url: str, repeats: int) -> tuple[float, float]:
    """The median time of ``files photos --json``'s work in this process, its modules
    loaded by a first, untimed run."""
    from fsledger.cli import main

    def once() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with redirect_stdout(io.StringIO()):
            main(["--db", url, "files", "photos", "--json"], standalone_mode=False)
        return time.perf_counter() - start, time.process_time() - cpu

    once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def console_script(installed: str, tmp: Path) -> tuple[str, str | None]:
    """The ``fsledger`` script to time: the installed one when it runs this checkout's entry
    point (``[project.scripts]``), else the same script as pip writes it, with this
    checkout's entry point, in ``tmp`` (a venv installed before the entry point changed
    still has the old one until ``make install``). With a note when it is not the
    installed one."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    entry = tomllib.loads(pyproject.read_text())["project"]["scripts"]["fsledger"]
    module, func = entry.split(":")
    python_script = Path(installed)
    if python_script.read_bytes()[:4] == b"\x7fELF":
        # The native launcher `make install` builds (native/): it execs pip's script, moved
        # to the venv's libexec; the command timed is the launcher, as a user types it.
        python_script = Path(installed).parent.parent / "libexec" / "fsledger"
    text = python_script.read_text()
    wanted = f"from {module} import {func}\n"
    if wanted in text:
        return installed, None
    found = re.search(r"^from (\S+) import (\S+)$", text, re.M)
    if found is None:
        sys.exit(f"{installed} is not a console script pip wrote: run 'make install'")
    script = tmp / "fsledger"
    script.write_text(text.replace(found.group(0) + "\n", wanted))
    script.chmod(0o755)
    note = (
        f"{installed} runs {found.group(1)}:{found.group(2)}, this checkout's entry point is "
        f"{entry}: timed the same script with {entry} (`make install` updates it)"
    )
    return str(script), note


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    p.add_argument("--repeats", type=int, default=21, help="timed runs of each line")
    p.add_argument("--quick", action="store_true", help="fewer runs (11)")
    args = p.parse_args(argv)
    repeats = 11 if args.quick else args.repeats
    executable = shutil.which("fsledger", path=str(Path(sys.executable).parent))
    if executable is None:
        sys.exit("fsledger is not installed in this Python's environment: run 'make install'")
    import fsledger

    # As an install does: an editable checkout would compile on every start otherwise
    # (PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(Path(fsledger.__file__).parent, quiet=1)

    with tempfile.TemporaryDirectory(prefix="fsledger-startup-") as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        for i in range(10):
            (root / f"{i:02d}.jpg").write_bytes(os.urandom(1000))
        url = "sqlite://" + str(Path(tmp) / "ledger.db")
        script, note = console_script(executable, Path(tmp))
        env = {**os.environ, "FSLEDGER_DATABASE_URL": url}
        subprocess.run(
            [executable, "repo", "add", str(root)], env=env, check=True, capture_output=True
        )
        lines: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            # The floor of any click CLI: the framework's own import (not judged).
            "python -c 'import click'": [sys.executable, "-c", "import click"],
            "fsledger --version": [script, "--version"],
            "fsledger files photos --json": [script, "files", "photos", "--json"],
        }
        walls: dict[str, list[float]] = {name: [] for name in lines}
        cpus: dict[str, list[float]] = {name: [] for name in lines}
        for argv_ in lines.values():  # warm the page cache
            timed(argv_, env)
        for _ in range(repeats):  # interleaved: a shared machine's noise falls on all
            for name, argv_ in lines.items():
                wall, cpu = timed(argv_, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
        work_wall, work_cpu = measure_work(url, repeats)
        counted = {name: instructions(argv_, env) for name, argv_ in lines.items()}
        once = instructions([sys.executable, "-c", IN_PROCESS, url, "1"], env)
        twice = instructions([sys.executable, "-c", IN_PROCESS, url, "2"], env)
        work_instr = twice - once if once is not None and twice is not None else None

    def ms(x: float) -> str:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"

    median = statistics.median
    base_wall, base_cpu = median(walls["python -c pass"]), median(cpus["python -c pass"])
    works = {
        "fsledger --version": (0.0, 0.0),
        "fsledger files photos --json": (work_wall, work_cpu),
    }

    def mi(n: int | None) -> str:
        return f"{n / 1e6:.0f}M" if n is not None else "-"

    print(
        "| command | wall (median, best) | CPU (median) | instructions | the work, in-process "
        "(wall, CPU, instructions) | ÷ (python + work): wall, CPU, instructions |"
    )
    print("|---|---|---|---|---|---|")
    base_instr = counted["python -c pass"]
    print(
        f"| `python -c pass` | {ms(base_wall)}, {ms(min(walls['python -c pass']))} "
        f"| {ms(base_cpu)} | {mi(base_instr)} | | |"
    )
    floor = "python -c 'import click'"
    print(
        f"| `{floor}` | {ms(median(walls[floor]))}, {ms(min(walls[floor]))} "
        f"| {ms(median(cpus[floor]))} | {mi(counted[floor])} | | |"
    )
    failed = False
    for name, (w_wall, w_cpu) in works.items():
        wall, cpu, instr = median(walls[name]), median(cpus[name]), counted[name]
        w_instr = 0 if name == "fsledger --version" else work_instr
        ratio_wall = wall / (base_wall + w_wall)
        ratio_cpu = cpu / (base_cpu + w_cpu)
        ratios = [ratio_wall, ratio_cpu]
        shown = f"{ratio_wall:.2f}×, {ratio_cpu:.2f}×"
        if instr is not None and base_instr is not None and w_instr is not None:
            ratios.append(instr / (base_instr + w_instr))
            shown += f", {ratios[-1]:.2f}×"
        failed |= min(ratios) > TARGET_RATIO
        print(
            f"| `{name}` | {ms(wall)}, {ms(min(walls[name]))} | {ms(cpu)} | {mi(instr)} "
            f"| {ms(w_wall)}, {ms(w_cpu)}, {mi(w_instr)} | {shown} |"
        )
    if note is not None:
        print(f"\nNote: {note}.")
    load = os.getloadavg()[0]
    print(
        f"\n{repeats} interleaved runs each; target: at most {TARGET_RATIO:g}× "
        f"({'met' if not failed else 'NOT met'}); Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} while measured"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
