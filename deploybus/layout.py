"""The deploy layout on a host.

::

    <root>/<project>/
        releases/<id>/          one complete checkout per deploy
        releases/<id>.partial/  a checkout in progress (never pointed at)
        current -> releases/<id>
        shared/                 files that survive releases, linked into each
        .deploybus/lock         one deploy per project per host (flock)
        .deploybus/releases/<id>.json   what each release is (commit, ref, state)

``current`` is switched atomically: a new relative symlink next to it, then
``rename(2)`` over it, then an fsync of the directory. A reader resolving
``current`` sees the old release or the new one, never neither.

Release states (in the ``.json``): ``pending`` while it is being made,
``ready`` once checked out, post script and health check passed, ``ok`` once
it was switched to and its post-switch script passed, ``failed`` otherwise.
Rollback only goes to ``ok`` releases; cleanup never removes the current
release or the one a rollback would go to.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploybus.errors import RefError
from deploybus.gitutil import fsync_dir
from deploybus.refs import check_name

#: Release ids: a name (no "/", not starting with "."), up to 128 characters.
#: The agent makes ``<stamp>-<commit[:8]>-<rollout[:8]>`` (44 characters).
RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_release(value: object) -> str:
    """Return ``value`` if it can name a release directory; else raise RefError.

    A release id becomes a path under ``releases/`` and the target of
    ``current``: one read from a message or a journal that could climb out
    of the project (``../../etc``) must never get that far."""
    if not isinstance(value, str) or not RELEASE_RE.fullmatch(value) \
            or value.endswith(".partial"):
        raise RefError(f"invalid release {value!r:.80}")
    return value


class Layout:
    """Paths and operations of one project's deploy directory.

    The project name and every release id given to a method that writes or
    switches are checked (:func:`check_release`), so nothing here reaches
    outside ``<root>/<project>``."""

    def __init__(self, root: Path, project: str) -> None:
        check_name(project, "project")
        self.dir = root / project
        self.releases = self.dir / "releases"
        self.current = self.dir / "current"
        self.shared = self.dir / "shared"
        self.meta = self.dir / ".deploybus"

    def ensure(self) -> None:
        (self.meta / "releases").mkdir(parents=True, exist_ok=True)
        self.releases.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the project's deploy lock; the kernel drops it if we die."""
        self.ensure()
        with open(self.meta / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def current_release(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        return Path(target).name

    def info(self, release: str) -> dict[str, Any]:
        """What ``release``'s record says; {} if it has none (or is no release id)."""
        if not isinstance(release, str) or not RELEASE_RE.fullmatch(release):
            return {}
        try:
            data = json.loads((self.meta / "releases" / f"{release}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_info(self, release: str, info: dict[str, Any]) -> None:
        path = self.meta / "releases" / f"{check_release(release)}.json"
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def set_state(self, release: str, state: str, **fields: Any) -> None:
        """Update the state (and any other fields) of ``release``'s record."""
        self.write_info(release, self.info(release) | fields | {"state": state})

    def complete_releases(self) -> list[str]:
        """Names of the release directories that are complete, oldest first."""
        try:
            with os.scandir(self.releases) as it:
                # DirEntry.is_dir without following links: no stat per release
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False)
                              and not e.name.endswith(".partial")
                              and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def rollback_target(self, before: str | None = None) -> str | None:
        """The newest release older than ``before`` (default: the current one)
        whose state is ``ok``: where a rollback goes by default."""
        before = before if before is not None else self.current_release()
        if before is None:
            return None
        for name in reversed(self.complete_releases()):
            if name < before and self.info(name).get("state") == "ok":
                return name
        return None

    def clear_current(self) -> None:
        """Remove ``current`` (back to "nothing deployed"), durably."""
        try:
            os.unlink(self.current)
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def restore(self, release: str | None) -> None:
        """Point ``current`` back at ``release``, or remove it if there was none."""
        if release is None:
            self.clear_current()
        else:
            self.switch(release)

    def link_shared(self, release_dir: Path, entries: Iterable[str], *,
                    owner: tuple[int, int] | None = None) -> list[str]:
        """Link each shared entry into ``release_dir`` (a checkout, partial or not).

        ``shared/<entry>`` is made on first use: from the release's own copy
        if it has one (moved there, so a repository can seed it), else as an
        empty directory. The release's path becomes a relative symlink to
        it. A directory on the way that is a symlink in the checkout is
        refused: the link must land inside the release. ``owner`` (uid, gid)
        is given what is created in ``shared/``. Returns the entries linked.
        """
        linked = []
        for entry in entries:
            parts = entry.strip("/").split("/")
            if entry.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"shared entry {entry!r} is not a relative path")
            link = release_dir.joinpath(*parts)
            parent = release_dir
            for part in parts[:-1]:
                parent = parent / part
                if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                    raise OSError(f"shared entry {entry!r}: {parent.relative_to(release_dir)} "
                                  f"in the release is not a directory")
                if not parent.exists():
                    parent.mkdir()
            target = self.shared.joinpath(*parts)
            if not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                if os.path.lexists(link) and not link.is_symlink():
                    shutil.move(str(link), str(target))  # the repository seeds it
                else:
                    target.mkdir()
                if owner is not None:
                    os.lchown(target, *owner)
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.exists():
                shutil.rmtree(link)
            os.symlink(os.path.relpath(target, link.parent), link)
            linked.append("/".join(parts))
        return linked

    def switch(self, release: str) -> None:
        """Point ``current`` at ``release`` atomically."""
        target = self.releases / check_release(release)
        if not target.is_dir():
            raise FileNotFoundError(f"release {release} does not exist")
        tmp = self.dir / f".current.tmp-{uuid.uuid4().hex[:12]}"
        os.symlink(os.path.join("releases", release), tmp)
        try:
            os.replace(tmp, self.current)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)

    def remove_leftovers(self) -> list[str]:
        """Remove partial checkouts and temporary links a crash left behind."""
        removed = []
        for p in self.releases.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        for p in self.dir.glob(".current.tmp-*"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed

    def cleanup(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete the oldest releases beyond ``keep`` and leftover partial
        checkouts; never the current release, the one a rollback from it
        would go to, or any in ``protect``. Returns what was removed."""
        removed = self.remove_leftovers()
        complete = self.complete_releases()
        if len(complete) <= keep:
            return removed
        current = self.current_release()
        keepers = {current, self.rollback_target(current), *protect} - {None}
        for name in complete[:-keep]:
            if name in keepers:
                continue
            shutil.rmtree(self.releases / name, ignore_errors=True)
            (self.meta / "releases" / f"{name}.json").unlink(missing_ok=True)
            removed.append(name)
        return removed
