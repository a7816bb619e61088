"""The exception tree. Every error fsledger raises on purpose is one of these::

FsledgerError                 exit code 1 unless a subclass says otherwise
├── ConfigError               a bad setting or argument (exit 2)
│   └── MissingExtra          a command needs an extra that is not installed (exit 2)
├── RepositoryNotFound        no repository matches the reference given (exit 2)
├── RepositoryExists          a repository with that name or root already exists (exit 2)
├── MirrorExists              a mirror to that bucket and prefix already exists (exit 2)
├── RootUnavailable           the root is missing, not a directory or unreadable (exit 4)
│   └── GuardRefused          the mass-deletion guard refused a scan (exit 4)
├── StoreError                the database failed
│   └── StoreUnavailable      the database cannot be reached (after retries)
    ├── LeaseLost                 another agent owns the repository now
├── CorruptionFound           ``scan --verify`` found silent corruption (exit 3)
└── ResyncNeeded              a change-feed cursor the feed cannot answer exactly (exit 5)
"""

from __future__ import annotations


class FsledgerError(Exception):
    """Base of every error fsledger raises deliberately."""

    exit_code = 1


class ConfigError(FsledgerError):
    """A setting (environment variable, option or file) has a value that cannot be used."""

    exit_code = 2


class MissingExtra(ConfigError):
    """A command needs packages of an extra that is not installed (``fsledger[server]``,
    ``fsledger[postgres]``): the message names the extra to install."""

    def __init__(self, extra: str, need: str, module: str | None) -> None:
        missing = f" ({module} is not installed)" if module else ""
        super().__init__(
            f"{need} needs the '{extra}' extra{missing}: "
            f"pip install 'fsledger[{extra}]' (or fsledger[all])"
        )
        self.extra = extra


class RepositoryNotFound(FsledgerError):
    exit_code = 2


class RepositoryExists(FsledgerError):
    exit_code = 2


class MirrorExists(FsledgerError):
    exit_code = 2


class RootUnavailable(FsledgerError):
    """The repository root cannot be used right now: nothing is deleted."""

    exit_code = 4


class GuardRefused(RootUnavailable):
    """The scan would delete records because the root looks unmounted or emptied."""


class StoreError(FsledgerError):
    """The database failed an operation."""


class StoreUnavailable(StoreError):
    """The database could not be reached."""


class CorruptionFound(FsledgerError):
    exit_code = 3


class LeaseLost(FsledgerError):
    """This agent no longer owns the repository (another agent took over): write nothing."""


class ResyncNeeded(FsledgerError):
    """A change-feed cursor the feed cannot answer exactly: retention pruned past it, it is
    from another database, it lies beyond the newest entry, or its entry is not the one it
    was issued for (the database was restored from a backup). The reader must list the
    files again, then follow the feed from ``cursor``, which was taken before the listing
    so no change falls in between."""

    exit_code = 5

    def __init__(self, message: str, cursor: str) -> None:
        super().__init__(message)
        self.cursor = cursor
