"""One helper per job, for every test module: wait for a condition, and check that the ledger
equals the disk.

``wait_for`` is the only way a test waits (no sleep stands in for an event). ``assert_exact``
and ``wait_exact`` compare what the ledger holds with an independent walk of the disk
(``treeutil``, which imports nothing from fsledger), through a ``Ledger`` or, for a daemon
in another process, through an open ``Store``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, TypeVar, overload
from uuid import UUID

from fsledger.errors import StoreError
from fsledger.ledger import Ledger
from fsledger.model import FileRecord, Repository
from fsledger.store import Store
from treeutil import Files, Snapshot, describe_diff, disk_files, disk_snapshot

T = TypeVar("T")

POLL_S = 0.02
"""How often ``wait_for`` asks again: short next to any deadline, long next to one check."""

State = Files | Snapshot
"""relative path -> (size, blake3 hex), or (size, mtime_ns, blake3 hex) with ``mtimes``."""


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 30.0,
    *,
    detail: Callable[[], object] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    Past ``timeout`` seconds, fail with an ``AssertionError`` naming ``what`` (and what
    ``detail()`` says then, when given: the difference that is left, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:g}s waiting for {what}"
            if detail is not None:
                message += f": {detail()}"
            raise AssertionError(message)
        time.sleep(POLL_S)


def _records(source: Ledger | Store, repo: Repository | UUID) -> Iterable[FileRecord]:
    if isinstance(source, Ledger):
        assert isinstance(repo, Repository), "a Ledger lists the records of a Repository"
        return source.files(repo)
    return source.iter_records(repo.id if isinstance(repo, Repository) else repo)


@overload
def ledger_state(
    source: Ledger | Store, repo: Repository | UUID, *, mtimes: Literal[False] = False
) -> Files: ...
@overload
def ledger_state(
    source: Ledger | Store, repo: Repository | UUID, *, mtimes: Literal[True]
) -> Snapshot: ...
@overload
def ledger_state(source: Ledger | Store, repo: Repository | UUID, *, mtimes: bool) -> State: ...
def ledger_state(source: Ledger | Store, repo: Repository | UUID, *, mtimes: bool = False) -> State:
    """What the ledger holds for ``repo``: path -> (size, [mtime_ns,] hash)."""
    if mtimes:
        return {r.path: (r.size, r.stat.mtime_ns, r.content_hash) for r in _records(source, repo)}
    return {r.path: (r.size, r.content_hash) for r in _records(source, repo)}


@overload
def disk_state(
    root: bytes | str | os.PathLike[str],
    rules: Iterable[str] = (),
    *,
    mtimes: Literal[False] = False,
) -> Files: ...
@overload
def disk_state(
    root: bytes | str | os.PathLike[str], rules: Iterable[str] = (), *, mtimes: Literal[True]
) -> Snapshot: ...
@overload
def disk_state(
    root: bytes | str | os.PathLike[str], rules: Iterable[str] = (), *, mtimes: bool
) -> State: ...
def disk_state(
    root: bytes | str | os.PathLike[str], rules: Iterable[str] = (), *, mtimes: bool = False
) -> State:
    """What the ledger must hold for the tree at ``root`` (with a repository's own ignore
    ``rules``), walked and hashed without fsledger. Call it when the workload is over."""
    if mtimes:
        return disk_snapshot(os.fsencode(root), rules)
    assert not tuple(rules), "ignore rules are compared with mtimes=True"
    return disk_files(root)


def _root(repo: Repository | UUID, root: bytes | str | os.PathLike[str] | None) -> bytes:
    if root is not None:
        return os.fsencode(root)
    assert isinstance(repo, Repository), "give the root of a repository named by its id"
    return repo.root


def assert_exact(
    source: Ledger | Store,
    repo: Repository | UUID,
    root: bytes | str | Path | None = None,
    rules: Iterable[str] = (),
    *,
    mtimes: bool = True,
) -> None:
    """The ledger equals the disk, now: every regular file below the root (``repo.root``
    unless given, less a repository's own ignore ``rules``) with its size, mtime and blake3
    digest (``mtimes=False``: size and digest only)."""
    want = disk_state(_root(repo, root), rules, mtimes=mtimes)
    got = ledger_state(source, repo, mtimes=mtimes)
    assert got == want, f"ledger != disk: {describe_diff(want, got)}"


def wait_exact(
    source: Ledger | Store,
    repo: Repository | UUID,
    root: bytes | str | Path | None = None,
    timeout: float = 30.0,
    *,
    mtimes: bool = True,
    outage: bool = False,
) -> float:
    """Wait until the ledger equals the disk (walked once: the workload must be over), and
    return the seconds it took. With ``outage``, a store that fails meanwhile (a database
    still refusing connections) counts as "not yet"."""
    want = disk_state(_root(repo, root), mtimes=mtimes)
    t0 = time.monotonic()

    def exact() -> bool:
        try:
            return ledger_state(source, repo, mtimes=mtimes) == want
        except StoreError:
            if not outage:
                raise
            return False

    def diff() -> str:
        try:
            got = ledger_state(source, repo, mtimes=mtimes)
        except StoreError as exc:
            return f"the store fails: {exc}"
        return "ledger != disk: " + describe_diff(want, got)

    wait_for("the ledger to equal the disk", exact, timeout, detail=diff)
    return time.monotonic() - t0
