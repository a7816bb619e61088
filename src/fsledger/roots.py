"""Is a repository's root healthy? One home for the question every part asks.

An unmounted disk leaves an empty mount point on the parent's device, and a tree that
"lost everything" is far more often a root that is not there than a library that was
deleted (a popular photo server removed 68,811 assets that way). So:

- ``check_root``: the mass-deletion guard a reconciliation passes before its walk and again
  before its deletions (missing, not a directory, unlistable, another device, or empty
  while the ledger holds files);
- ``root_present``: the cheap question the watcher asks before each pass and the manager
  every few seconds (a directory, on the device the last scan saw);
- ``stat_new_root``: what adding a repository requires of its path;
- ``check_bucket``: the same guard for a bucket (``s3://BUCKET[/PREFIX]``), as a pure rule
  over what ``fsledger.s3.bucket`` found out (the I/O stays there).

Filesystems mounted *below* a root are ``fsledger.mounts``'s (``MountGuard``).
"""

from __future__ import annotations

import os
import stat as stat_mod

from fsledger.errors import GuardRefused, RootUnavailable
from fsledger.ignore import IgnoreRules
from fsledger.model import Repository

__all__ = ["check_bucket", "check_root", "root_present", "stat_new_root"]


def root_present(root: bytes, dev: int | None) -> bool:
    """The root is a directory, on device ``dev`` if one was recorded (one ``stat``)."""
    try:
        st = os.stat(root)
    except OSError:
        return False
    return stat_mod.S_ISDIR(st.st_mode) and (dev is None or st.st_dev == dev)


def stat_new_root(root: bytes) -> os.stat_result:
    """The ``stat`` of a path about to become a repository's root.

    Raises:
        RootUnavailable: it does not exist, cannot be reached or is not a directory.
    """
    try:
        st = os.stat(root)
    except OSError as exc:
        raise RootUnavailable(
            f"cannot add {os.fsdecode(root)}: {exc.strerror} (errno {exc.errno})"
        ) from exc
    if not stat_mod.S_ISDIR(st.st_mode):
        raise RootUnavailable(f"cannot add {os.fsdecode(root)}: not a directory")
    return st


def check_root(repo: Repository, has_records: bool, rules: IgnoreRules, force: bool) -> int:
    """The mass-deletion guard. Returns the root's device number.

    Raises:
        RootUnavailable: the root is missing, not a directory, or cannot be listed.
        GuardRefused: the root is on another device than recorded, or empty while records
            exist (an unmounted disk looks exactly like that); ``force`` overrides.
    """
    root = repo.root_str
    try:
        st = os.stat(repo.root)
    except OSError as exc:
        raise RootUnavailable(
            f"repository {repo.name!r}: root {root} is unavailable ({exc.strerror}); is the "
            "disk mounted? Nothing was changed."
        ) from exc
    if not stat_mod.S_ISDIR(st.st_mode):
        raise RootUnavailable(
            f"repository {repo.name!r}: root {root} is not a directory; nothing was changed."
        )
    try:
        names = os.listdir(repo.root)
    except OSError as exc:
        raise RootUnavailable(
            f"repository {repo.name!r}: root {root} cannot be listed ({exc.strerror}); "
            "nothing was changed."
        ) from exc
    if force:
        return st.st_dev
    if repo.root_dev is not None and st.st_dev != repo.root_dev:
        raise GuardRefused(
            f"repository {repo.name!r}: root {root} is on device {st.st_dev:#x}, but was on "
            f"{repo.root_dev:#x}: the disk may not be mounted. Nothing was changed. If the "
            "library really moved to another disk, scan once with --force."
        )
    visible = [n for n in names if not rules.ignores_name(os.fsencode(n), os.fsencode(n))]
    if has_records and not visible:
        raise GuardRefused(
            f"repository {repo.name!r}: root {root} is empty but the ledger holds files: "
            "the disk may not be mounted. Nothing was deleted. If the files really are gone, "
            "scan once with --force."
        )
    return st.st_dev


def check_bucket(
    repo: Repository, *, problem: str | None, empty: bool, has_records: bool, force: bool
) -> None:
    """The mass-deletion guard of a bucket, the local rule transposed: a bucket that is
    missing, refuses us (access denied, wrong credentials) or cannot be reached is
    ``problem``; a prefix that lists ``empty`` while the ledger holds files is refused, as
    an empty mount point is, unless ``force``. Either way nothing is deleted (exit code 4).

    Raises:
        RootUnavailable: ``problem`` (whatever ``force`` says: nothing can be listed).
        GuardRefused: empty while records exist, without ``force``.
    """
    if problem is not None:
        raise RootUnavailable(
            f"repository {repo.name!r}: bucket {repo.root_str} is unavailable ({problem}). "
            "Nothing was changed."
        )
    if empty and has_records and not force:
        raise GuardRefused(
            f"repository {repo.name!r}: {repo.root_str} lists no objects but the ledger holds "
            "files: the bucket or prefix may have been replaced or emptied by mistake. Nothing "
            "was deleted. If the objects really are gone, scan once with --force."
        )
