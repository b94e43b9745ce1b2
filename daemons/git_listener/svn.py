"""The Subversion post-commit hook: every committed revision becomes an
``svn.commit`` message on ``git.commits``.

``deploybus hook install-svn REPO --project NAME`` writes
``REPO/hooks/post-commit``. svn runs it with the arguments ``REPOS-PATH
REVISION [TXN-NAME]`` and an *empty* environment, so the script names
everything by absolute path: the interpreter, the config, the key and
``svnlook``. It runs ``deploybus notify svn-commit``, which reads the
revision with ``svnlook`` (:func:`commit_body`) and publishes it
(:func:`publish_commit`). A post-commit hook cannot undo a commit, and this
one never holds it up: whatever goes wrong, it prints one warning line on
stderr and exits 0 within :data:`HOOK_DEADLINE` seconds.

Building the body and publishing it are separate, so that the body can go
through a durable outbox instead of straight to the bus.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploybus import protocol, topics
from deploybus.errors import DeployBusError
from deploybus.refs import check_name

#: Marks a post-commit hook as ours, so reinstalling may overwrite it but nothing else.
MARKER = "# installed by deploybus hook install-svn"

#: Seconds one ``svnlook`` may take.
SVNLOOK_TIMEOUT = 5.0

#: Seconds ``notify svn-commit`` may take in all before it gives up (with a
#: warning, exit 0): the committer's ``svn commit`` waits for the hook.
HOOK_DEADLINE = 10.0


def is_repository(repo: Path) -> bool:
    """``repo`` looks like a Subversion repository (what ``svnadmin create``
    makes): a ``format`` file and a ``db`` directory."""
    return (repo / "format").is_file() and (repo / "db").is_dir()


def install(repo: Path, *, project: str, config: Path, force: bool = False,
            key: Path | None = None, svnlook: str | None = None) -> Path:
    """Write ``hooks/post-commit`` into Subversion repository ``repo``.

    ``svnlook`` is the program the hook reads revisions with; by default the
    one on this PATH, recorded by absolute path (svn gives hooks no PATH).
    A post-commit hook that is not ours is replaced only with ``force``."""
    check_name(project, "project")
    if not is_repository(repo):
        raise DeployBusError(f"{repo} is not a Subversion repository (no 'format' file and "
                             "'db' directory; give the repository's directory on the svn "
                             "server, not a working copy or a URL)")
    look = shutil.which(svnlook or "svnlook")
    if look is None:
        raise DeployBusError(f"{svnlook or 'svnlook'} not found on PATH: the hook reads each "
                             "revision with svnlook (install subversion)")
    hook = repo / "hooks" / "post-commit"
    if hook.exists() and MARKER not in hook.read_text(errors="replace") and not force:
        raise DeployBusError(f"{hook} exists and was not written by deploybus; "
                             "use --force to replace it")
    hook.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "deploybus.cli", "--config", str(config.resolve()),
           "notify", "svn-commit", "--project", project, "--svnlook", str(Path(look).resolve()),
           *(["--key", str(key.resolve())] if key is not None else [])]
    text = (f"#!/bin/sh\n{MARKER}\n"
            "# svn runs post-commit with REPOS-PATH REVISION [TXN-NAME] and an empty\n"
            "# environment: every path here is absolute. It never fails the commit.\n"
            f'exec {" ".join(shlex.quote(c) for c in cmd)} -- "$1" "$2"\n')
    tmp = hook.with_name(".post-commit.deploybus.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, hook)  # a commit made meanwhile runs the old hook or the new, never half
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook


# -- reading a revision -------------------------------------------------------------------

def _look(svnlook: str, what: str, repo: Path, rev: int, *,
          timeout: float = SVNLOOK_TIMEOUT) -> str:
    """``svnlook WHAT -r REV REPO``'s output (UTF-8: svn converts to the
    locale, and a hook's environment has none)."""
    try:
        r = subprocess.run([svnlook, what, "-r", str(rev), str(repo)], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=timeout,
                           env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        raise DeployBusError(f"svnlook {what} -r {rev} {repo}: no answer within "
                             f"{timeout:.0f}s") from None
    except OSError as exc:
        raise DeployBusError(f"cannot run {svnlook}: {exc}") from None
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip()[-300:]
        raise DeployBusError(f"svnlook {what} -r {rev} {repo}: {err or f'exit {r.returncode}'}")
    return r.stdout.decode("utf-8", "replace")


def branch_of(paths: list[str]) -> str | None:
    """The repository path of the first ``trunk``, ``branches/X`` or
    ``tags/X`` one of ``paths`` is in or is (``trunk``, ``branches/fix``,
    ``app/tags/v1``), or None. Best effort: svn has no branches, only a
    convention of directories."""
    for path in paths:
        parts = [p for p in path.strip("/").split("/") if p]
        for i, part in enumerate(parts):
            if part == "trunk":
                found = "/".join(parts[:i + 1])
            elif part in ("branches", "tags") and i + 1 < len(parts):
                found = "/".join(parts[:i + 2])
            else:
                continue
            return found if len(found) <= 250 else None
    return None


def _date(text: str) -> str | None:
    """``svnlook date``'s ``2026-12-03 12:11:38 +0000 (Thu, 03 Dec 2026)`` as
    ISO 8601 in UTC, or None."""
    try:
        t = datetime.strptime(text.strip()[:25], "%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return None
    return t.astimezone(UTC).isoformat()


def _cap(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def commit_body(repo: Path, rev: int, project: str, *,
                svnlook: str = "svnlook") -> dict[str, Any]:
    """The ``svn.commit`` body of revision ``rev`` of repository ``repo``
    (read with ``svnlook``), checked against :class:`protocol.SvnCommit`.
    Raises DeployBusError if svnlook cannot read it."""
    check_name(project, "project")
    if rev < 1:
        raise DeployBusError(f"revision {rev}: a post-commit revision is 1 or more")
    author = _look(svnlook, "author", repo, rev).strip()
    date = _date(_look(svnlook, "date", repo, rev))
    log = _look(svnlook, "log", repo, rev)
    changed = [line[4:] for line in _look(svnlook, "changed", repo, rev).splitlines()
               if len(line) > 4]
    branch = branch_of(changed)
    if branch is None:
        branch = branch_of(_look(svnlook, "dirs-changed", repo, rev).splitlines())
    subject = next((line.strip() for line in log.splitlines() if line.strip()), "")
    body: dict[str, Any] = {"project": project, "revision": rev,
                            "paths_changed": len(changed)}
    if author:
        body["author"] = _cap(author, 200)
    if date:
        body["date"] = date
    if subject:
        body["subject"] = _cap(subject, protocol.SVN_SUBJECT_CAP)
    if branch:
        body["branch"] = branch
    protocol.parse("svn.commit", body)  # a body we cannot send is an error here, not later
    return body


def publish_commit(bus: Any, body: dict[str, Any], *, sender: str, signing_key: Any) -> None:
    """Publish ``body`` as an ``svn.commit`` on ``git.commits``, signed with
    the svn server's key (a git key)."""
    bus.publish(topics.GIT_COMMITS, protocol.seal(protocol.parse("svn.commit", body),
                                                  key=signing_key, sender=sender))
