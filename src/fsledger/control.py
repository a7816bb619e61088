"""The daemon's control socket, client side: ``fsledger scan`` asks the running
``fsledger run`` to scan, and ``fsledger repo add`` to index the repository it added.

A repository has one writer (ARCHITECTURE.md): while ``fsledger run`` keeps a repository,
a ``fsledger scan`` of it from the command line would be a second writer beside the
daemon's watcher and scheduled runs. So the command asks the daemon instead: the
reconciliation is queued ahead of scheduled ones, run by the daemon's own writer, and its
outcome printed as the command prints its own (same lines, same exit code). The command
also skips what a separate process pays before its first ``lstat``: click, the store's
modules, psycopg's ~0.2 s import, forking workers (docs/benchmarks.md).

The channel is a Unix socket in a directory only the user can enter
(``$XDG_RUNTIME_DIR/fsledger``, else ``$XDG_DATA_HOME/fsledger/run``, mode 0700), named
after the database it serves; the daemon checks the peer's uid (``SO_PEERCRED``) and that
the database asked for is its own. Both ends are the operator's, trusted: nothing here
reads the watched trees. The daemon's end is ``fsledger.control_server``.

Protocol (both directions UTF-8, ``surrogateescape``):

* request: NUL-separated fields ``scan``, the database key (``database_key``), the
  client's working directory, flags (``j`` for ``--json``, ``v`` for ``--verify``, ``n``
  for repositories ``repo add`` has just added, which the daemon picks up at once), then
  the REPO arguments; the client then shuts its side down. A connection that sends
  nothing is a probe (``serving``), answered with nothing.
* answer: lines, each a one-letter tag and a text: ``a`` accepted (the scans are queued),
  ``o`` a line of stdout, ``e`` a line of stderr, ``x`` the exit code (last), or a lone
  ``d`` line: declined, with why (the
  daemon does not keep every repository asked for, or the request is not its own); the
  command then scans by itself, as it did before. The texts never hold a newline (the
  CLI escapes control characters in what it prints).

A second client speaks this protocol: the native launcher ``make install`` builds as the
``fsledger`` command (native/fsledger.c), with the same rules (``entry._served_scan``,
``socket_path``, ``private_dir``); a change to either is made to both, and
tests/test_control.py runs both against the same daemons.

This module imports the standard library's C parts only (``_socket``, not ``socket``,
whose import with ``enum`` and ``selectors`` costs as much as the rest of the command):
``fsledger.entry`` uses it before click or anything else is loaded.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs the client its import; mypy still reads the block
if TYPE_CHECKING:
    from _socket import socket
    from collections.abc import Callable, Iterator, Mapping

MAX_SOCKET_PATH = 107
"""``sun_path`` holds 108 bytes with its NUL: a longer path gets no socket (the command
then scans by itself)."""

ENCODING = ("utf-8", "surrogateescape")


def socket_dir(env: Mapping[str, str]) -> str:
    """Where the sockets live: ``$XDG_RUNTIME_DIR/fsledger``, else
    ``$XDG_DATA_HOME/fsledger/run`` (``~/.local/share`` by default)."""
    if runtime := env.get("XDG_RUNTIME_DIR"):
        return os.path.join(runtime, "fsledger")
    from fsledger.entry import data_home  # loaded already: the console script is entry

    return os.path.join(data_home(env), "run")


def database_key(url: str) -> str:
    """The database as both ends name it: its URL, a SQLite file by its real path (two
    spellings of one file meet)."""
    if url.startswith("sqlite:///"):
        return "sqlite://" + os.path.realpath(url.removeprefix("sqlite://"))
    return url


def socket_path(url: str, env: Mapping[str, str]) -> str | None:
    """The control socket of the daemon serving ``url``, or None if its path is too long.

    The name is a 64-bit digest of the key (two CRC-32s: ``zlib`` is loaded at start-up
    already, ``hashlib`` is not); the daemon checks the full key, so a collision declines
    instead of reaching another database's daemon."""
    import zlib

    key = database_key(url).encode(*ENCODING)
    name = f"{zlib.crc32(key):08x}{zlib.crc32(key[::-1]):08x}.sock"
    path = os.path.join(socket_dir(env), name)
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def private_dir(directory: str) -> bool:
    """Whether ``directory`` is this user's own and closed to others (nobody else could
    have put a socket there)."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


ACCEPTED_NOTE = (
    "fsledger: the running 'fsledger run' keeps this repository and runs the scan "
    "(its progress: fsledger status, or the dashboard)"
)
"""What a command prints on a terminal's stderr when the daemon has taken its scan."""


class Declined(Exception):
    """No daemon serves this request: the command does the work itself."""


def ask_scan(
    url: str,
    refs: list[str],
    *,
    verify: bool,
    as_json: bool,
    env: Mapping[str, str],
    out: Callable[[str], None],
    err: Callable[[str], None],
    accepted: Callable[[], None] | None = None,
    new: bool = False,
) -> int:
    """Have the daemon serving ``url`` scan ``refs`` (every repository if empty); its
    output goes to ``out``/``err`` line by line, and ``accepted`` is called once the daemon
    has queued the scans. Returns the command's exit code. ``new``: the command has just
    added the repositories (``repo add``), which the daemon picks up at once to index them.

    Raises:
        Declined: no daemon serves the database here, or it does not keep every
            repository asked for (nothing was printed).
    """
    import _socket  # the C module ``socket`` wraps (see the module's docstring)

    sock = _connect(url, env)
    try:
        flags = ("j" if as_json else "") + ("v" if verify else "") + ("n" if new else "")
        fields = ["scan", database_key(url), os.getcwd(), flags, *refs]
        sock.sendall("\0".join(fields).encode(*ENCODING))
        sock.shutdown(_socket.SHUT_WR)
        answered = False
        for line in _lines(sock):
            tag, text = line[:1], line[1:]
            if tag == "d" and not answered:
                raise Declined(text)
            answered = True
            if tag == "a":
                if accepted is not None:
                    accepted()
            elif tag == "o":
                out(text)
            elif tag == "e":
                err(text)
            elif tag == "x":
                return int(text)
        if not answered:
            raise Declined("the daemon closed the connection")
        err("fsledger: error: the daemon stopped before the scan ended")
        return 1
    finally:
        sock.close()


def serving(url: str, env: Mapping[str, str]) -> bool:
    """Whether a daemon (``fsledger run``) answers on the control socket of ``url``: a
    command that will ask it for a scan (``repo add``) then starts no workers of its own.
    The daemon may still decline (``Declined``)."""
    try:
        _connect(url, env).close()  # sends nothing: a probe, answered with nothing
    except Declined:
        return False
    return True


def _connect(url: str, env: Mapping[str, str]) -> socket:
    """A connection to the daemon serving ``url``.

    Raises:
        Declined: no control socket here (or one in a directory others can enter), or
            nobody answers on it (no daemon, or a socket left by a dead process).
    """
    import _socket

    path = socket_path(url, env)
    if path is None or not private_dir(os.path.dirname(path)):
        raise Declined("no control socket")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise Declined(str(exc)) from None
    return sock


def _lines(sock: socket) -> Iterator[str]:
    """The answer's lines as they arrive."""
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
        *whole, buf = buf.split(b"\n")
        for line in whole:
            yield line.decode(*ENCODING)
    if buf:
        yield buf.decode(*ENCODING)
