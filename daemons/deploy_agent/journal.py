"""The agent's journal: one JSON file per rollout it accepted, kept on disk.

``<state_dir>/journal/<rollout>.json`` goes through three states::

    accepted  the request passed every check; written and fsynced before the
              broker gets its ack, so an acked request is never lost
    running   a worker is on it; ``step`` says where (and ``script`` which
              process group runs a hook, so a restart can kill an orphan)
    done      ``result`` is the deploy.result body; ``published`` says
              whether the bus has it yet

A request for a rollout that has an entry is never run again: a ``done``
entry is answered with its result, an unfinished one is left to the run (or
the restart recovery) in charge of it. Entries are replaced whole through a
temporary file and ``rename(2)``, so a crash leaves the old version or the
new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from deploybus.errors import RefError
from deploybus.gitutil import fsync_dir
from deploybus.layout import check_release
from deploybus.refs import check_commit, check_name, check_ref, check_user

#: Entry states.
ACCEPTED, RUNNING, DONE = "accepted", "running", "done"

#: Done entries are kept this long (seconds): far longer than any request may
#: live (signing.MAX_TTL is one day), so a late redelivery still finds them.
KEEP_DONE = 14 * 24 * 3600

#: Names of entries: a rollout id, or one with a suffix (``<rollout>.undo``);
#: no "/" and no leading ".", so an entry's file is always in the directory.
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Journal:
    """Reads and writes the entries of one agent's journal directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, rollout: str) -> Path:
        """The entry's file; RefError if ``rollout`` is not an entry name
        (:data:`KEY_RE`): a name never reaches outside the directory."""
        if not isinstance(rollout, str) or not KEY_RE.fullmatch(rollout):
            raise RefError(f"invalid journal entry name {rollout!r:.80}")
        return self.dir / f"{rollout}.json"

    def get(self, rollout: str) -> dict[str, Any] | None:
        """The entry of ``rollout``, or None. Entries written before the journal
        had states (a bare result) read as done and published."""
        try:
            data = json.loads(self.path(rollout).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Unreadable: treat as handled rather than run a deploy twice.
            return {"state": DONE, "published": True, "result": {
                "status": "failed", "reason": "journal entry unreadable"}}
        if not isinstance(data, dict):
            return None
        if "state" not in data:
            return {"state": DONE, "published": True, "result": data}
        return data

    def write(self, rollout: str, entry: dict[str, Any], *, sync: bool = True) -> None:
        """Replace the entry of ``rollout``; with ``sync`` it is on disk when this returns."""
        path = self.path(rollout)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        data = json.dumps(entry, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        if sync:
            fsync_dir(self.dir)

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every entry, oldest first; leftover temporary files are removed."""
        files = []
        for p in self.dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink(missing_ok=True)
            elif p.suffix == ".json" and KEY_RE.fullmatch(p.stem):  # else not an entry
                try:
                    files.append((p.stat().st_mtime, p.stem))
                except FileNotFoundError:
                    continue
        for _, rollout in sorted(files):
            entry = self.get(rollout)
            if entry is not None:
                yield rollout, entry

    def prune(self, older_than: float = KEEP_DONE) -> list[str]:
        """Remove done entries last written more than ``older_than`` seconds ago."""
        cutoff = time.time() - older_than
        removed = []
        for p in self.dir.glob("*.json"):
            if not KEY_RE.fullmatch(p.stem):
                continue
            try:
                if p.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            entry = self.get(p.stem)
            if entry is not None and entry.get("state") == DONE and entry.get("published"):
                p.unlink(missing_ok=True)
                removed.append(p.stem)
        return removed


def check_entry(entry: dict[str, Any], *, steps: Collection[str]) -> None:
    """Raise RefError naming the first field of ``entry`` (read back from
    disk) that the live path would not have let through.

    Recovery acts on what an entry names: it switches ``current`` to
    ``previous_release``, removes and marks ``release``, kills the process
    group ``script.pgid`` and runs scripts with the request's fields in
    their environment. A damaged or planted entry must not make it do any
    of that outside the project's directory (``previous_release:
    "../../etc"``) or to another process (``pgid: 1``), so every field gets
    the same checks as a request (:mod:`deploybus.refs`,
    :func:`deploybus.layout.check_release`); ``steps`` are the step names a
    run records."""
    def field(what: str, check: Any, value: Any, *, optional: bool = True) -> None:
        if value is None and optional:
            return
        try:
            check(value)
        except RefError as exc:
            raise RefError(f"{what}: {exc}") from None

    req = entry.get("request")
    if not isinstance(req, dict):
        raise RefError("request: missing")
    field("rollout", lambda v: check_name(v, "rollout id"), entry.get("rollout"),
          optional=False)
    action = entry.get("action") or "deploy"
    if action not in ("deploy", "rollback"):
        raise RefError(f"action: unknown action {action!r:.40}")
    if entry.get("step") is not None and entry.get("step") not in steps:
        raise RefError(f"step: unknown step {entry.get('step')!r:.40}")
    for key in ("release", "previous_release"):
        field(key, check_release, entry.get(key))
    field("request.project", lambda v: check_name(v, "project"), req.get("project"),
          optional=False)
    field("request.environment", lambda v: check_name(v, "environment"),
          req.get("environment"), optional=False)
    field("request.release", check_release, req.get("release"))
    field("request.user", check_user, req.get("user"))
    field("request.commit", check_commit, req.get("commit"))
    if action == "deploy":
        field("request.ref", check_ref, req.get("ref"))
    field("request.ref_name", check_ref, req.get("ref_name"))
    script = entry.get("script")
    if script is not None:
        pgid, start = (script.get("pgid"), script.get("start")) if isinstance(script, dict) \
            else (None, None)
        if type(pgid) is not int or pgid <= 1 or (start is not None and type(start) is not int):
            raise RefError(f"script: not a process group of a script: {script!r:.80}")
