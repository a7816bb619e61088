"""Tier 1: the real-time watcher, its event backends and its metrics.

``Watcher`` keeps watched repositories true from inotify events; ``InotifyBackend`` is
the real event source and ``ScriptedBackend`` a deterministic one for tests, both behind
the ``WatchBackend`` interface. ``is_network_fs`` tells where inotify is blind.
"""

from __future__ import annotations

from fsledger.watch.backend import (
    InotifyBackend,
    RawEvent,
    ScriptedBackend,
    WatchBackend,
    WatchLimitReached,
)
from fsledger.watch.metrics import WatcherMetrics
from fsledger.watch.netfs import fs_type, is_network_fs
from fsledger.watch.watcher import Watcher

__all__ = [
    "InotifyBackend",
    "RawEvent",
    "ScriptedBackend",
    "WatchBackend",
    "WatchLimitReached",
    "Watcher",
    "WatcherMetrics",
    "fs_type",
    "is_network_fs",
]
