"""Helpers shared by the watcher tests: an independent disk walker, the ledger's view of
the same tree, and waiting on a condition with a deadline.

The walker deliberately shares no code with fsledger (``os.walk``, ``fnmatch``, the
``blake3`` package directly): a bug in ``fsledger.walk`` or ``fsledger.ignore`` must not
be able to hide itself by agreeing with itself.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from fsledger.ledger import Ledger
from fsledger.model import Repository
from treeutil import blake3_of_file, skipped

State = dict[bytes, tuple[int, str | None]]
"""relative path -> (size, blake3 hex)"""


digest_of = blake3_of_file


def disk_state(root: bytes | str | Path) -> State:
    """Every regular file under ``root`` that the ledger should hold, walked independently."""
    top = os.fsencode(root)
    out: State = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not skipped(d)]
        for name in filenames:
            if skipped(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            out[os.path.relpath(full, top)] = (st.st_size, digest_of(full))
    return out


def ledger_state(ledger: Ledger, repo: Repository) -> State:
    return {r.path: (r.size, r.content_hash) for r in ledger.files(repo)}


def describe_diff(want: State, got: State, limit: int = 10) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    parts = []
    for label, paths in (("missing", missing), ("extra", extra), ("wrong", wrong)):
        if paths:
            shown = ", ".join(os.fsdecode(p) for p in paths[:limit])
            parts.append(f"{label} {len(paths)}: {shown}")
    return "; ".join(parts) or "equal"


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def assert_in_sync(ledger: Ledger, repo: Repository, root: bytes | str | Path) -> None:
    want = disk_state(root)
    got = ledger_state(ledger, repo)
    assert got == want, describe_diff(want, got)


def wait_in_sync(
    ledger: Ledger, repo: Repository, root: bytes | str | Path, timeout: float = 20.0
) -> State:
    """Wait until the ledger equals the disk (walked once: the workload is over)."""
    want = disk_state(root)
    if not wait_until(lambda: ledger_state(ledger, repo) == want, timeout):
        got = ledger_state(ledger, repo)
        raise AssertionError(f"ledger != disk after {timeout}s: {describe_diff(want, got)}")
    return want


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path
