"""Exactness: what ``fsledger files --json`` says equals an independent walk of the disk.

The independent walk is ``os.walk`` + ``os.lstat`` + the ``blake3`` library reading each
whole file; it shares no code with fsledger's walker, reconciler or hashing module.
The generated library holds no hidden or ignored names, so every regular file counts.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3

# (size, mtime_ns, ctime_ns, inode, blake3 hex)
FileState = tuple[int, int, int, int, str | None]


def disk_state(root: Path) -> dict[bytes, FileState]:
    """Every regular file below ``root`` (relative path bytes) with its stat key and hash."""
    top = os.fsencode(root)
    out: dict[bytes, FileState] = {}
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            with open(full, "rb") as f:
                digest = blake3.blake3(f.read()).hexdigest()
            rel = os.path.relpath(full, top)
            out[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest)
    return out


def ledger_state(files_json_lines: str) -> dict[bytes, FileState]:
    """Parse ``fsledger files REPO --json`` output (one JSON object a line)."""
    out: dict[bytes, FileState] = {}
    for line in files_json_lines.splitlines():
        rec = json.loads(line)
        algo_ok = rec["hash_algo"] in (None, "blake3")
        out[base64.b64decode(rec["path_b64"])] = (
            rec["size"],
            rec["mtime_ns"],
            rec["ctime_ns"],
            rec["inode"],
            rec["hash"] if algo_ok else f"{rec['hash_algo']}:{rec['hash']}",
        )
    return out


@dataclass(frozen=True)
class Comparison:
    files_on_disk: int
    missing: list[str]
    """On disk, not in the ledger."""
    extra: list[str]
    """In the ledger, not on disk."""
    differing: list[str]
    """In both, with another size, mtime, ctime, inode or hash."""

    @property
    def exact(self) -> bool:
        return not (self.missing or self.extra or self.differing)

    def to_json(self) -> dict[str, object]:
        return {
            "exact": self.exact,
            "files_on_disk": self.files_on_disk,
            "missing": len(self.missing),
            "extra": len(self.extra),
            "differing": len(self.differing),
            "examples": (self.missing + self.extra + self.differing)[:5],
        }


def compare(disk: dict[bytes, FileState], ledger: dict[bytes, FileState]) -> Comparison:
    """Compare the two states path by path."""
    return Comparison(
        files_on_disk=len(disk),
        missing=sorted(os.fsdecode(p) for p in disk.keys() - ledger.keys()),
        extra=sorted(os.fsdecode(p) for p in ledger.keys() - disk.keys()),
        differing=sorted(
            os.fsdecode(p) for p in disk.keys() & ledger.keys() if disk[p] != ledger[p]
        ),
    )
