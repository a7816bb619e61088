"""Helpers shared by the watcher tests: an independent disk walker, the ledger's view of
the same tree, and waiting on a condition with a deadline.

The walker deliberately shares no code with fsledger (``os.walk``, ``fnmatch``, the
``blake3`` package directly): a bug in ``fsledger.walk`` or ``fsledger.ignore`` must not
be able to hide itself by agreeing with itself.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path

from fsledger.ledger import Ledger
from fsledger.model import Repository
from treeutil import blake3_of_file, describe_diff
from treeutil import disk_files as disk_state

State = dict[bytes, tuple[int, str | None]]
"""relative path -> (size, blake3 hex)"""


digest_of = blake3_of_file


def ledger_state(ledger: Ledger, repo: Repository) -> State:
    return {r.path: (r.size, r.content_hash) for r in ledger.files(repo)}


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


RENAME_EXCHANGE = 2
AT_FDCWD = -100
SYS_RENAMEAT2 = 316  # x86_64, for a libc without the renameat2 wrapper


def exchange(a: Path, b: Path) -> None:
    """``renameat2(a, b, RENAME_EXCHANGE)``: swap two names atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    args = (AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    fn = getattr(libc, "renameat2", None)
    rc = fn(*args) if fn is not None else libc.syscall(SYS_RENAMEAT2, *args)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))
