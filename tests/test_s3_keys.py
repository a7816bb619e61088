"""The key encoding of mirrors (fsledger.s3.keys): exact and reversible for any path bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsledger.s3.keys import ESCAPE, decode, encode, key_of, path_of

# A name: any bytes but "/" and NUL; a path: names joined by "/".
names = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"x").replace(b"\0", b"y"))
paths = st.lists(names, min_size=1, max_size=4).map(b"/".join)
utf8_names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\u241b\x85"),
    min_size=1,
    max_size=12,
)


@pytest.mark.slow  # 2000 generated paths: 4-8 s
@given(paths)
@settings(max_examples=2000)
def test_round_trip_of_any_path(path: bytes) -> None:
    key = encode(path)
    key.encode("utf-8")  # valid UTF-8, no lone surrogate
    assert decode(key) == path
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key)
    assert key.count("/") == path.count(b"/")


@pytest.mark.slow  # 1000 generated names
@given(st.lists(utf8_names, min_size=1, max_size=4).map("/".join))
@settings(max_examples=1000)
def test_printable_utf8_names_are_their_own_keys(text: str) -> None:
    assert encode(text.encode()) == text
    assert decode(text) == text.encode()


@pytest.mark.slow  # 1000 generated pairs
@given(paths, paths)
@settings(max_examples=1000)
def test_distinct_paths_distinct_keys(a: bytes, b: bytes) -> None:
    assert (encode(a) == encode(b)) == (a == b)


@given(
    st.lists(utf8_names, min_size=1, max_size=3).map("/".join),
    st.lists(utf8_names, min_size=1, max_size=3).map("/".join),
)
def test_order_kept_where_nothing_is_escaped(a: str, b: str) -> None:
    assert (encode(a.encode()).encode() < encode(b.encode()).encode()) == (a.encode() < b.encode())


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (b"caf\xe9.jpg", "caf\u241bE9.jpg"),
        (b"a\nb", "a\u241b0Ab"),
        ("a\u241bb".encode(), "a\u241bE2\u241b90\u241b9Bb"),
        (b"d\x7f/\xc2\x85", "d\u241b7F/\u241bC2\u241b85"),
        (b"\xed\xa0\x80", "\u241bED\u241bA0\u241b80"),  # an encoded surrogate is not UTF-8
        ("été/IMG 1.jpg".encode(), "été/IMG 1.jpg"),
    ],
)
def test_examples(path: bytes, key: str) -> None:
    assert encode(path) == key
    assert decode(key) == path


@pytest.mark.parametrize("key", [f"a{ESCAPE}", f"a{ESCAPE}e9", f"{ESCAPE}G0", "a\nb", "a\udc80"])
def test_keys_not_made_by_encode_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        decode(key)


def test_prefix_and_length() -> None:
    assert key_of("p/", b"a/b") == "p/a/b"
    assert path_of("p/", "p/a\u241bFFb") == b"a\xffb"
    with pytest.raises(ValueError):
        path_of("p/", "q/a")
    with pytest.raises(ValueError):
        key_of("", b"\xff" * 400)  # 400 escapes of 5 bytes each
