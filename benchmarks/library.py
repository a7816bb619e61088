"""Deterministic synthetic libraries of several shapes (``PROFILES``).

The same ``LibrarySpec`` always yields the same paths, sizes, contents and mtimes, so a
library is generated once under ``bench-data/`` and reused: a manifest beside the tree
records the spec it was made from, and a library whose manifest differs (or is missing,
which is also what an interrupted generation leaves) is deleted and made again.

A *profile* gives the shape of the tree and the sizes of its files (a list of size classes,
each with a share of the files):

- ``photos`` (the default): ``YEAR/YEAR-MM/YEAR-MM-DD Event/IMG_NNNN.jpg``, mostly small
  JPEG-like files, a few camera-sized photos and a handful of 20 MiB videos (100k: 1.3 GiB).
- ``tiny``: the same shape, files of 0-4 KiB only, for the 1M-file run, where the question
  is the per-file cost (walk, stat, compare), not bytes hashed.
- ``flat``: five folders of 20k files (a phone's dumps); ``deep``: 12 levels of folders of
  3-10 entries (an exported archive); ``video``: 8-64 MiB clips with ``.xmp`` sidecars
  (bound by hashing); ``mixed``: folders of exactly 100 small files plus 20 videos;
  ``wide``: 20k folders of 5 files (the per-folder cost); ``single``: every file in one
  folder (100k: a folder cut between its files in many ranges).

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


@dataclass(frozen=True)
class Profile:
    """A shape of library: how its folders nest, and the sizes of its files."""

    shape: str
    """``events`` (``YEAR/YEAR-MM/YEAR-MM-DD Event/``, 20-80 files a folder), ``flat`` (five
    folders of a fifth of the files each), ``deep`` (12 levels of 3-10 entries a folder),
    ``video`` (one folder a year of clips, each with an ``.xmp`` sidecar) or ``mixed``
    (``YEAR/NN/eventK/``, 100 files a folder)."""
    classes: tuple[SizeClass, ...]
    files: int
    """Files of the library ``make bench`` measures."""
    quick_files: int
    """Files of the ``--quick`` library."""
    about: str


PROFILES: dict[str, Profile] = {
    "photos": Profile(
        "events",
        (
            SizeClass("small", 0.9955, 2 * KiB, 12 * KiB, ".jpg"),
            SizeClass("photo", 0.0030, 100 * KiB, 2 * MiB, ".jpg"),
            SizeClass("video", 0.00015, 20 * MiB, 20 * MiB, ".mp4"),
            SizeClass("raw", 0.00135, 20 * KiB, 60 * KiB, ".dng"),
        ),
        100_000,
        10_000,
        "event folders of 20-80 files; 99.55% small JPEG-like 2-12 KiB, a few photos, raws "
        "and 20 MiB videos",
    ),
    "tiny": Profile(
        "events",
        (SizeClass("tiny", 1.0, 0, 4 * KiB, ".jpg"),),
        1_000_000,
        10_000,
        "event folders of 20-80 files of 0-4 KiB (the 1M-file run: the per-file cost)",
    ),
    "flat": Profile(
        "flat",
        (SizeClass("small", 1.0, 2 * KiB, 12 * KiB, ".jpg"),),
        100_000,
        10_000,
        "5 folders of 20k files each (a phone's dumps), 2-12 KiB",
    ),
    "deep": Profile(
        "deep",
        (SizeClass("small", 1.0, 1 * KiB, 16 * KiB, ".dat"),),
        100_000,
        10_000,
        "12 levels of folders of 3-10 entries each (an exported archive), 1-16 KiB",
    ),
    "video": Profile(
        "video",
        (SizeClass("video", 1.0, 8 * MiB, 64 * MiB, ".mp4"),),
        800,
        80,
        "clips of 8-64 MiB, each with a 1-4 KiB .xmp sidecar (half the files)",
    ),
    "wide": Profile(
        "wide",
        (SizeClass("small", 1.0, 1 * KiB, 8 * KiB, ".jpg"),),
        100_000,
        10_000,
        "20k folders of 5 files of 1-8 KiB (an album per day, a sidecar tree): the per-folder cost",
    ),
    "single": Profile(
        "single",
        (SizeClass("small", 1.0, 1 * KiB, 8 * KiB, ".jpg"),),
        100_000,
        10_000,
        "every file in one folder (a camera dump, a sync client's inbox), 1-8 KiB",
    ),
    "mixed": Profile(
        "mixed",
        (
            SizeClass("small", 1.0, 1 * KiB, 16 * KiB, ".jpg"),
            SizeClass("video", 0.0, 20 * MiB, 20 * MiB, ".mp4"),
        ),
        100_000,
        10_000,
        "folders of 100 files of 1-16 KiB (YEAR/NN/eventK/), plus 20 videos of 20 MiB",
    ),
}

EVENTS = ("Birthday", "Beach", "Hike", "Wedding", "Trip", "Garden", "Café", "Snow", "Zoo")
"""Event names; one has a non-ASCII (UTF-8) name, as real libraries do."""


FIRST_DAY = datetime(2004, 1, 1, 9, 0, tzinfo=UTC)
LAST_DAY = datetime(2023, 12, 31, 9, 0, tzinfo=UTC)
DEEP_LEVELS = 12
MIXED_FOLDER = 100
MIXED_VIDEOS = 20


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


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def plan(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """The library's files in generation order (deterministic for a given spec)."""
    shape = PROFILES[spec.profile].shape
    if shape == "flat":
        return _plan_flat(spec)
    if shape == "deep":
        return _plan_deep(spec)
    if shape == "video":
        return _plan_video(spec)
    if shape == "mixed":
        return _plan_mixed(spec)
    if shape == "wide":
        return _plan_wide(spec)
    if shape == "single":
        return _plan_single(spec)
    return _plan_events(spec)


def _plan_events(spec: LibrarySpec) -> Iterator[PlannedFile]:
    rng = random.Random(spec.seed)
    classes = PROFILES[spec.profile].classes
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
            yield PlannedFile(index, f"{folder}/IMG_{n:04d}{cls.ext}", size, _ns(taken))
            index += 1


def _spread(rng: random.Random, index: int, files: int) -> int:
    """An mtime for file ``index`` of ``files``: spread over FIRST_DAY..LAST_DAY in order."""
    span = (LAST_DAY - FIRST_DAY).total_seconds()
    at = FIRST_DAY + timedelta(seconds=span * index / max(1, files))
    return _ns(at + timedelta(microseconds=rng.randrange(1_000_000)))


def _plan_flat(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``DCIM/10NCAMRA/IMG_NNNNN.jpg``: five folders of a fifth of the files each."""
    rng = random.Random(spec.seed)
    (cls,) = PROFILES[spec.profile].classes
    folders = 5
    per = -(-spec.files // folders)
    for index in range(spec.files):
        folder, n = divmod(index, per)
        path = f"DCIM/{100 + folder}CAMRA/IMG_{n:05d}{cls.ext}"
        size = rng.randint(cls.min_bytes, cls.max_bytes)
        yield PlannedFile(index, path, size, _spread(rng, index, spec.files))


WIDE_FOLDER = 5


def _plan_wide(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``albums/YEAR-MM-DD NNNNN/IMG_N.jpg``: folders of ``WIDE_FOLDER`` files, all at one
    level."""
    rng = random.Random(spec.seed)
    (cls,) = PROFILES[spec.profile].classes
    for index in range(spec.files):
        f, n = divmod(index, WIDE_FOLDER)
        mtime = _spread(rng, index, spec.files)
        day = datetime.fromtimestamp(mtime // 1_000_000_000, UTC)
        path = f"albums/{day:%Y-%m-%d} {f:05d}/IMG_{n}{cls.ext}"
        yield PlannedFile(index, path, rng.randint(cls.min_bytes, cls.max_bytes), mtime)


def _plan_single(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``Camera/IMG_YYYYMMDD_NNNNNN.jpg``: every file in one folder."""
    rng = random.Random(spec.seed)
    (cls,) = PROFILES[spec.profile].classes
    for index in range(spec.files):
        mtime = _spread(rng, index, spec.files)
        day = datetime.fromtimestamp(mtime // 1_000_000_000, UTC)
        path = f"Camera/IMG_{day:%Y%m%d}_{index:06d}{cls.ext}"
        yield PlannedFile(index, path, rng.randint(cls.min_bytes, cls.max_bytes), mtime)


def _deep_branching(files: int) -> float:
    """The mean number of subfolders a folder above the last level has, such that a tree of
    ``DEEP_LEVELS`` levels of folders of 3-10 entries (6.5 on average) holds about ``files``
    files."""

    def expected(m: float) -> float:
        inner = sum(m**d for d in range(DEEP_LEVELS - 1))
        return inner * (6.5 - m) + m ** (DEEP_LEVELS - 1) * 6.5

    lo, hi = 1.0, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < files else (lo, mid)
    return lo


def _plan_deep(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``DEEP_LEVELS`` levels of folders (``l03-part 7``), each of 3-10 entries: files, and
    subfolders down to the last level; cut at ``spec.files`` files."""
    rng = random.Random(spec.seed)
    (cls,) = PROFILES[spec.profile].classes
    # Aimed past the count (the branching varies between folders) and cut at it.
    m = _deep_branching(2 * spec.files)
    whole, frac = int(m), m - int(m)
    index = 0
    # Depth-first: (folder, level); a folder's files first, then its subfolders.
    stack: list[tuple[str, int]] = [("archive", 0)]
    while stack and index < spec.files:
        folder, level = stack.pop()
        entries = rng.randint(3, 10)
        subdirs = 0
        if level < DEEP_LEVELS - 1:
            subdirs = min(entries - 1, whole + (1 if rng.random() < frac else 0))
        for n in range(entries - subdirs):
            if index >= spec.files:
                break
            size = rng.randint(cls.min_bytes, cls.max_bytes)
            path = f"{folder}/doc_{n:02d}{cls.ext}"
            yield PlannedFile(index, path, size, _spread(rng, index, spec.files))
            index += 1
        for k in reversed(range(subdirs)):
            stack.append((f"{folder}/l{level + 1:02d}-part {k}", level + 1))


def _plan_video(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``Videos/YEAR/CLIP_NNNN.mp4`` with ``CLIP_NNNN.xmp`` beside each (half the files)."""
    rng = random.Random(spec.seed)
    (cls,) = PROFILES[spec.profile].classes
    clips = spec.files // 2
    years = LAST_DAY.year - FIRST_DAY.year + 1
    for k in range(clips):
        year = FIRST_DAY.year + k * years // max(1, clips)
        mtime = _spread(rng, k, clips)
        size = rng.randint(cls.min_bytes, cls.max_bytes)
        yield PlannedFile(2 * k, f"Videos/{year}/CLIP_{k:04d}{cls.ext}", size, mtime)
        sidecar = rng.randint(1 * KiB, 4 * KiB)
        yield PlannedFile(2 * k + 1, f"Videos/{year}/CLIP_{k:04d}.xmp", sidecar, mtime)


def _plan_mixed(spec: LibrarySpec) -> Iterator[PlannedFile]:
    """``YEAR/NN/eventK/IMG_NNN.jpg``, 100 files a folder; ``MIXED_VIDEOS`` of them,
    spread evenly, are 20 MiB videos."""
    rng = random.Random(spec.seed)
    small, video = PROFILES[spec.profile].classes
    folders = -(-spec.files // MIXED_FOLDER)
    years = LAST_DAY.year - FIRST_DAY.year + 1
    per_year = -(-folders // years)
    every = max(1, spec.files // MIXED_VIDEOS)
    for index in range(spec.files):
        f, n = divmod(index, MIXED_FOLDER)
        year, j = divmod(f, per_year)
        folder = f"{FIRST_DAY.year + year}/{j // 5 + 1:02d}/event{j % 5 + 1}"
        cls = video if index % every == every // 2 else small
        size = rng.randint(cls.min_bytes, cls.max_bytes)
        yield PlannedFile(
            index, f"{folder}/IMG_{n:03d}{cls.ext}", size, _spread(rng, index, spec.files)
        )


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
    total = count = 0
    for f in plan(spec):
        folder = f.path.rpartition("/")[0]
        if folder not in made:
            (tree / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        content.write(tree / f.path, f.index, f.size, f.mtime_ns)
        total += f.size
        count += 1
    parts = [d.split("/") for d in made]
    directories = len({"/".join(p[:i]) for p in parts for i in range(1, len(p) + 1)})
    # Written last: a manifest exists only for a complete library.
    saved = {"spec": spec.to_json(), "files": count, "bytes": total}
    saved["directories"] = directories
    manifest.write_text(json.dumps(saved, indent=2))
    return Library(spec, tree, count, total, directories)


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
