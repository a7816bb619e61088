"""A repository's own ``.fsledger.yaml``: read safely, honoured only when the operator says so.

The file lives in the root, so whoever can write into the tree can write it: it is
untrusted input. Three rules follow.

* It is read only for a repository whose operator trusts it (``repo add
  --trust-repo-config``); otherwise it is never opened.
* It is opened below the root without following a symlink, with ``O_NONBLOCK`` (a FIFO
  planted under its name must not block the daemon in ``open``), and used only if the
  opened descriptor is a regular file of at most ``MAX_BYTES``.
* Its stored copy follows the file: a file deleted, unreadable or no longer trusted
  clears it. Its ignore patterns stop new records; they never retire existing ones on
  their own (``RepoWriter.retire``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from dataclasses import replace

from fsledger.beneath import Beneath
from fsledger.config import parse_duration
from fsledger.errors import ConfigError
from fsledger.model import RepoSettings, Repository

log = logging.getLogger(__name__)

REPO_CONFIG_NAMES = (b".fsledger.yaml", b".fsledger.yml")
"""Per-repository YAML in the root (hidden, so never recorded), with a ``sync_settings`` map."""
MAX_BYTES = 64 * 1024
"""A settings file is a few lines; anything bigger is refused rather than parsed."""


def read_config_bytes(root: bytes, name: bytes) -> bytes | None:
    """The bytes of ``name`` in ``root``, or None if there is no such entry.

    Raises:
        ConfigError: the entry is not a regular file (a FIFO, a symlink, a directory...),
            is bigger than ``MAX_BYTES``, or cannot be read.
    """
    where = os.fsdecode(os.path.join(root, name))
    try:
        with Beneath(root) as tree:
            fd = tree.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{where}: is a symlink; only a regular file is read") from None
        raise ConfigError(f"{where}: cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise ConfigError(f"{where}: is not a regular file; ignored")
        if st.st_size > MAX_BYTES:
            raise ConfigError(f"{where}: is larger than {MAX_BYTES} bytes; ignored")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, MAX_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:  # grew after the fstat
                raise ConfigError(f"{where}: is larger than {MAX_BYTES} bytes; ignored")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_repo_yaml(root: bytes) -> RepoSettings | None:
    """Read ``sync_settings`` from a repository's YAML file, if it has one.

    Example file::

        sync_settings:
          quick_scan_interval: "5m"
          full_scan_interval: "30m"
          ignore_patterns: ["*.xmp", "exports/*"]

    Returns the file's settings in the operator fields of ``RepoSettings`` (the caller
    decides where they go), or None when there is no file.

    Raises:
        ConfigError: the file exists but cannot be used.
    """
    for name in REPO_CONFIG_NAMES:
        raw = read_config_bytes(root, name)
        if raw is None:
            continue
        where = os.fsdecode(os.path.join(root, name))
        try:
            import yaml  # here: most roots have no such file, and yaml costs 20 ms to import

            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot be read as YAML: {exc}") from exc
        return _sync_settings(data, where)
    return None


def _sync_settings(data: object, where: str) -> RepoSettings:
    sync = data.get("sync_settings") if isinstance(data, dict) else None
    if sync is None:
        return RepoSettings()
    if not isinstance(sync, dict):
        raise ConfigError(f"{where}: sync_settings must be a mapping")
    patterns = sync.get("ignore_patterns") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: sync_settings.ignore_patterns must be a list of strings")

    def dur(key: str) -> float | None:
        value = sync.get(key)
        return None if value is None else parse_duration(f"{where}: {key}", str(value))

    return RepoSettings(
        ignore_patterns=tuple(patterns),
        quick_scan_interval_s=dur("quick_scan_interval"),
        full_scan_interval_s=dur("full_scan_interval"),
    )


def follow_file(repo: Repository) -> Repository:
    """``repo`` with its stored copy of the root's file brought up to date.

    Untrusted, or no file: the copy is cleared. A file that cannot be used (not a regular
    file, too big, bad YAML) is logged and also cleared: what an untrusted writer broke
    must not leave an older copy in force either.
    """
    settings = repo.settings
    found: RepoSettings | None = None
    if settings.trust_repo_config:
        try:
            found = load_repo_yaml(repo.root)
        except ConfigError as exc:
            log.error("Repository %s: %s (its settings are not used)", repo.id, exc)
    found = found or RepoSettings()
    wanted = replace(
        settings,
        file_ignore_patterns=found.ignore_patterns,
        file_quick_scan_interval_s=found.quick_scan_interval_s,
        file_full_scan_interval_s=found.full_scan_interval_s,
    )
    return repo if wanted == settings else replace(repo, settings=wanted)
