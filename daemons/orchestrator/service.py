"""The orchestrator service.

It takes ``deploy.rollout`` messages signed by a person, web or CI key and
checks them: the signer's policy, project, environment, hosts, strategy,
the environment's deploy windows (an override needs a reason and is
audited) and the lock (one rollout per project and environment; a refusal
names the holder). A deploy's ref is resolved once, on the project's git
server, to a full commit id (a tag or a branch, never both); the requests
carry and sign that commit. An accepted rollout is recorded in the store and
run by a :class:`~deploybus.daemons.orchestrator.rollout.RolloutRun` in a
thread of its own. Signed ``deploy.control`` messages pause, resume, promote
or abort it, and are answered. Agents' progress and results arrive on
``deploy.events``, each signed by the key of the host it names and counted
only if it answers a request this orchestrator sent (:mod:`.mailbox`);
presence on ``presence``, signed by its host. On start it resumes every
rollout the store says is not finished.

Messages that are not signed by a trusted key of the right role never get
here (the dispatcher dead-letters them), so nothing is stored or audited
under a name a message chose. Because windows and locks are checked here,
on the one path every rollout takes, no front end can bypass them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from deploybus import gitutil, protocol, topics
from deploybus.bus import Delivery
from deploybus.bus.base import Backoff
from deploybus.daemons.orchestrator.autodeploy import AutoDeploy
from deploybus.daemons.orchestrator.mailbox import Key, Mailbox
from deploybus.daemons.orchestrator.rollout import RolloutRun
from deploybus.dispatch import Dispatcher, Message
from deploybus.envelope import now
from deploybus.errors import BusError, DeployBusError
from deploybus.plan import plan
from deploybus.protocol import (
    Action,
    Control,
    ControlAction,
    DeployRequest,
    Progress,
    Result,
    RolloutRequest,
    RolloutState,
    RolloutStatus,
)
from deploybus.refs import check_ref
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.signing import Signer
from deploybus.states import FINAL_STATES
from deploybus.store import Store
from deploybus.strategy import Strategy

#: How long a rollout's lock lasts if the rollout never releases it.
LOCK_TTL = 6 * 3600


class Orchestrator(Service):
    """See the module docstring."""

    name = "orchestrator"

    def __init__(self, ctx: Context, store: Store | None = None) -> None:
        super().__init__(ctx)
        self.store = store or Store(ctx.config.state_url)
        self.verifier = ctx.config.verifier()
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats,
                                     verifier=self.verifier)
        self.cond = threading.Condition()
        self.mailbox = Mailbox(self.cond)
        self.autodeploy = AutoDeploy(self)
        self.stopping = threading.Event()
        self.runs: dict[str, RolloutRun] = {}

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
        ons = {ec.auto_deploy.on for ec in self.ctx.config.environments.values()
               if ec.auto_deploy is not None}
        if "ci_success" in ons:
            self.dispatcher.subscribe(topics.CI_EVENTS,
                                      lambda msg, _d: self.autodeploy.on_ci_build(msg),
                                      queue=topics.ORCHESTRATOR_CI, types={"ci.build"})
        if "push" in ons:
            self.dispatcher.subscribe(topics.GIT_COMMITS,
                                      lambda msg, _d: self.autodeploy.on_push(msg),
                                      queue=topics.ORCHESTRATOR_PUSHES,
                                      types={"git.push", "svn.commit"})

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.dispatcher.close(timeout)
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for run in list(self.runs.values()):
            run.thread.join(timeout)

    # -- shared with the runs --------------------------------------------------------

    def send(self, topic: str, body: protocol.Body, *, correlation: str,
             ttl: float | None = None) -> None:
        """Sign and publish; while the broker is away, keep trying (with capped
        backoff) for as long as the orchestrator runs: a rollout outlives a
        broker restart."""
        raw = protocol.seal(body, key=self.ctx.signing_key, sender=self.ctx.sender,
                            correlation=correlation, ttl=ttl)
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

    def send_requests(self, requests: list[DeployRequest], *, ttl: float,
                      before: Callable[[list[str]], None] | None = None) -> list[str]:
        """Sign and publish deploy requests as one batch (one broker round trip
        on AMQP); retried whole, like :meth:`send`, while the broker is away.
        A request the broker had already taken before a failure may go out
        twice: agents answer a repeated request from their journal. Each try
        signs the requests anew, so that their time to live starts when they
        go out: a request kept through a long broker outage would otherwise
        arrive expired. ``before`` is called with each try's ids before it
        goes out, so that an answer that comes back at once finds them
        recorded. Returns the ids of the requests that went out."""
        backoff = Backoff(initial=0.5, cap=10.0, stop=self.stopping)
        while True:
            envs = [protocol.sign(r, key=self.ctx.signing_key, sender=self.ctx.sender,
                                  correlation=r.rollout, ttl=ttl) for r in requests]
            if before is not None:
                before([env.id for env in envs])
            try:
                self.ctx.bus.publish_batch([(topics.requests_for(r.host), env.encode())
                                            for r, env in zip(requests, envs, strict=True)])
                return [env.id for env in envs]
            except BusError as exc:
                self.log.warning("batch publish failed; retrying", count=len(envs),
                                 error=str(exc), retry_in=round(backoff.delay, 1))
                if not backoff.wait():
                    raise

    def status(self, rollout: str, state: RolloutState, reason: str | None = None,
               **extra: Any) -> None:
        """Record a rollout's new state and tell whoever watches."""
        self.store.set_rollout(rollout, state=state, reason=reason)
        self.send(topics.STATUS, RolloutStatus(rollout=rollout, state=state, reason=reason,
                                               **extra), correlation=rollout)
        self.log.info(f"rollout {state}", rollout=rollout, reason=reason)

    def finished(self, run: RolloutRun) -> None:
        self.store.release_lock(run.project, run.environment, rollout_id=run.id)
        with self.cond:
            self.runs.pop(run.id, None)
        self.mailbox.forget(run.id)

    # -- starting runs ---------------------------------------------------------------

    def _launch(self, record: dict[str, Any]) -> None:
        ec = self.ctx.config.environments.get(record["environment"])
        if ec is None or record["project"] not in self.ctx.config.projects:
            self.status(record["id"], RolloutState.FAILED,
                        "project or environment no longer configured")
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

    @staticmethod
    def requester(body: RolloutRequest | Control, signer: Signer) -> str:
        """Who a rollout or control is recorded for: a person's own key
        speaks for that person; the web and CI speak for the user they name."""
        if signer.role is protocol.Role.PERSON or body.user == signer.name:
            return signer.name
        return f"{body.user} (via {signer.name})"[:128]

    def refuse(self, rollout: str, *, project: str, environment: str, ref: str, user: str,
               reason: str, actor: str) -> None:
        """A rollout from a trusted key (or the orchestrator's own auto-deploy)
        that cannot run: recorded, audited under ``actor``, answered."""
        self.ctx.stats.incr("refused")
        self.log.warning("rollout refused", rollout=rollout, reason=reason)
        created = self.store.create_rollout(id=rollout, project=project,
                                            environment=environment, ref=ref, user=user,
                                            hosts=[], state="refused", reason=reason)
        if not created:
            return  # a redelivery of a rollout we already decided on
        self.store.audit(actor=actor, action="refused", project=project,
                         environment=environment, rollout_id=rollout, reason=reason,
                         user=user)
        self.send(topics.STATUS, RolloutStatus(rollout=rollout, state=RolloutState.REFUSED,
                                               reason=reason), correlation=rollout)

    def on_rollout(self, msg: Message, _d: Delivery) -> None:
        body = msg.body
        assert isinstance(body, RolloutRequest)
        user = self.requester(body, msg.signer)
        try:
            self._on_rollout(msg, body, user)
        except Exception as exc:
            # Whoever asked waits for a status: tell them, never leave them hanging.
            self.log.exception("rollout handling failed", rollout=body.rollout)
            reason = f"orchestrator error: {type(exc).__name__}: {exc}"
            record = self.store.rollout(body.rollout)
            if record is None:
                self.refuse(body.rollout, project=body.project, environment=body.environment,
                            ref=body.ref or "rollback", user=user, reason=reason,
                            actor=msg.signer.name)
            elif record["state"] not in FINAL_STATES and body.rollout not in self.runs:
                self.status(body.rollout, RolloutState.FAILED, reason)
                self.store.release_lock(record["project"], record["environment"],
                                        rollout_id=body.rollout)

    def _check(self, msg: Message, body: RolloutRequest) -> tuple[list[str], Strategy,
                                                                  str | None, str, str | None]:
        """Everything a rollout must pass before it is recorded; returns its
        hosts, strategy, the window it overrides, its ref and its commit.
        Raises DeployBusError with the reason to refuse it."""
        self.verifier.admit(msg.env, msg.signer, project=body.project,
                            environment=body.environment)
        planned = plan(self.ctx.config, project=body.project, environment=body.environment,
                       hosts=body.hosts,
                       strategy=protocol.to_dict(body.strategy) if body.strategy else None)
        ec, hosts, strategy = planned.environment, planned.hosts, planned.strategy
        pc = self.ctx.config.projects[body.project]
        outside = ec.windows.refusal(now()) if ec.windows else None
        if outside and not (body.override and body.override.strip()):
            raise DeployBusError(f"{body.environment} is closed for deploys: {outside}; "
                                 "an override needs a reason")
        if body.action is Action.ROLLBACK:
            return hosts, strategy, outside, f"rollback:{body.release or 'previous'}", None
        if body.ref is None:
            raise DeployBusError("a deploy needs a ref")
        refname, commit = gitutil.resolve_remote(pc.git, check_ref(body.ref))
        return hosts, strategy, outside, refname, commit

    def _on_rollout(self, msg: Message, body: RolloutRequest, user: str) -> None:
        try:
            hosts, strategy, outside, ref, commit = self._check(msg, body)
        except DeployBusError as exc:
            self.refuse(body.rollout, project=body.project, environment=body.environment,
                        ref=body.ref or f"rollback:{body.release or 'previous'}", user=user,
                        reason=str(exc), actor=msg.signer.name)
            return
        self.accept(body.rollout, project=body.project, environment=body.environment,
                    ref=ref, commit=commit, hosts=hosts, strategy=strategy, action=body.action,
                    target_release=body.release, user=user, actor=msg.signer.name,
                    override=body.override if outside else None, window=outside)

    def accept(self, rollout: str, *, project: str, environment: str, ref: str,
               commit: str | None, hosts: list[str], strategy: Strategy, action: Action,
               user: str, actor: str, target_release: str | None = None,
               override: str | None = None, window: str | None = None,
               **audit: Any) -> bool:
        """Record a checked rollout and run it, unless its id is known (a
        redelivery: False) or its project and environment are locked
        (refused, naming the holder: False). ``audit`` goes into the audit
        entry (an auto-deploy names its build)."""
        if not self.store.create_rollout(id=rollout, project=project, environment=environment,
                                         ref=ref, user=user, hosts=hosts, action=action,
                                         target_release=target_release, commit=commit,
                                         strategy=strategy.to_dict(), override=override):
            self.log.info("rollout already known; ignoring redelivery", rollout=rollout)
            return False
        held = self.store.acquire_lock(project=project, environment=environment, owner=user,
                                       reason=f"rollout {rollout}: {ref}", ttl=LOCK_TTL,
                                       rollout_id=rollout)
        if held is not None:
            who = f"rollout {held['rollout']}" if held["rollout"] else "a manual lock"
            reason = (f"{project}/{environment} is locked by {who} (owner {held['owner']}, "
                      f"reason: {held['reason']}, since {held['acquired_at'][:19]}Z, "
                      f"expires {held['expires_at'][:19]}Z)")
            self.store.set_rollout(rollout, state="refused", reason=reason)
            self.store.audit(actor=actor, action="refused", project=project,
                             environment=environment, rollout_id=rollout, reason=reason,
                             user=user, **audit)
            self.send(topics.STATUS, RolloutStatus(rollout=rollout, state=RolloutState.REFUSED,
                                                   reason=reason, lock=held),
                      correlation=rollout)
            self.log.warning("rollout refused: locked", rollout=rollout, holder=held)
            return False
        self.store.audit(actor=actor, action="accepted", project=project,
                         environment=environment, rollout_id=rollout, user=user, ref=ref,
                         commit=commit, hosts=hosts, strategy=strategy.to_dict(), **audit)
        if override:
            self.store.audit(actor=actor, action="window-override", project=project,
                             environment=environment, rollout_id=rollout, user=user,
                             reason=override, window=window)
            self.log.warning("deploy window overridden", rollout=rollout, reason=override,
                             window=window, user=user)
        self.log.info("rollout accepted", rollout=rollout, project=project, ref=ref,
                      commit=commit, environment=environment, hosts=hosts, user=user,
                      actor=actor)
        record = self.store.rollout(rollout)
        assert record is not None
        self._launch(record)
        return True

    def on_control(self, msg: Message, _d: Delivery) -> None:
        """Pause, resume, promote or abort a rollout running here. Every
        control message from a trusted key gets a signed answer on
        ``deploy.status`` naming its id (``control_id``): ``control_done``
        with what happened, or ``control_refused`` with why; ``deploybus
        pause|resume|promote|abort`` waits for it."""
        body = msg.body
        assert isinstance(body, Control)
        rollout, action = body.rollout, body.action
        user = self.requester(body, msg.signer)
        record = self.store.rollout(rollout)
        try:
            if record is None:
                raise DeployBusError(f"no rollout {rollout!r} is known")
            self.verifier.admit(msg.env, msg.signer, project=record["project"],
                                environment=record["environment"])
            run = self.runs.get(rollout)
            if run is None:
                raise DeployBusError(f"rollout {rollout} is {record['state']}; only a running "
                                     f"or paused rollout can be steered")
        except DeployBusError as exc:
            self.log.warning("control refused", rollout=rollout, action=action, reason=str(exc))
            self.send(topics.STATUS, RolloutStatus(
                rollout=rollout, state=RolloutState(record["state"]) if record else None,
                control=action, control_id=msg.env.id, control_refused=str(exc)),
                correlation=rollout)
            return
        done = run.control(action, user)
        self.store.audit(actor=msg.signer.name, action=action, project=record["project"],
                         environment=record["environment"], rollout_id=rollout, user=user)
        self.store.add_log(rollout, "-", "control", f"{action} by {user}: {done}")
        self.log.info("rollout control", rollout=rollout, action=action, user=user, done=done)
        self.send(topics.STATUS, RolloutStatus(
            rollout=rollout, state=RolloutState(record["state"]), control=ControlAction(action),
            control_id=msg.env.id, control_done=done), correlation=rollout)

    def on_event(self, msg: Message, _d: Delivery) -> None:
        """Progress and results, signed by the host they name (the dispatcher
        saw to that); kept only if they answer a request we sent."""
        body = msg.body
        assert isinstance(body, Progress | Result)
        key = Key(body.rollout, body.host, body.undo)
        if isinstance(body, Progress):
            ours = self.mailbox.progress(key, body.request_id)
        else:
            ours = self.mailbox.result(key, body)
        if not ours:
            self.ctx.stats.incr("unasked_answers")
            self.log.warning("answer to no request of ours; ignored", type=msg.env.type,
                             rollout=body.rollout, host=body.host, request=body.request_id)
            return
        if body.entries:
            # a result may carry the deploy's last progress entries
            self.store.add_logs(body.rollout, body.host,
                                [(e.step, _log_text(e)) for e in body.entries])

    def on_presence(self, msg: Message, _d: Delivery) -> None:
        body = msg.body
        assert isinstance(body, protocol.Presence)
        self.store.record_presence(body.host, protocol.to_dict(body), daemon=body.daemon)


def _log_text(entry: protocol.ProgressEntry) -> str:
    text = entry.message
    if entry.lines:
        text += "\n" + "\n".join(entry.lines)
    return text
