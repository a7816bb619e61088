"""The mirrors of a ledger: the library API ``fsledger mirror ...`` and ``fsledger run`` use.

``Mirrors(ledger)`` adds, lists, resumes, removes and verifies mirrors (``fsledger.s3.mirror``
does the work); ``MirrorSupervisor`` runs one ``MirrorRunner`` thread per active mirror of the
repositories a ``fsledger run`` owns, and notices mirrors added, paused, resumed or removed by
other processes within seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fsledger.errors import ConfigError, FsledgerError
from fsledger.model import Mirror, MirrorCounters, MirrorState
from fsledger.s3.location import S3Location, is_s3_url

if TYPE_CHECKING:
    from fsledger.feed import FeedHub
    from fsledger.ledger import Ledger
    from fsledger.s3.mirror import Comparison, MirrorRunner

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 4
"""Requests a mirror has in flight at most, unless ``FSLEDGER_MIRROR_CONCURRENCY`` says
otherwise: a mirror waits on the network, not on the CPU, so this is not the CPU count
(``RECONCILIATION_MAX_CONCURRENCY``); 4 is rclone's ``--transfers`` default."""


def mirror_concurrency() -> int:
    """``FSLEDGER_MIRROR_CONCURRENCY`` (1..256), else ``DEFAULT_CONCURRENCY``.

    Raises:
        ConfigError: the variable is not a whole number in range.
    """
    from fsledger.config import parse_int

    value = os.environ.get("FSLEDGER_MIRROR_CONCURRENCY")
    if not value:
        return DEFAULT_CONCURRENCY
    return parse_int("FSLEDGER_MIRROR_CONCURRENCY", value, 1, 256)


class MirrorNotFound(FsledgerError):
    exit_code = 2


class MirrorFailed(FsledgerError):
    """The bucket failed (unreachable, refused): nothing past the failure was recorded as
    done; the next sync does it again."""


@contextmanager
def _failures(location: str) -> Iterator[None]:
    try:
        yield
    except FsledgerError:
        raise
    except Exception as exc:  # botocore's errors, a read-back that did not match
        raise MirrorFailed(f"mirror {location}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    """A mirror and where it stands against the feed."""

    mirror: Mirror
    repository: str
    backlog: int
    """Feed entries (of every repository) after the mirror's cursor: an upper bound of
    what it has left to do."""
    live: dict[str, Any] | None = None
    """From a running daemon's runner: its state and rates."""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.mirror.to_json(),
            "repository": self.repository,
            "backlog": self.backlog,
            "synced": self.mirror.cursor_seq is not None,
            **({"live": self.live} if self.live is not None else {}),
        }


class Mirrors:
    """The mirrors of one ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.store = ledger.store

    def add(
        self,
        repo_ref: str,
        url: str,
        endpoint_url: str | None = None,
        max_delete: int | None = None,
        check: bool = True,
    ) -> Mirror:
        """Mirror a repository to ``s3://BUCKET[/PREFIX]``; with ``check``, the bucket must
        answer first (credentials and endpoint from the AWS chain).

        Raises:
            ConfigError: a bad URL, an overlapping mirror, or a bucket that does not answer.
            MirrorExists: that bucket and prefix are a mirror already.
        """
        repo = self.ledger.resolve(repo_ref)
        location = S3Location.parse(url, endpoint_url)
        if is_s3_url(repo.root):
            raise ConfigError(f"{repo.name} is a bucket: only local repositories are mirrored")
        if max_delete is not None and max_delete < 0:
            raise ConfigError("--max-delete must be 0 or more")
        for other in self.store.list_mirrors():
            theirs = S3Location.parse(other.url, other.endpoint_url)
            if (
                theirs.bucket == location.bucket
                and theirs.endpoint_url == location.endpoint_url
                and theirs.prefix != location.prefix
                and (
                    theirs.prefix.startswith(location.prefix)
                    or location.prefix.startswith(theirs.prefix)
                )
            ):
                raise ConfigError(f"{location} overlaps the mirror {theirs}")
        if check:
            self._check_bucket(location)
        mirror = Mirror(
            uuid.uuid4(), repo.id, str(location), location.endpoint_url, max_delete=max_delete
        )
        self.store.add_mirror(mirror)
        log.info("Mirror %s of %s added", location, repo.name)
        return mirror

    def _check_bucket(self, location: S3Location) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from fsledger.s3.location import make_client

        try:
            make_client(location, timeout_s=10.0).head_bucket(Bucket=location.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"bucket {location.bucket!r} does not answer: {exc}") from None

    def all(self) -> list[Mirror]:
        return self.store.list_mirrors()

    def get(self, ref: str) -> Mirror:
        """A mirror by id or URL (or the only mirror of a repository named ``ref``).

        Raises:
            MirrorNotFound: nothing matches, or a repository with several mirrors.
        """
        mirrors = self.store.list_mirrors()
        for m in mirrors:
            if str(m.id) == ref or m.url == ref or m.url == ref.rstrip("/"):
                return m
        mine = self.of_repository(ref) if mirrors else []
        if len(mine) == 1:
            return mine[0]
        if len(mine) > 1:
            raise MirrorNotFound(f"{ref!r} has {len(mine)} mirrors: name one by URL or id")
        raise MirrorNotFound(f"no mirror {ref!r} (see 'fsledger mirror list')")

    def of_repository(self, repo_ref: str) -> list[Mirror]:
        try:
            repo = self.ledger.resolve(repo_ref)
        except FsledgerError:
            return []
        return self.store.list_mirrors(repo.id)

    def remove(self, ref: str) -> Mirror:
        """Forget a mirror; its bucket is left as it is."""
        mirror = self.get(ref)
        self.store.remove_mirror(mirror.id)
        return mirror

    def resume(self, ref: str, accept_deletes: bool = False) -> Mirror:
        """Resume a paused mirror; ``accept_deletes``: the deletions pending now go ahead
        (the backlog up to the feed's head no longer counts against ``--max-delete``)."""
        mirror = self.get(ref)
        through = self.store.latest_seq() if accept_deletes else None
        self.store.set_mirror_state(mirror.id, MirrorState.ACTIVE, None, through)
        return self.get(str(mirror.id))

    def status(
        self, live: Callable[[UUID], dict[str, Any] | None] | None = None
    ) -> list[MirrorStatus]:
        head = self.store.latest_seq()
        names = {r.id: r.name for r in self.store.list_repositories()}
        out = []
        for m in self.store.list_mirrors():
            backlog = head - (m.cursor_seq or 0)
            out.append(
                MirrorStatus(
                    m,
                    names.get(m.repository_id, str(m.repository_id)),
                    max(0, backlog),
                    live(m.id) if live else None,
                )
            )
        return out

    def runner(
        self, mirror: Mirror, concurrency: int | None = None, hub: FeedHub | None = None
    ) -> MirrorRunner:
        from fsledger.s3.mirror import MirrorRunner

        return MirrorRunner(self.store, mirror.id, concurrency or mirror_concurrency(), hub=hub)

    def sync(self, ref: str, timeout: float | None = None) -> Mirror:
        """Catch one mirror up with the feed now, in this process (``mirror sync``)."""
        mirror = self.get(ref)
        runner = self.runner(mirror)
        try:
            with _failures(mirror.url):
                return runner.sync(timeout)
        finally:
            runner.stop()

    def verify(self, mirror: Mirror, repair: bool = False) -> Comparison:
        runner = self.runner(mirror)
        try:
            with _failures(mirror.url):
                return runner.verify(repair=repair)
        finally:
            runner.stop()


class MirrorSupervisor:
    """One ``MirrorRunner`` thread per active mirror of the repositories ``owns`` says this
    process keeps (``fsledger run``: those whose lease it holds)."""

    def __init__(
        self,
        ledger: Ledger,
        owns: Callable[[UUID], bool],
        poll_s: float = 2.0,
        hub: FeedHub | None = None,
    ) -> None:
        self.mirrors = Mirrors(ledger)
        self.hub = hub
        self.owns = owns
        self.poll_s = poll_s
        self.runners: dict[UUID, MirrorRunner] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fsledger-mirrors", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            runners, self.runners = list(self.runners.values()), {}
        for runner in runners:
            runner.stop(timeout)

    def live(self, mirror_id: UUID) -> dict[str, Any] | None:
        with self._lock:
            runner = self.runners.get(mirror_id)
        if runner is None:
            return None
        objects, nbytes = runner.stats.rates()
        return {
            "state": runner.stats.state,
            "backlog": runner.stats.backlog,
            "objects_per_s": round(objects, 3),
            "bytes_per_s": round(nbytes, 1),
        }

    def totals(self) -> list[tuple[Mirror, MirrorCounters, str | None]]:
        """Each mirror with its counters and the live state, for /metrics."""
        out = []
        for m in self.mirrors.all():
            live = self.live(m.id)
            out.append((m, m.counters, live["state"] if live else None))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("Mirrors: supervision failed")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        wanted = {m.id: m for m in self.mirrors.all() if self.owns(m.repository_id)}
        with self._lock:
            gone = [mid for mid in self.runners if mid not in wanted]
            stale = [self.runners.pop(mid) for mid in gone]
        for runner in stale:
            runner.stop()
        for mid, mirror in wanted.items():
            with self._lock:
                if mid in self.runners:
                    continue
            try:
                runner = self.mirrors.runner(mirror, hub=self.hub)
            except FsledgerError as exc:
                log.error("Mirror %s cannot run: %s", mirror.url, exc)
                continue
            with self._lock:
                self.runners[mid] = runner
            runner.start()
            log.info("Mirror %s: following the change feed", mirror.url)


__all__ = [
    "DEFAULT_CONCURRENCY",
    "MirrorFailed",
    "MirrorNotFound",
    "MirrorStatus",
    "MirrorSupervisor",
    "Mirrors",
    "mirror_concurrency",
]
