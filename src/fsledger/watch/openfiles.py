"""Which files some process holds open for writing: the watcher's last resort, asked only
of files with a write not followed by its ``IN_CLOSE_WRITE`` once their debounce is over.

inotify says a file was written (``IN_MODIFY``) and that a writable descriptor of it was
closed (``IN_CLOSE_WRITE``), but not that a writer still holds it: a ``cp`` stalled longer
than the debounce between two writes looks just like a ``truncate(2)`` (a write without a
descriptor, so without a close) or a writer that stopped. ``/proc/*/fd`` tells them apart:
a descriptor open for writing (``fdinfo`` flags ``O_WRONLY`` or ``O_RDWR``) on the file's
inode. The scan costs a ``stat`` of every descriptor of the system (some 0.1 s for
thousands), hence only for those files, all of one pass at once. Processes the watcher may
not inspect (other users', without privileges) are not seen: their files are recorded
after the debounce as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["open_for_writing"]

_WRITABLE = os.O_WRONLY | os.O_RDWR


def _flags(pid: str, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_for_writing(files: Iterable[tuple[int, int]], proc: str = "/proc") -> set[tuple[int, int]]:
    """Those of ``files`` (``(st_dev, st_ino)``) some process holds open for writing."""
    wanted = set(files)
    found: set[tuple[int, int]] = set()
    if not wanted:
        return found
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:  # the watcher's own too: its hashing only reads
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in wanted and key not in found:
                flags = _flags(pid, fd)
                if flags is not None and flags & _WRITABLE:
                    found.add(key)
                    if found == wanted:
                        return found
    return found
