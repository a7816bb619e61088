"""Names and messages made safe for a terminal or a log line.

File names are chosen by whoever writes into a watched tree: a newline in one could forge a
record line of ``fsledger files`` or a line of the daemon's log (``[ERROR] FORGED``), and an
ESC or OSC sequence could rewrite what a terminal shows. Human output and log lines show
every control character as an escape instead; ``--json`` output is escaped by JSON itself.
"""

from __future__ import annotations

import logging
import os
import re

from fsledger.store.redact import scrub_urls

_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
"""C0 and C1 controls, DEL, line and paragraph separators, bidirectional overrides (which
can make a name read as another), and the lone surrogates ``os.fsdecode`` makes of bytes
that are not UTF-8."""


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as ``\\xNN`` / ``\\uNNNN``."""
    return _CONTROL.sub(_escape, text)


def show_path(path: bytes) -> str:
    """A path (bytes) for a terminal or a log: decoded, with undecodable bytes and control
    characters escaped."""
    return escape_controls(os.fsdecode(path))


class SafeFormatter(logging.Formatter):
    """The log formatter of ``fsledger``'s commands.

    It escapes control characters in each message, so that one log record is one line
    whatever names or texts its arguments carry (tracebacks, appended after the message,
    keep their lines); and it removes URL credentials, query strings and ``password=``
    values from the whole line, whoever logged it (httpx logs every request's full URL).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return scrub_urls(super().format(record))
