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
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deploybus import redact
from deploybus.errors import DeployError, RefError
from deploybus.refs import DEPLOYABLE, check_ref, is_commit_id, is_full_commit_id

#: A fetch or clone that takes longer than this (seconds) is killed and fails.
FETCH_TIMEOUT = 600.0

#: A ref lookup that takes longer than this (seconds) fails, and its
#: ``git cat-file`` is replaced.
RESOLVE_TIMEOUT = 30.0

def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``
    (:func:`deploybus.redact.text`). Every error text this module makes goes
    through it, since git quotes the URL it was given and a project's
    ``git`` URL may carry a token; those texts end up in results, logs and
    web pages."""
    return redact.text(text)


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
            raise DeployError(redact_text(
                f"git could not update mirror of {project} from {url}: "
                f"no answer within {FETCH_TIMEOUT:.0f}s")) from None
        if r.returncode != 0:
            raise DeployError(redact_text(
                f"git could not update mirror of {project} from {url}: "
                f"{r.stderr.strip()[-500:] or f'exit {r.returncode}'}"))
    return path


def resolve_remote(url: str, ref: str, *, timeout: float = 30) -> tuple[str, str]:
    """``(full_refname, commit)`` that ``ref`` names in the repository at ``url``.

    Done once, when a rollout is accepted: every host then deploys that
    commit, whatever its mirror's refs say. git's own lookup is loose (a
    ``refs/release/1.0`` shadows the tag ``release/1.0``, a branch named
    ``abc1234`` shadows the commit it abbreviates), so this one is strict:

    * ``refs/tags/X`` and ``refs/heads/X`` are looked up exactly; other
      ``refs/`` namespaces are refused;
    * a bare ``X`` is ``refs/tags/X`` or ``refs/heads/X``, refused when both
      exist or neither does;
    * a full commit id (40 or 64 hex digits) is taken as it is (its refname
      is the id; the agent checks the commit exists when it fetches);
    * an abbreviated commit id is refused: git would resolve it through
      refs first.

    An annotated tag gives the commit it points at (``refs/tags/X^{}``).
    One ``git ls-remote`` with the exact refnames; git never prompts for
    credentials. RefError for a ref that names nothing or more than one
    thing, DeployError when the repository cannot be asked; URLs in either
    have their credentials redacted."""
    check_ref(ref)
    lowered = ref.lower()
    if is_full_commit_id(lowered):
        return lowered, lowered
    if ref.startswith("refs/"):
        if not ref.startswith(DEPLOYABLE):
            raise RefError(f"{ref} is not a tag or a branch: say refs/tags/NAME or "
                           f"refs/heads/NAME")
        wanted = [ref]
    elif is_commit_id(lowered):
        raise RefError(f"{ref} looks like an abbreviated commit id: give the full commit id "
                       f"(or refs/tags/{ref} or refs/heads/{ref} for a tag or branch of "
                       f"that name)")
    else:
        wanted = [prefix + ref for prefix in DEPLOYABLE]
    # An annotated tag's commit is listed only when asked for by name.
    peeled = [name + "^{}" for name in wanted if name.startswith("refs/tags/")]
    try:
        # A group of its own: on timeout, git's helpers (ssh, git-remote-https) go too.
        proc = subprocess.Popen(
            ["git", "ls-remote", "--end-of-options", url, *wanted, *peeled],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, errors="replace", env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            process_group=0)
    except OSError as exc:
        raise DeployError(f"cannot run git ls-remote: {exc}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DeployError(redact_text(f"git ls-remote {url}: no answer within "
                                      f"{timeout:g}s")) from None
    if proc.returncode != 0:
        raise DeployError(redact_text(f"git ls-remote {url} failed: "
                                      f"{err.strip()[-500:] or f'exit {proc.returncode}'}"))
    found: dict[str, str] = {}
    for line in out.splitlines():
        oid, _, name = line.partition("\t")
        found[name] = oid
    present = [name for name in wanted if name in found]
    if not present:
        what = ref if ref.startswith("refs/") else f"tag or branch {ref}"
        raise RefError(redact_text(f"no {what} in {url}"))
    if len(present) > 1:
        raise RefError(f"{ref} is ambiguous: both a tag and a branch named {ref}; say "
                       f"refs/tags/{ref} or refs/heads/{ref}")
    (name,) = present
    commit = found.get(name + "^{}", found[name])
    if not is_full_commit_id(commit):
        raise DeployError(redact_text(f"git ls-remote {url} gave {commit!r:.80} for {name}"))
    return name, commit


def is_ancestor(mirror: Path, older: str, newer: str) -> bool:
    """``older`` is an ancestor of ``newer`` (both full commit ids in ``mirror``);
    a commit is not its own ancestor here. RefError if either is unknown."""
    for c in (older, newer):
        if not is_full_commit_id(c):
            raise RefError(f"not a full commit id: {c!r:.80}")
    if older == newer:
        return False
    r = _git("--git-dir", str(mirror), "merge-base", "--is-ancestor", "--end-of-options",
             older, newer, timeout=60)
    if r.returncode in (0, 1):
        return r.returncode == 0
    raise RefError(redact_text(f"cannot compare {older[:12]} and {newer[:12]}: "
                               f"{r.stderr.strip()[-300:]}"))


def has_commit(mirror: Path, commit: str) -> bool:
    """``commit`` (a full id) is a commit object in ``mirror``. A tag object's
    id is not a commit, and no ref is consulted: a full id names one object."""
    if not is_full_commit_id(commit):
        raise RefError(f"not a full commit id: {commit!r:.80}")
    try:
        return resolve(mirror, commit) == commit
    except RefError:
        return False


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
            raise DeployError(redact_text(
                f"git archive of {commit} failed: "
                f"{archive_err.read().decode(errors='replace').strip()[-500:]}"))
        if tar.returncode != 0:
            tar_err.seek(0)
            raise DeployError(redact_text(
                f"unpacking {commit} failed: "
                f"{tar_err.read().decode(errors='replace').strip()[-500:]}"))
        listing.seek(0)
        return listing.read().count(b"\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
