"""The daemon's control socket, its end (``fsledger run``): the scans ``fsledger scan``
asks for (``fsledger.control`` holds the client and the protocol).

A scan asked for goes through the manager's queue, so the daemon's writer stays the
repository's only one; what the command prints is made here by the same functions the
CLI uses when it scans by itself (``scan_lines``, ``scan_exit``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fsledger.control import ENCODING, database_key, private_dir, socket_path
from fsledger.errors import CorruptionFound, FsledgerError

if TYPE_CHECKING:
    from fsledger.ledger import Ledger
    from fsledger.manager import SyncManager
    from fsledger.model import Repository, ScanStats

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
"""The longest request read (a command line's REPO arguments)."""
IO_TIMEOUT_S = 30.0
"""How long a connection may take to send its request, or to take a line of the answer."""


def stats_line(repo: Repository, stats: ScanStats) -> str:
    """A scan's outcome on one line, as a person reads it."""
    from fsledger import human
    from fsledger.text import escape_controls

    parts = [
        f"{stats.files_scanned:,} files",
        f"{stats.files_added:,} added",
        f"{stats.files_updated:,} updated",
        f"{stats.files_removed:,} removed",
        f"{stats.files_moved:,} moved",
        f"{stats.files_hashed:,} hashed ({human.size(stats.bytes_hashed)})",
    ]
    if stats.errors or stats.error_count:
        parts.append(f"{max(stats.error_count, len(stats.errors)):,} errors")
    if stats.corrupt:
        parts.append(f"{len(stats.corrupt):,} CORRUPT")
    duration = human.duration(stats.duration_ms / 1000)
    return f"{escape_controls(repo.name)}: " + ", ".join(parts) + f" in {duration}"


def scan_lines(
    repo: Repository, outcome: ScanStats | BaseException, as_json: bool
) -> Iterator[tuple[bool, str]]:
    """What ``fsledger scan`` prints for one repository: ``(to_stderr, line)`` pairs, the
    same whether the command scanned or the daemon did."""
    from fsledger.jsonform import dumps
    from fsledger.text import escape_controls, show_path

    if isinstance(outcome, BaseException):
        yield True, f"fsledger: error: {escape_controls(str(outcome))}"
        if as_json:
            yield False, dumps({"repository": repo.name, "id": str(repo.id), "error": str(outcome)})
        return
    stats = outcome
    if as_json:
        yield False, dumps({"repository": repo.name, "id": str(repo.id), **stats.to_json()})
        return
    yield False, stats_line(repo, stats)
    for error in stats.errors[:20]:
        yield True, f"  error: {escape_controls(str(error))}"
    for note in stats.notes:
        yield True, f"  note: {escape_controls(note)}"
    for path in stats.corrupt:
        shown = show_path(path) if isinstance(path, bytes) else escape_controls(path)
        yield True, f"  CORRUPT: {shown}"


def scan_exit(outcomes: list[ScanStats | BaseException]) -> int:
    """The exit code of a scan command: the first error's, else ``CorruptionFound``'s if
    anything was found corrupt, else 0."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            return outcome.exit_code if isinstance(outcome, FsledgerError) else 1
    if any(o.corrupt for o in outcomes if not isinstance(o, BaseException)):
        return CorruptionFound.exit_code
    return 0


class ControlServer:
    """The daemon's end of the control socket: one thread accepting, one a connection."""

    def __init__(self, ledger: Ledger, manager: SyncManager, url: str, path: str) -> None:
        self.ledger = ledger
        self.manager = manager
        self.key = database_key(url)
        self.path = path
        self._sock: socket.socket | None = None
        self._inode = 0

    def start(self) -> bool:
        """Bind and serve; False (logged) if another live daemon serves this database
        already, or the socket cannot be made (the daemon runs on without it)."""
        from fsledger.store.lease import make_private_dirs

        directory = os.path.dirname(self.path)
        try:
            make_private_dirs(directory)
            if not private_dir(directory):
                log.warning("Control socket not served: %s is open to other users", directory)
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.path)
                except OSError:
                    pass  # nobody answers: a socket left by a process that died, or none
                else:
                    log.info("Control socket %s is served by another daemon", self.path)
                    return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            sock.listen(16)
        except OSError as exc:
            log.warning("Control socket not served (%s): 'fsledger scan' scans by itself", exc)
            return False
        self._sock = sock
        threading.Thread(target=self._accept, name="fsledger-control", daemon=True).start()
        log.info("Control socket at %s", self.path)
        return True

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)  # ours still (not a later daemon's)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept(self) -> None:
        while (sock := self._sock) is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="fsledger-control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        # A command sends its request at once and reads the answer as it comes: one that
        # does neither within IO_TIMEOUT_S is dropped (its scans, once queued, run on).
        conn.settimeout(IO_TIMEOUT_S)
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (os.geteuid(), 0):
                log.warning("Control socket: refused a connection of uid %d", uid)
                return

            def send(tag: str, text: str) -> None:
                conn.sendall((tag + text + "\n").encode(*ENCODING))

            try:
                request = self._read(conn)
                if not request:
                    return  # too long, or nothing: a probe (``control.serving``)
                fields = request.decode(*ENCODING).split("\0")
                if fields[0] != "scan" or len(fields) < 4:
                    send("d", f"unknown request {fields[0]!r}")
                elif fields[1] != self.key:
                    send("d", "another database")
                else:
                    self._scan(fields[2], fields[3], fields[4:], send)
            except OSError as exc:  # the command went away (^C): its scan runs on
                log.debug("Control socket: %s", exc)

    @staticmethod
    def _read(conn: socket.socket) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while chunk := conn.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REQUEST:
                return None
        return b"".join(chunks)

    def _scan(
        self, cwd: str, flags: str, refs: list[str], send: Callable[[str, str], None]
    ) -> None:
        try:
            repos = (
                [self.ledger.resolve(ref, base=cwd) for ref in refs]
                if refs
                else self.ledger.list_repositories()
            )
        except Exception as exc:  # the command's own run gives the error its usual form
            send("d", str(exc))
            return
        command = "fsledger repo add" if "n" in flags else "fsledger scan"
        # One the command has just added (``repo add``) is kept from now on, not from the
        # next poll of the list: its first index is this daemon's, not a second one beside.
        waits = (
            self.manager.request_reconciliations(
                [r.id for r in repos], verify="v" in flags, reason=command
            )
            if repos
            else None
        )
        if waits is None:
            send("d", "a repository asked for is not kept by this daemon")
            return
        for repo in repos:
            log.info("Repository %s: reconciliation asked for by '%s'", repo.id, command)
        pending = list(zip(repos, waits, strict=True))
        send("a", "")
        outcomes: list[ScanStats | BaseException] = []
        for repo, done in pending:
            try:
                outcome: ScanStats | BaseException = done.result()
            except Exception as exc:
                outcome = exc
            outcomes.append(outcome)
            for to_err, text in scan_lines(repo, outcome, "j" in flags):
                send("e" if to_err else "o", text)
        send("x", str(scan_exit(outcomes)))


def serve_for(ledger: Ledger, manager: SyncManager, url: str) -> ControlServer | None:
    """Start the control socket of ``fsledger run`` for the database ``url`` (None if it is
    not served; the daemon runs on without it)."""
    path = socket_path(url, os.environ)
    if path is None:
        log.info("Control socket not served: its path would be too long")
        return None
    server = ControlServer(ledger, manager, url, path)
    return server if server.start() else None
