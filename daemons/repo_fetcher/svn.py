"""The fetcher's part for Subversion projects (``projects.<p>.svn``): a
cache of exports instead of a git mirror.

For each svn project a host serves, the fetcher keeps plain exports of its
newest revisions under ``<state_dir>/svn/<project>/r<REV>``: at start the
youngest revision (``svn info --show-item revision URL``), then the
revision each ``svn.commit`` names. An export is written to
``r<REV>.tmp`` and renamed, so ``r<REV>`` is complete whenever it exists;
the newest ``keep`` (the project's ``keep``) are kept, older ones removed.
Every svn command runs ``--non-interactive`` (credentials come from the
fetcher user's svn configuration, never a prompt) under a timeout; a
failure is logged and counted (``fetch_failed``) and the next commit or
restart tries again.

Rollouts do not deploy these exports (yet): see docs/subversion.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deploybus.config import ProjectConfig
from deploybus.errors import DeployError
from deploybus.gitutil import _locked, fsync_dir, redact_text

#: An ``svn export`` that takes longer than this (seconds) is killed and fails.
EXPORT_TIMEOUT = 600.0
#: ``svn info`` (the youngest revision) may take this long.
INFO_TIMEOUT = 60.0

_EXPORT_RE = re.compile(r"r([1-9][0-9]*)")


def export_dir(state_dir: Path, project: str) -> Path:
    """Where the exports of ``project`` are: ``<state_dir>/svn/<project>``."""
    return state_dir / "svn" / project


def exports(state_dir: Path, project: str) -> list[int]:
    """The revisions exported for ``project``, oldest first."""
    d = export_dir(state_dir, project)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir()
                  if (m := _EXPORT_RE.fullmatch(p.name)) and p.is_dir())


def _svn(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["svn", "--non-interactive", *args], capture_output=True,
                              text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        raise DeployError(redact_text(f"svn {args[0]} {args[-1]}: no answer within "
                                      f"{timeout:.0f}s")) from None
    except OSError as exc:
        raise DeployError(f"cannot run svn: {exc}") from None


def _failed(what: str, r: subprocess.CompletedProcess[str]) -> DeployError:
    return DeployError(redact_text(f"{what}: {r.stderr.strip()[-500:] or f'exit {r.returncode}'}"))


def youngest(url: str, *, timeout: float = INFO_TIMEOUT) -> int:
    """The newest revision of the repository at ``url``."""
    r = _svn("info", "--show-item", "revision", "--", url, timeout=timeout)
    if r.returncode != 0:
        raise _failed(f"svn info {url}", r)
    try:
        rev = int(r.stdout.strip())
    except ValueError:
        raise DeployError(redact_text(f"svn info {url}: not a revision: "
                                      f"{r.stdout.strip()[:80]!r}")) from None
    if rev < 1:
        raise DeployError(redact_text(f"svn info {url}: revision {rev}: nothing committed yet"))
    return rev


def export(state_dir: Path, project: str, url: str, rev: int, *, keep: int = 5,
           timeout: float = EXPORT_TIMEOUT) -> Path | None:
    """Export revision ``rev`` of ``url`` to ``<state_dir>/svn/<project>/r<rev>``
    (through ``r<rev>.tmp`` and a rename) and prune to the newest ``keep``.
    The path, or None when there was nothing to do: ``rev`` is exported
    already, or older than the ``keep`` newest exports."""
    d = export_dir(state_dir, project)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"r{rev}"
    with _locked(d / "exports"):
        have = exports(state_dir, project)
        if rev in have or (len(have) >= keep and rev < have[-keep]):
            return None
        tmp = d / f"r{rev}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an export that died
        r = _svn("export", "--force", "-q", "-r", str(rev), "--", url, str(tmp),
                 timeout=timeout)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _failed(f"svn export -r {rev} {url}", r)
        if not tmp.is_dir():  # exporting a file URL writes a file
            tmp.unlink(missing_ok=True)
            raise DeployError(redact_text(f"svn export -r {rev} {url}: not a directory"))
        os.rename(tmp, final)
        fsync_dir(d)
        prune(state_dir, project, keep)
    return final


def prune(state_dir: Path, project: str, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` exports (and leftover ``.tmp``
    directories); the revisions removed."""
    d = export_dir(state_dir, project)
    gone = exports(state_dir, project)[:-keep] if keep > 0 else []
    for rev in gone:
        shutil.rmtree(d / f"r{rev}", ignore_errors=True)
    for p in d.glob("r*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    return gone


def refresh(state_dir: Path, pc: ProjectConfig, revision: int | None, *,
            log: Any, stats: Any) -> None:
    """The fetcher's step for svn project ``pc``: export ``revision`` (None:
    the youngest). Never raises for svn's failures: they are logged and
    counted (``fetch_failed``) like a git fetch's."""
    try:
        rev = revision if revision is not None else youngest(pc.git)
        path = export(state_dir, pc.name, pc.git, rev, keep=pc.keep)
    except (DeployError, OSError) as exc:
        stats.incr("fetch_failed")
        log.warning("svn export failed", project=pc.name, revision=revision,
                    error=redact_text(str(exc)))
        return
    stats.incr("fetched")
    if path is None:
        log.info("svn export up to date", project=pc.name, revision=rev)
    else:
        log.info("svn export updated", project=pc.name, revision=rev, export=str(path))
