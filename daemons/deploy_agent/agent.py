"""The deploy agent service: takes ``deploy.request`` messages for its host.

The dispatcher hands it only well-formed requests signed by an orchestrator
key. For each, on the transport's thread: if the request is already in the
journal, answer from there (a redelivery or a repeat never deploys twice);
otherwise check it (:mod:`.intake`: fresh, not a replay, allowed, for this
host and a project it serves) and refuse with a reported reason if it
fails. An accepted request is written to the journal (fsynced),
acknowledged on the bus at once, and queued, and the handler returns, so
the broker gets its ack within milliseconds however long the deploy takes
(RabbitMQ's consumer_timeout never fires, and an acked request is never
redelivered).

Workers (:mod:`.workers`) run each project's requests one after another
(:mod:`.steps`); the outcome replaces the journal entry (``done``) and goes
out as a signed ``deploy.result`` through the outbox (:mod:`.outbox`),
which never lets a slow or absent broker stall a deploy.

On start, before subscribing, every journal entry a killed agent left
unfinished is queued for recovery: reported failed ("interrupted: agent
restarted during <step>"), its orphaned script killed, its partial release
removed, ``current`` switched back if it had moved. Every accepted, refused
or repeated request is written once to the audit log
``<state_dir>/audit.jsonl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deploybus import envelope, gitutil, protocol, topics
from deploybus.bus import Delivery
from deploybus.daemons.deploy_agent import steps
from deploybus.daemons.deploy_agent.intake import AuditLog, Intake
from deploybus.daemons.deploy_agent.journal import ACCEPTED, DONE, RUNNING, Journal
from deploybus.daemons.deploy_agent.outbox import Outbox
from deploybus.daemons.deploy_agent.workers import Job, JournalTracker, Workers
from deploybus.dispatch import Dispatcher, Message
from deploybus.errors import BusError, DeployBusError, LapsedError
from deploybus.heartbeat import Heartbeat
from deploybus.protocol import DeployRequest, Failure, Result
from deploybus.runner import STOP_GRACE, Context, Service

#: What a failed deploy's last step says about why it failed.
FAILURE_AT_STEP = {"fetch": Failure.FETCH, "pre": Failure.SCRIPT, "post": Failure.SCRIPT,
                   "post_switch": Failure.SCRIPT, "checkout": Failure.CHECKOUT,
                   "shared": Failure.CHECKOUT, "health": Failure.HEALTH,
                   "switch": Failure.SWITCH}

#: The fields a result body may have on the bus.
RESULT_FIELDS = frozenset(Result.__struct_fields__)


def journal_key(rollout: str, undo: bool) -> str:
    """The journal's name for a request: its rollout, or, for the rollback
    that undoes that rollout on this host, a name of its own."""
    return f"{rollout}.undo" if undo else rollout


def _now() -> str:
    return envelope.fmt_time(envelope.now())


class DeployAgent(Service):
    """See the module docstring."""

    name = "deploy_agent"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        hc = ctx.config.host(ctx.host)
        self.root, self.state_dir = hc.root, hc.state_dir
        self.journal = Journal(self.state_dir / "journal")
        self.verifier = ctx.config.verifier(replay_path=None)
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats,
                                     verifier=self.verifier)
        self.intake = Intake(ctx.config, ctx.host, self.verifier)
        self.audit_log = AuditLog(self.state_dir / "audit.jsonl")
        self.outbox = Outbox(self.publish, sent=self._mark_sent, log=self.log, stats=ctx.stats)
        self.workers = Workers(execute=self._execute, finish=self._finish,
                               progress=self._progress, log=self.log)
        # The agent's own presence: liveness says "agent down" when it stops.
        self.heartbeat = Heartbeat(ctx, "agent", interval=hc.heartbeat,
                                   extra=lambda: {"deploying": self.workers.running()},
                                   log=self.log)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.ctx.signing_key is None:
            raise DeployBusError(f"the agent of {self.ctx.host} needs a key to sign its "
                                 f"results: hosts.{self.ctx.host}.signing or keys.signing")
        gitutil.no_prompts()
        self.journal.ensure()
        self.root.mkdir(parents=True, exist_ok=True)
        from deploybus.signing import ReplayCache
        self.verifier.replay = ReplayCache(self.state_dir / "seen.jsonl")
        self.outbox.start()
        self.workers.start()
        self.recover()
        self.dispatcher.subscribe(topics.requests_for(self.ctx.host), self.on_request,
                                  queue=topics.agent_queue(self.ctx.host),
                                  types={"deploy.request"}, prefetch=1)
        self.heartbeat.start()
        self.log.info("agent ready", root=str(self.root), state_dir=str(self.state_dir))

    def recover(self) -> None:
        """Queue what a killed agent left unfinished; resend unpublished results."""
        pruned = self.journal.prune()
        if pruned:
            self.log.info("old journal entries removed", count=len(pruned))
        for key, entry in self.journal.entries():
            state = entry.get("state")
            if state in (ACCEPTED, RUNNING):
                self.log.warning("interrupted request found; recovering", request=key,
                                 state=state, step=entry.get("step"))
                self.workers.enqueue(Job(key, entry, recover=True))
            elif state == DONE and not entry.get("published"):
                self.outbox.result(key, Job(key, entry).base | (entry.get("result") or {}))

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Stop taking requests, let running deploys finish within ``timeout``,
        report queued ones as not started, send what is left to send."""
        deadline = time.monotonic() + timeout
        self.heartbeat.stop()
        self.dispatcher.close(timeout)
        still = self.workers.stop(deadline)
        if still:
            self.log.warning("deploys still running at stop; the next start recovers them",
                             projects=still)
        self.outbox.stop(max(1.0, deadline - time.monotonic()))
        gitutil.close_resolvers()

    def healthy(self) -> bool:
        return self.outbox.alive() and self.heartbeat.alive()

    # -- what goes out --------------------------------------------------------------------

    def publish(self, type: str, body: dict[str, Any]) -> None:
        """Sign and publish a progress or result body now, on the calling
        thread (raises BusError)."""
        if type == "deploy.result":
            dropped = set(body) - RESULT_FIELDS
            if dropped:
                self.log.warning("result fields not sent", fields=sorted(dropped))
            body = {k: v for k, v in body.items() if k in RESULT_FIELDS}
        typed = protocol.parse(type, {**body, "host": self.ctx.host})
        self.ctx.bus.publish(topics.EVENTS, protocol.seal(
            typed, key=self.ctx.signing_key, sender=self.ctx.sender,
            correlation=str(body.get("rollout"))))

    def _mark_sent(self, key: str) -> None:
        entry = self.journal.get(key)
        if entry is not None and entry.get("state") == DONE:
            entry["published"] = True
            try:
                self.journal.write(key, entry, sync=False)
            except OSError as exc:  # sent anyway; at worst sent again after a restart
                self.log.warning("could not mark result sent", request=key, error=str(exc))

    def _progress(self, job: Job) -> steps.Progress:
        def progress(step: str, message: str, lines: list[str] | None) -> None:
            job.last_progress = time.monotonic()
            self.outbox.progress(job.key, job.base | {"entries": [
                {"step": step, "message": message, "lines": lines or [], "at": _now()}]})
        return progress

    def acknowledge(self, job: Job, message: str) -> None:
        """Tell the orchestrator at once that the request is here: it fails a
        host whose agent stays silent for the environment's ack_timeout.
        Sent now rather than through the outbox (which holds progress back
        to batch it); if the bus refuses, the outbox keeps it and tries again
        with the results (unless the result goes first: it says more)."""
        body = job.base | {"entries": [{"step": "accepted", "message": message, "lines": [],
                                        "at": _now()}]}
        try:
            self.publish("deploy.progress", body)
        except BusError as exc:
            self.log.warning("acknowledgement not sent; will retry", rollout=job.rollout,
                             error=str(exc))
            self.outbox.ack(job.key, body)

    # -- the request ---------------------------------------------------------------------------

    def on_request(self, msg: Message, _d: Delivery) -> None:
        body = msg.body
        assert isinstance(body, DeployRequest)
        key = journal_key(body.rollout, body.undo)
        earlier = self.journal.get(key)
        if earlier is not None:
            self.answer_from_journal(msg, key, earlier)
            return
        try:
            entry = self.intake.check(msg)
        except DeployBusError as exc:
            # lapsed: it waited too long (a broker outage, say); its sender may ask anew
            self.refuse(msg, str(exc), lapsed=isinstance(exc, LapsedError))
            return
        try:
            self.journal.write(key, entry)
        except OSError as exc:
            self.refuse(msg, f"cannot record the request: {exc}")
            return
        req = entry["request"]
        self.audit_log.write(msg, "accepted", rollout=body.rollout, action=body.action.value,
                             undo=body.undo, project=body.project,
                             environment=body.environment, ref=body.ref, commit=body.commit,
                             release=body.release, user=body.user)
        self.log.info(f"{body.action} accepted", rollout=body.rollout, project=body.project,
                      ref=body.ref, commit=body.commit, release=body.release, user=req["user"],
                      signer=msg.signer.name)
        job = Job(key, entry)
        ahead = self.workers.ahead_of(job.project)
        self.acknowledge(job, f"accepted; waiting for {', '.join(ahead)} to finish" if ahead
                         else "accepted")
        self.workers.enqueue(job)

    def answer_from_journal(self, msg: Message, key: str, entry: dict[str, Any]) -> None:
        """A request this agent already has: never run it again. The answer
        names the request it answers (the orchestrator counts only answers
        to requests it sent)."""
        body = msg.body
        assert isinstance(body, DeployRequest)
        refusal = self.intake.same_request(msg, entry)
        if refusal is not None:
            self.refuse(msg, refusal)
            return
        state = entry.get("state")
        self.audit_log.write(msg, "duplicate", rollout=body.rollout, state=state,
                             status=(entry.get("result") or {}).get("status"))
        job = Job(key, entry)
        if state == DONE:
            result = entry.get("result") or {}
            self.log.info("request already handled; answering from journal",
                          rollout=body.rollout, id=msg.env.id, status=result.get("status"))
            self.publish("deploy.result", result | {"request_id": msg.env.id,
                                                    "duplicate": True})
        else:
            self.log.info("request already accepted and in progress; not running it again",
                          rollout=body.rollout, id=msg.env.id, state=state)
            # the running job's progress and result answer this request now:
            # the orchestrator that sent it (restarted) knows no other id
            if not self.workers.readdress(key, msg.env.id):
                # it finished meanwhile: its result is in the journal now
                entry = self.journal.get(key) or entry
                if entry.get("state") == DONE:
                    self.publish("deploy.result", (entry.get("result") or {})
                                 | {"request_id": msg.env.id, "duplicate": True})
                    return
            job.base["request_id"] = msg.env.id
            self.acknowledge(job, "already accepted; in progress")

    def refuse(self, msg: Message, reason: str, *, lapsed: bool = False) -> None:
        """Tell the orchestrator (whose key signed the request) why it will not
        run here."""
        body = msg.body
        assert isinstance(body, DeployRequest)
        self.ctx.stats.incr("refused")
        self.log.warning("deploy request refused", rollout=body.rollout, id=msg.env.id,
                         reason=reason)
        self.audit_log.write(msg, "refused", rollout=body.rollout, reason=reason)
        self.publish("deploy.result", {
            "rollout": body.rollout, "request_id": msg.env.id, "status": "refused",
            "failure": (Failure.LAPSED if lapsed else Failure.REFUSED).value,
            "reason": reason[:4000], "action": body.action.value, "undo": body.undo,
            "project": body.project, "environment": body.environment, "ref": body.ref}
            | ({"lapsed": True} if lapsed else {}))

    # -- the work ------------------------------------------------------------------------------

    def _execute(self, job: Job) -> dict[str, Any]:
        entry = job.entry
        req_d = entry.get("request") or {}
        pc = self.ctx.config.projects.get(job.project)
        where = {"root": self.root, "state_dir": self.state_dir, "host": self.ctx.host,
                 "progress": self._progress(job)}
        if job.recover:
            return steps.recover(entry, pc, **where) | {"failure": Failure.INTERRUPTED.value}
        if pc is None:
            return {"status": "failed", "failure": Failure.AGENT_ERROR.value,
                    "reason": f"project {job.project!r} is no longer configured on this host"}
        req = steps.Request(rollout=job.rollout, project=job.project,
                            environment=str(req_d.get("environment")),
                            ref=str(req_d.get("ref") or ""), user=str(req_d.get("user")),
                            action=str(entry.get("action") or "deploy"),
                            release=req_d.get("release"), commit=req_d.get("commit"))
        tracker = JournalTracker(self.journal, job.key, entry)
        run: Callable[..., dict[str, Any]] = \
            steps.rollback if req.action == "rollback" else steps.deploy
        return run(req, pc, tracker=tracker, **where)

    def _finish(self, job: Job, result: dict[str, Any]) -> None:
        result = job.base | result
        if result.get("status") == "succeeded":
            result.pop("failure", None)
        elif "failure" not in result:
            default = Failure.SWITCH if result.get("action") == "rollback" \
                else Failure.AGENT_ERROR
            result["failure"] = FAILURE_AT_STEP.get(str(job.entry.get("step")), default).value
        entry = job.entry
        entry.pop("script", None)
        entry.update(state=DONE, result=result, published=False, finished=_now())
        self.journal.write(job.key, entry)
        self.log.info(f"{result.get('action')} finished", rollout=job.rollout,
                      status=result["status"], release=result.get("release"),
                      reason=result.get("reason"))
        self.outbox.result(job.key, result)
