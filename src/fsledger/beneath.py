"""Paths below a repository root, resolved without following a single symlink.

Whoever can write into a watched tree is untrusted. ``open(root + b"/" + rel, O_NOFOLLOW)``
guards only the last component of ``rel``: a directory in the middle that was replaced by a
symlink (``rm -r foo && ln -s /etc foo``) is followed, and the ledger would record, hash and
publish files outside the root under ``foo/``. So nothing below a root is ever opened as one
path string. Every directory below it is resolved relative to the root's descriptor with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux 5.6+), or,
where the kernel lacks it, one component at a time with ``O_NOFOLLOW``; the last component is
then opened or ``lstat``-ed relative to its directory's descriptor. A path longer than
``PATH_MAX`` is resolved in pieces, so depth has no limit either.

A symlink met in the middle of a path means the path does not exist as a directory entry of
the tree: it is reported as ``ENOTDIR``, which every caller already reads as "gone".

The root itself is the operator's choice and may be a symlink (``/photos -> /mnt/nas``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections import OrderedDict
from types import TracebackType

from fsledger.model import RelPath

log = logging.getLogger(__name__)

__all__ = ["Beneath", "is_dir_below", "resolve_dir", "split"]

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437
"""The same number on every architecture Linux added it to (it postdates the unified table)."""

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_PIECE = 3800
"""Bytes of a path resolved in one call: below PATH_MAX (4096) with room to spare."""
MAX_CACHED_DIRS = 64


class _OpenHow(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 (ctypes' own convention)
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _load_syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_syscall = _load_syscall()
_have_openat2: bool | None = None if _syscall is not None else False
_how = _OpenHow(_DIR_PATH, 0, _RESOLVE)
_how_size = ctypes.sizeof(_OpenHow)


def split(rel: RelPath) -> tuple[RelPath, bytes]:
    """``(parent directory, name)`` of a path below a root (the parent of ``a`` is ``b""``)."""
    parent, _sep, name = rel.rpartition(b"/")
    return parent, name


def _check(rel: RelPath) -> None:
    # Names come from directory listings and events, which never hold these; a path that
    # does is not one of the tree's, whoever built it.
    if rel.startswith(b"/") or any(p in (b"", b".", b"..") for p in rel.split(b"/")):
        raise OSError(errno.EINVAL, "not a plain path below the root", os.fsdecode(rel))


def _openat2(dir_fd: int, path: bytes) -> int:
    """``openat2(dir_fd, path, O_PATH|O_DIRECTORY, RESOLVE_BENEATH|NO_SYMLINKS)``; raises
    ``OSError``. ENOSYS (an old kernel) or EPERM (a seccomp filter) turn the fallback on."""
    global _have_openat2
    assert _syscall is not None
    for _attempt in range(8):
        fd = _syscall(_SYS_OPENAT2, dir_fd, path, ctypes.addressof(_how), _how_size)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # a concurrent rename elsewhere: the kernel asks for a retry
            continue
        if err in (errno.ENOSYS, errno.EPERM) and _have_openat2 is None:
            _have_openat2 = False
            raise _Unsupported
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), os.fsdecode(path))


class _Unsupported(Exception):
    pass


def _by_component(dir_fd: int, path: bytes) -> int:
    fd = dir_fd
    try:
        for name in path.split(b"/"):
            nxt = os.open(name, _DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def resolve_dir(dir_fd: int, rel: RelPath) -> int:
    """A new ``O_PATH`` descriptor of the directory ``rel`` below ``dir_fd``, reached without
    following any symlink; the caller closes it.

    Raises:
        OSError: as ``open`` would; a symlink (or anything not a directory) in the way is
            ``ENOTDIR``.
    """
    global _have_openat2
    _check(rel)
    pieces = _pieces(rel)
    fd = dir_fd
    try:
        for piece in pieces:
            try:
                if _have_openat2 is False or b"/" not in piece:
                    # One component: O_NOFOLLOW is all openat2 would add (no ctypes call).
                    nxt = _by_component(fd, piece)
                else:
                    try:
                        nxt = _openat2(fd, piece)
                        _have_openat2 = True
                    except _Unsupported:
                        nxt = _by_component(fd, piece)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EXDEV):
                    raise NotADirectoryError(
                        errno.ENOTDIR, "a symlink stands where a directory was", os.fsdecode(rel)
                    ) from None
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def _pieces(rel: RelPath) -> list[bytes]:
    if len(rel) <= _PIECE:
        return [rel]
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for name in rel.split(b"/"):
        if cur and size + len(name) + 1 > _PIECE:
            out.append(b"/".join(cur))
            cur, size = [], 0
        cur.append(name)
        size += len(name) + 1
    out.append(b"/".join(cur))
    return out


RECURSE_LEVELS = 32
"""``Beneath.dir_fd`` resolves (and caches) the parents of a directory up to this depth."""


class Beneath:
    """A repository root, opened once, and what lies below it, reached without symlinks.

    Directory descriptors are kept (up to ``MAX_CACHED_DIRS``) for the object's life, so a
    batch of paths in few directories costs one resolution per directory. Keep it short
    lived (a batch, a pass, a chunk of files): a cached descriptor follows its directory if
    it is renamed. Use as a context manager, or call ``close``.

    Raises (from the constructor):
        OSError: the root cannot be opened (missing, not a directory, unmounted).
    """

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.fd = os.open(root, _DIR_PATH)
        self._dirs: OrderedDict[RelPath, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Beneath:
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def dir_fd(self, rel: RelPath) -> int:
        """The (cached) descriptor of directory ``rel`` (``b""``: the root). Do not close it."""
        if not rel:
            return self.fd
        fd = self._dirs.get(rel)
        if fd is not None:
            self._dirs.move_to_end(rel)
            return fd
        # From the parent's (cached) descriptor, one component is left to resolve: a batch
        # in path order meets siblings one after the other, below a parent resolved once.
        # (Past RECURSE_LEVELS levels with no ancestor cached, the path is resolved whole.)
        up, _sep, last = rel.rpartition(b"/")
        if up and up not in self._dirs and rel.count(b"/") > RECURSE_LEVELS:
            fd = resolve_dir(self.fd, rel)
        else:
            fd = resolve_dir(self.dir_fd(up), last)
        self._dirs[rel] = fd
        if len(self._dirs) > MAX_CACHED_DIRS:
            _old, stale = self._dirs.popitem(last=False)
            os.close(stale)
        return fd

    def lstat(self, rel: RelPath) -> os.stat_result:
        """``lstat`` of ``rel`` (the root itself for ``b""``), its parents resolved safely."""
        if not rel:
            return os.stat(self.fd)
        parent, name = split(rel)
        return os.stat(name, dir_fd=self.dir_fd(parent), follow_symlinks=False)

    def open(self, rel: RelPath, flags: int) -> int:
        """``open`` of the file ``rel`` with ``O_NOFOLLOW`` and ``O_NONBLOCK`` added (a FIFO
        planted under a file's name must not block the open); the caller closes it and
        checks with ``fstat`` that it got the kind of file it wanted."""
        parent, name = split(rel)
        _check(rel)
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        return os.open(name, flags, dir_fd=self.dir_fd(parent))

    def open_dir(self, rel: RelPath) -> int:
        """A new readable descriptor of directory ``rel`` (listable); the caller closes it."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        if not rel:
            return os.open(".", flags, dir_fd=self.fd)
        parent, name = split(rel)
        try:
            return os.open(name, flags, dir_fd=self.dir_fd(parent))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotADirectoryError(
                    errno.ENOTDIR, "a symlink stands where a directory was", os.fsdecode(rel)
                ) from None
            raise

    def is_dir(self, rel: RelPath) -> bool:
        """Whether ``rel`` is a directory (not a symlink to one); False if it cannot be seen."""
        import stat as stat_mod

        try:
            return stat_mod.S_ISDIR(self.lstat(rel).st_mode)
        except OSError:
            return False

    def proc_path(self, rel: RelPath) -> bytes:
        """A ``/proc/self/fd`` path naming directory ``rel`` for as long as this object
        lives: for calls that take only a path (``inotify_add_watch``), whatever its depth."""
        return b"/proc/self/fd/%d" % self.dir_fd(rel)


def is_dir_below(root: bytes, rel: RelPath) -> bool:
    """Whether ``rel`` below ``root`` is a directory, reached without following symlinks
    (False when it, or the root, cannot be seen)."""
    try:
        with Beneath(root) as tree:
            return tree.is_dir(rel)
    except OSError:
        return False
