"""Interpreting raw inotify events: the watch tree kept true, renames paired, everything
else coalesced into pending work (``state.Pending``) for the next pass.

Nothing here touches the database or hashes anything; it runs on the reader thread (under
the watcher's lock), so the kernel queue keeps being drained however slow the writes are.
"""

from __future__ import annotations

import logging
import stat as stat_mod
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from fsledger.beneath import Beneath
from fsledger.decide import SettleRule
from fsledger.model import RelPath, Repository
from fsledger.watch.backend import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    RawEvent,
)
from fsledger.watch.metrics import WatcherMetrics
from fsledger.watch.state import (
    DirMove,
    FileMove,
    Key,
    Pending,
    RepoWatch,
    join,
    parent_of,
    show,
    under,
)
from fsledger.watch.tree import WatchTree

log = logging.getLogger(__name__)

LINK_EVENTS = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_CREATE | IN_MOVED_TO
"""Events on an ignored file name after which it may be a hard link of a recorded file
whose content or ctime just changed (written through it, linked, chmod-ed, renamed). A
deleted or renamed-away name cannot be looked at any more: what its unlink changed (the
other names' ctime) waits for the next reconciliation."""


@dataclass(slots=True)
class PendingMove:
    """An IN_MOVED_FROM waiting for its IN_MOVED_TO. Its path is resolved through ``key``
    when needed: an ancestor may be renamed while it waits."""

    repo: RepoWatch
    key: Key
    is_dir: bool
    at: float
    displaced: Displaced | None = None
    """Set when the directory moving is one another rename just took the name of (the
    second half of an exchange)."""
    wd: int | None = None
    """The moving directory's own watch (None: a file, or a directory not watched). The
    name it left may hold another directory before the move pairs or expires (``mv d
    /elsewhere; mkdir d``), and a walk may have found it at its new place first: its
    watch tells which directory is which (``EventInterpreter._moving_path``)."""
    unplaced: bool = False
    """The moving directory is one the tree knows without a watch (``RepoWatch.unplaced``):
    so it is at the name it goes to."""


@dataclass(slots=True)
class Displaced:
    """A directory another directory was renamed onto: a watched one, or one the tree
    knows is there without its watch (``EventInterpreter._unwatched_dir``). Either it was
    empty and is gone (a plain rename over it), or it is the other side of
    ``renameat2(RENAME_EXCHANGE)``, whose rename pair comes right after, from the same
    name, to the name the first one left (``source``). Until one is known (the pair wait),
    its watches are detached from the path index and their events held back."""

    repo: RepoWatch
    key: Key
    path: RelPath
    watches: list[tuple[RelPath, int]]
    checks: dict[RelPath, float]
    """Its subtree's checks queued by path (suffixes), which must not follow the rename."""
    failed: set[RelPath]
    """Its subtree's directories that could not be read (``RepoWatch.failed``, suffixes):
    they come back with it."""
    at: float
    source: Key
    """The name the directory that took its place came from: an exchange's other half
    goes there, and a rename from its name to anywhere else is not that half (the
    directory that moves on is the one that came: this one was overwritten, which a
    directory without a watch does not report)."""


class EventInterpreter:
    """Turns raw events into watch-tree changes and pending work. Not locked by itself: the
    ``Watcher`` calls it under its lock.

    Args:
        repos: the watched repositories (the watcher's own dict, shared).
        tree: the watch tree.
        metrics: event counters.
        settle_s: how soon a closed, moved or deleted path is looked at.
        debounce_s: how long after its last event a path possibly still being written waits.
        pair_wait_s: how long an IN_MOVED_FROM waits for its IN_MOVED_TO.
        max_hold_s: how long a file written and not closed may wait while a writer holds
            it open (``SettleRule.max_hold_s``; the watcher asks, ``Watcher._hold_open``).
    """

    def __init__(
        self,
        repos: dict[UUID, RepoWatch],
        tree: WatchTree,
        metrics: WatcherMetrics,
        settle_s: float,
        debounce_s: float,
        pair_wait_s: float,
        max_hold_s: float = 0.0,
    ) -> None:
        self.repos = repos
        self.tree = tree
        self.metrics = metrics
        self.settle_s = settle_s
        self.debounce_s = debounce_s
        self.rule = SettleRule(settle_s, debounce_s, max_hold_s)
        """When an event's path may be looked at (``fsledger.decide``)."""
        self.pair_wait_s = pair_wait_s
        self.unpaired: dict[int, PendingMove] = {}
        """IN_MOVED_FROM events by cookie."""
        self.frozen: set[int] = set()
        """Watches below a directory whose IN_MOVED_FROM is unpaired."""
        self.deferred: list[RawEvent] = []
        """Events of frozen watches, in order, replayed once their directory's move is known."""
        self.resyncs: list[tuple[Repository, RelPath, str]] = []
        """Reconciliations to ask for, handed over by the watcher outside its lock."""
        self.displaced: dict[Key, Displaced] = {}
        """Directories another rename took the name of, by that name's key."""
        tree.in_flight = lambda wd: wd in self.frozen
        tree.on_rehome = lambda state, path: self._rewatched(state, path, time.monotonic())

    def displacing(self, state: RepoWatch) -> bool:
        """Whether a rename of ``state`` landed on a watched directory and whether that was
        half an exchange is not known yet: its renames must not be written meanwhile."""
        return any(d.repo is state for d in self.displaced.values())

    def frozen_paths(self, state: RepoWatch) -> list[RelPath]:
        """Directories of ``state`` whose IN_MOVED_FROM is unpaired: what is below them is
        held back until they pair (a rename) or expire (moved out)."""
        return [
            path
            for s in self.unpaired.values()
            if s.repo is state and (path := self._moving_path(s)) is not None
        ]

    def _moving_path(self, src: PendingMove) -> RelPath | None:
        """Where the directory of an unpaired IN_MOVED_FROM is known, while it is still
        known at the name it left (its watch there): None for a file, a directory whose
        parent is gone from the tree, or one whose name another directory took meanwhile
        or that a walk found at its new place already (its watch moved or was dropped)."""
        if not src.is_dir or (path := self.tree.key_path(src.key)) is None:
            return None
        if src.wd is not None and src.repo.index.by_path.get(path) != src.wd:
            return None
        return path

    def oldest_unpaired(self) -> float | None:
        return min((f.at for f in self.unpaired.values()), default=None)

    def ingest(self, events: Sequence[RawEvent], now: float) -> None:
        """Interpret a batch of events (caller holds the lock)."""
        for ev in events:
            self._one(ev, now)

    def _one(self, ev: RawEvent, now: float) -> None:
        if ev.mask & IN_Q_OVERFLOW:
            self._overflow()
            return
        if ev.mask & IN_DELETE_SELF and self._overwritten(ev.wd, now):
            return
        if ev.wd in self.frozen:
            # Its directory is below one whose IN_MOVED_FROM is unpaired: where it is (in
            # the repository or out of it) is known once that move pairs or expires.
            self.deferred.append(ev)
            return
        entry = self.tree.owner(ev.wd)
        if entry is None:
            return  # a watch already dropped (its IN_IGNORED, stragglers)
        state, dir_rel = entry
        if ev.mask & IN_IGNORED:
            self._watch_gone(state, ev.wd, dir_rel, now)
            return
        if not ev.name:
            self._self_event(state, ev, dir_rel)
            return
        rel = join(dir_rel, ev.name)
        if state.rules.ignores_name(ev.name, rel):
            self.metrics.events_ignored += 1
            if not ev.mask & IN_ISDIR and ev.mask & LINK_EVENTS:
                self._ignored_file(state, ev, now)
            return
        self.metrics.events_processed += 1
        self._path_event(state, ev, rel, now)

    def _ignored_file(self, state: RepoWatch, ev: RawEvent, now: float) -> None:
        """An event on an ignored file name. Its record is never kept, but the file may be a
        hard link of a recorded one (``ln photo.jpg .hidden``; an editor writing through
        the hidden name): its content or ctime changed with this event, and inotify names
        only the ignored name. It is looked at when it settles, as any path: when it has
        other links, the records with its inode are looked at (``Applier``)."""
        mask, key, pending = ev.mask, (ev.wd, ev.name), state.pending
        content = bool(mask & (IN_MODIFY | IN_CLOSE_WRITE))
        if mask & IN_CLOSE_WRITE:
            pending.link(key, now + self.rule.after_close(), content=True, writing=False)
        elif mask & (IN_MODIFY | IN_CREATE):
            pending.link(key, now + self.rule.after_write(), content=content, writing=True)
        elif mask & IN_ATTRIB:
            current = pending.links.get(key)
            writing = current is not None and current.writing
            pending.link(key, now + self.rule.after_attrib(writing), content=False, writing=None)
        else:  # moved in under an ignored name
            pending.link(key, now + self.rule.after_close(), content=False, writing=None)

    def _refreeze(self, now: float) -> None:
        """Recompute the watches below unpaired directory moves; replay the events held back
        for watches that are no longer below one."""
        self.frozen = {
            wd
            for s in self.unpaired.values()
            if (path := self._moving_path(s)) is not None
            for _, wd in s.repo.index.subtree_wds(path)
        }
        self.frozen.update(wd for d in self.displaced.values() for _, wd in d.watches)
        for s in self.unpaired.values():
            if s.displaced is not None:
                self.frozen.update(wd for _, wd in s.displaced.watches)
        if self.deferred:
            held, self.deferred = self.deferred, []
            for ev in held:
                self._one(ev, now)  # held again if still frozen; dropped if unwatched

    def _path_event(self, state: RepoWatch, ev: RawEvent, rel: RelPath, now: float) -> None:
        mask = ev.mask
        key: Key = (ev.wd, ev.name)
        is_dir = bool(mask & IN_ISDIR)
        pending = state.pending
        if mask & IN_MOVED_FROM:
            displaced = self.displaced.pop(key, None) if is_dir else None
            if displaced is not None and displaced.repo is not state:
                self._drop_displaced(displaced)
                displaced = None
            wd = state.index.by_path.get(rel) if is_dir else None
            unplaced = is_dir and wd is None and key in state.unplaced
            state.unplaced.discard(key)
            self.unpaired[ev.cookie] = PendingMove(state, key, is_dir, now, displaced, wd, unplaced)
            if is_dir:
                self._refreeze(now)
            else:
                # Looked at only after the pairing window: a rename keeps its hash.
                pending.mark(key, now + self.pair_wait_s + self.settle_s)
        elif mask & IN_MOVED_TO:
            self._moved_to(state, key, rel, is_dir, ev.cookie, now)
        elif is_dir:
            if mask & IN_CREATE:
                self._dir_arrived(state, rel, now)
            elif mask & IN_DELETE:
                state.unplaced.discard(key)
                self._dir_gone(state, rel, now)
            elif mask & IN_ATTRIB and state.had_failed(rel):
                self._dir_readable(state, rel, now)
            # Otherwise IN_ATTRIB/IN_MODIFY of a directory change no record.
        elif mask & (IN_CLOSE_WRITE | IN_DELETE):
            closed = bool(mask & IN_CLOSE_WRITE)
            pending.mark(
                key,
                now + self.rule.after_close(),
                content=closed,
                writing=False,
                closed_at=now if closed else None,
            )
        elif mask & IN_MODIFY:
            current = pending.dirty.get(key)
            since = now if current is None or current.open_since is None else current.open_since
            due = self.rule.after_unclosed_write(now, since)
            inode = _linked_inode(state, rel) if current is None else None
            pending.mark(key, due, content=True, writing=True, open_since=since, inode=inode)
        elif mask & IN_CREATE:
            # Opened to be written (``open(O_CREAT)``), or a link, a node: which, the hold
            # asks when it is due without a close (``SettleRule.held``).
            inode = _linked_inode(state, rel) if key not in pending.dirty else None
            pending.mark(
                key, now + self.rule.after_write(), writing=True, open_since=now, inode=inode
            )
        elif mask & IN_ATTRIB:
            current = pending.dirty.get(key)
            writing = current is not None and current.writing
            pending.mark(key, now + self.rule.after_attrib(writing))

    def _moved_to(
        self, state: RepoWatch, key: Key, rel: RelPath, is_dir: bool, cookie: int, now: float
    ) -> None:
        src = self.unpaired.pop(cookie, None) if cookie else None
        try:
            self._paired(state, key, rel, is_dir, src, now)
        finally:
            if src is not None and src.is_dir:
                self._refreeze(now)

    def _paired(
        self,
        state: RepoWatch,
        key: Key,
        rel: RelPath,
        is_dir: bool,
        src: PendingMove | None,
        now: float,
    ) -> None:
        if src is not None and (src.repo is not state or src.is_dir != is_dir):
            self._moved_out(src, now)  # from another repository: out of one, into this one
            src = None
        if src is None:
            if is_dir:
                self._dir_arrived(state, rel, now)
            else:
                state.pending.mark(key, now + self.settle_s)
            return
        if is_dir and src.displaced is not None:
            if key == src.displaced.source:
                self._exchanged(state, src.displaced, key, rel, now)
                return
            # Not back to where the displacing rename came from, so not an exchange: the
            # displaced directory was overwritten, and the one that took its name moves on.
            self._drop_displaced(src.displaced)
            src.displaced = None
        if is_dir:
            old_path = self.tree.key_path(src.key)
            if old_path is None:  # its parent is gone from the tree: count it as moved in
                self._dir_arrived(state, rel, now)
                return
            if src.wd is not None and state.index.by_path.get(old_path) != src.wd:
                self._rehomed(state, src, old_path, rel, now)
                return
            if rel != old_path and under(rel, old_path):
                # Impossible on disk (a directory inside itself): the tree is stale. Make
                # both places true from the disk rather than trust it.
                log.warning(
                    "Repository %s: rename of %s into its own subtree %s; rescanning both",
                    state.id,
                    show(old_path),
                    show(rel),
                )
                self._moved_out(src, now)
                self._dir_arrived(state, rel, now)
                return
            pending = state.pending
            unchecked = self._leaves_unchecked(state, old_path)
            target = state.index.by_path.get(rel)
            if (
                target is not None and target != state.index.by_path.get(old_path)
            ) or self._unwatched_dir(state, key, rel):
                self._displace(state, key, rel, src.key, now)
            self.tree.rename(state, old_path, rel)
            wd = state.index.by_path.get(rel)
            pending.renamed(old_path, rel)
            state.renamed(old_path, rel)
            if src.unplaced:
                state.unplaced.add(key)
            pending.dir_moves.append(DirMove(wd, old_path, rel, now))
            state.move_log.append((old_path, rel, wd))
            if unchecked:
                self._check_moved(state, rel, now)
            return
        moves = state.pending.file_moves
        for move in reversed(moves):
            if move.dst == src.key:  # a -> b, then b -> c: one move a -> c
                move.dst = key
                move.retried = False  # its next hop came: it may wait for another
                break
        else:
            moves.append(FileMove(src.key, key))
        old = state.pending.dirty.get(src.key)
        state.pending.mark(src.key, now + self.settle_s)
        state.pending.mark(
            key,
            now + self.settle_s,
            content=old is not None and old.content,
            closed_at=old.closed_at if old is not None else None,
        )

    def _leaves_unchecked(self, state: RepoWatch, old_path: RelPath) -> bool:
        """Whether a directory renamed away from ``old_path`` leaves a subtree whose check
        is still pending (a directory that arrived and is not scanned yet): the records
        it should carry may not be stored yet, so the rename alone cannot put them at its
        new path, and the check covers only what is below its own path then."""
        pending = state.pending
        return any(under(old_path, p) and p != old_path for p in pending.check_paths) or any(
            (p := self.tree.path_of(w)) is not None and under(old_path, p) and p != old_path
            for w in pending.check_wds
        )

    def _check_moved(self, state: RepoWatch, rel: RelPath, now: float) -> None:
        """Make the directory just renamed to ``rel`` true from the disk (see
        ``_leaves_unchecked``), by its watch when it has one (it may move on)."""
        wd = state.index.by_path.get(rel)
        if wd is not None:
            state.pending.check_wd(wd, now + self.settle_s)
        else:
            state.pending.check_path(rel, now + self.settle_s)

    def _rehomed(
        self, state: RepoWatch, src: PendingMove, old_path: RelPath, rel: RelPath, now: float
    ) -> None:
        """A rename ``old_path -> rel`` whose directory's watch is not at ``old_path`` any
        more when its pair is read: a walk of ``rel`` (or of a later place) found it
        first, or another directory took ``old_path`` and the watches of the one that
        left were dropped. The records follow the rename as always; the watches are
        where the walk put them, or are made again at ``rel`` (which is then listed)."""
        now_at = self.tree.path_of(src.wd)
        pending = state.pending
        pending.renamed(old_path, rel)
        state.renamed(old_path, rel)
        wd = src.wd if now_at is not None else None
        pending.dir_moves.append(DirMove(wd, old_path, rel, now))
        state.move_log.append((old_path, rel, src.wd))
        if now_at is None:
            self.tree.unwatch(state, rel)  # what the rename replaced there
            self._dir_arrived(state, rel, now)

    def _unwatched_dir(self, state: RepoWatch, key: Key, rel: RelPath) -> bool:
        """Whether, by the events read, a directory the tree has no watch for is at ``rel``
        (named ``key``): one that arrived and was left unplaced (``RepoWatch.unplaced``),
        or one that could not be watched (``RepoWatch.failed``). A rename onto it displaces
        it as it does a watched one: read as a plain rename, the second half of an
        exchange with it would take the first half's directory back (found by a targeted
        fuzzer of the model-based test's operations: a directory moved in and exchanged
        before its arrival was read)."""
        if rel in state.index.by_path:
            return False
        return key in state.unplaced or rel in state.failed

    def _displace(self, state: RepoWatch, key: Key, rel: RelPath, source: Key, now: float) -> None:
        """A directory (from ``source``) is being renamed onto the directory ``rel``, watched
        or known without its watch: detach ``rel``'s watches until it is known whether it
        is gone or comes back (see ``Displaced``). A walk's disagreement at ``rel`` was
        about the directory leaving: what is there now is the one the rename brings."""
        pending = state.pending
        state.unplaced.discard(key)
        for path in [p for p in state.disputed if under(p, rel)]:
            del state.disputed[path]
        checks = {p[len(rel) :]: d for p, d in pending.check_paths.items() if under(p, rel)}
        for suffix in checks:
            del pending.check_paths[rel + suffix]
        failed = {f[len(rel) :] for f in state.failed if under(f, rel)}
        state.failed -= {rel + suffix for suffix in failed}
        old = self.displaced.pop(key, None)
        if old is not None:
            self._drop_displaced(old)
        watches = self.tree.detach(state, rel)
        self.displaced[key] = Displaced(state, key, rel, watches, checks, failed, now, source)
        self._refreeze(now)

    def _exchanged(
        self, state: RepoWatch, gone: Displaced, key: Key, rel: RelPath, now: float
    ) -> None:
        """The second half of an exchange: the displaced directory reappears at ``rel``
        (where the first half's directory came from). Its watches follow it (one without
        its own is known there without it), and the rename is queued right after the
        first half, marked to be written with it. Like any rename, it may leave a
        subtree not scanned yet (``_leaves_unchecked``)."""
        unchecked = self._leaves_unchecked(state, gone.path)
        self.tree.attach(state, rel, gone.watches)
        if not any(not suffix for suffix, _ in gone.watches):
            state.unplaced.add(key)
        for suffix, due in gone.checks.items():
            state.pending.check_path(rel + suffix, due)
        state.failed |= {rel + suffix for suffix in gone.failed}
        wd = state.index.by_path.get(rel)
        state.pending.dir_moves.append(DirMove(wd, gone.path, rel, now, exchange=True))
        state.move_log.append((gone.path, rel, wd))
        if unchecked:
            self._check_moved(state, rel, now)

    def _overwritten(self, wd: int, now: float) -> bool:
        """IN_DELETE_SELF of a displaced directory: the rename onto it replaced it (the
        kernel says so within the rename call), so no exchange half is to come."""
        for key, gone in list(self.displaced.items()):
            if any(w == wd and not suffix for suffix, w in gone.watches):
                del self.displaced[key]
                self._drop_displaced(gone)
                self._refreeze(now)
                return True
        return False

    def _drop_displaced(self, gone: Displaced) -> None:
        self.tree.forget_detached(gone.watches)
        self.update_metrics()

    def _moved_out(self, src: PendingMove, now: float) -> None:
        if src.displaced is not None:  # not the exchange it looked like: nothing comes back
            self._drop_displaced(src.displaced)
            src.displaced = None
        if not src.is_dir:
            src.repo.pending.mark(src.key, now + self.settle_s)
        elif (path := self._moving_path(src)) is not None and (
            src.wd is not None or path not in src.repo.index.by_path
        ):
            self._dir_gone(src.repo, path, now)
        elif (path := self.tree.key_path(src.key)) is not None:
            # The name it left holds another directory now, or the directory was found
            # (walked) at its new place already: those watches stay; the records of the
            # name are made true from the disk.
            src.repo.pending.check_path(path, now + self.settle_s)
        # else its parent left the tree too, and that parent's records are cleared.

    def expire(self, now: float, force: bool) -> None:
        """IN_MOVED_FROM events whose pair did not come (``force``: all of them) were moves
        out of the repository."""
        dirs = False
        for key, gone in list(self.displaced.items()):
            if force or now - gone.at >= self.pair_wait_s:
                del self.displaced[key]  # overwritten: a plain rename onto an empty directory
                self._drop_displaced(gone)
                dirs = True
        for cookie, src in list(self.unpaired.items()):
            if force or now - src.at >= self.pair_wait_s:
                del self.unpaired[cookie]
                dirs |= src.is_dir
                if not src.repo.lost and self.repos.get(src.repo.id) is src.repo:
                    self._moved_out(src, now)
        if dirs:
            self._refreeze(now)

    def _dir_arrived(self, state: RepoWatch, rel: RelPath, now: float) -> None:
        """A directory was created or moved in: watch it (and what it already holds) first,
        then reconcile it, so nothing created before the watch landed is missed.

        The walk may leave it unplaced (the disk is ahead of the events: another
        directory's watch is at its name already, ``WatchTree._place``; or it could not
        be watched): by the events it is there all the same (``RepoWatch.unplaced``)."""
        self.tree.watch(state, rel)
        self.update_metrics()
        self._rewatched(state, rel, now)
        wd = state.index.by_path.get(rel)
        if wd is not None:
            state.pending.check_wd(wd, now + self.settle_s)
        else:
            state.pending.check_path(rel, now + self.settle_s)
        parent = state.index.by_path.get(parent_of(rel)) if rel else None
        if wd is None and parent is not None:
            state.unplaced.add((parent, rel.rpartition(b"/")[2]))

    def _rewatched(self, state: RepoWatch, rel: RelPath, now: float) -> None:
        """Watches of the arrived subtree ``rel`` that were frozen: a directory moved out
        (its IN_MOVED_FROM unpaired) and back under another name within the pair wait
        (``mv d /elsewhere && mv /elsewhere d-back``) keeps its watches, as a watch follows
        the inode and watching it again returns the same descriptor. They name paths below
        ``rel`` now, and the check just queued makes ``rel`` true from the disk as it is
        after the walk that watched it, so:

        * the events held back for them came before the arrival, and that disk already
          shows what they did: replayed when the move out expires, a rename among them
          (an exchange of two of its subdirectories) would be applied to records and
          watches that reflect it already, swapping both back (the records then name
          the wrong side, and pending paths resolve to the wrong directory): dropped;
        * the events that follow the arrival are about ``rel`` as watched now: read in
          order as any other, not held back until the move out expires, which would let
          a pass list the subtree in between and their renames be applied after it."""
        wds = {wd for _, wd in state.index.subtree_wds(rel)}
        if not wds & self.frozen:
            return
        self.deferred = [ev for ev in self.deferred if ev.wd not in wds]
        self._refreeze(now)

    def _dir_readable(self, state: RepoWatch, rel: RelPath, now: float) -> None:
        """The mode (or owner, ACL) of a directory that could not be watched or listed, or
        of one of its ancestors, changed: it may be readable now (``chmod 755`` after
        ``chmod 000``). Whatever happened in it meanwhile sent no event the watcher could
        act on, so it is watched again and its subtree reconciled; a check that still
        fails marks it failed again."""
        state.failed = {f for f in state.failed if not under(f, rel)}
        log.info("Repository %s: %s changed mode; scanning it again", state.id, show(rel))
        self._dir_arrived(state, rel, now)

    def _dir_gone(self, state: RepoWatch, rel: RelPath, now: float) -> None:
        """A directory was deleted or moved out: unwatch its subtree, clear its records."""
        self.tree.unwatch(state, rel)
        self.update_metrics()
        state.pending.check_path(rel, now + self.settle_s)

    def _watch_gone(self, state: RepoWatch, wd: int, dir_rel: RelPath, now: float) -> None:
        """IN_IGNORED for a watch we did not remove: its directory was deleted (expected
        after IN_DELETE_SELF), or the watch was lost (an unmount)."""
        deleted = wd in self.tree.deleted
        self.tree.drop(state, wd, dir_rel)
        self.update_metrics()
        if not dir_rel:
            self.lose(state, "the watch of the repository root was removed")
            return
        state.pending.check_path(dir_rel, now + self.settle_s)
        if not deleted:
            self.request_resync(state, dir_rel, "inotify watch lost")

    def _self_event(self, state: RepoWatch, ev: RawEvent, dir_rel: RelPath) -> None:
        root = not dir_rel
        if ev.mask & IN_UNMOUNT:
            if root:
                self.lose(state, "the filesystem of the repository root was unmounted")
            else:
                self.request_resync(state, dir_rel, "a filesystem below it was unmounted")
        elif ev.mask & IN_DELETE_SELF:
            if root:
                self.lose(state, "the repository root was deleted")
            else:
                self.tree.deleted.add(ev.wd)
        elif ev.mask & IN_MOVE_SELF and root:
            self.lose(state, "the repository root was moved")
        elif ev.mask & IN_ATTRIB and root and state.had_failed(b""):
            # The root's own mode changed (its parent is not watched): see _dir_readable.
            self._dir_readable(state, b"", time.monotonic())
        # A subdirectory's IN_MOVE_SELF: its parent's IN_MOVED_FROM/TO tell where it went.

    def _overflow(self) -> None:
        self.metrics.overflows += 1
        log.warning(
            "inotify queue overflow: events were lost; re-watching and reconciling every "
            "watched repository"
        )
        # Pairs whose other half may be lost cannot be trusted; the reconciliation sees all.
        for gone in [*self.displaced.values()] + [
            s.displaced for s in self.unpaired.values() if s.displaced is not None
        ]:
            self._drop_displaced(gone)
        self.displaced.clear()
        self.unpaired.clear()
        self.frozen.clear()
        self.deferred.clear()
        for state in list(self.repos.values()):
            state.unplaced.clear()  # the rewatch places what is there
            if state.lost:
                continue
            if not self.tree.rewatch(state) and not state.degraded:
                self.lose(state, "the repository root cannot be watched")
                continue
            self.request_resync(state, b"", "inotify queue overflow")
        self.update_metrics()

    def lose(self, state: RepoWatch, reason: str) -> None:
        """The root went away: stop watching (records are kept) and ask for a reconciliation,
        which marks the repository offline until its root returns."""
        log.warning("Repository %s: %s; not watching it any more", state.id, reason)
        self.forget(state)
        state.lost = True
        self.update_metrics()
        self.request_resync(state, b"", reason)

    def forget(self, state: RepoWatch) -> None:
        """Drop everything known about a repository's watches and pending work."""
        self.tree.unwatch(state, b"")
        state.pending = Pending()
        state.unplaced.clear()
        for cookie, src in list(self.unpaired.items()):
            if src.repo is state:
                del self.unpaired[cookie]
                if src.displaced is not None:
                    self._drop_displaced(src.displaced)
        for key, gone in list(self.displaced.items()):
            if gone.repo is state:
                del self.displaced[key]
                self._drop_displaced(gone)
        self._refreeze(time.monotonic())
        self.update_metrics()

    def update_metrics(self) -> None:
        repos = self.repos.values()
        self.metrics.watched_repositories = sum(
            1 for s in repos if not s.lost and b"" in s.index.by_path
        )
        self.metrics.watched_directories = len(self.tree)
        self.metrics.degraded_repositories = sum(1 for s in repos if s.degraded)

    def request_resync(self, state: RepoWatch, prefix: RelPath, reason: str) -> None:
        """Queue a request (caller holds the lock); it is handed over outside the lock."""
        self.metrics.resyncs_requested += 1
        self.resyncs.append((state.writer.repo, prefix, reason))


def _linked_inode(state: RepoWatch, rel: RelPath) -> int | None:
    """The inode of the file at ``rel`` if it has other links (``Dirty.inode``): one
    ``lstat`` when a name's first event since its last look is read (IN_CREATE: maybe a
    new link; IN_MODIFY: a write through it), while a short-lived name still exists. None
    for a single link, anything but a file, or a name already gone (or too long a path:
    best effort, a reconciliation covers what is missed)."""
    try:
        # Resolved below the root's descriptor: a directory of the path swapped for a
        # symlink must not lead the look (and the records it refreshes) outside the tree.
        with Beneath(state.repo.root) as tree:
            st = tree.lstat(rel)
    except (OSError, ValueError):
        return None
    return st.st_ino if stat_mod.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
