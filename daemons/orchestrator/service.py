"""The orchestrator service.

It takes signed ``deploy.rollout`` messages and checks them: signature and
signer policy, project, environment, hosts, strategy, the environment's
deploy windows (an override needs a reason and is audited) and the lock (one
rollout per project and environment; a refusal names the holder). An
accepted rollout is recorded in the store and run by a
:class:`~deploybus.daemons.orchestrator.rollout.RolloutRun` in a thread of
its own. Signed ``deploy.control`` messages pause, resume, promote or abort
it. Agents' progress and results arrive on ``deploy.events``; presence on
``presence``. On start it resumes every rollout the store says is not
finished.

Because windows and locks are checked here, on the one path every rollout
takes, no front end (CLI, API, web) can bypass them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from deploybus import envelope, topics
from deploybus.bus import Delivery
from deploybus.bus.base import Backoff
from deploybus.daemons.orchestrator.rollout import RolloutRun
from deploybus.dispatch import Dispatcher
from deploybus.envelope import Envelope
from deploybus.errors import BusError, DeployBusError
from deploybus.refs import check_name, check_ref
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.store import FINAL_STATES, Store
from deploybus.strategy import Strategy

#: deploy.rollout.status and similar events expire after this many seconds.
EVENT_TTL = 24 * 3600

#: How long a rollout's lock lasts if the rollout never releases it.
LOCK_TTL = 6 * 3600

CONTROL_ACTIONS = ("pause", "resume", "promote", "abort")

#: Daemons whose heartbeats count towards a host's liveness (deploybus.liveness).
PRESENCE_DAEMONS = ("agent", "fetcher", "keepalive")


def _log_text(entry: dict[str, Any]) -> str:
    text = str(entry.get("message", ""))
    lines = entry.get("lines")
    if isinstance(lines, list) and lines:
        text += "\n" + "\n".join(str(x) for x in lines)
    return text


class Orchestrator(Service):
    """See the module docstring."""

    name = "orchestrator"

    def __init__(self, ctx: Context, store: Store | None = None) -> None:
        super().__init__(ctx)
        self.store = store or Store(ctx.config.state_url)
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats)
        self.verifier = ctx.config.verifier()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.runs: dict[str, RolloutRun] = {}
        # (rollout, host) -> result, for requests a run is waiting on
        self._expected: set[tuple[str, str]] = set()
        self._results: dict[tuple[str, str], dict[str, Any]] = {}
        self._progress: dict[tuple[str, str], float] = {}
        # (rollout, host) whose agent has said anything since it was last asked
        self._acked: set[tuple[str, str]] = set()
        # (rollout, host) -> id of the latest request sent: a refusal of an
        # older one (a stale redelivery) answers nothing
        self._sent: dict[tuple[str, str], str] = {}

    def start(self) -> None:
        if self.ctx.signing_key is None:
            raise DeployBusError("the orchestrator needs keys.signing to sign deploy requests")
        self.dispatcher.subscribe(topics.PRESENCE, self.on_presence,
                                  queue=topics.ORCHESTRATOR_PRESENCE, types={"presence"},
                                  prefetch=50)
        # Resume first, so results that queued up while we were away find the
        # runs expecting them.
        self.resume()
        self.dispatcher.subscribe(topics.EVENTS, self.on_event, queue=topics.ORCHESTRATOR_EVENTS,
                                  types={"deploy.progress", "deploy.result"}, prefetch=50)
        self.dispatcher.subscribe(topics.CONTROL, self.on_control,
                                  queue=topics.ORCHESTRATOR_CONTROL, types={"deploy.control"})
        self.dispatcher.subscribe(topics.ROLLOUTS, self.on_rollout,
                                  queue=topics.ORCHESTRATOR_ROLLOUTS, types={"deploy.rollout"})

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.dispatcher.close(timeout)
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for run in list(self.runs.values()):
            run.thread.join(timeout)

    # -- shared with the runs --------------------------------------------------------

    def send(self, topic: str, type: str, body: dict[str, Any], *, correlation: str,
             ttl: float = EVENT_TTL) -> None:
        """Sign and publish; while the broker is away, keep trying (with capped
        backoff) for as long as the orchestrator runs: a rollout outlives a
        broker restart."""
        env = envelope.new(type, body, sender=self.ctx.sender, correlation=correlation, ttl=ttl)
        raw = self.ctx.signing_key.sign(env).encode()
        backoff = Backoff(initial=0.5, cap=10.0, stop=self.stopping)
        while True:
            try:
                self.ctx.bus.publish(topic, raw)
                return
            except BusError as exc:
                self.log.warning("publish failed; retrying", topic=topic, error=str(exc),
                                 retry_in=round(backoff.delay, 1))
                if not backoff.wait():
                    raise

    def send_many(self, messages: list[tuple[str, str, dict[str, Any], str, float]], *,
                  before: Callable[[list[str]], None] | None = None) -> list[str]:
        """Sign and publish ``(topic, type, body, correlation, ttl)`` messages as
        one batch (one broker round trip on AMQP); retried whole, like
        :meth:`send`, while the broker is away. A message the broker had
        already taken before a failure may go out twice: agents answer a
        repeated request from their journal. Each try signs the messages
        anew, so that their time to live starts when they go out: a request
        kept through a long broker outage would otherwise arrive expired.
        ``before`` is called with each try's ids before it goes out, so that
        an answer that comes back at once finds them recorded.
        Returns the ids of the messages that went out."""
        backoff = Backoff(initial=0.5, cap=10.0, stop=self.stopping)
        while True:
            envs = [envelope.new(type, body, sender=self.ctx.sender, correlation=correlation,
                                 ttl=ttl) for _topic, type, body, correlation, ttl in messages]
            raw = [(m[0], self.ctx.signing_key.sign(env).encode())
                   for m, env in zip(messages, envs, strict=True)]
            if before is not None:
                before([env.id for env in envs])
            try:
                self.ctx.bus.publish_batch(raw)
                return [env.id for env in envs]
            except BusError as exc:
                self.log.warning("batch publish failed; retrying", count=len(raw),
                                 error=str(exc), retry_in=round(backoff.delay, 1))
                if not backoff.wait():
                    raise

    def status(self, rollout: str, state: str, reason: str | None = None, **extra: Any) -> None:
        self.store.set_rollout(rollout, state=state, reason=reason)
        self.send(topics.STATUS, "deploy.rollout.status",
                  {"rollout": rollout, "state": state, "reason": reason, **extra},
                  correlation=rollout)
        self.log.info("rollout " + state, rollout=rollout, reason=reason)

    def expect(self, rollout: str, host: str) -> None:
        with self.cond:
            self._expected.add((rollout, host))
            self._acked.discard((rollout, host))
            self._progress[(rollout, host)] = time.monotonic()

    def acked(self, rollout: str, host: str) -> bool:
        """The agent of ``host`` has said something of ``rollout`` (its
        acknowledgement, progress or result) since it was last asked."""
        return (rollout, host) in self._acked

    def sent(self, rollout: str, host: str, request_id: str) -> None:
        with self.cond:
            self._sent[(rollout, host)] = request_id

    def has_result(self, rollout: str, host: str) -> bool:
        return (rollout, host) in self._results

    def take_result(self, rollout: str, host: str) -> dict[str, Any] | None:
        with self.cond:
            result = self._results.pop((rollout, host), None)
            if result is not None:
                self._expected.discard((rollout, host))
                self._progress.pop((rollout, host), None)
            return result

    def postpone(self, rollout: str, hosts: Iterable[str], by: float) -> None:
        """Move the stuck clocks of ``hosts`` back by ``by`` seconds (an outage)."""
        with self.cond:
            for host in hosts:
                key = (rollout, host)
                if key in self._progress:
                    self._progress[key] += by

    def last_progress(self, rollout: str, host: str) -> float:
        return self._progress.get((rollout, host), time.monotonic())

    def finished(self, run: RolloutRun) -> None:
        self.store.release_lock(run.project, run.environment, rollout_id=run.id)
        with self.cond:
            self.runs.pop(run.id, None)
            for key in [k for k in self._expected if k[0] in (run.id, f"{run.id}.rb")]:
                self._expected.discard(key)
                self._progress.pop(key, None)
            self._acked = {k for k in self._acked if k[0] not in (run.id, f"{run.id}.rb")}
            for key in [k for k in self._sent if k[0] in (run.id, f"{run.id}.rb")]:
                del self._sent[key]

    # -- starting runs ---------------------------------------------------------------

    def _launch(self, record: dict[str, Any]) -> None:
        ec = self.ctx.config.environments.get(record["environment"])
        if ec is None or record["project"] not in self.ctx.config.projects:
            self.status(record["id"], "failed", "project or environment no longer configured")
            self.store.release_lock(record["project"], record["environment"],
                                    rollout_id=record["id"])
            return
        run = RolloutRun(self, record, Strategy.parse(record.get("strategy") or {}),
                         ec.request_timeout, ec.haproxy, ack_timeout=ec.ack_timeout)
        with self.cond:
            self.runs[run.id] = run
        run.thread.start()

    def resume(self) -> None:
        """Go on with every rollout the store says is not finished."""
        for record in self.store.active_rollouts():
            self.log.info("resuming rollout", rollout=record["id"], state=record["state"])
            self.store.audit(actor="orchestrator", action="resume", project=record["project"],
                             environment=record["environment"], rollout_id=record["id"])
            self._launch(record)

    # -- handlers --------------------------------------------------------------------

    def refuse(self, rollout: str, body: dict[str, Any], user: str, reason: str,
               signer: str | None = None) -> None:
        self.ctx.stats.incr("refused")
        self.log.warning("rollout refused", rollout=rollout, reason=reason)
        project, environment = str(body.get("project"))[:64], str(body.get("environment"))[:64]
        created = self.store.create_rollout(
            id=rollout, project=project, environment=environment,
            ref=str(body.get("ref"))[:200], user=user, hosts=[], state="refused", reason=reason)
        if not created:
            return  # a redelivery of a rollout we already decided on
        self.store.audit(actor=signer or user, action="refused", project=project,
                         environment=environment, rollout_id=rollout, reason=reason, user=user)
        self.send(topics.STATUS, "deploy.rollout.status",
                  {"rollout": rollout, "state": "refused", "reason": reason},
                  correlation=rollout)

    def on_rollout(self, env: Envelope, d: Delivery) -> None:
        try:
            self._on_rollout(env, d)
        except Exception as exc:
            # Whoever asked waits for a status: tell them, never leave them hanging.
            rollout = str(env.body.get("rollout") or env.correlation or env.id)[:64]
            self.log.exception("rollout handling failed", rollout=rollout)
            reason = f"orchestrator error: {type(exc).__name__}: {exc}"
            record = self.store.rollout(rollout)
            if record is None:
                self.refuse(rollout, env.body, str(env.body.get("user") or env.sender)[:128],
                            reason)
            elif record["state"] not in FINAL_STATES and rollout not in self.runs:
                self.status(rollout, "failed", reason)
                self.store.release_lock(record["project"], record["environment"],
                                        rollout_id=rollout)

    def _on_rollout(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        rollout = str(body.get("rollout") or env.correlation or env.id)[:64]
        user = str(body.get("user") or env.sender)[:128]
        signer = None
        try:
            rollout = check_name(rollout, "rollout id")
            project = check_name(body.get("project"), "project")
            environment = check_name(body.get("environment"), "environment")
            action = body.get("action") or "deploy"
            if action not in ("deploy", "rollback"):
                raise DeployBusError(f"unknown action {action!r:.40}")
            target = body.get("release")
            if action == "rollback":
                if target is not None:
                    check_name(target, "release")
                ref = f"rollback:{target or 'previous'}"
            else:
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
            overrides = body.get("strategy")
            if overrides is not None and not isinstance(overrides, dict):
                raise DeployBusError("strategy must be a mapping")
            strategy = Strategy.parse(ec.strategy, overrides)
            strategy.phases(hosts)
            override = body.get("override")
            outside = ec.windows.refusal(envelope.now()) if ec.windows else None
            if outside and not (isinstance(override, str) and override.strip()):
                raise DeployBusError(f"{environment} is closed for deploys: {outside}; "
                                     "an override needs a reason")
        except DeployBusError as exc:
            self.refuse(rollout, body, user, str(exc), signer)
            return
        if not self.store.create_rollout(id=rollout, project=project, environment=environment,
                                         ref=ref, user=user, hosts=hosts, action=action,
                                         target_release=target, strategy=strategy.to_dict(),
                                         override=override if outside else None):
            self.log.info("rollout already known; ignoring redelivery", rollout=rollout)
            return
        held = self.store.acquire_lock(project=project, environment=environment, owner=user,
                                       reason=f"rollout {rollout}: {ref}", ttl=LOCK_TTL,
                                       rollout_id=rollout)
        if held is not None:
            who = f"rollout {held['rollout']}" if held["rollout"] else "a manual lock"
            reason = (f"{project}/{environment} is locked by {who} (owner {held['owner']}, "
                      f"reason: {held['reason']}, since {held['acquired_at'][:19]}Z, "
                      f"expires {held['expires_at'][:19]}Z)")
            self.store.set_rollout(rollout, state="refused", reason=reason)
            self.store.audit(actor=signer, action="refused", project=project,
                             environment=environment, rollout_id=rollout, reason=reason,
                             user=user)
            self.send(topics.STATUS, "deploy.rollout.status",
                      {"rollout": rollout, "state": "refused", "reason": reason,
                       "lock": held}, correlation=rollout)
            self.log.warning("rollout refused: locked", rollout=rollout, holder=held)
            return
        self.store.audit(actor=signer, action="accepted", project=project,
                         environment=environment, rollout_id=rollout, user=user, ref=ref,
                         hosts=hosts, strategy=strategy.to_dict())
        if outside:
            self.store.audit(actor=signer, action="window-override", project=project,
                             environment=environment, rollout_id=rollout, user=user,
                             reason=override, window=outside)
            self.log.warning("deploy window overridden", rollout=rollout, reason=override,
                             window=outside, user=user)
        self.log.info("rollout accepted", rollout=rollout, project=project, ref=ref,
                      environment=environment, hosts=hosts, user=user, signer=signer)
        record = self.store.rollout(rollout)
        assert record is not None
        self._launch(record)

    def on_control(self, env: Envelope, _d: Delivery) -> None:
        """Pause, resume, promote or abort a rollout running here. Every
        control message gets a signed answer on ``deploy.status`` naming its
        id (``control_id``): ``control_done`` with what happened, or
        ``control_refused`` with why; ``deploybus pause|resume|promote|abort``
        waits for it."""
        body = env.body
        rollout, action = body.get("rollout"), body.get("action")
        user = str(body.get("user") or env.sender)[:128]
        record = None
        try:
            if not isinstance(rollout, str) or action not in CONTROL_ACTIONS:
                raise DeployBusError(f"a control message needs a rollout id and one of "
                                     f"{', '.join(CONTROL_ACTIONS)}")
            rollout = check_name(rollout, "rollout id")
            record = self.store.rollout(rollout)
            if record is None:
                raise DeployBusError(f"no rollout {rollout!r} is known")
            signer = self.verifier.verify(env, project=record["project"],
                                          environment=record["environment"])
            run = self.runs.get(rollout)
            if run is None:
                raise DeployBusError(f"rollout {rollout} is {record['state']}; only a running "
                                     f"or paused rollout can be steered")
        except DeployBusError as exc:
            self.log.warning("control refused", rollout=rollout, action=action, reason=str(exc))
            if isinstance(rollout, str) and rollout:
                self.send(topics.STATUS, "deploy.rollout.status",
                          {"rollout": rollout[:64],
                           "state": record["state"] if record else "unknown",
                           "control": str(action)[:16], "control_id": env.id,
                           "control_refused": str(exc)}, correlation=rollout[:64])
            return
        done = run.control(action, user)
        self.store.audit(actor=signer, action=action, project=record["project"],
                         environment=record["environment"], rollout_id=rollout, user=user)
        self.store.add_log(rollout, "-", "control", f"{action} by {user}: {done}")
        self.log.info("rollout control", rollout=rollout, action=action, user=user, done=done)
        self.send(topics.STATUS, "deploy.rollout.status",
                  {"rollout": rollout, "state": record["state"], "control": action,
                   "control_id": env.id, "control_done": done}, correlation=rollout)

    def on_event(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        rollout, host = body.get("rollout"), body.get("host")
        if not isinstance(rollout, str) or not isinstance(host, str):
            return
        key = (rollout, host)
        if env.type == "deploy.progress":
            with self.cond:
                if key in self._progress:
                    self._progress[key] = time.monotonic()
                if key in self._expected:
                    self._acked.add(key)
                    self.cond.notify_all()
        if env.type == "deploy.progress" or "entries" in body:
            # a result may carry the deploy's last progress entries
            self.store.add_logs(rollout.removesuffix(".rb"), host,
                                [(str(e.get("step", ""))[:32], _log_text(e))
                                 for e in envelope.progress_entries(body)])
        if env.type == "deploy.result":
            with self.cond:
                if body.get("status") == "refused" and body.get("request_id") not in (
                        None, self._sent.get(key, body.get("request_id"))):
                    return  # the refusal of a request since asked anew
                if key in self._expected:
                    self._results.setdefault(key, body)
                    self.cond.notify_all()

    def on_presence(self, env: Envelope, _d: Delivery) -> None:
        host, daemon = env.body.get("host"), env.body.get("daemon", "keepalive")
        if not isinstance(host, str) or daemon not in PRESENCE_DAEMONS:
            raise DeployBusError(f"presence needs a host and one of {PRESENCE_DAEMONS} as "
                                 f"daemon, got {daemon!r:.40}")
        self.store.record_presence(check_name(host, "host"), env.body, daemon=daemon)
