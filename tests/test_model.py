"""A model-based test: random sequences of real filesystem operations on a real tree.

hypothesis' ``RuleBasedStateMachine`` applies operations to a tree that two ledgers of the
same backend index: one followed live by a watcher alone (in a process of its own, without
root's DAC bypass, so ``chmod 000`` is real for it), one brought up to date offline by a
scan at the end. After each sequence (``teardown``: every fd closed, every directory
readable again) both must equal the descriptor-walking oracle, and each one's feed replayed
from seq 0 must equal that ledger (``scenario_support.Scenario.check``).

The rules draw their targets from the tree as it is on disk, so the "model" is the disk
itself, read by the oracle. The operations that cannot apply (a rename onto a non-empty
directory, an exchange of a directory with its own child) leave the tree as it was.

Runs: a short one by default (``make test``); ``--model-examples N`` or
``FSLEDGER_MODEL_EXAMPLES=N`` for a longer one, which also shrinks a failure to a minimal
sequence (shrinking replays many failing examples, each waiting out the live deadline).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

import scenario_support
from conftest import BACKENDS, _fresh_pg_schema, make_settings
from fsledger.ledger import Ledger
from scenario_support import Scenario, exchange, mkdirs_at

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/sys/fs/inotify"), reason="inotify is Linux-only"
)

NAMES: tuple[bytes, ...] = (
    b"a.jpg",
    b"b",
    b"c.raw",
    b"d",
    b"caf\xc3\xa9",  # UTF-8
    b"\xff\xfe-raw",  # not UTF-8
    b"lat\xe9n",  # not UTF-8 (latin-1)
    b".hidden",
    b"x.tmp",
    b"photo with space.jpg",
)
DEFAULT_EXAMPLES = {"sqlite": 12, "postgres": 6}
STEPS = 20
MAX_PATH_FOR_RULES = 3500
"""Rules address entries by path; deeper entries (built through descriptors) are left to
the tiers and the oracle."""
BENIGN = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EINVAL,
    errno.ELOOP,
    errno.EXDEV,
    errno.EMLINK,
}
SECRET = b"outside-the-root secret\n" * 9
ANCHOR_DIR = b"anchor"
"""A directory no rule touches: a root left empty while records exist is refused by the
root guard by design (a missing mount looks like that), which is not what this tests."""


def attempt(op: Callable[[], object]) -> None:
    """Run one filesystem operation; one the tree's current shape refuses changes nothing."""
    try:
        op()
    except OSError as exc:
        if exc.errno not in BENIGN:
            raise


def entries(root: bytes) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(files, directories, other entries) below ``root`` as relative paths, read through
    directory descriptors, following no symlink; the root itself is the directory b""."""
    files: list[bytes] = []
    dirs: list[bytes] = [b""]
    other: list[bytes] = []
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

    def visit(fd: int, rel: bytes) -> None:
        with os.scandir(fd) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        for name in names:
            path = rel + b"/" + name if rel else name
            st_ = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st_.st_mode):
                dirs.append(path)
                sub = os.open(name, flags, dir_fd=fd)
                try:
                    visit(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st_.st_mode):
                files.append(path)
            else:
                other.append(path)

    top = os.open(root, flags)
    try:
        visit(top, b"")
    finally:
        os.close(top)
    limit = MAX_PATH_FOR_RULES - len(root)

    def short(ps: list[bytes]) -> list[bytes]:
        return [p for p in ps if len(p) < limit and not p.startswith(ANCHOR_DIR)]

    return short(files), short(dirs), short(other)


class Context:
    """What one test run shares with its machines: the backend and where trees go."""

    def __init__(self, backend: str, base: Path, pg_admin_url: str | None) -> None:
        self.backend = backend
        self.base = base
        self.pg_admin_url = pg_admin_url

    def store_url(self, stack: contextlib.ExitStack, workdir: Path, name: str) -> str:
        if self.backend == "sqlite":
            return "sqlite://" + str(workdir / f"{name}.db")
        assert self.pg_admin_url is not None
        schema = contextlib.contextmanager(_fresh_pg_schema)(self.pg_admin_url)
        return stack.enter_context(schema)


class TreeMachine(RuleBasedStateMachine):
    """Real operations on one real tree, checked live and offline at the end."""

    context: ClassVar[Context]

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        try:
            self._set_up()
        except BaseException:
            self.stack.close()
            raise

    def _set_up(self) -> None:
        ctx = self.context
        self.work = Path(tempfile.mkdtemp(dir=ctx.base))
        self.stack.callback(shutil.rmtree, self.work, True)
        ledgers = []
        for name in ("live", "offline"):
            url = ctx.store_url(self.stack, self.work, name)
            ledger = Ledger(make_settings(url))
            self.stack.callback(ledger.close)
            ledgers.append((url, ledger))
        (live_url, live_ledger), (off_url, off_ledger) = ledgers
        self.offline = Scenario(off_ledger, off_url, self.work, "offline")
        self.live = Scenario(live_ledger, live_url, self.work, "live")
        self.stack.callback(self.live.close)
        self.root = os.fsencode(self.live.root)
        self.outside = os.fsencode(self.live.outside)
        self.counter = 0
        self.open_fds: list[int] = []
        self.offline.start(self._populate)
        self.live.start()

    @staticmethod
    def _populate(root: Path, outside: Path) -> None:
        for rel, data in (
            ("a.jpg", b"alpha" * 20),
            ("d/b.jpg", b"bravo" * 30),
            ("d/e/c.jpg", b"charlie" * 40),
            ("f/g.jpg", b"golf"),
            (os.fsdecode(ANCHOR_DIR) + "/keep.jpg", b"never touched"),
        ):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        (outside / "etc").mkdir()
        (outside / "etc" / "secret").write_bytes(SECRET)

    # --- helpers ---------------------------------------------------------------------------
    def full(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    def content(self, seed: int) -> bytes:
        self.counter += 1
        return (b"%d:%d;" % (seed, self.counter)) * (seed % 300)

    def pick(self, data: st.DataObject, kind: str) -> bytes | None:
        files, dirs, other = entries(self.root)
        choices = {"file": files, "dir": dirs, "subdir": dirs[1:], "any": files + dirs[1:] + other}
        pool = choices[kind]
        return data.draw(st.sampled_from(pool), label=kind) if pool else None

    # --- rules -----------------------------------------------------------------------------
    @rule(data=st.data(), name=st.sampled_from(NAMES), seed=st.integers(0, 5000))
    def create(self, data: st.DataObject, name: bytes, seed: int) -> None:
        d = self.pick(data, "dir")
        if d is None:
            return
        attempt(lambda: _write(os.path.join(self.full(d), name), self.content(seed)))

    @rule(data=st.data(), seed=st.integers(0, 5000), mode=st.sampled_from(["wb", "ab", "r+b"]))
    def write(self, data: st.DataObject, seed: int, mode: str) -> None:
        """Overwrite, append, or rewrite in place (same inode)."""
        f = self.pick(data, "file")
        if f is not None:
            attempt(lambda: _write(self.full(f), self.content(seed), mode))

    @rule(data=st.data(), size=st.integers(0, 50))
    def truncate(self, data: st.DataObject, size: int) -> None:
        f = self.pick(data, "file")
        if f is not None:
            attempt(lambda: os.truncate(self.full(f), size))

    @rule(data=st.data(), seed=st.integers(0, 5000))
    def atomic_save(self, data: st.DataObject, seed: int) -> None:
        """An editor's save: a hidden temporary file renamed over the original."""
        f = self.pick(data, "file")
        if f is None:
            return
        parent, _, name = self.full(f).rpartition(b"/")
        temp = parent + b"/." + name + b".swp"

        def save() -> None:
            _write(temp, self.content(seed))
            os.replace(temp, self.full(f))

        attempt(save)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def rename(self, data: st.DataObject, name: bytes) -> None:
        """A file, directory or link renamed, maybe into another directory."""
        src, dst = self.pick(data, "any"), self.pick(data, "dir")
        if src is not None and dst is not None:
            attempt(lambda: os.rename(self.full(src), os.path.join(self.full(dst), name)))

    @rule(data=st.data(), names=st.lists(st.sampled_from(NAMES), min_size=2, max_size=4))
    def rename_chain(self, data: st.DataObject, names: list[bytes]) -> None:
        """``mv D0 C/D1 && mv C/D1 D2 && mv D2 D3``: one entry renamed several times."""
        src = self.pick(data, "any")
        if src is None:
            return
        current = self.full(src)
        for name in names:
            dst_dir = self.pick(data, "dir")
            if dst_dir is None:
                return
            target = os.path.join(self.full(dst_dir), name + b"-%d" % self.counter)
            self.counter += 1
            try:
                os.rename(current, target)
            except OSError as exc:
                if exc.errno not in BENIGN:
                    raise
                return
            current = target

    @rule(data=st.data())
    def exchange(self, data: st.DataObject) -> None:
        """``renameat2(RENAME_EXCHANGE)`` of any two entries."""
        a, b = self.pick(data, "any"), self.pick(data, "any")
        if a is not None and b is not None and a != b:
            attempt(lambda: exchange(self.full(a), self.full(b)))

    @rule(data=st.data(), outside=st.booleans())
    def dir_to_symlink(self, data: st.DataObject, outside: bool) -> None:
        """``mv foo x && ln -s x foo``, or foo replaced by a link out of the root."""
        d = self.pick(data, "subdir")
        if d is None:
            return
        path = self.full(d)
        aside = path + b"-aside%d" % self.counter
        self.counter += 1

        def replace() -> None:
            os.rename(path, aside)
            target = os.path.join(self.outside, b"etc") if outside else os.path.basename(aside)
            os.symlink(target, path)

        attempt(replace)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def hard_link(self, data: st.DataObject, name: bytes) -> None:
        f, d = self.pick(data, "file"), self.pick(data, "dir")
        if f is not None and d is not None:
            attempt(lambda: os.link(self.full(f), os.path.join(self.full(d), name)))

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        """``chmod 000`` of a directory (real for the watcher: it runs without DAC bypass)."""
        d = self.pick(data, "subdir")
        if d is not None:
            os.chmod(self.full(d), 0)

    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        """``chmod 755`` of a directory."""
        d = self.pick(data, "subdir")
        if d is not None:
            os.chmod(self.full(d), 0o755)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        f = self.pick(data, "file")
        if f is not None:
            attempt(lambda: os.unlink(self.full(f)))

    @rule(data=st.data())
    def rmtree(self, data: st.DataObject) -> None:
        d = self.pick(data, "subdir")
        if d is not None:
            shutil.rmtree(self.full(d), ignore_errors=True)

    @rule(data=st.data(), depth=st.sampled_from([3, 12, 90]), seed=st.integers(0, 5000))
    def deep_mkdir(self, data: st.DataObject, depth: int, seed: int) -> None:
        """A chain of directories (90 levels of 49-byte names: past PATH_MAX), built through
        descriptors, with a file at the bottom."""
        d = self.pick(data, "dir")
        if d is None:
            return
        names = [b"deep%02d_" % i + b"z" * 42 for i in range(depth)]

        def build() -> None:
            # The chain may exist already, with a level turned into a symlink or a file, or
            # a directory exchanged onto its bottom name: refused like any other operation.
            made = mkdirs_at(self.full(d), names)
            scenario_support.write_at(self.full(d), made[-1] + b"/bottom.jpg", self.content(seed))

        attempt(build)

    @rule(data=st.data(), name=st.sampled_from(NAMES), seed=st.integers(0, 5000))
    def open_for_writing(self, data: st.DataObject, name: bytes, seed: int) -> None:
        """Start writing a new file and keep it open across the following steps."""
        d = self.pick(data, "dir")
        if d is None:
            return
        try:
            fd = os.open(
                os.path.join(self.full(d), name),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                0o644,
            )
        except OSError as exc:
            if exc.errno not in BENIGN:
                raise
            return
        os.write(fd, self.content(seed))
        self.open_fds.append(fd)

    @rule(seed=st.integers(0, 5000))
    def finish_writing(self, seed: int) -> None:
        """The oldest file still open gets its second half and is closed."""
        if self.open_fds:
            fd = self.open_fds.pop(0)
            os.write(fd, self.content(seed))
            os.close(fd)

    @rule(data=st.data())
    def move_out_and_back(self, data: st.DataObject) -> None:
        """An entry moved out of the root, changed there, moved back under another name."""
        src = self.pick(data, "any")
        if src is None:
            return
        parked = os.path.join(self.outside, b"parked%d" % self.counter)
        self.counter += 1

        def out_and_back() -> None:
            os.rename(self.full(src), parked)
            if os.path.isdir(parked) and not os.path.islink(parked):
                _write(os.path.join(parked, b"added-outside.jpg"), b"added outside")
            os.rename(parked, self.full(src) + b"-back")

        attempt(out_and_back)

    # --- the check -------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            for fd in self.open_fds:
                os.close(fd)
            self.open_fds.clear()
            self._unlock_all()
            self.live.check("after the sequence")
            self.offline.check("after the sequence")
        finally:
            self.stack.close()

    def _unlock_all(self) -> None:
        """Every directory readable again (``chmod 755``), found through descriptors."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

        def visit(fd: int) -> None:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for name in names:
                st_ = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st_.st_mode):
                    if stat.S_IMODE(st_.st_mode) != 0o755:
                        os.chmod(name, 0o755, dir_fd=fd, follow_symlinks=False)
                    sub = os.open(name, flags, dir_fd=fd)
                    try:
                        visit(sub)
                    finally:
                        os.close(sub)

        top = os.open(self.root, flags)
        try:
            visit(top)
        finally:
            os.close(top)


def _write(path: bytes, data: bytes, mode: str = "wb") -> None:
    flags = {
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        "r+b": os.O_WRONLY,
    }[mode]
    fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.timeout(4 * 3600)  # bounded by the number of examples asked for
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_operation_sequences_keep_both_tiers_exact(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    model_examples: int | None,
) -> None:
    """Random sequences of real operations: the live ledger, the offline ledger and both
    feeds replayed from seq 0 equal the oracle after each sequence."""
    admin = request.getfixturevalue("pg_admin_url") if backend == "postgres" else None
    long_run = model_examples is not None
    examples = model_examples if long_run else DEFAULT_EXAMPLES[backend]
    assert examples is not None
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if long_run:
        phases.append(Phase.shrink)

    class Machine(TreeMachine):
        context = Context(backend, tmp_path, admin)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=True,
        ),
    )
