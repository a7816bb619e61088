"""Network filesystem detection: inotify sees no changes another NFS/SMB client makes.

``statfs(2)`` tells the filesystem type of a path; Python's ``os.statvfs`` does not expose
``f_type``, so it is read through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

NETWORK_FS_TYPES: dict[int, str] = {
    0x6969: "nfs",
    0xFE534D42: "smb2",
    0xFF534D42: "cifs",
    0x517B: "smb",
    0x65735546: "fuse",
}
"""``f_type`` magic numbers (linux/magic.h) of filesystems where inotify is blind to
changes made elsewhere. FUSE is included because it varies by implementation (sshfs,
rclone and s3fs see no remote changes)."""

_libc: ctypes.CDLL | None = None


_STATFS_BUFFER = 512
"""``struct statfs`` is 120 bytes on 64-bit Linux and 64 on 32-bit; a generous buffer keeps
us correct on any ABI, since only the first field (``f_type``) is read."""


def fs_type(path: bytes | str) -> int:
    """The ``f_type`` of the filesystem holding ``path``.

    Raises:
        OSError: ``statfs`` failed (the path is missing or unreachable).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(_STATFS_BUFFER)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    # f_type is the first field, a native word (__fsword_t); the magic numbers fit 32 bits,
    # and on 32-bit ABIs the high ones come back negative.
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_network_fs(path: bytes | str) -> bool:
    """Whether ``path`` is on NFS, SMB/CIFS or FUSE, where inotify misses remote changes.

    Raises:
        OSError: ``statfs`` failed.
    """
    return fs_type(path) in NETWORK_FS_TYPES
