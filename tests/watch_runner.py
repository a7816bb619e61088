"""One fsledger tier in a process of its own, for the scenario and model tests.

``python watch_runner.py watch REPO_ID LOG``: a ``Watcher`` (tier 1 only: no periodic
reconciliation; a resync the watcher asks for itself runs, as under ``fsledger run``) on the
repository, configured from the environment as ``fsledger run`` is. It prints ``ready``
once the watches are in place, appends every batch its writer applies to ``LOG`` (one JSON
line a change), and stops (flushing what is pending) when its stdin closes.

``python watch_runner.py scan REPO_ID LOG``: one reconciliation (tier 2), same log.

``python watch_runner.py run REPO_ID LOG``: the daemon's ``SyncManager`` with its watcher,
as ``fsledger run`` with periodic reconciliation off (what it does when a root goes away
and comes back is the manager's); ``ready`` once its startup reconciliation is done.

The tests start it under ``setpriv`` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH when
they run as root, so that ``chmod 000`` means for fsledger what it means for any user.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from uuid import UUID

from fsledger.config import Settings
from fsledger.ledger import Ledger
from fsledger.manager import LiveSource, SyncManager
from fsledger.model import RelPath, Repository
from fsledger.watch import Watcher
from fsledger.writer import Applied


def _live(
    ledger: Ledger, settings: Settings, on_resync: Callable[[Repository, RelPath, str], None]
) -> LiveSource:
    return Watcher(ledger, settings, on_resync=on_resync)


def main(argv: list[str]) -> int:
    command, repo_id, log_path = argv[1], UUID(argv[2]), argv[3]
    settings = Settings.from_env()
    ledger = Ledger(settings)
    lock = threading.Lock()
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below

    def record(repo: Repository, applied: Applied) -> None:
        with lock:
            for c in applied.changes:
                log.write(
                    json.dumps(
                        {
                            "kind": c.kind.value,
                            "path": c.path.hex(),
                            "old_path": c.old_path.hex() if c.old_path is not None else None,
                            "size": c.record.size if c.record else None,
                        }
                    )
                    + "\n"
                )
            log.flush()

    try:
        repo = ledger.store.get_repository(repo_id)
        assert repo is not None, f"no repository {repo_id}"
        writer = ledger.writer(repo)
        writer.listeners = [*writer.listeners, record]
        if command == "scan":
            stats = ledger.scan(repo)
            print(json.dumps({"errors": list(stats.errors)}), flush=True)
            return 0
        if command == "run":
            manager = SyncManager(ledger, settings, live_factory=_live)
            manager.start()
            assert manager.wait_idle(60.0), "the startup reconciliation did not finish"
            print("ready", flush=True)
            sys.stdin.read()
            manager.stop()
            return 0
        watcher = Watcher(ledger, settings)
        watcher.add(repo)
        watcher.start()
        print("ready", flush=True)
        sys.stdin.read()
        watcher.stop()
        return 0
    finally:
        ledger.close()
        log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
