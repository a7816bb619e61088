"""Ignore rules shared by both tiers: hidden names, system files, glob patterns.

A path is ignored when any of its components is (an ignored directory hides its
whole subtree), so the walker and the watcher only ever need to test one name.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_PATTERNS: tuple[str, ...] = (
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "*.tmp",
    "*.temp",
    "*.swp",
    "*.swo",
    "*~",
)
"""The seed's ignore patterns. Hidden names (``.lumilio`` included) are ignored separately."""


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns if p]
    return re.compile("|".join(parts)) if parts else None


def _last_bytes(patterns: Iterable[str]) -> frozenset[int] | None:
    """The bytes a name must end with to match one of ``patterns`` (latin-1 text), or None
    when a pattern can end with anything (``*``, ``?``, ``[...]``)."""
    out: set[int] = set()
    for p in patterns:
        if not p or p[-1] in "*?]":
            return None
        out.add(ord(p[-1]))
    return frozenset(out)


@dataclass(frozen=True)
class IgnoreRules:
    """Decides which names never reach the ledger.

    Patterns without ``/`` match a single name (``*.tmp``); patterns with ``/``
    match the path relative to the root (``exports/*``). Names are matched as the
    bytes they are, decoded as latin-1 so every byte maps to one character.

    Example:
        >>> rules = IgnoreRules.default(extra=["*.xmp"])
        >>> rules.ignores_name(b"IMG_1.xmp"), rules.ignores_name(b"IMG_1.jpg")
        (True, False)
    """

    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    hidden: bool = True
    _name_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _path_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _name_ends: frozenset[int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def latin(p: str) -> str:
            return os.fsencode(p).decode("latin-1")

        name_patterns = [latin(p) for p in self.patterns if "/" not in p]
        object.__setattr__(self, "_name_re", _compile(name_patterns))
        # The walker asks about every name in the tree; most end in a byte no pattern ends
        # in (".jpg" vs "*.tmp", "*~", ...), which rules them out without the regex.
        object.__setattr__(self, "_name_ends", _last_bytes(name_patterns))
        object.__setattr__(
            self, "_path_re", _compile(latin(p.strip("/")) for p in self.patterns if "/" in p)
        )

    @classmethod
    def default(cls, extra: Iterable[str] = ()) -> IgnoreRules:
        """The seed's rules plus ``extra`` patterns (a repository's own)."""
        return cls(DEFAULT_PATTERNS + tuple(extra))

    def ignores_name(self, name: bytes, relpath: bytes | None = None) -> bool:
        """Whether the entry ``name`` (at ``relpath``) is ignored, with its subtree."""
        if self.hidden and name.startswith(b"."):
            return True
        if (
            self._name_re is not None
            and (self._name_ends is None or (name and name[-1] in self._name_ends))
            and self._name_re.match(name.decode("latin-1"))
        ):
            return True
        return (
            self._path_re is not None
            and relpath is not None
            and self._path_re.match(relpath.decode("latin-1")) is not None
        )

    def ignores_path(self, relpath: bytes) -> bool:
        """Whether a path relative to the root is ignored (any component, or the whole path)."""
        parts = relpath.split(b"/")
        for i, part in enumerate(parts):
            if self.ignores_name(part, b"/".join(parts[: i + 1])):
                return True
        return False
