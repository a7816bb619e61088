"""``python -m benchmarks.parts DB_URL REPO``: where a no-change rescan's CPU goes.

Times each stage of a rescan alone, in this one process (CPU time, best of three, so that
a loaded machine disturbs it little): the walk (``walk(flat=True)``), reading the records
(``iter_record_rows``), and the merge of both, which is what a range worker does for a
rescan that finds nothing to hash; then the floor a Python walk cannot go below, a bare loop
of ``os.scandir`` and ``os.lstat(name, dir_fd=...)`` over the same tree, and ``find``.
The repository must have been indexed (``fsledger repo add``) into ``DB_URL`` and its tree
left alone since: a file that differs from its record (even by ctime alone, as making a
hard-linked copy of the tree changes) is a look, not the common case being measured; their
count is printed.
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

from fsledger.decide import LookRule
from fsledger.ignore import IgnoreRules
from fsledger.merge import Merge
from fsledger.store import open_store
from fsledger.walk import walk


def best_cpu(fn: Callable[[], object], rounds: int = 3) -> float:
    """The least CPU seconds ``fn`` took over ``rounds`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def bare_walk(root: bytes) -> tuple[float, float]:
    """CPU seconds of listing every directory, then of ``lstat``-ing every file by name
    relative to its directory's descriptor: no sorting, no tuples."""
    dirs: list[tuple[bytes, list[bytes]]] = []

    def listing() -> None:
        dirs.clear()
        stack = [b""]
        while stack:
            rel = stack.pop()
            names = []
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(os.path.join(rel, entry.name))
                    else:
                        names.append(entry.name)
            dirs.append((rel, names))

    def stats() -> None:
        for rel, names in dirs:
            fd = os.open(os.path.join(root, rel) if rel else root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name in names:
                    os.lstat(name, dir_fd=fd)
            finally:
                os.close(fd)

    return best_cpu(listing), best_cpu(stats)


def find_cpu(root: bytes) -> float:
    """CPU seconds of ``find -printf`` (the rescan's reference) over the tree, best of 3."""
    best = float("inf")
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            ["find", root, "-type", "f", "-printf", "%s %T@ %p\\n"],
            stdout=subprocess.DEVNULL,
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


def main(argv: list[str]) -> int:
    url, name = argv
    gc.set_threshold(50_000, *gc.get_threshold()[1:])  # as a scan's workers run
    store = open_store(url)
    repo = next(r for r in store.list_repositories() if r.name == name)
    root, rules, rule = repo.root, IgnoreRules.default(), LookRule("blake3")

    def merged() -> int:
        return sum(
            1 for _ in Merge(walk(root, rules, flat=True), store.iter_record_rows(repo.id), rule)
        )

    looks = merged()
    lines = {
        "walk": best_cpu(lambda: sum(1 for _ in walk(root, rules, flat=True))),
        "records read": best_cpu(lambda: sum(1 for _ in store.iter_record_rows(repo.id))),
        "merge (walk + records + compare)": best_cpu(merged),
    }
    listing, stats = bare_walk(root)
    lines["floor: listing every directory"] = listing
    lines["floor: lstat every file"] = stats
    lines["find -printf"] = find_cpu(root)
    for label, seconds in lines.items():
        print(f"{label:34s} {seconds * 1000:8.0f} ms CPU")
    print(f"files that differ from their records: {looks:,} (0 is the case measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
