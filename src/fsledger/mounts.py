"""Filesystems mounted below a repository root: which are mounted now, which scans remember.

An unmounted filesystem leaves its mount point behind as an empty directory on the parent's
filesystem, and to a walk that looks exactly like a directory whose files were all deleted.
So every reconciliation reads the mount table and the store remembers the mount points
below the root it saw. A remembered mount point that is not mounted any more is handed to
the walk as *unreadable*: its records are kept and the scan reports an error saying why, as
for a directory that fails with ``ENOTCONN``, until the filesystem is mounted again or
``scan --force`` forgets it (a mount removed for good).

Why the mount table (``/proc/self/mountinfo``) rather than an ``st_dev`` check of every
directory in the walk:

- it costs one read of a small file per reconciliation and nothing per directory or file
  (a 1M-file tree has tens of thousands of directories; the walk's hot loop stays as it is);
- it sees a bind mount of the *same* filesystem, whose mount point has its parent's
  ``st_dev``, and it says whether a path is mounted *now* even when the empty mount point
  left behind is on the same device as the mount was;
- it is the table of this process's mount namespace, which is exactly what its walk sees;
- a btrfs subvolume has an ``st_dev`` of its own but is not a mount (nothing to unmount).

The kernel escapes space, tab, newline and backslash in its fields as ``\\040``, ``\\011``,
``\\012`` and ``\\134``; paths are bytes, so names that are not UTF-8 survive. Where
``/proc`` is not mounted, remembered mount points are checked by ``st_dev`` against their
parent's (one ``lstat`` pair each), and no new ones are learned.
"""

from __future__ import annotations

import logging
import os
import re
import stat as stat_mod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from fsledger.beneath import Beneath
from fsledger.ignore import IgnoreRules
from fsledger.model import MountPoint, RelPath, Repository
from fsledger.store.base import Store

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``mountinfo``: where a filesystem is mounted, what and of which type."""

    mount_point: bytes
    """Absolute, as seen from this process's root, unescaped."""
    fs_type: str
    source: str


def unescape(field: bytes) -> bytes:
    """Undo the kernel's octal escapes (a backslash and three octal digits: one byte)."""
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 8) & 0xFF,)), field)


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """Parse ``/proc/PID/mountinfo`` (see proc(5)); malformed lines are skipped.

    A line is ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE
    SUPER_OPTIONS``; the optional fields vary in number, so the type and source are found
    after the ``-`` separator. Later lines are later mounts (a mount stacked on another
    comes after it).

    Example:
        >>> line = b"36 35 98:0 /data /srv/my\\\\040photos rw shared:1 - nfs4 nas:/p rw"
        >>> parse_mountinfo(line)[0].mount_point
        b'/srv/my photos'
    """
    out: list[MountEntry] = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3 or not fields[4].startswith(b"/"):
            continue
        out.append(
            MountEntry(
                unescape(fields[4]),
                os.fsdecode(unescape(fields[sep + 1])),
                os.fsdecode(unescape(fields[sep + 2])),
            )
        )
    return out


def read_mountinfo(path: str | None = None) -> list[MountEntry] | None:
    """This process's mount table (``MOUNTINFO`` unless ``path``), or ``None`` when it cannot
    be read (no ``/proc``)."""
    path = path or MOUNTINFO
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        log.debug("Cannot read the mount table %s: %s", path, exc)
        return None
    return parse_mountinfo(data)


def mounts_below(
    root: bytes, entries: Iterable[MountEntry], rules: IgnoreRules | None = None
) -> dict[RelPath, MountEntry]:
    """The mount points strictly below ``root``, relative to it (the topmost mount of each).

    ``root`` is resolved first (the table names real paths); mount points below an ignored
    name are left out, since no record can be there.
    """
    real = os.path.realpath(root).rstrip(b"/")
    prefix = real + b"/"
    out: dict[RelPath, MountEntry] = {}
    for entry in entries:
        point = entry.mount_point
        if not point.startswith(prefix):
            continue
        rel = point[len(prefix) :].rstrip(b"/")
        if rel and not (rules is not None and rules.ignores_path(rel)):
            out[rel] = entry
    return out


def under(path: RelPath, top: RelPath) -> bool:
    """``path`` is ``top`` or below it (``top`` = ``b""``: the whole repository)."""
    return not top or path == top or path.startswith(top + b"/")


def mounted_by_dev(root: bytes, rel: RelPath) -> bool:
    """Without a mount table: a directory on another device than its parent is mounted."""
    parent = rel.rpartition(b"/")[0]
    try:
        with Beneath(root) as tree:
            st = tree.lstat(rel)
            up = tree.lstat(parent)
    except OSError:
        return False
    return stat_mod.S_ISDIR(st.st_mode) and st.st_dev != up.st_dev


def not_mounted_message(point: MountPoint) -> str:
    return (
        f"a filesystem was mounted here ({point.fs_type or '?'} {point.source or '?'}) and is "
        "not now; its records are kept until it is mounted again. If it was removed for good, "
        "scan once with --force to forget it."
    )


def empty_mount_message(point: MountPoint) -> str:
    return (
        f"a filesystem is mounted here ({point.fs_type or '?'} {point.source or '?'} was) but "
        "it is empty while the ledger holds files below it: another filesystem, or a share "
        "that did not come up? Its records are kept. If it really was emptied, scan once "
        "with --force."
    )


class MountTable:
    """The mount points below one root, as the mount table says now."""

    def __init__(self, root: bytes, rules: IgnoreRules | None, path: str | None = None) -> None:
        self.root = root
        entries = read_mountinfo(path)
        self.known = entries is not None
        self.points = mounts_below(root, entries, rules) if entries is not None else {}

    def is_mounted(self, rel: RelPath) -> bool:
        return rel in self.points if self.known else mounted_by_dev(self.root, rel)


class MountGuard:
    """One reconciliation's view of the filesystems mounted below its root.

    Args:
        repo: the repository.
        rules: its ignore rules.
        remembered: the mount points the store remembers.
        prefix: the subtree the reconciliation walks (``b""``: all of it).
        force: forget remembered mount points that are not mounted any more (a mount
            removed for good), instead of keeping their records; and believe an empty one.
        mountinfo: the mount table to read (tests pass their own).
        has_records_below: whether the ledger holds files below a path (for the empty-mount
            check; without it, that check is skipped).
    """

    def __init__(
        self,
        repo: Repository,
        rules: IgnoreRules,
        remembered: Sequence[MountPoint],
        prefix: RelPath = b"",
        force: bool = False,
        mountinfo: str | None = None,
        has_records_below: Callable[[RelPath], bool] | None = None,
    ) -> None:
        self.repo = repo
        self.rules = rules
        self.prefix = prefix.strip(b"/")
        self.remembered = list(remembered)
        self.mountinfo = mountinfo
        self.table = MountTable(repo.root, rules, mountinfo)
        self.unreadable: dict[RelPath, str] = {}
        """What the walk must report as unreadable instead of listing it."""
        self.vanished: list[MountPoint] = []
        """Remembered mount points (in scope) that are not mounted now, records kept."""
        self.forgotten: list[MountPoint] = []
        """Remembered mount points (in scope) not mounted now, forgotten by ``force``."""
        self._mounted = {p.path: self.table.is_mounted(p.path) for p in self.remembered}
        for point in self.remembered:
            in_scope = under(point.path, self.prefix) or under(self.prefix, point.path)
            if not in_scope or self._mounted[point.path]:
                continue
            if force:
                self.forgotten.append(point)
                continue
            self.vanished.append(point)
            # The walk of a prefix inside the vanished mount stops at its start.
            at = self.prefix if under(self.prefix, point.path) else point.path
            self.unreadable.setdefault(at, not_mounted_message(point))
        if force or has_records_below is None:
            return
        # Mounted, but empty while the ledger holds files below it: the root guard's rule,
        # per mount point. Another filesystem (an empty one, a share that failed to come up
        # and left a placeholder mounted) is not the library that was there.
        for point in self.remembered:
            in_scope = under(point.path, self.prefix) or under(self.prefix, point.path)
            if not in_scope or not self._mounted[point.path] or point.path in self.unreadable:
                continue
            if self._empty(point.path) and has_records_below(point.path):
                at = self.prefix if under(self.prefix, point.path) else point.path
                self.unreadable.setdefault(at, empty_mount_message(point))

    def _empty(self, rel: RelPath) -> bool:
        try:
            with Beneath(self.repo.root) as tree:
                fd = tree.open_dir(rel)
            try:
                names = [os.fsencode(n) for n in os.listdir(fd)]
            finally:
                os.close(fd)
        except OSError:
            return False  # what cannot be listed the walk reports as unreadable anyway
        return not any(not self.rules.ignores_name(n, rel + b"/" + n) for n in names)

    @classmethod
    def load(
        cls, store: Store, repo: Repository, rules: IgnoreRules, prefix: RelPath, force: bool
    ) -> MountGuard:
        """Read the remembered mount points and the mount table (one query, one file)."""

        def has_records_below(rel: RelPath) -> bool:
            rows = store.iter_record_rows(repo.id, rel + b"/", rel + b"0", page=1)
            return next(iter(rows), None) is not None

        return cls(repo, rules, store.mount_points(repo.id), prefix, force, None, has_records_below)

    def memory(self) -> list[MountPoint]:
        """What to remember once the reconciliation has succeeded: every remembered mount
        point not forgotten (with whether it is mounted now), and every one mounted now."""
        forgotten = {p.path for p in self.forgotten}
        new = {
            p.path: replace(p, mounted=self._mounted[p.path])
            for p in self.remembered
            if p.path not in forgotten
        }
        for rel, entry in self.table.points.items():
            new[rel] = MountPoint(rel, entry.fs_type, entry.source, True)
        return sorted(new.values(), key=lambda p: p.path)

    def remember(self, store: Store) -> list[str]:
        """Store ``memory()`` if it changed; returns notes for the user (what was forgotten)."""
        memory = self.memory()
        if memory != sorted(self.remembered, key=lambda p: p.path):
            store.set_mount_points(self.repo.id, memory)
            for point in memory:
                if point.path not in {p.path for p in self.remembered}:
                    log.info(
                        "Repository %s: a filesystem is mounted below the root at %s",
                        self.repo.id,
                        point.describe(),
                    )
        notes = []
        for point in self.forgotten:
            note = (
                f"{point.describe()}: was mounted below the root and is not any more; "
                "--force forgot it, so its records now follow what the directory holds"
            )
            log.warning("Repository %s: %s", self.repo.id, note)
            notes.append(note)
        return notes

    def unmounted_since_start(self) -> list[RelPath]:
        """Mount points in scope that were mounted when the walk started and are not now
        (read again before deletions: an unmount during the walk looks like a deletion)."""
        table = MountTable(self.repo.root, self.rules, self.mountinfo)
        before = dict.fromkeys([*self.table.points, *(p for p, m in self._mounted.items() if m)])
        return [
            rel
            for rel in before
            if (under(rel, self.prefix) or under(self.prefix, rel)) and not table.is_mounted(rel)
        ]


def unmounted(store: Store, repo: Repository, rules: IgnoreRules | None) -> list[RelPath]:
    """Remembered mount points of ``repo`` that are not mounted now (one query; the mount
    table is read only when some are remembered). The watcher keeps what is below them."""
    remembered = store.mount_points(repo.id)
    if not remembered:
        return []
    table = MountTable(repo.root, rules)
    return [p.path for p in remembered if not table.is_mounted(p.path)]


def changed_mounts(store: Store, repo: Repository) -> list[tuple[MountPoint, bool]]:
    """Remembered mount points whose state differs from what the last scan saw, with
    whether each is mounted now (the manager's periodic check: a share mounted again is
    reconciled and watched again; one that went away without an event is reported)."""
    remembered = store.mount_points(repo.id)
    if not remembered:
        return []
    table = MountTable(repo.root, None)
    return [(p, now) for p in remembered if (now := table.is_mounted(p.path)) != p.mounted]
