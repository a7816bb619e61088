"""The Python floor of a no-change rescan by a command of its own: the least any Python
program must do to tell that a repository's records still match the disk.

    python -I -S benchmarks/floor.py DATABASE_URL REPOSITORY_ID ROOT

It starts the interpreter without ``site`` (no virtualenv, no ``.pth`` files), opens the
store with the driver fsledger uses (``sqlite3``; psycopg for PostgreSQL, found through
``FLOOR_SITE``, the venv's site-packages, since ``-S`` leaves it off the path), reads each
record's ``(path, size, mtime_ns, ctime_ns, inode)``, walks the tree below directory
descriptors with one ``lstat`` a file, and compares. No decision module, no ignore rules,
no hashing, no writes, no output but a count: whatever fsledger's ``scan`` costs above
this is fsledger's; this is the interpreter's, the driver's and the kernel's.

``benchmarks.scenarios.StoreRun.rescan_nochange`` times it beside ``find`` and ``fsledger
scan``, so the floor is measured in the same run as the line it bounds.
"""

from __future__ import annotations

import os
import stat
import sys


def records(url: str, repo_id: str) -> dict[bytes, tuple[int, int, int, int]]:
    query = (
        "SELECT file_path, file_size, mtime_ns, ctime_ns, inode FROM file_records "
        "WHERE repository_id = {}"
    )
    if url.startswith("sqlite://"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite://"))
        rows = db.execute(query.format("?"), (repo_id,)).fetchall()
        db.close()
    else:
        sys.path.insert(0, os.environ["FLOOR_SITE"])
        import psycopg

        with psycopg.connect(url) as conn:
            rows = conn.execute(query.format("%s"), (repo_id,)).fetchall()
    # PostgreSQL stores inodes as signed 64-bit; fold them back as fsledger does.
    return {bytes(p): (s, m, c, i + (1 << 64) if i < 0 else i) for p, s, m, c, i in rows}


def differences(root: bytes, known: dict[bytes, tuple[int, int, int, int]]) -> int:
    """Files whose lstat differs from their record, new files, and records with no file."""
    seen = matched = 0

    def walk(fd: int, rel: bytes) -> None:
        nonlocal seen, matched
        with os.scandir(fd) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in names:
            path = rel + os.fsencode(name)
            if is_dir:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    walk(sub, path + b"/")
                finally:
                    os.close(sub)
                continue
            st = os.lstat(name, dir_fd=fd)
            if stat.S_ISREG(st.st_mode):
                seen += 1
                matched += known.get(path) == (
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    st.st_ino,
                )

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walk(top, b"")
    finally:
        os.close(top)
    return (seen - matched) + (len(known) - matched)


def main() -> None:
    url, repo_id, root = sys.argv[1:4]
    known = records(url, repo_id)
    print(len(known), differences(os.fsencode(root), known))


if __name__ == "__main__":
    main()
