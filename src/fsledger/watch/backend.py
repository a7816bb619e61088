"""Event sources for the watcher: the ``WatchBackend`` interface and its implementations.

A backend is deliberately thin: it adds and removes one watch per directory and hands
over raw inotify events (``RawEvent``), names as bytes, overflows included. Everything
recursive (which directories to watch, what an event means) lives in ``Watcher``.

* ``InotifyBackend``: Linux inotify through ``inotify_simple`` (watch management) with
  our own read and parse, so names stay the bytes the kernel sent.
* ``ScriptedBackend``: the same interface for tests, which push events by hand and so
  can produce any sequence deterministically (an overflow, a move whose halves are far
  apart, a create and a delete inside the debounce window).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import stat as stat_mod
import struct
import termios
import threading
from dataclasses import dataclass
from typing import Protocol

from fsledger.errors import FsledgerError

log = logging.getLogger(__name__)

# The inotify mask bits (linux/inotify.h), spelled out so the scripted backend and the
# watcher do not depend on the binding.
IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
"""What every directory watch asks for. IN_ONLYDIR + IN_DONT_FOLLOW: a symlink or a file
that took a directory's place is never watched; IN_EXCL_UNLINK: no events for files that
were deleted while still open."""

PROC_FD = b"/proc/self/fd/"
"""A watch path with this prefix names a directory the caller opened below its root
without following symlinks (``Beneath.proc_path``): that magic link is followed, as it is
the directory itself."""


def _mask_for(path: bytes) -> int:
    return WATCH_MASK & ~IN_DONT_FOLLOW if path.startswith(PROC_FD) else WATCH_MASK


_MASK_NAMES = {
    IN_ACCESS: "ACCESS",
    IN_MODIFY: "MODIFY",
    IN_ATTRIB: "ATTRIB",
    IN_CLOSE_WRITE: "CLOSE_WRITE",
    IN_CLOSE_NOWRITE: "CLOSE_NOWRITE",
    IN_OPEN: "OPEN",
    IN_MOVED_FROM: "MOVED_FROM",
    IN_MOVED_TO: "MOVED_TO",
    IN_CREATE: "CREATE",
    IN_DELETE: "DELETE",
    IN_DELETE_SELF: "DELETE_SELF",
    IN_MOVE_SELF: "MOVE_SELF",
    IN_UNMOUNT: "UNMOUNT",
    IN_Q_OVERFLOW: "Q_OVERFLOW",
    IN_IGNORED: "IGNORED",
    IN_ISDIR: "ISDIR",
}


def describe_mask(mask: int) -> str:
    """``IN_CREATE|IN_ISDIR``-style text for logs."""
    return "|".join("IN_" + n for bit, n in _MASK_NAMES.items() if mask & bit) or hex(mask)


class WatchLimitReached(FsledgerError):
    """``inotify_add_watch`` failed with ENOSPC: ``fs.inotify.max_user_watches`` is used up."""


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One inotify event as the kernel reports it.

    ``wd`` is -1 for ``IN_Q_OVERFLOW``; ``name`` is empty for events about the watched
    directory itself (``IN_DELETE_SELF``, ``IN_MOVE_SELF``, ``IN_IGNORED``, ...).
    """

    wd: int
    mask: int
    cookie: int
    name: bytes

    def __repr__(self) -> str:
        return f"RawEvent({self.wd}, {describe_mask(self.mask)}, {self.cookie}, {self.name!r})"


class WatchBackend(Protocol):
    """A source of raw directory events: inotify, or a scripted one for tests."""

    def add_watch(self, path: bytes) -> int:
        """Watch one directory (not recursively); returns its watch descriptor. Watching a
        directory that is already watched returns the descriptor it already has.

        Raises:
            WatchLimitReached: the per-user watch limit is used up (ENOSPC).
            OSError: the path is gone, not a directory, or unreadable.
        """
        ...

    def remove_watch(self, wd: int) -> None:
        """Stop watching; a descriptor the kernel already dropped is not an error."""
        ...

    def read(self, timeout_s: float) -> list[RawEvent]:
        """Every event available now, waiting up to ``timeout_s`` for the first one."""
        ...

    def close(self) -> None: ...


def max_user_watches() -> int | None:
    """``fs.inotify.max_user_watches``, for messages."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches", "rb") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


_EVENT = struct.Struct("iIII")


def parse_events(data: bytes) -> list[RawEvent]:
    """Unpack a buffer read from an inotify descriptor (names stay bytes)."""
    out: list[RawEvent] = []
    pos, end, size = 0, len(data), _EVENT.size
    while pos + size <= end:
        wd, mask, cookie, namelen = _EVENT.unpack_from(data, pos)
        pos += size
        name = data[pos : pos + namelen].split(b"\0", 1)[0]
        pos += namelen
        out.append(RawEvent(wd, mask, cookie, name))
    return out


class InotifyBackend:
    """Linux inotify. One instance (one descriptor) serves every repository.

    ``inotify_simple`` creates the descriptor and manages watches; reading is ours, so
    that names are not decoded and an ``IN_Q_OVERFLOW`` reaches the watcher as it is.

    Raises:
        OSError: inotify is unavailable (not Linux, or ``max_user_instances`` used up).
    """

    def __init__(self) -> None:
        import inotify_simple

        self._inotify = inotify_simple.INotify()
        self._fd: int = self._inotify.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._closed = False

    def add_watch(self, path: bytes) -> int:
        try:
            return int(self._inotify.add_watch(path, _mask_for(path)))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                limit = max_user_watches()
                raise WatchLimitReached(
                    f"cannot watch {os.fsdecode(path)}: the inotify watch limit "
                    f"(fs.inotify.max_user_watches={limit}) is used up; raise it with "
                    "'sysctl fs.inotify.max_user_watches=N'"
                ) from exc
            raise

    def remove_watch(self, wd: int) -> None:
        try:
            self._inotify.rm_watch(wd)
        except OSError as exc:
            # EINVAL: the kernel already dropped it (its directory was deleted).
            if exc.errno != errno.EINVAL:
                log.warning("Cannot remove inotify watch %d: %s", wd, exc)

    def read(self, timeout_s: float) -> list[RawEvent]:
        if self._closed:
            return []
        data = self._read_available()
        if not data and timeout_s > 0 and self._poll.poll(int(timeout_s * 1000)):
            data = self._read_available()
        return parse_events(data)

    def _read_available(self) -> bytes:
        avail = bytearray(4)
        fcntl.ioctl(self._fd, termios.FIONREAD, avail, True)
        n: int = struct.unpack("@i", bytes(avail))[0]
        if n <= 0:
            return b""
        # The kernel only ever returns whole events, so a short read stays parseable.
        return os.read(self._fd, n)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inotify.close()


class ScriptedBackend:
    """A backend whose events the test pushes by hand, with watches tracked like the kernel's.

    ``add_watch`` checks the path is a real directory and gives the same descriptor to the
    same inode (as inotify does, which is how a descriptor survives a rename);
    ``remove_watch`` queues ``IN_IGNORED``. ``watch_limit`` makes ``add_watch`` fail with
    ``WatchLimitReached`` beyond that many watches.

    Example:
        >>> backend = ScriptedBackend()  # doctest: +SKIP
        >>> backend.emit(root, IN_CLOSE_WRITE, b"a.jpg")  # doctest: +SKIP
    """

    def __init__(self, watch_limit: int | None = None) -> None:
        self.watch_limit = watch_limit
        self.watches: dict[int, tuple[int, int]] = {}
        """wd -> (st_dev, st_ino) of the watched directory."""
        self._by_inode: dict[tuple[int, int], int] = {}
        self._next_wd = 1
        self._queue: collections.deque[RawEvent] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    # --- the interface ------------------------------------------------------------------
    def add_watch(self, path: bytes) -> int:
        st = os.stat(path) if path.startswith(PROC_FD) else os.lstat(path)
        if not stat_mod.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", os.fsdecode(path))
        ident = (st.st_dev, st.st_ino)
        with self._cond:
            if (wd := self._by_inode.get(ident)) is not None:
                return wd
            if self.watch_limit is not None and len(self.watches) >= self.watch_limit:
                raise WatchLimitReached(
                    f"cannot watch {os.fsdecode(path)}: scripted watch limit "
                    f"{self.watch_limit} reached"
                )
            wd = self._next_wd
            self._next_wd += 1
            self.watches[wd] = ident
            self._by_inode[ident] = wd
            return wd

    def remove_watch(self, wd: int) -> None:
        with self._cond:
            ident = self.watches.pop(wd, None)
            if ident is None:
                return
            self._by_inode.pop(ident, None)
            self._queue.append(RawEvent(wd, IN_IGNORED, 0, b""))
            self._cond.notify_all()

    def read(self, timeout_s: float) -> list[RawEvent]:
        with self._cond:
            if not self._queue and timeout_s > 0 and not self.closed:
                self._cond.wait(timeout_s)
            out = list(self._queue)
            self._queue.clear()
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # --- for tests ----------------------------------------------------------------------
    def wd_of(self, directory: bytes) -> int:
        """The descriptor watching ``directory`` (looked up by its inode, as the kernel does).

        Raises:
            KeyError: the directory is not watched.
        """
        st = os.lstat(directory)
        with self._cond:
            return self._by_inode[(st.st_dev, st.st_ino)]

    def push(self, *events: RawEvent) -> None:
        """Queue events exactly as given."""
        with self._cond:
            self._queue.extend(events)
            self._cond.notify_all()

    def emit(self, directory: bytes | int, mask: int, name: bytes = b"", cookie: int = 0) -> None:
        """Queue one event for the watch of ``directory`` (a path or a descriptor)."""
        wd = directory if isinstance(directory, int) else self.wd_of(directory)
        self.push(RawEvent(wd, mask, cookie, name))

    def overflow(self) -> None:
        """Queue ``IN_Q_OVERFLOW``, as the kernel does when its queue is full."""
        self.push(RawEvent(-1, IN_Q_OVERFLOW, 0, b""))
