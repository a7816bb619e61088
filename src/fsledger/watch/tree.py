"""The watch tree: one inotify watch per directory, and which directory each watch is.

A watch descriptor follows its directory's inode, not its path: after a directory is
renamed, the paths of it and of every directory below it are rewritten here (the
kernel's watches stay as they are).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from fsledger.beneath import Beneath
from fsledger.model import RelPath
from fsledger.watch.backend import WatchBackend, WatchLimitReached, max_user_watches
from fsledger.watch.state import DirIndex, Key, RepoWatch, join, parent_of, show, under

log = logging.getLogger(__name__)

GONE = (errno.ENOENT, errno.ENOTDIR)
"""Errors that mean "not there any more" (every other error means "cannot know")."""
RECHECK_S = 0.1
"""How long a walk that found the disk ahead of the events (``WatchTree._place``) leaves
them to be read before it walks that directory again and takes the disk's word."""


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
        self.in_flight: Callable[[int], bool] = lambda wd: False
        """Whether a watch's directory is between two known places: below a directory
        whose IN_MOVED_FROM is unpaired, or displaced by a rename onto it (set by the
        ``EventInterpreter``). Where such a directory is now, only the disk can say."""
        self.on_rehome: Callable[[RepoWatch, RelPath], None] = lambda repo, path: None
        """Called after a walk placed a directory in flight (or one the tree knew
        elsewhere) at ``path``: the events held back for its watches are about where
        it was (set by the ``EventInterpreter``)."""

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
        a directory that vanished meanwhile is skipped. The walk reads the disk as it is
        now, which may be ahead of the events read so far (see ``_place``).
        """
        added = 0
        stack: list[tuple[RelPath, bool]] = [(top, False)]
        rehomed: list[RelPath] = []
        try:
            below = Beneath(repo.repo.root)
        except OSError as exc:
            log.warning("Cannot watch repository %s: its root: %s", repo.id, exc)
            return 0
        with below:
            while stack:
                rel, trusted = stack.pop()
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
                placed = self._place(repo, rel, wd, trusted)
                if placed is None:
                    continue
                moved, trusted = placed
                if moved and not any(under(rel, r) for r in rehomed):
                    rehomed.append(rel)
                added += 1
                stack += [(sub, trusted) for sub in self._subdirs(repo, below, rel)]
        for path in rehomed:
            self.on_rehome(repo, path)
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

    def unwatch(self, repo: RepoWatch, top: RelPath, keep: frozenset[int] = frozenset()) -> None:
        """Remove the watches of ``top`` and everything below it (but those in ``keep``,
        which are only taken out of the path index)."""
        for _path, wd in repo.index.remove_subtree(top):
            if wd in keep:
                continue
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
        """Put a detached subtree back, at ``top`` (a walk may have found it there first)."""
        self.unwatch(repo, top, keep=frozenset(wd for _, wd in watches))
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
        repo.disputed.clear()
        self.watch(repo, b"")
        for wd in before - set(repo.index.by_path.values()):
            self.backend.remove_watch(wd)
        return b"" in repo.index.by_path

    def _place(
        self, repo: RepoWatch, path: RelPath, wd: int, trusted: bool
    ) -> tuple[bool, bool] | None:
        """Map the watch ``wd`` a walk got for the directory at ``path``, unless the tree
        may know better for now. Returns None when it did not (the walk does not go
        below it), else whether it was known otherwise (in flight, or the disk's word
        was taken) and whether the disk's word is taken below it too (``trusted``).

        The tree follows the events in their order; a walk reads the disk as it is now.
        When they disagree (``wd`` known at another path, or another watch known at
        ``path``), the operation that explains it may still be in the kernel queue:
        ``mv a b`` not read yet, ``renameat2(RENAME_EXCHANGE)`` of ``path`` and another
        directory, a directory deleted and another made at its name. Its events rewrite
        the tree in order (a rename carries the watches of a subtree, a displacement
        detaches them, a deletion drops them); a walk that took the disk's word first
        made them act on the wrong watches (the exchange put the new occupant's watch
        back where it came from, and the watch of a directory that had only moved was
        removed as if it were gone, found by the model-based test). So the tree is left
        as it is, and ``path`` is walked again a little later (``RECHECK_S``): by then
        the events have been read, or the disagreement was not theirs, and the disk is
        taken at its word (the place the tree knew the directory at is walked again
        too). A directory in flight (``in_flight``) is the exception: where it went,
        only the disk can say."""
        prev = self.owners.get(wd)
        elsewhere = prev is not None and prev[0] is repo and prev[1] != path
        old = repo.index.by_path.get(path)
        other = old is not None and old != wd
        now = time.monotonic()
        if (elsewhere and not self.in_flight(wd)) or (
            other and old is not None and not self.in_flight(old)
        ):
            since = repo.disputed.setdefault(path, now)
            if now - since < RECHECK_S and not trusted:
                repo.pending.check_path(path, since + RECHECK_S)
                return None
            trusted = True
            if elsewhere and prev is not None:
                repo.pending.check_path(prev[1], now)
        repo.disputed.pop(path, None)
        if other:
            # Another directory took the name of the one known there (one in flight, or
            # the disk's word is taken): that one's watches go with it.
            self.unwatch(repo, path, keep=frozenset({wd}))
        self._map(repo, path, wd)
        return elsewhere or other, trusted

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
        if path and (parent := repo.index.by_path.get(parent_of(path))) is not None:
            repo.unplaced.discard((parent, path.rpartition(b"/")[2]))  # placed now

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
