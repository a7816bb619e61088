"""The watch tree: one inotify watch per directory, and which directory each watch is.

A watch descriptor follows its directory's inode, not its path: after a directory is
renamed, the paths of it and of every directory below it are rewritten here (the
kernel's watches stay as they are).
"""

from __future__ import annotations

import errno
import logging
import os

from fsledger.beneath import Beneath
from fsledger.model import RelPath
from fsledger.watch.backend import WatchBackend, WatchLimitReached, max_user_watches
from fsledger.watch.state import DirIndex, Key, RepoWatch, join, show

log = logging.getLogger(__name__)

GONE = (errno.ENOENT, errno.ENOTDIR)
"""Errors that mean "not there any more" (every other error means "cannot know")."""


class WatchTree:
    """Watches of every repository, over one backend.

    Not locked by itself: the ``Watcher`` calls it under its lock.
    """

    def __init__(self, backend: WatchBackend) -> None:
        self.backend = backend
        self.owners: dict[int, tuple[RepoWatch, RelPath]] = {}
        """wd -> (repository, path of the directory)."""
        self.deleted: set[int] = set()
        """Watches whose directory reported IN_DELETE_SELF: their IN_IGNORED is expected."""

    def __len__(self) -> int:
        return len(self.owners)

    def owner(self, wd: int) -> tuple[RepoWatch, RelPath] | None:
        return self.owners.get(wd)

    def path_of(self, wd: int | None) -> RelPath | None:
        entry = self.owners.get(wd) if wd is not None else None
        return entry[1] if entry is not None else None

    def key_path(self, key: Key) -> RelPath | None:
        """The path a ``(parent wd, name)`` key names now (None: its directory is gone)."""
        entry = self.owners.get(key[0])
        return join(entry[1], key[1]) if entry is not None else None

    def watch(self, repo: RepoWatch, top: RelPath) -> int:
        """Watch ``top`` and every non-ignored directory below it; returns how many.

        The watch limit stops the walk and marks the repository degraded (with a warning);
        a directory that vanished meanwhile is skipped.
        """
        added = 0
        stack = [top]
        try:
            below = Beneath(repo.repo.root)
        except OSError as exc:
            log.warning("Cannot watch repository %s: its root: %s", repo.id, exc)
            return 0
        with below:
            while stack:
                rel = stack.pop()
                try:
                    # The directory reached below the root without following a symlink, and
                    # watched through its descriptor's /proc name: no path string below the
                    # root is resolved again, and depth has no PATH_MAX limit.
                    wd = self.backend.add_watch(below.proc_path(rel))
                except WatchLimitReached as exc:
                    self._degrade(repo, exc)
                    break
                except OSError as exc:
                    if exc.errno not in GONE:
                        log.warning("Cannot watch %s in repository %s: %s", show(rel), repo.id, exc)
                        repo.failed.add(rel)
                    continue
                self._map(repo, rel, wd)
                added += 1
                stack += self._subdirs(repo, below, rel)
        return added

    @staticmethod
    def _subdirs(repo: RepoWatch, below: Beneath, rel: RelPath) -> list[RelPath]:
        out: list[RelPath] = []
        try:
            fd = below.open_dir(rel)
        except OSError as exc:
            if exc.errno not in GONE:
                log.warning("Cannot list %s in repository %s: %s", show(rel), repo.id, exc)
                repo.failed.add(rel)
            return out
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    child = join(rel, name)
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir and not repo.rules.ignores_name(name, child):
                        out.append(child)
        except OSError as exc:
            if exc.errno not in GONE:
                log.warning("Cannot list %s in repository %s: %s", show(rel), repo.id, exc)
                repo.failed.add(rel)
        finally:
            os.close(fd)
        return out

    def unwatch(self, repo: RepoWatch, top: RelPath) -> None:
        """Remove the watches of ``top`` and everything below it."""
        for _path, wd in repo.index.remove_subtree(top):
            self.owners.pop(wd, None)
            self.deleted.discard(wd)
            self.backend.remove_watch(wd)

    def drop(self, repo: RepoWatch, wd: int, path: RelPath) -> None:
        """Forget one watch the kernel already removed (IN_IGNORED)."""
        repo.index.discard(path, wd)
        self.owners.pop(wd, None)
        self.deleted.discard(wd)

    def rename(self, repo: RepoWatch, old: RelPath, new: RelPath) -> None:
        """``old`` was renamed to ``new``: rewrite the paths of its subtree's watches."""
        if new != old:
            self.unwatch(repo, new)  # an empty directory the rename replaced
        for path, wd in repo.index.remove_subtree(old):
            moved = new + path[len(old) :]
            repo.index.add(moved, wd)
            self.owners[wd] = (repo, moved)

    def detach(self, repo: RepoWatch, top: RelPath) -> list[tuple[RelPath, int]]:
        """Take ``top``'s subtree out of the path index, keeping its watches: another
        directory was renamed onto ``top``, and this one is either gone (overwritten) or
        about to reappear under another name (an exchange). Returns ``(suffix, wd)``
        pairs, the suffix being the path below ``top`` (``b""`` for ``top`` itself)."""
        return [(path[len(top) :], wd) for path, wd in repo.index.remove_subtree(top)]

    def attach(self, repo: RepoWatch, top: RelPath, watches: list[tuple[RelPath, int]]) -> None:
        """Put a detached subtree back, at ``top``."""
        self.unwatch(repo, top)
        for suffix, wd in watches:
            if wd in self.owners:
                repo.index.add(top + suffix, wd)
                self.owners[wd] = (repo, top + suffix)

    def forget_detached(self, watches: list[tuple[RelPath, int]]) -> None:
        """A detached subtree that did not reappear: its directory was overwritten."""
        for _suffix, wd in watches:
            self.owners.pop(wd, None)
            self.deleted.discard(wd)
            self.backend.remove_watch(wd)

    def rewatch(self, repo: RepoWatch) -> bool:
        """Rebuild a repository's watches from the disk (after an overflow, renames may be
        unknown). Returns whether the root is watched."""
        before = set(repo.index.by_path.values())
        for wd in before:
            self.owners.pop(wd, None)
        repo.index = DirIndex()
        self.watch(repo, b"")
        for wd in before - set(repo.index.by_path.values()):
            self.backend.remove_watch(wd)
        return b"" in repo.index.by_path

    def _map(self, repo: RepoWatch, path: RelPath, wd: int) -> None:
        prev = self.owners.get(wd)
        if prev is not None and (prev[0] is not repo or prev[1] != path):
            prev[0].index.discard(prev[1], wd)  # the same directory, known at a stale path
        old = repo.index.by_path.get(path)
        if old is not None and old != wd:
            self.owners.pop(old, None)  # another directory took this path's place
            self.backend.remove_watch(old)
        repo.index.add(path, wd)
        self.owners[wd] = (repo, path)
        self.deleted.discard(wd)

    def _degrade(self, repo: RepoWatch, exc: WatchLimitReached) -> None:
        if not repo.degraded:
            repo.degraded = True
            log.warning(
                "Repository %s is only partly watched: %s. Changes in unwatched directories "
                "are caught by scheduled reconciliations only (limit %s watches).",
                repo.id,
                exc,
                max_user_watches(),
            )
