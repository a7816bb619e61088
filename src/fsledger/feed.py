"""Reading the durable change feed by cursor, waking readers when it grows, pruning it.

Framework-free and part of the core: ``Ledger.changes``, the HTTP app, the webhook
dispatchers and ``fsledger changes`` all read the feed through ``Feed`` and wait on
``FeedHub``; none of them needs the web stack to do so.

A cursor is ``FEED_ID:SEQ:TAG``: the random id of the database's feed, the sequence number
of the last entry the reader has seen, and that entry's tag (random per writing
transaction). It is answered with exactly the entries after it. Cursors that would be
answered silently wrong are refused with ``ResyncNeeded`` instead (as Watchman's
fresh-instance flag):

* a cursor of another feed (another database, or one that was recreated);
* a cursor older than the retention low-water mark;
* a cursor beyond the newest entry (the database was restored from an older backup);
* a cursor whose seq now names another entry (restored, then written again: the tags differ).

The error carries the newest cursor, taken *before* the reader lists the files again, so
that replaying the feed from it after the listing loses nothing (applying a change twice
is harmless). The older two-part form ``FEED_ID:SEQ`` is still read, without the tag check.

Example::

    feed = Feed(store)
    page = feed.read(None, limit=100)          # from the beginning of the feed
    for entry in page.entries: ...
    page = feed.read(page.cursor, limit=100)   # exactly what came after
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from uuid import UUID

from fsledger.errors import ConfigError, ResyncNeeded, StoreError
from fsledger.model import FeedEntry, FeedRow, FileRecord, RelPath, Repository, utcnow
from fsledger.store.base import Store

if TYPE_CHECKING:  # the ledger reads the feed through this module: no import cycle at run time
    import asyncio

    from fsledger.ledger import Ledger
    from fsledger.writer import Applied

log = logging.getLogger(__name__)

_CURSOR_RE = re.compile(r"([0-9a-f]{1,32}):(\d{1,18})(?::([0-9a-f]{8}))?")
CURSOR_PATTERN = r"^[0-9a-f]{1,32}:[0-9]{1,18}(?::[0-9a-f]{8})?$"
"""What ``Cursor.parse`` accepts, for schemas."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in one database's change feed: after entry ``seq`` of feed ``feed_id``,
    whose tag was ``tag`` (None: a cursor of the older form, whose entry is not checked)."""

    feed_id: str
    seq: int
    tag: int | None = None

    def __str__(self) -> str:
        if self.tag is None:
            return f"{self.feed_id}:{self.seq}"
        return f"{self.feed_id}:{self.seq}:{self.tag:08x}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """Parse ``FEED_ID:SEQ:TAG`` (or the older ``FEED_ID:SEQ``).

        Raises:
            ConfigError: the text is not a cursor.
        """
        m = _CURSOR_RE.fullmatch(text.strip())
        if m is None:
            raise ConfigError(
                f"{text[:80]!r} is not a change-feed cursor: expected FEED_ID:SEQ:TAG as "
                "returned in 'cursor' by the feed"
            )
        tag = m.group(3)
        return cls(m.group(1), int(m.group(2)), int(tag, 16) if tag is not None else None)


class _Entry(Protocol):
    """What a page is made of: ``FeedEntry`` objects or flat ``FeedRow``s."""

    @property
    def seq(self) -> int: ...

    @property
    def tag(self) -> int: ...


E = TypeVar("E", bound=_Entry)


def entry_cursor(entry: _Entry, feed_id: str) -> Cursor:
    """The cursor right after ``entry``."""
    return Cursor(feed_id, entry.seq, entry.tag)


def entry_json(entry: FeedEntry, feed_id: str) -> dict[str, Any]:
    """A feed entry as JSON, with the cursor that follows it (``id:`` of its SSE event)."""
    return {**entry.to_json(), "cursor": str(entry_cursor(entry, feed_id))}


@dataclass(frozen=True, slots=True)
class FeedPage:
    """One read of the feed."""

    entries: tuple[FeedEntry, ...]
    cursor: Cursor
    """Where the next read starts: after the last entry, or later when a repository filter
    skipped entries."""
    has_more: bool
    """The page was full: read again right away."""

    def to_json(self) -> dict[str, Any]:
        fid = self.cursor.feed_id
        return {
            "changes": [entry_json(e, fid) for e in self.entries],
            "cursor": str(self.cursor),
            "has_more": self.has_more,
        }


@dataclass(frozen=True, slots=True)
class FilesPage:
    """One page of a repository's records, in path byte order (``Ledger.files_page``)."""

    records: tuple[FileRecord, ...]
    after: RelPath | None
    """Pass back to get the next page; None at the end."""
    feed_cursor: Cursor | None
    """On the first page only: the feed's head, read *before* the page. A consumer that lists
    every page and then follows the feed from here misses nothing: whatever changed while it
    listed comes after this cursor (some of it may already be in the listing, and applying
    it again is harmless)."""

    def to_json(self) -> dict[str, Any]:
        after = self.after
        return {
            "files": [r.to_json() for r in self.records],
            "cursor": base64.urlsafe_b64encode(after).decode().rstrip("=")
            if after is not None
            else None,
            "feed_cursor": str(self.feed_cursor) if self.feed_cursor is not None else None,
        }


@dataclass(frozen=True, slots=True)
class RowsPage:
    """One read of the feed as flat rows (``Feed.read_rows``): what the HTTP API serialises
    a page from, straight, with no object per change."""

    rows: list[FeedRow]
    cursor: Cursor
    has_more: bool


class Feed:
    """Reads the change feed of one store by cursor.

    Args:
        store: where the feed lives.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def head(self) -> Cursor:
        """The cursor after the newest entry: a reader starting here sees only what comes next."""
        info = self.store.feed_info()
        return Cursor(info.feed_id, info.latest_seq, info.latest_tag)

    def oldest(self) -> Cursor:
        """The oldest cursor still answered (everything before it was pruned)."""
        info = self.store.feed_info()
        return Cursor(info.feed_id, info.pruned_through, self.store.feed_tag(info.pruned_through))

    def read(self, since: Cursor | None, limit: int, repo_id: UUID | None = None) -> FeedPage:
        """Up to ``limit`` entries after ``since`` (from the beginning of the feed if None).

        Raises:
            ResyncNeeded: ``since`` is from another feed, older than the retention window,
                beyond the newest entry, or names an entry that is not the one it was
                issued for (see the module's docstring).
            StoreError: the database failed.
        """
        entries, cursor, full = self._read(since, limit, repo_id, self.store.changes_since)
        return FeedPage(tuple(entries), cursor, full)

    def read_rows(self, since: Cursor | None, limit: int, repo_id: UUID | None = None) -> RowsPage:
        """``read`` as flat rows (see ``RowsPage``); the same checks and cursors, with the
        state, the rows and the retention mark read in one transaction (``feed_page``)."""
        after = since.seq if since is not None else 0
        info, at, rows, pruned = self.store.feed_page(after, limit, repo_id)
        head = Cursor(info.feed_id, info.latest_seq, info.latest_tag)
        start = since or Cursor(info.feed_id, 0, 0)
        # ``pruned`` was read with the rows: a prune that passed the cursor meanwhile refuses
        # the page rather than answering it with a hole.
        self._check(start, info.feed_id, head, max(info.pruned_through, pruned), at)
        return RowsPage(rows, *self._next(start, head, rows, limit))

    def _next(
        self, start: Cursor, head: Cursor, entries: list[E], limit: int
    ) -> tuple[Cursor, bool]:
        """Where the next read starts, and whether this page was full."""
        full = len(entries) >= limit
        if entries and (full or entries[-1].seq >= head.seq):
            return entry_cursor(entries[-1], head.feed_id), full
        if head.seq > start.seq:
            # A filter skipped the rest up to the head (other repositories, blanked entries).
            return head, full
        return start, full

    def _read(
        self,
        since: Cursor | None,
        limit: int,
        repo_id: UUID | None,
        fetch: Callable[[int, int, UUID | None], list[E]],
    ) -> tuple[list[E], Cursor, bool]:
        # The head is read before the entries: everything up to it is committed (appends are
        # serialised in sequence order), so an empty or partial page may advance to it.
        info = self.store.feed_info()
        start = since or Cursor(info.feed_id, 0, 0)
        head = Cursor(info.feed_id, info.latest_seq, info.latest_tag)
        self._check(start, info.feed_id, head, info.pruned_through)
        entries = fetch(start.seq, limit, repo_id)
        # Checked after reading: pruning only moves forward, so a page read before a prune
        # that passed the cursor is still refused rather than returned with a hole.
        pruned = self.store.feed_info().pruned_through
        if start.seq < pruned:
            raise ResyncNeeded(
                f"resync needed: cursor {start} is older than the change feed's retention window "
                f"(entries up to {pruned} were pruned); list the files again, then follow the "
                f"feed from {head}",
                str(head),
            )
        cursor, full = self._next(start, head, entries, limit)
        return entries, cursor, full

    def _check(
        self, start: Cursor, feed_id: str, head: Cursor, pruned: int, tag: int | None = -1
    ) -> None:
        """Refuse a cursor that this feed cannot answer exactly (``ResyncNeeded``). ``tag``:
        the tag of the entry at ``start.seq`` when the caller read it already (-1: not)."""
        why = None
        if start.feed_id != feed_id:
            why = f"belongs to another change feed (this database's is {feed_id})"
        elif start.seq < pruned:
            why = (
                f"is older than the change feed's retention window (entries up to {pruned} "
                "were pruned)"
            )
        elif start.seq > head.seq:
            why = (
                f"is beyond the newest entry ({head.seq}): the database was restored from an "
                "older backup, or the cursor was not issued by this feed"
            )
        elif start.tag is not None and start.seq > 0:
            if tag == -1:
                tag = head.tag if start.seq == head.seq else self.store.feed_tag(start.seq)
            if tag != start.tag:
                why = (
                    "no longer names the entry it was issued for: the database was restored "
                    "from a backup and written again since"
                )
        if why is not None:
            raise ResyncNeeded(
                f"resync needed: cursor {start} {why}; list the files again, then follow the "
                f"feed from {head}",
                str(head),
            )


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the feed keeps entries: by age and by count (0 turns either off)."""

    max_age_s: float = 30 * 86400.0
    max_entries: int = 1_000_000
    interval_s: float = 600.0
    """How often pruning runs."""

    def prune(self, store: Store) -> int:
        """Prune once; returns the number of entries removed."""
        older = utcnow() - timedelta(seconds=self.max_age_s) if self.max_age_s > 0 else None
        keep = self.max_entries if self.max_entries > 0 else None
        if older is None and keep is None:
            return 0
        removed = store.prune_changes(older, keep)
        if removed:
            log.info("Pruned %d change-feed entries past retention", removed)
        return removed


class FeedHub:
    """Wakes feed readers as soon as the feed grows, and keeps the feed within retention.

    The writers of this process call ``on_applied`` (the hub adds it to every repository's
    ``RepoWriter.listeners``), so a change is announced the moment it is committed. Changes
    written by other processes (a ``fsledger scan`` next to the daemon, a repository going
    offline) are noticed by a poll of the newest sequence number every ``poll_s``.

    Readers wait with ``wait`` (threads) or ``wait_async`` (an event loop). The hub owns
    one thread, started by ``start`` and ended by ``stop``.

    Args:
        ledger: the ledger whose writers are listened to.
        repositories: which repositories to attach to (the SyncManager's, whose settings
            include per-repository YAML); the stored list when omitted.
        retention: pruning policy; no pruning when None.
        poll_s: how often the store is polled for changes made elsewhere.
    """

    def __init__(
        self,
        ledger: Ledger,
        repositories: Callable[[], list[Repository]] | None = None,
        retention: Retention | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.ledger = ledger
        self.feed = Feed(ledger.store)
        self._repositories = repositories or ledger.list_repositories
        self.retention = retention
        self.poll_s = poll_s
        self._latest = 0
        self._cond = threading.Condition()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    @property
    def latest(self) -> int:
        """The newest sequence number this hub has heard of."""
        return self._latest

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Attach to the writers, read the newest sequence number, start the poll thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        try:
            self.notify(self.ledger.store.latest_seq())
        except StoreError as exc:
            log.warning("Change feed: cannot read the newest sequence number yet: %s", exc)
        self._attach()
        self._thread = threading.Thread(target=self._run, name="fsledger-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and wake every waiter (streams end, dispatchers return)."""
        self._stop.set()
        self._wake_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- notification -------------------------------------------------------------------
    def on_applied(self, repo: Repository, applied: Applied) -> None:
        """A ``RepoWriter`` listener: the batch is committed, wake the readers."""
        if applied.last_seq is not None:
            self.notify(applied.last_seq)

    def notify(self, seq: int) -> None:
        """Announce that the feed holds entries up to ``seq``."""
        with self._cond:
            if seq <= self._latest:
                return
            self._latest = seq
        self._wake_all()

    def _wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            # RuntimeError: the loop closed under a waiter that is going away anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def wake(self) -> None:
        """Wake every waiter now (one whose ``cancel`` was set returns)."""
        self._wake_all()

    def wait(self, after: int, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Block until the feed holds an entry after ``after``, the hub stops, ``cancel`` is
        set (and ``wake`` called), or ``timeout``.

        Returns whether there is something after ``after``.
        """

        def ready() -> bool:
            return self._latest > after or self.closed or (cancel is not None and cancel.is_set())

        with self._cond:
            self._cond.wait_for(ready, timeout)
            return self._latest > after

    async def wait_async(self, after: int, timeout: float) -> bool:
        """``wait`` for an event loop."""
        if self._latest > after or self.closed:
            return self._latest > after
        import asyncio  # here: the CLI's feed commands never wait on an event loop

        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        key = (loop, event)
        with self._cond:
            self._waiters.add(key)
        try:
            if self._latest > after or self.closed:  # it moved while registering
                return self._latest > after
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return self._latest > after
        finally:
            with self._cond:
                self._waiters.discard(key)

    # --- the thread ---------------------------------------------------------------------
    def _attach(self) -> None:
        """Listen to the writer of every repository (writers are created lazily and replaced
        when a repository is removed and added again, so this runs on every poll)."""
        try:
            repos = self._repositories()
        except StoreError as exc:
            log.warning("Change feed: cannot list repositories: %s", exc)
            return
        except RuntimeError:  # the manager's table changed while it was copied: next poll
            return
        for repo in repos:
            writer = self.ledger.writer(repo)
            if self.on_applied not in writer.listeners:
                writer.listeners.append(self.on_applied)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._attach()
                self.notify(self.ledger.store.latest_seq())
                self._maybe_prune()
            except StoreError as exc:
                log.warning("Change feed poll failed: %s", exc)
            except Exception:
                log.exception("Change feed poll failed")

    def _maybe_prune(self) -> None:
        if self.retention is None:
            return
        now = time.monotonic()
        if self._last_prune and now - self._last_prune < self.retention.interval_s:
            return
        self._last_prune = now
        self.retention.prune(self.ledger.store)


__all__ = [
    "CURSOR_PATTERN",
    "Cursor",
    "Feed",
    "FeedHub",
    "FeedPage",
    "FilesPage",
    "Retention",
    "RowsPage",
    "entry_cursor",
    "entry_json",
]
