"""Local git mirrors and checkouts, shared by the fetcher and the agent.

A host keeps one bare mirror per project under ``<state_dir>/mirrors``;
deploys check out of it, so a deploy needs no network once the mirror has
the commit. Mirror updates take a file lock so the fetcher and the agent
never fetch into the same mirror at once.

Every operation is one ``git`` command run directly. GitPython was used here
first; its ``Repo()`` reads the repository's config in Python each time it
is made, which cost more CPU per deploy than the git commands themselves
(docs/performance.md), and kept 12 MB resident in every agent. Resolving a
ref, which a deploy does twice when it has to fetch, goes to a ``git
cat-file --batch-check`` kept running per mirror: a line on a pipe rather
than a new process.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deploybus.errors import DeployError, RefError
from deploybus.refs import check_ref

#: A fetch or clone that takes longer than this (seconds) is killed and fails.
FETCH_TIMEOUT = 600.0

#: A ref lookup that takes longer than this (seconds) fails, and its
#: ``git cat-file`` is replaced.
RESOLVE_TIMEOUT = 30.0


def no_prompts() -> None:
    """git in this process (and its children) never asks for credentials on
    a terminal: a daemon has nobody to answer. The agent and the fetcher call
    it at start; setting it once, rather than passing an environment to each
    git command, spares copying the whole environment per command."""
    os.environ["GIT_TERMINAL_PROMPT"] = "0"


def mirror_path(state_dir: Path, project: str) -> Path:
    return state_dir / "mirrors" / f"{project}.git"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _git(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, errors="replace",
                          timeout=timeout, stdin=subprocess.DEVNULL)


def update_mirror(state_dir: Path, project: str, url: str, *,
                  maintenance: bool = False) -> Path:
    """Clone the mirror if missing, else fetch (pruning deleted refs).

    ``maintenance``: let git run its automatic housekeeping (``gc --auto``)
    after the fetch. The fetcher does; a deploy does not, so that a repack
    never lands in the middle of one."""
    path = mirror_path(state_dir, project)
    with _locked(path):
        if (path / "HEAD").exists():
            cmd = ["--git-dir", str(path), "fetch", "--quiet", "--prune", "--tags",
                   "--auto-maintenance" if maintenance else "--no-auto-maintenance",
                   "origin", "+refs/heads/*:refs/heads/*"]
        else:
            cmd = ["clone", "--quiet", "--mirror", "--no-hardlinks", "--", url, str(path)]
            _forget_resolver(path)  # a resolver left on an older mirror at this path
        try:
            r = _git(*cmd, timeout=FETCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DeployError(f"git could not update mirror of {project} from {url}: "
                              f"no answer within {FETCH_TIMEOUT:.0f}s") from None
        if r.returncode != 0:
            raise DeployError(f"git could not update mirror of {project} from {url}: "
                              f"{r.stderr.strip()[-500:] or f'exit {r.returncode}'}")
    return path


def resolve(mirror: Path, ref: str) -> str:
    """The commit id ``ref`` names in ``mirror``; RefError if it names none."""
    check_ref(ref)
    if not (mirror / "HEAD").is_file():
        raise RefError(f"no mirror at {mirror}")
    with _resolvers_lock:
        resolver = _resolvers.get(mirror)
        if resolver is None:
            resolver = _resolvers[mirror] = _Resolver(mirror)
    commit = resolver.lookup(f"{ref}^{{commit}}")
    if commit is None:
        raise RefError(f"ref {ref!r} not found")
    return commit


class _Resolver:
    """One ``git cat-file --batch-check`` on one mirror, started on first use
    and again whenever it has died or the mirror directory was replaced.

    It sees what fetches add: git reads a loose ref from its file on every
    lookup, re-reads ``packed-refs`` when the file changed, and rescans the
    packs when an object is not found. Names come on stdin, so a ref can
    never be taken for an option (refs are checked by :func:`check_ref`
    first anyway)."""

    def __init__(self, mirror: Path) -> None:
        self.mirror = mirror
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ident: tuple[int, int] | None = None

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.mirror)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def lookup(self, name: str) -> str | None:
        """The object id ``name`` resolves to, or None if it resolves to none."""
        with self.lock:
            ident = self._identity()
            if self.proc is None or self.proc.poll() is not None or ident != self.ident:
                self._stop()
                try:
                    self.proc = subprocess.Popen(
                        ["git", "--git-dir", str(self.mirror), "cat-file", "--batch-check"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, bufsize=0)
                except OSError as exc:
                    raise DeployError(f"cannot run git cat-file: {exc}") from None
                self.ident = ident
            try:
                line = self._ask(name)
            except (OSError, DeployError):
                self._stop()
                raise
        # "<id> <type> <size>", or "<name> missing" / "<name> ambiguous"
        fields = line.split()
        if len(fields) == 3 and fields[1] == "commit":
            return fields[0]
        return None

    def _ask(self, name: str) -> str:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(name.encode() + b"\n")
        except BrokenPipeError:
            raise DeployError("git cat-file ended unexpectedly") from None
        out = proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + RESOLVE_TIMEOUT
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise DeployError(f"git cat-file gave no answer within {RESOLVE_TIMEOUT:.0f}s")
            chunk = os.read(out, 4096)
            if not chunk:
                raise DeployError("git cat-file ended unexpectedly")
            data += chunk
        return data.decode(errors="replace")

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # cat-file ends at end of input
            proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        with self.lock:
            self._stop()


_resolvers: dict[Path, _Resolver] = {}
_resolvers_lock = threading.Lock()


def _forget_resolver(mirror: Path) -> None:
    with _resolvers_lock:
        resolver = _resolvers.pop(mirror, None)
    if resolver is not None:
        resolver.close()


def close_resolvers() -> None:
    """Stop every ``git cat-file`` this process keeps (at shutdown)."""
    with _resolvers_lock:
        resolvers = list(_resolvers.values())
        _resolvers.clear()
    for resolver in resolvers:
        resolver.close()


def export(mirror: Path, commit: str, dest: Path,
           on_start: Callable[[int], None] | None = None) -> int:
    """Write the tree of ``commit`` into ``dest`` (no .git); returns the entry count.

    ``git archive | tar -x``: the tree is written as git would check it out
    (symlinks included), at the speed of tar rather than of Python's tarfile
    (about 40% less CPU per deploy, measured by bench/fanout.py).

    Both run in one new process group, handed to ``on_start`` before any
    work is done, so that whoever recovers from this process being killed
    can stop them: they would otherwise go on writing into ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    # tar's listing (one line per entry) and both stderrs go to files, read
    # once at the end: a pipe would wake this process for every entry.
    with tempfile.TemporaryFile() as listing, tempfile.TemporaryFile() as archive_err, \
            tempfile.TemporaryFile() as tar_err:
        read_end, write_end = os.pipe()
        try:
            # tar first, as the group's leader: it cannot end before git
            # archive has joined the group, because this process still holds
            # the pipe's write end.
            tar = subprocess.Popen(["tar", "-x", "-v", "--no-same-owner", "-C", str(dest)],
                                   stdin=read_end, stdout=listing, stderr=tar_err,
                                   process_group=0)
            os.close(read_end)
            read_end = -1
            if on_start is not None:
                on_start(tar.pid)
            try:
                archive = subprocess.Popen(["git", "--git-dir", str(mirror), "archive",
                                            "--format=tar", commit], stdout=write_end,
                                           stderr=archive_err, stdin=subprocess.DEVNULL,
                                           process_group=tar.pid)
            except OSError as exc:
                tar.kill()
                tar.wait()
                raise DeployError(f"cannot run git archive: {exc}") from None
        finally:
            if read_end >= 0:
                os.close(read_end)
            os.close(write_end)
        archive.wait()
        tar.wait()
        # git's own failure (exit > 0) explains tar's; tar's failure explains
        # git being killed by SIGPIPE (exit < 0).
        if archive.returncode > 0 or (archive.returncode != 0 and tar.returncode == 0):
            archive_err.seek(0)
            raise DeployError(f"git archive of {commit} failed: "
                              f"{archive_err.read().decode(errors='replace').strip()[-500:]}")
        if tar.returncode != 0:
            tar_err.seek(0)
            raise DeployError(f"unpacking {commit} failed: "
                              f"{tar_err.read().decode(errors='replace').strip()[-500:]}")
        listing.seek(0)
        return listing.read().count(b"\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
