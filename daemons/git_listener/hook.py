"""The git post-receive hook: every pushed ref becomes a ``git.push`` message.

``deploybus hook install BARE_REPO --project NAME`` writes
``hooks/post-receive``, which runs ``deploybus notify push`` with the
interpreter and config file it was installed with. The hook never blocks or
fails a push: if the bus is unreachable it says so on the pusher's terminal
and exits 0; fetchers catch up on their next start, and agents fetch any ref
their mirror lacks.
"""

from __future__ import annotations

import getpass
import os
import shlex
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

from deploybus import protocol, topics
from deploybus.errors import DeployBusError
from deploybus.refs import check_name

#: Marks a hook as ours, so reinstalling may overwrite it but nothing else.
MARKER = "# installed by deploybus hook install"

ZERO = "0" * 40


def install(repo: Path, *, project: str, config: Path, force: bool = False,
            key: Path | None = None) -> Path:
    """Write the post-receive hook into bare repository ``repo``."""
    check_name(project, "project")
    if not (repo / "HEAD").exists() or not (repo / "objects").is_dir():
        raise DeployBusError(f"{repo} is not a bare git repository")
    hook = repo / "hooks" / "post-receive"
    if hook.exists() and MARKER not in hook.read_text(errors="replace") and not force:
        raise DeployBusError(f"{hook} exists and was not written by deploybus; "
                             "use --force to replace it")
    hook.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "deploybus.cli", "--config", str(config.resolve()),
           "notify", "push", "--project", project,
           *(["--key", str(key.resolve())] if key is not None else [])]
    hook.write_text(f"#!/bin/sh\n{MARKER}\n"
                    f"exec {' '.join(shlex.quote(c) for c in cmd)}\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook


def pushes(lines: Iterable[str], *, project: str, pusher: str | None = None) -> list[dict]:
    """``git.push`` bodies for the ``old new ref`` lines git gives the hook."""
    who = pusher or os.environ.get("GL_USERNAME") or os.environ.get("GITEA_PUSHER_NAME") \
        or getpass.getuser()
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        old, new, ref = parts
        out.append({"project": project, "ref": ref, "old": old, "new": new, "pusher": who,
                    "created": old == ZERO, "deleted": new == ZERO})
    return out


def publish_pushes(bus, bodies: list[dict], *, sender: str, signing_key) -> int:  # noqa: ANN001
    """Publish each body as a ``git.push`` signed with the git server's key."""
    for body in bodies:
        bus.publish(topics.GIT_COMMITS, protocol.seal(protocol.parse("git.push", body),
                                                      key=signing_key, sender=sender))
    return len(bodies)
