"""The deploy layout on a host.

::

    <root>/<project>/
        releases/<id>/          one complete checkout per deploy
        releases/<id>.partial/  a checkout in progress (never pointed at)
        current -> releases/<id>
        .deploybus/lock         one deploy per project per host (flock)
        .deploybus/releases/<id>.json   what each release is (commit, ref, state)

``current`` is switched atomically: a new relative symlink next to it, then
``rename(2)`` over it, then an fsync of the directory. A reader resolving
``current`` sees the old release or the new one, never neither.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploybus.gitutil import fsync_dir


class Layout:
    """Paths and operations of one project's deploy directory."""

    def __init__(self, root: Path, project: str) -> None:
        self.dir = root / project
        self.releases = self.dir / "releases"
        self.current = self.dir / "current"
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
        try:
            return json.loads((self.meta / "releases" / f"{release}.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_info(self, release: str, info: dict[str, Any]) -> None:
        path = self.meta / "releases" / f"{release}.json"
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def switch(self, release: str) -> None:
        """Point ``current`` at ``release`` atomically."""
        target = self.releases / release
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

    def cleanup(self, keep: int) -> list[str]:
        """Delete the oldest releases beyond ``keep`` (never the current one)
        and leftover partial checkouts; returns what was removed."""
        current = self.current_release()
        removed = []
        for p in self.releases.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        complete = sorted(p.name for p in self.releases.iterdir()
                          if p.is_dir() and not p.name.endswith(".partial"))
        for name in complete[:-keep] if len(complete) > keep else []:
            if name == current:
                continue
            shutil.rmtree(self.releases / name, ignore_errors=True)
            (self.meta / "releases" / f"{name}.json").unlink(missing_ok=True)
            removed.append(name)
        return removed
