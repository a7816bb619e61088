"""Path bytes <-> S3 object keys: an exact, reversible encoding.

A POSIX name is any bytes but ``/`` and NUL; an S3 key is UTF-8 text of at most 1024 bytes,
and control characters in it break the XML listings (and many tools). So a repository path
becomes a key like this:

* every byte of a valid UTF-8 character that is printable stays as it is: a UTF-8 name
  without the escape character below is its own key (``Fotos/été 2024/IMG_1.jpg`` is the
  key ``Fotos/été 2024/IMG_1.jpg``);
* every other byte becomes ``␛`` (U+241B SYMBOL FOR ESCAPE) followed by the byte's two
  upper-case hex digits. That is: bytes that are not part of valid UTF-8 (Latin-1 names,
  truncated sequences, overlong forms, encoded surrogates), the C0 controls and DEL
  (0x00-0x1F, 0x7F), the C1 controls (U+0080-U+009F) and the bytes of ``␛`` itself (so
  ``a␛b`` becomes ``a␛E2␛90␛9Bb``);
* ``/`` stays ``/``: the bucket shows the tree as folders.

Decoding turns ``␛HH`` back into the byte and everything else into its UTF-8 bytes; a key
with a ``␛`` not followed by two upper-case hex digits was not made by ``encode`` and is
refused (``ValueError``): ``mirror verify`` counts such an object as extra.

The encoding is not order-preserving where bytes are escaped (``␛`` sorts among the
three-byte characters); where nothing is escaped the key's UTF-8 bytes *are* the path's, so
the order is the same. ``mirror verify`` sorts decoded keys, never relies on the order.
"""

from __future__ import annotations

import re

ESCAPE = "\u241b"
"""``␛``: introduces an escaped byte as two upper-case hex digits."""
MAX_KEY_BYTES = 1024
"""S3's limit on a key's UTF-8 length."""

_ESCAPE_BYTES = ESCAPE.encode()
# Characters that are escaped although they are valid UTF-8: C0, DEL, C1 and the escape.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f" + ESCAPE + "]")
_ESCAPED = re.compile(ESCAPE + "([0-9A-F]{2})?")


def _escape_bytes(raw: bytes) -> str:
    return "".join(f"{ESCAPE}{b:02X}" for b in raw)


def encode(path: bytes) -> str:
    """The key text of a relative path (without the mirror's prefix)."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return _encode_mixed(path)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: _escape_bytes(m.group().encode()), text)


def _encode_mixed(path: bytes) -> str:
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF.
    text = path.decode("utf-8", "surrogateescape")
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"{ESCAPE}{code - 0xDC00:02X}")
        elif _UNSAFE.match(ch):
            out.append(_escape_bytes(ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def decode(key: str) -> bytes:
    """The path bytes a key encodes (the inverse of ``encode``).

    Raises:
        ValueError: the key holds a ``␛`` that is not followed by two upper-case hex digits,
            or a character ``encode`` would have escaped: it was not made by ``encode``.
    """
    if ESCAPE not in key:
        if _UNSAFE.search(key) is not None:
            raise ValueError(f"not an fsledger key (unescaped control character): {key!r}")
        return key.encode()  # a lone surrogate: UnicodeEncodeError, a ValueError
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(key):
        if m.group(1) is None:
            raise ValueError(f"not an fsledger key ({ESCAPE} without two hex digits): {key!r}")
        plain = key[pos : m.start()]
        if _UNSAFE.search(plain) is not None:
            raise ValueError(f"not an fsledger key (unescaped control character): {key!r}")
        out += plain.encode()
        out.append(int(m.group(1), 16))
        pos = m.end()
    tail = key[pos:]
    if _UNSAFE.search(tail) is not None:
        raise ValueError(f"not an fsledger key (unescaped control character): {key!r}")
    out += tail.encode()
    return bytes(out)


def key_of(prefix: str, path: bytes) -> str:
    """The full object key of ``path`` below a mirror's ``prefix`` (``""`` or ending in ``/``).

    Raises:
        ValueError: the key would be longer than S3 allows (1024 bytes of UTF-8).
    """
    key = prefix + encode(path)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"the key of {path!r} is longer than {MAX_KEY_BYTES} bytes")
    return key


def path_of(prefix: str, key: str) -> bytes:
    """The path a full key below ``prefix`` encodes.

    Raises:
        ValueError: the key is not below the prefix, or was not made by ``encode``.
    """
    if not key.startswith(prefix):
        raise ValueError(f"{key!r} is not below {prefix!r}")
    return decode(key[len(prefix) :])


__all__ = ["ESCAPE", "MAX_KEY_BYTES", "decode", "encode", "key_of", "path_of"]
