"""Helpers shared by the watcher tests: writing files, swapping two names, a file's digest.

The ledger's view of a tree, the independent disk walk it is compared with, and waiting with
a deadline are in ``support`` (one helper per job for every test module).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from treeutil import blake3_of_file

digest_of = blake3_of_file


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
