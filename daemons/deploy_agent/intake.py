"""Whether a deploy request may run on this host: the agent's request checks.

The dispatcher has already seen to it that the request is a well-formed
``deploy.request`` signed by an orchestrator key (anything else never gets
here). :class:`Intake` then checks what only this host can: fresh, not a
replay, allowed for its project and environment, for this host, a project
this host serves in that environment, a user and ref that are safe to hand
to scripts and git. It also decides whether a repeat of a request already
in the journal is the same request (answered from the journal) or another
one reusing its rollout id (refused).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from deploybus import envelope
from deploybus.config import Config
from deploybus.dispatch import Message
from deploybus.errors import DeployBusError
from deploybus.layout import check_release
from deploybus.protocol import Action, DeployRequest
from deploybus.refs import check_ref, check_user
from deploybus.signing import Verifier


def _now() -> str:
    return envelope.fmt_time(envelope.now())


class AuditLog:
    """``<state_dir>/audit.jsonl``: every accepted, refused or repeated request,
    one JSON line each. Only requests signed by an orchestrator key are
    written here; noise on the bus is dead-lettered (and rate-limited) by
    the dispatcher before it could fill this file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, msg: Message, decision: str, **fields: Any) -> None:
        entry = {"at": _now(), "decision": decision, "id": msg.env.id,
                 "sender": msg.env.sender, "signer": msg.signer.name,
                 "key": (msg.env.sig or {}).get("key"), **fields}
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


class Intake:
    """See the module docstring."""

    def __init__(self, config: Config, host: str, verifier: Verifier) -> None:
        self.config, self.host, self.verifier = config, host, verifier

    def check(self, msg: Message) -> dict[str, Any]:
        """The journal entry of a request that may run here; DeployBusError
        (LapsedError if it only came too late) saying why not."""
        body = msg.body
        assert isinstance(body, DeployRequest)
        self.verifier.admit(msg.env, msg.signer, project=body.project,
                            environment=body.environment)
        if body.host != self.host:
            raise DeployBusError(f"request is for host {body.host!r}, not {self.host!r}")
        if body.project not in self.config.projects:
            raise DeployBusError(f"unknown project {body.project!r}")
        ec = self.config.environments.get(body.environment)
        if ec is None or self.host not in ec.hosts:
            raise DeployBusError(f"host {self.host} is not in environment {body.environment!r}")
        if ec.projects is not None and body.project not in ec.projects:
            raise DeployBusError(f"project {body.project!r} is not deployed to "
                                 f"{body.environment!r}")
        check_user(body.user)
        if body.action is Action.DEPLOY:
            if body.ref is None or body.commit is None:
                raise DeployBusError("a deploy request must name the ref and its commit")
            check_ref(body.ref)
        elif body.release is not None:
            check_release(body.release)
        return {"rollout": body.rollout, "action": body.action.value, "undo": body.undo,
                "state": "accepted", "accepted": _now(),
                "request": {"id": msg.env.id, "project": body.project,
                            "environment": body.environment, "ref": body.ref,
                            "commit": body.commit, "release": body.release,
                            "user": body.user, "host": self.host, "undo": body.undo,
                            "signer": msg.signer.name, "sender": msg.env.sender}}

    def same_request(self, msg: Message, entry: dict[str, Any]) -> str | None:
        """None if ``msg`` repeats the request ``entry`` records (a redelivery,
        or the orchestrator asking again after a restart); else why it is
        refused. A repeat is answered from the journal, never run again."""
        body = msg.body
        assert isinstance(body, DeployRequest)
        req = entry.get("request")
        if req is None:
            return None
        if (req.get("project"), req.get("environment"), entry.get("action"),
                req.get("commit")) != (body.project, body.environment, body.action.value,
                                       body.commit):
            return f"rollout id {body.rollout} was already used here for another request"
        if not self.verifier.allowed(msg.signer, body.project, body.environment):
            return (f"signer {msg.signer.name!r} may not act on {body.project!r} in "
                    f"{body.environment!r}")
        return None
