"""The "a day of edits" change set: 1% modified, 1% deleted, 1% added, one folder renamed.

Applied to a hard-linked working copy (see ``library.working_copy``), never to the
library itself: a modification is an atomic save (new file renamed over the old).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.library import ContentSource, Library, plan


@dataclass(frozen=True)
class ChangeSet:
    """What ``apply_changes`` did, so the rescan's counts can be checked against it."""

    modified: int
    deleted: int
    added: int
    renamed_dir: str
    renamed_files: int

    def to_json(self) -> dict[str, object]:
        return {
            "modified": self.modified,
            "deleted": self.deleted,
            "added": self.added,
            "renamed_dir": self.renamed_dir,
            "renamed_files": self.renamed_files,
        }


def apply_changes(
    work: Path, library: Library, share: float = 0.01, round_no: int = 0
) -> ChangeSet:
    """Change ``share`` of the files of ``work`` each way, and rename one event folder.

    ``round_no`` > 0: another change set of the same size on a tree that earlier rounds
    changed (only files and folders still where the library put them are picked)."""
    spec = library.spec
    rng = random.Random(spec.seed + 1 + 7919 * round_no)
    files = list(plan(spec))
    if round_no:
        files = [f for f in files if (work / f.path).exists()]
    folders = sorted({f.path.rpartition("/")[0] for f in files})
    renamed = rng.choice(folders)
    others = [f for f in files if f.path.rpartition("/")[0] != renamed]
    n = max(1, int(spec.files * share))
    picked = rng.sample(others, 2 * n)
    content = ContentSource(spec.seed + 1 + 7919 * round_no)
    now_ns = time.time_ns()

    for k, f in enumerate(picked[:n]):
        target = work / f.path
        tmp = target.with_name(target.name + ".saving")
        content.write(tmp, spec.files + k, f.size + 17, now_ns)
        os.replace(tmp, target)
    for f in picked[n:]:
        (work / f.path).unlink()

    # Half the new files join existing folders, half arrive as a new import.
    new_folder = work / "9999" / "9999-12" / f"9999-12-{31 - round_no:02d} Import"
    new_folder.mkdir(parents=True)
    hosts = rng.sample([d for d in folders if d != renamed], max(1, n // 20))
    for k in range(n):
        if k % 2:
            path = new_folder / f"NEW{round_no or ''}_{k:06d}.jpg"
        else:
            path = work / hosts[k % len(hosts)] / f"NEW{round_no or ''}_{k:06d}.jpg"
        content.write(path, 2 * spec.files + k, rng.randint(2048, 12288), now_ns - 86_400 * 10**9)

    renamed_files = sum(1 for f in files if f.path.rpartition("/")[0] == renamed)
    os.rename(work / renamed, work / (renamed + " (sorted)"))
    return ChangeSet(n, n, n, renamed, renamed_files)
