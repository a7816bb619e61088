"""Ignore rules: hidden names, the seed's system patterns, a repository's own globs."""

from __future__ import annotations

import pytest

from fsledger.ignore import DEFAULT_PATTERNS, IgnoreRules

DEFAULT = IgnoreRules.default()


@pytest.mark.parametrize(
    "name",
    [
        b".DS_Store",
        b"Thumbs.db",
        b"desktop.ini",
        b"x.tmp",
        b"x.temp",
        b".x.swp",
        b"x.swo",
        b"backup~",
        b".hidden",
        b".lumilio",
        b".",
        b"..",
        b"\xff.tmp",
    ],
)
def test_default_ignores(name: bytes) -> None:
    assert DEFAULT.ignores_name(name, name)
    assert DEFAULT.ignores_path(name)


@pytest.mark.parametrize(
    "name",
    [
        b"IMG_0001.jpg",
        b"x.tmp.jpg",  # the pattern matches the whole name, not a part
        b"X.TMP",  # case-sensitive, like the file system
        b"thumbs.db",
        b"tmp",
        b"a~b",
        b"\xff\xfe.jpg",
        b"name with spaces",
        b"new\nline",
        "é.jpg".encode(),
    ],
)
def test_default_keeps(name: bytes) -> None:
    assert not DEFAULT.ignores_name(name, name)
    assert not DEFAULT.ignores_path(name)


def test_a_newline_does_not_end_a_match_early() -> None:
    """``fnmatch`` patterns must match the whole name: ``x.tmp\\nreal.jpg`` is not ``*.tmp``."""
    assert not DEFAULT.ignores_name(b"x.tmp\nreal.jpg")
    assert DEFAULT.ignores_name(b"real.jpg\nx.tmp")


def test_ignores_path_checks_every_component() -> None:
    assert DEFAULT.ignores_path(b".hidden/dir/file.jpg")
    assert DEFAULT.ignores_path(b"a/b/.git/config")
    assert DEFAULT.ignores_path(b"a/cache.tmp/file.jpg")
    assert not DEFAULT.ignores_path(b"a/b/file.jpg")
    assert not DEFAULT.ignores_path(b"a.b/c.d")


def test_extra_name_patterns() -> None:
    rules = IgnoreRules.default(["*.xmp", "@eaDir"])
    assert rules.ignores_name(b"IMG_1.xmp")
    assert rules.ignores_path(b"2020/@eaDir/thumb.jpg")
    assert rules.ignores_name(b".DS_Store")  # the defaults stay
    assert not rules.ignores_name(b"IMG_1.jpg")
    assert rules.patterns == (*DEFAULT_PATTERNS, "*.xmp", "@eaDir")


def test_path_patterns_match_from_the_root() -> None:
    rules = IgnoreRules.default(["exports/*", "/cache/"])
    assert rules.ignores_name(b"x", b"exports/x")
    assert rules.ignores_path(b"exports/a/b.jpg")
    assert not rules.ignores_path(b"exports")  # the directory itself is kept
    assert not rules.ignores_path(b"sub/exports/x")  # anchored at the root
    assert rules.ignores_path(b"cache")
    assert rules.ignores_path(b"cache/x.jpg")
    assert not rules.ignores_path(b"cached/x.jpg")
    # A path pattern never matches a bare name without its path.
    assert not rules.ignores_name(b"x")


def test_non_ascii_patterns_match_their_bytes() -> None:
    rules = IgnoreRules(patterns=("é*", "*\udcff"), hidden=False)
    assert rules.ignores_name("été.jpg".encode())
    assert rules.ignores_name(b"abc\xff")
    assert not rules.ignores_name(b"e.jpg")


def test_without_hidden_or_patterns() -> None:
    rules = IgnoreRules(patterns=(), hidden=False)
    assert not rules.ignores_name(b".hidden")
    assert not rules.ignores_path(b".git/config")
    assert not rules.ignores_name(b"x.tmp")


def test_empty_patterns_are_ignored() -> None:
    rules = IgnoreRules(patterns=("", "*.xmp"))
    assert not rules.ignores_name(b"anything.jpg")
    assert rules.ignores_name(b"a.xmp")
