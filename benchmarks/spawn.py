"""Run one command and report its wall time and peak RSS: ``spawn.py REPORT_FILE ARGV...``.

Why a separate small process: on ``execve`` Linux folds the *old* address space's
high-water RSS into the new program's ``ru_maxrss``, so a command forked straight from
the benchmark (which holds a whole-tree listing after an exactness check) would inherit
the benchmark's size. Forked from this helper, started with ``python -S``, the inherited
floor is this helper's few MiB. Standard library only, no ``site``.
"""

import json
import os
import sys
import time


def main() -> int:
    report, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _pid, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(report, "w") as f:
        # ru_maxrss is in KiB on Linux.
        json.dump({"seconds": seconds, "exit": code, "peak_rss_bytes": usage.ru_maxrss * 1024}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
