"""Keeping database passwords out of messages and logs.

A database URL may carry a password (``postgresql://user:secret@host/db`` or
``?password=secret``), and libpq quotes parts of a URL it cannot parse in its own errors
(``invalid percent-encoded token: "secret%zz"``). Every message that names a database goes
through ``redact_url``, and every driver error through ``scrub``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def _userinfo_end(rest: str) -> int:
    """Index of the ``@`` that ends the user info (the last one before the query), or -1."""
    head = rest.split("?", 1)[0]
    return head.rfind("@")


def redact_url(url: str) -> str:
    """``url`` with its password (user info or ``password=`` parameter) replaced by ``***``.

    Example:
        >>> redact_url("postgresql://ann:p@ss@db.lan:5432/photos?password=x&sslmode=require")
        'postgresql://ann:***@db.lan:5432/photos?password=***&sslmode=require'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    at = _userinfo_end(rest)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    return scheme + sep + _QUERY_PASSWORD.sub(r"\1***", rest)


def secrets_of(url: str) -> list[str]:
    """The password(s) a URL carries, as written and percent-decoded, longest first.

    A password with an ``@`` in it is ambiguous (libpq ends the user info at the first
    ``@`` and takes the rest for the host name, which it then quotes in its error), so its
    pieces count too. Fragments shorter than 3 characters are left alone: replacing every
    "a" of a message would say nothing and hide everything.
    """
    found: list[str] = []
    _scheme, sep, rest = url.partition("://")
    if sep:
        at = _userinfo_end(rest)
        if at >= 0:
            _user, colon, password = rest[:at].partition(":")
            if colon:
                found += [password, *password.split("@")]
        found += [m.group(2) for m in _QUERY_PASSWORD.finditer(rest)]
    out = {s for p in found for s in (p, unquote(p)) if len(s) >= 3}
    return sorted(out, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) without the URL or any password it carries."""
    text = text.replace(url, redact_url(url))
    for secret in secrets_of(url):
        text = text.replace(secret, "***")
    return text
