"""The deploy agent service: takes signed ``deploy.request`` messages for its host.

For each request, in order: answer from the journal if this rollout was
already handled here (a redelivery or a replay never deploys twice); check
the signature, freshness, replay and policy, the project, environment, host
and ref, and refuse with a reported reason if any fails; run the deploy;
write the result to the journal; publish it; ack. Every accepted or refused
request is written once to the local audit log ``<state_dir>/audit.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deploybus import envelope, topics
from deploybus.bus import Delivery
from deploybus.daemons.deploy_agent import steps
from deploybus.dispatch import Dispatcher
from deploybus.envelope import Envelope
from deploybus.errors import DeployBusError
from deploybus.refs import check_name, check_ref
from deploybus.runner import STOP_GRACE, Context, Service

#: Result and progress messages expire after this many seconds.
EVENT_TTL = 24 * 3600


class DeployAgent(Service):
    """See the module docstring."""

    name = "deploy_agent"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        hc = ctx.config.host(ctx.host)
        self.root, self.state_dir = hc.root, hc.state_dir
        self.journal = self.state_dir / "journal"
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats)
        self.verifier = None

    def start(self) -> None:
        self.journal.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.verifier = self.ctx.config.verifier(replay_path=self.state_dir / "seen.jsonl")
        self.dispatcher.subscribe(topics.requests_for(self.ctx.host), self.on_request,
                                  queue=topics.agent_queue(self.ctx.host),
                                  types={"deploy.request"}, prefetch=1)
        self.log.info("agent ready", root=str(self.root), state_dir=str(self.state_dir))

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.dispatcher.close(timeout)

    # -- events ------------------------------------------------------------------

    def publish(self, type: str, rollout: str, body: dict[str, Any]) -> None:
        env = envelope.new(type, {"rollout": rollout, "host": self.ctx.host, **body},
                           sender=self.ctx.sender, correlation=rollout, ttl=EVENT_TTL)
        if self.ctx.signing_key is not None:
            env = self.ctx.signing_key.sign(env)
        self.ctx.bus.publish(topics.EVENTS, env.encode())

    def audit(self, env: Envelope, decision: str, **fields: Any) -> None:
        entry = {"at": envelope.fmt_time(envelope.now()), "decision": decision, "id": env.id,
                 "sender": env.sender, "key": (env.sig or {}).get("key"), **fields}
        with open(self.state_dir / "audit.jsonl", "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    # -- the request -------------------------------------------------------------

    def _journal_path(self, rollout: str) -> Path:
        return self.journal / f"{rollout}.json"

    def on_request(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        rollout = body.get("rollout") if isinstance(body.get("rollout"), str) else None
        try:
            rollout = check_name(rollout or env.correlation, "rollout id")
        except DeployBusError as exc:
            self.refuse(env, rollout or "unknown", str(exc))
            return
        done = self._journal_path(rollout)
        if done.exists():
            earlier = json.loads(done.read_text())
            self.log.info("request already handled; answering from journal", rollout=rollout,
                          id=env.id, status=earlier.get("status"))
            self.audit(env, "duplicate", rollout=rollout, status=earlier.get("status"))
            self.publish("deploy.result", rollout, earlier | {"duplicate": True})
            return
        try:
            project = check_name(body.get("project"), "project")
            environment = check_name(body.get("environment"), "environment")
            ref = check_ref(body.get("ref"))
            user = str(body.get("user") or "unknown")[:128]
            if body.get("host") != self.ctx.host:
                raise DeployBusError(f"request is for host {body.get('host')!r:.60}, "
                                     f"not {self.ctx.host!r}")
            assert self.verifier is not None
            signer = self.verifier.verify(env, project=project, environment=environment)
            pc = self.ctx.config.projects.get(project)
            if pc is None:
                raise DeployBusError(f"unknown project {project!r}")
            ec = self.ctx.config.environments.get(environment)
            if ec is None or self.ctx.host not in ec.hosts:
                raise DeployBusError(f"host {self.ctx.host} is not in environment {environment!r}")
        except DeployBusError as exc:
            self.refuse(env, rollout, str(exc))
            return
        self.audit(env, "accepted", rollout=rollout, project=project, environment=environment,
                   ref=ref, user=user, signer=signer)
        self.log.info("deploy accepted", rollout=rollout, project=project, ref=ref, user=user,
                      signer=signer)
        base = {"project": project, "environment": environment, "ref": ref}

        def progress(step: str, message: str, lines: list[str] | None) -> None:
            self.publish("deploy.progress", rollout,
                         base | {"step": step, "message": message, "lines": lines or []})

        result = steps.deploy(steps.Request(rollout, project, environment, ref, user), pc,
                              root=self.root, state_dir=self.state_dir, host=self.ctx.host,
                              progress=progress)
        result = base | result
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, done)
        self.log.info("deploy finished", rollout=rollout, status=result["status"],
                      release=result.get("release"), reason=result.get("reason"))
        self.publish("deploy.result", rollout, result)

    def refuse(self, env: Envelope, rollout: str, reason: str) -> None:
        self.ctx.stats.incr("refused")
        self.log.warning("deploy request refused", rollout=rollout, id=env.id, reason=reason)
        self.audit(env, "refused", rollout=rollout, reason=reason)
        body = env.body
        self.publish("deploy.result", rollout, {
            "status": "refused", "reason": reason,
            "project": str(body.get("project"))[:64], "ref": str(body.get("ref"))[:200]})
