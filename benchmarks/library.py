"""A deterministic synthetic photo library: ``YEAR/YEAR-MM/YEAR-MM-DD Event/IMG_NNNN.jpg``.

The same ``LibrarySpec`` always yields the same paths, sizes, contents and mtimes, so a
library is generated once under ``bench-data/`` and reused: a manifest beside the tree
records the spec it was made from, and a library whose manifest differs (or is missing,
which is also what an interrupted generation leaves) is deleted and made again.

Sizes come from a *profile*, a list of size classes each with a share of the files:

- ``photos`` (the default): mostly small JPEG-like files (thumbnails and phone exports),
  a few camera-sized photos and a handful of 20 MiB videos. 100k files take about 1.2 GiB.
- ``tiny``: files of 0-4 KiB only, for the 1M-file run, where the question is the
  per-file cost (walk, stat, compare), not bytes hashed.

Every mtime is set to the file's event date, years in the past, as a real library's are:
a freshly written mtime would fall in the reconciler's "racy" window and make it rehash
files on the rescan, which is correct behaviour but not the case being measured.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class SizeClass:
    """A kind of file: its share of the library, its size range (inclusive) and extension."""

    name: str
    share: float
    min_bytes: int
    max_bytes: int
    ext: str


PROFILES: dict[str, tuple[SizeClass, ...]] = {
    "photos": (
        SizeClass("small", 0.9955, 2 * KiB, 12 * KiB, ".jpg"),
        SizeClass("photo", 0.0030, 100 * KiB, 2 * MiB, ".jpg"),
        SizeClass("video", 0.00015, 20 * MiB, 20 * MiB, ".mp4"),
        SizeClass("raw", 0.00135, 20 * KiB, 60 * KiB, ".dng"),
    ),
    "tiny": (SizeClass("tiny", 1.0, 0, 4 * KiB, ".jpg"),),
}

EVENTS = ("Birthday", "Beach", "Hike", "Wedding", "Trip", "Garden", "Café", "Snow", "Zoo")
"""Event names; one has a non-ASCII (UTF-8) name, as real libraries do."""


FIRST_DAY = datetime(2004, 1, 1, 9, 0, tzinfo=UTC)
LAST_DAY = datetime(2023, 12, 31, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class LibrarySpec:
    """Everything a library is generated from; equal specs give byte-identical trees."""

    files: int
    profile: str = "photos"
    seed: int = 20240601
    files_per_event: tuple[int, int] = (20, 80)
    generator: int = 2
    """Bumped whenever ``plan`` changes, so libraries made by an older one are remade."""

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.files}"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "files_per_event": list(self.files_per_event)}


@dataclass(frozen=True)
class PlannedFile:
    """One file of the library: where it goes, how big it is, its content seed and mtime."""

    index: int
    path: str
    size: int
    mtime_ns: int


def plan(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """The library's files in generation order (deterministic for a given spec)."""
    rng = random.Random(spec.seed)
    classes = PROFILES[spec.profile]
    weights = [c.share for c in classes]
    # Events spread over FIRST_DAY..LAST_DAY whatever the library's size: every mtime is
    # in the past (a future mtime is "racy" for the reconciler, and rehashed every scan).
    events = spec.files / (sum(spec.files_per_event) / 2)
    spacing_s = (LAST_DAY - FIRST_DAY).total_seconds() / events
    day = FIRST_DAY
    folders: collections.Counter[str] = collections.Counter()
    index = 0
    while index < spec.files:
        day += timedelta(seconds=rng.uniform(0.2, 1.8) * spacing_s)
        event = f"{day:%Y-%m-%d} {rng.choice(EVENTS)}"
        folder = f"{day:%Y}/{day:%Y-%m}/{event}"
        folders[folder] += 1
        if folders[folder] > 1:  # two events of one name on one day: "Beach", "Beach 2"
            folder += f" {folders[folder]}"
        count = min(rng.randint(*spec.files_per_event), spec.files - index)
        for n in range(1, count + 1):
            cls = rng.choices(classes, weights)[0]
            size = rng.randint(cls.min_bytes, cls.max_bytes)
            taken = day + timedelta(seconds=37 * n, microseconds=rng.randrange(1_000_000))
            mtime_ns = int(taken.timestamp()) * 1_000_000_000 + taken.microsecond * 1000
            yield PlannedFile(index, f"{folder}/IMG_{n:04d}{cls.ext}", size, mtime_ns)
            index += 1


class ContentSource:
    """Deterministic file contents: a unique header, then bytes from a seeded random pool.

    Slicing one pool is ~100× faster than generating random bytes per file, and the
    header keeps every file's content (and so its hash) distinct.
    """

    POOL = 8 * MiB

    def __init__(self, seed: int) -> None:
        self._pool = random.Random(seed).randbytes(self.POOL)
        self._view = memoryview(self._pool)

    def chunks(self, index: int, size: int) -> Iterator[memoryview | bytes]:
        header = f"fsledger-bench {index:012d}\n".encode()[:size]
        yield header
        left = size - len(header)
        pos = (index * 7919) % self.POOL
        while left > 0:
            n = min(left, self.POOL - pos)
            yield self._view[pos : pos + n]
            left -= n
            pos = 0

    def write(self, path: Path, index: int, size: int, mtime_ns: int) -> None:
        with open(path, "wb", buffering=0) as f:
            for chunk in self.chunks(index, size):
                f.write(chunk)
        os.utime(path, ns=(mtime_ns, mtime_ns))


@dataclass(frozen=True)
class Library:
    """A generated library on disk."""

    spec: LibrarySpec
    tree: Path
    files: int
    bytes: int
    directories: int


def _manifest_path(base: Path) -> Path:
    return base / "manifest.json"


def ensure_library(
    spec: LibrarySpec, data_dir: Path, log: Callable[[str], None] = print
) -> Library:
    """Return the library for ``spec`` under ``data_dir``, generating it if needed."""
    base = data_dir / spec.name
    manifest = _manifest_path(base)
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("spec") == spec.to_json():
            return Library(
                spec, base / "tree", saved["files"], saved["bytes"], saved["directories"]
            )
    if base.exists():
        shutil.rmtree(base)
    tree = base / "tree"
    tree.mkdir(parents=True)
    log(f"generating library {spec.name} in {tree} (once; reused by later runs)")
    content = ContentSource(spec.seed)
    made: set[str] = set()
    total = 0
    for f in plan(spec):
        folder = f.path.rpartition("/")[0]
        if folder not in made:
            (tree / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        content.write(tree / f.path, f.index, f.size, f.mtime_ns)
        total += f.size
    directories = len({"/".join(d.split("/")[:i]) for d in made for i in (1, 2, 3)})
    # Written last: a manifest exists only for a complete library.
    saved = {"spec": spec.to_json(), "files": spec.files, "bytes": total}
    saved["directories"] = directories
    manifest.write_text(json.dumps(saved, indent=2))
    return Library(spec, tree, spec.files, total, directories)


def working_copy(library: Library, data_dir: Path) -> Path:
    """A fresh hard-linked copy of the library (``cp -al``), safe to change.

    Changes to it never touch the library: deletions remove only links, renames happen in
    the copy, and modifications are written as new files renamed over the old (an atomic
    save, as photo editors do), which gives the copy a new inode.
    """
    work = data_dir / "work" / library.spec.name
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(library.tree), str(work)], check=True)
    return work
