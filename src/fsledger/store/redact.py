"""Keeping database passwords, and URL credentials in general, out of messages and logs.

A database URL may carry a password in many forms: ``postgresql://user:secret@host/db``,
``?password=secret``, ``?sslpassword=secret``, a percent-encoded key (``?%70assword=``,
which libpq decodes to ``password``), or a key/value DSN (``host=db password=secret``).
libpq also quotes parts of a URL it cannot parse in its own errors (``invalid
percent-encoded token: "secret%zz"``). So the secrets are found the way libpq finds them
(``psycopg.conninfo.conninfo_to_dict``), plus the textual forms they were written in; every
message that names a database goes through ``redact_url``, every driver error through
``scrub``, and every log line through ``scrub_urls`` (``fsledger.text.SafeFormatter``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

SECRET_KEYS = frozenset({"password", "sslpassword"})
"""libpq connection parameters whose value is a secret."""

_QUERY_PARAM = re.compile(r"([?&])([^&#=]*)=([^&#]*)")
_KV_SECRET = re.compile(r"\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&]+)", re.IGNORECASE)
"""``password=...`` / ``sslpassword = '...'`` as written in a key/value DSN (or anywhere)."""
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _userinfo_end(rest: str) -> int:
    """Index of the ``@`` that ends the user info (the last one before the query), or -1."""
    head = rest.split("?", 1)[0]
    return head.rfind("@")


def _is_secret_key(key: str) -> bool:
    return unquote(key).strip().lower() in SECRET_KEYS


def _redact_query(rest: str) -> str:
    def hide(m: re.Match[str]) -> str:
        return f"{m.group(1)}{m.group(2)}=***" if _is_secret_key(m.group(2)) else m.group(0)

    return _QUERY_PARAM.sub(hide, rest)


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: that of the user info, and the value
    of every secret parameter (``password``, ``sslpassword``, however percent-encoded); a
    key/value DSN has its secret values replaced likewise.

    Example:
        >>> redact_url("postgresql://ann:p@ss@db.lan:5432/photos?password=x&sslmode=require")
        'postgresql://ann:***@db.lan:5432/photos?password=***&sslmode=require'
        >>> redact_url("host=db.lan password='a b' dbname=photos")
        'host=db.lan password=*** dbname=photos'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KV_SECRET.sub(r"\1***", url)
    at = _userinfo_end(rest)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    return scheme + sep + _redact_query(rest)


def secrets_of(url: str) -> list[str]:
    """The password(s) a URL or DSN carries, as written and as libpq decodes them, longest
    first.

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
        found += [m.group(3) for m in _QUERY_PARAM.finditer(rest) if _is_secret_key(m.group(2))]
    found += [m.group(2).strip("'") for m in _KV_SECRET.finditer(url)]
    found += _libpq_secrets(url)
    out = {s for p in found for s in (p, unquote(p)) if len(s) >= 3}
    return sorted(out, key=len, reverse=True)


def _libpq_secrets(url: str) -> list[str]:
    """The secret values libpq itself would read from ``url`` (none if it cannot parse it:
    then the textual forms above are all there is)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
    except Exception:  # not a libpq URL or DSN (sqlite://, garbage): nothing to add
        return []
    return [str(v) for k, v in params.items() if k in SECRET_KEYS and v]


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) without the URL or any password it carries."""
    text = text.replace(url, redact_url(url))
    for secret in secrets_of(url):
        text = text.replace(secret, "***")
    return text


def _display(m: re.Match[str]) -> str:
    url = m.group(0)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return redact_url(url)
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + ("?***" if parts.query else "")


def scrub_urls(text: str) -> str:
    """``text`` with the credentials and query string of every URL in it, and every
    ``password=`` value, replaced by ``***``: for log lines, which may come from a library
    (httpx logs each request's full URL at INFO) that knows nothing of what is secret."""
    if "://" in text:
        text = _URL.sub(_display, text)
    if "assword" in text.lower():
        text = _KV_SECRET.sub(r"\1***", text)
    return text
