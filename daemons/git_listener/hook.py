"""The git post-receive hook: every pushed ref becomes a ``git.push`` message.

``deploybus hook install BARE_REPO --project NAME`` writes
``hooks/post-receive``. On each push it runs :mod:`.post_receive` with the
interpreter it was installed with: the pushes are written to the durable
outbox (:mod:`deploybus.outbox`) and a detached ``deploybus outbox drain``
publishes them, signed with the git key, once the broker takes them. The
hook never blocks or fails a push, and a push made while the broker is down
is queued, not lost: the next push's drainer, or a ``deploybus listener``
using the same outbox, publishes it when the broker is back.
"""

from __future__ import annotations

import shlex
import sqlite3
import stat
import sys
from pathlib import Path

from deploybus import protocol, topics
from deploybus.daemons.git_listener.post_receive import ZERO, pushes
from deploybus.errors import DeployBusError
from deploybus.outbox import Outbox
from deploybus.refs import check_name

__all__ = ["MARKER", "ZERO", "install", "publish_pushes", "pushes"]

#: Marks a hook as ours, so reinstalling may overwrite it but nothing else.
MARKER = "# installed by deploybus hook install"

def install(repo: Path, *, project: str, config: Path, outbox: Path, force: bool = False,
            key: Path | None = None) -> Path:
    """Write the post-receive hook into bare repository ``repo``; it queues
    pushes in ``outbox`` (created here, so that a first push finds it)."""
    check_name(project, "project")
    if not (repo / "HEAD").exists() or not (repo / "objects").is_dir():
        raise DeployBusError(f"{repo} is not a bare git repository")
    hook = repo / "hooks" / "post-receive"
    if hook.exists() and MARKER not in hook.read_text(errors="replace") and not force:
        raise DeployBusError(f"{hook} exists and was not written by deploybus; "
                             "use --force to replace it")
    hook.parent.mkdir(exist_ok=True)
    outbox = outbox.resolve()
    try:
        Outbox(outbox).close()
    except (OSError, sqlite3.Error) as exc:
        raise DeployBusError(f"cannot create the outbox {outbox}: {exc} (give --outbox a "
                             f"file in a directory the git user can write)") from None
    drain = [sys.executable, "-m", "deploybus.cli", "--config", str(config.resolve()),
             *(["--key", str(key.resolve())] if key is not None else []),
             "outbox", "drain", "--outbox", str(outbox), "--quiet"]
    cmd = [sys.executable, "-m", "deploybus.daemons.git_listener.post_receive",
           "--outbox", str(outbox), "--project", project, "--", *drain]
    hook.write_text(f"#!/bin/sh\n{MARKER}\n"
                    f"exec {' '.join(shlex.quote(c) for c in cmd)}\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook


def publish_pushes(bus, bodies: list[dict], *, sender: str, signing_key) -> int:  # noqa: ANN001
    """Publish each body as a ``git.push`` signed with the git server's key."""
    for body in bodies:
        bus.publish(topics.GIT_COMMITS, protocol.seal(protocol.parse("git.push", body),
                                                      key=signing_key, sender=sender))
    return len(bodies)
