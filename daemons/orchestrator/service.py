"""The orchestrator service.

It takes signed ``deploy.rollout`` messages, checks them against the config
and the signer policy, records the rollout in the store, and runs it in a
thread of its own: one host after another (or up to ``parallel`` hosts at a
time, from the environment or the rollout), each sent a signed
``deploy.request`` that expires after the environment's ``request_timeout``;
no new host is started after the first that fails, refuses or does not
answer. Agents'
``deploy.progress`` and ``deploy.result`` events are written to the store and
wake the rollout thread; ``deploy.rollout.status`` events tell watchers
(the CLI's ``--wait``, the web) where the rollout stands.

Strategies (canary, batches, windows), locks and resume after a restart
build on this in the next issue; see docs/architecture.md.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from deploybus import envelope, topics
from deploybus.bus import Delivery
from deploybus.dispatch import Dispatcher
from deploybus.envelope import Envelope
from deploybus.errors import DeployBusError
from deploybus.refs import check_name, check_ref
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.store import FINAL_STATES, Store

#: deploy.rollout.status and similar events expire after this many seconds.
EVENT_TTL = 24 * 3600


class Orchestrator(Service):
    """See the module docstring."""

    name = "orchestrator"

    def __init__(self, ctx: Context, store: Store | None = None) -> None:
        super().__init__(ctx)
        self.store = store or Store(ctx.config.state_url)
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats)
        self.verifier = ctx.config.verifier()
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.ctx.signing_key is None:
            raise DeployBusError("the orchestrator needs keys.signing to sign deploy requests")
        self.dispatcher.subscribe(topics.EVENTS, self.on_event, queue=topics.ORCHESTRATOR_EVENTS,
                                  types={"deploy.progress", "deploy.result",
                                         "deploy.rollout.status"}, prefetch=50)
        self.dispatcher.subscribe(topics.PRESENCE, self.on_presence,
                                  queue=topics.ORCHESTRATOR_PRESENCE, types={"presence"},
                                  prefetch=50)
        self.dispatcher.subscribe(topics.ROLLOUTS, self.on_rollout,
                                  queue=topics.ORCHESTRATOR_ROLLOUTS, types={"deploy.rollout"})

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.dispatcher.close(timeout)
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout)

    # -- publishing ----------------------------------------------------------------

    def send(self, topic: str, type: str, body: dict[str, Any], *, correlation: str,
             ttl: float = EVENT_TTL) -> None:
        env = envelope.new(type, body, sender=self.ctx.sender, correlation=correlation, ttl=ttl)
        self.ctx.bus.publish(topic, self.ctx.signing_key.sign(env).encode())

    def status(self, rollout: str, state: str, reason: str | None = None, **extra: Any) -> None:
        self.store.set_rollout(rollout, state=state, reason=reason)
        self.send(topics.EVENTS, "deploy.rollout.status",
                  {"rollout": rollout, "state": state, "reason": reason, **extra},
                  correlation=rollout)
        self.log.info("rollout " + state, rollout=rollout, reason=reason, **extra)

    # -- handlers ----------------------------------------------------------------------

    def on_rollout(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        rollout = str(body.get("rollout") or env.correlation or env.id)[:64]
        user = str(body.get("user") or env.sender)[:128]
        try:
            rollout = check_name(rollout, "rollout id")
            project = check_name(body.get("project"), "project")
            environment = check_name(body.get("environment"), "environment")
            ref = check_ref(body.get("ref"))
            signer = self.verifier.verify(env, project=project, environment=environment)
            if project not in self.ctx.config.projects:
                raise DeployBusError(f"unknown project {project!r}")
            ec = self.ctx.config.environments.get(environment)
            if ec is None:
                raise DeployBusError(f"unknown environment {environment!r}")
            if ec.projects is not None and project not in ec.projects:
                raise DeployBusError(f"project {project!r} is not deployed to {environment!r}")
            hosts = body.get("hosts") or list(ec.hosts)
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise DeployBusError("hosts must be a list of host names")
            unknown = [h for h in hosts if h not in ec.hosts]
            if unknown:
                raise DeployBusError(f"hosts not in {environment}: {', '.join(unknown)}")
            hosts = list(dict.fromkeys(hosts))
            parallel = body.get("parallel") or ec.parallel
            if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
                raise DeployBusError("parallel must be a whole number of hosts >= 1")
        except DeployBusError as exc:
            self.ctx.stats.incr("refused")
            self.log.warning("rollout refused", rollout=rollout, reason=str(exc))
            self.store.create_rollout(id=rollout, project=str(body.get("project"))[:64],
                                      environment=str(body.get("environment"))[:64],
                                      ref=str(body.get("ref"))[:200], user=user, hosts=[],
                                      state="refused", reason=str(exc))
            self.send(topics.EVENTS, "deploy.rollout.status",
                      {"rollout": rollout, "state": "refused", "reason": str(exc)},
                      correlation=rollout)
            return
        if not self.store.create_rollout(id=rollout, project=project, environment=environment,
                                         ref=ref, user=user, hosts=hosts):
            self.log.info("rollout already known; ignoring redelivery", rollout=rollout)
            return
        self.log.info("rollout accepted", rollout=rollout, project=project, ref=ref,
                      environment=environment, hosts=hosts, user=user, signer=signer)
        t = threading.Thread(target=self.run_rollout, name=f"rollout-{rollout}", daemon=True,
                             args=(rollout, project, environment, ref, user, hosts,
                                   ec.request_timeout, parallel))
        self.threads.append(t)
        t.start()

    def on_event(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        rollout, host = body.get("rollout"), body.get("host")
        if not isinstance(rollout, str) or not isinstance(host, str):
            return
        if env.type == "deploy.progress":
            text = str(body.get("message", ""))
            lines = body.get("lines") or []
            if isinstance(lines, list) and lines:
                text += "\n" + "\n".join(str(x) for x in lines)
            self.store.add_log(rollout, host, str(body.get("step", ""))[:32], text)
        elif env.type == "deploy.result":
            with self.cond:
                self.results.setdefault((rollout, host), body)
                self.cond.notify_all()

    def on_presence(self, env: Envelope, _d: Delivery) -> None:
        host = env.body.get("host")
        if isinstance(host, str):
            self.store.record_presence(host, env.body)

    # -- the rollout -------------------------------------------------------------------

    def run_rollout(self, rollout: str, project: str, environment: str, ref: str, user: str,
                    hosts: list[str], timeout: float, parallel: int) -> None:
        try:
            self._run(rollout, project, environment, ref, user, hosts, timeout, parallel)
        except Exception as exc:  # a rollout thread never dies silently
            self.log.exception("rollout crashed", rollout=rollout)
            self.status(rollout, "failed", f"orchestrator error: {exc}")

    def _run(self, rollout: str, project: str, environment: str, ref: str, user: str,
             hosts: list[str], timeout: float, parallel: int) -> None:
        """At most ``parallel`` hosts in flight; after the first failure no host
        is started, the ones in flight are waited for, the rest skipped."""
        self.status(rollout, "running", hosts=hosts, project=project, ref=ref, parallel=parallel)
        pending = list(hosts)
        inflight: dict[str, float] = {}  # host -> deadline
        failure: str | None = None
        done = 0
        while pending or inflight:
            while pending and failure is None and len(inflight) < parallel:
                host = pending.pop(0)
                self.store.set_step(rollout, host, state="requested")
                self.send(topics.requests_for(host), "deploy.request",
                          {"rollout": rollout, "project": project, "environment": environment,
                           "ref": ref, "host": host, "user": user,
                           "position": hosts.index(host)},
                          correlation=rollout, ttl=timeout)
                inflight[host] = time.monotonic() + timeout
            if not inflight:
                break
            with self.cond:
                self.cond.wait_for(
                    lambda: self.stopping.is_set()
                    or any((rollout, h) in self.results for h in inflight),
                    max(0.0, min(inflight.values()) - time.monotonic()))
                answered = {h: self.results.pop((rollout, h)) for h in list(inflight)
                            if (rollout, h) in self.results}
            if self.stopping.is_set() and not answered:
                return  # a restart picks it up again (next issue: resume)
            now = time.monotonic()
            for host in list(inflight):
                result = answered.get(host)
                if result is None and inflight[host] > now:
                    continue
                del inflight[host]
                if result is None:
                    result = {"status": "failed",
                              "reason": f"no answer from {host} within {timeout:.0f}s"}
                state = str(result.get("status"))
                done += 1
                self.store.set_step(rollout, host, state=state, release=result.get("release"),
                                    commit=result.get("commit"), message=result.get("reason"))
                self.send(topics.EVENTS, "deploy.rollout.status",
                          {"rollout": rollout, "state": "running", "host": host,
                           "host_state": state, "reason": result.get("reason"),
                           "done": done, "total": len(hosts)}, correlation=rollout)
                if state != "succeeded" and failure is None:
                    failure = f"{host}: {state}: {result.get('reason')}"
        if failure is not None:
            for rest in pending:
                self.store.set_step(rollout, rest, state="skipped")
            self.status(rollout, "failed", failure)
            return
        self.status(rollout, "succeeded", hosts=hosts)


__all__ = ["Orchestrator", "FINAL_STATES"]
