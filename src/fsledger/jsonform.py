"""The JSON forms every face prints (the CLI, the HTTP API, the feed): paths, timestamps, a
file record, and the one encoder of the CLI's ``--json`` lines.

Light on purpose: the console script's fast path (``fsledger.entry``) prints
``files REPO --json`` with this module and no other of the model's, so it imports only
``binascii``, ``datetime`` and ``json``'s C encoder (no dataclasses, no typing, no ``re``).
``fsledger.model`` re-exports what it defines and ``FileRecord.to_json`` calls
``record_json``: one implementation, whichever path prints.
"""

from __future__ import annotations

import binascii
from datetime import UTC, datetime

TYPE_CHECKING = False  # typing costs the fast path its import; mypy still reads the block
if TYPE_CHECKING:
    from typing import Any

try:  # CPython's C accelerator of ``json`` (json.encoder uses the very same function)
    from _json import encode_basestring_ascii as _ascii_str
except ImportError:  # pragma: no cover (another interpreter: json's own, identical output)
    from json.encoder import encode_basestring_ascii as _ascii_str


def path_text(path: bytes) -> str:
    """A path as text that every encoder and every strict JSON parser accepts: UTF-8, with
    each byte that is not valid UTF-8 shown as U+FFFD.

    Not ``os.fsdecode``: its lone surrogates (``\\udcff``) are refused by pydantic, orjson,
    browsers and most JSON parsers, so one such name made every page holding it fail. The
    text is for display and prefix matching; the exact bytes travel beside it as base64.
    """
    return path.decode("utf-8", "replace")


def path_to_json(path: bytes) -> dict[str, str]:
    """The two JSON forms of a path: ``path`` (``path_text``: always encodable, lossy only
    for names that are not UTF-8) and ``path_b64`` (standard base64 of the exact bytes: the
    key a consumer should use). ``b2a_base64`` is what ``base64.b64encode`` calls, without
    loading ``base64`` (which loads ``re``)."""
    return {
        "path": path_text(path),
        "path_b64": binascii.b2a_base64(path, newline=False).decode("ascii"),
    }


def rfc3339(moment: datetime) -> str:
    """One RFC 3339 form for every timestamp the API, the feed and the CLI print: UTC, always
    with microseconds (``isoformat`` drops them when they are zero, which strict parsers with
    a fixed layout refuse)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def record_json(
    path: bytes,
    size: int,
    mtime_ns: int,
    ctime_ns: int,
    inode: int,
    content_hash: str | None,
    hash_algo: str | None,
    last_scanned: str,
) -> dict[str, Any]:
    """A file record's JSON object (``FileRecord.to_json``; ``last_scanned`` already in
    ``rfc3339`` form)."""
    return {
        **path_to_json(path),
        "size": size,
        "mtime_ns": mtime_ns,
        "ctime_ns": ctime_ns,
        "inode": inode,
        "hash": content_hash,
        "hash_algo": hash_algo,
        "last_scanned": last_scanned,
    }


def dumps(obj: Any) -> str:
    """``json.dumps(obj, ensure_ascii=True)``, what every ``--json`` line is.

    A flat object of text, whole numbers, booleans and nulls (a file record) is encoded
    here with json's own C string encoder, exactly as ``json.dumps`` does (its default
    separators, ``int.__repr__``), without loading the ``json`` package (``json.decoder``
    loads ``re``: a quarter of the fast path's start). Anything else goes to ``json.dumps``.
    ``tests/test_cli_fast.py`` checks the two agree.
    """
    if type(obj) is dict:
        parts = []
        for key, value in obj.items():
            if type(key) is not str:
                break
            kind = type(value)
            if kind is str:
                text = _ascii_str(value)
            elif kind is int:
                text = int.__repr__(value)
            elif value is None:
                text = "null"
            elif value is True:
                text = "true"
            elif value is False:
                text = "false"
            else:
                break
            parts.append(_ascii_str(key) + ": " + text)
        else:
            return "{" + ", ".join(parts) + "}"
    import json

    return json.dumps(obj, ensure_ascii=True)
