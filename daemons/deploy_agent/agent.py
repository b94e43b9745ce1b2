"""The deploy agent service: takes signed ``deploy.request`` messages for its host.

For each request, on the transport's thread: check who signed it; if this
rollout is already in the journal, answer with the earlier result (a
redelivery or a replay never deploys twice); otherwise check freshness,
replay, policy, project, environment, host and ref, and refuse with a
reported reason if any fails. An accepted request is written to the journal
(fsynced) and queued, and the handler returns, so the broker gets its ack
within milliseconds however long the deploy takes (RabbitMQ's
consumer_timeout never fires, and an acked request is never redelivered).

Each project has a worker thread that runs its requests one after another
(:mod:`.steps`); different projects deploy at the same time. The outcome
replaces the journal entry (``done``) and is published as ``deploy.result``;
progress goes out as ``deploy.progress`` on the way. An outbox thread does
the publishing, so a slow or absent broker never stalls a deploy: progress
is dropped when it cannot be sent, results are kept in the journal and sent
again until the broker takes them.

On start, before subscribing, every journal entry a killed agent left
unfinished is queued for recovery: reported failed ("interrupted: agent
restarted during <step>"), its orphaned script killed, its partial release
removed, ``current`` switched back if it had moved. A warm stop lets the
running deploys finish (within the stop grace) and reports queued ones as
not started. Every accepted, refused or duplicate request is written once
to the audit log ``<state_dir>/audit.jsonl``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from deploybus import envelope, gitutil, topics
from deploybus.bus import Delivery
from deploybus.daemons.deploy_agent import steps
from deploybus.daemons.deploy_agent.journal import ACCEPTED, DONE, RUNNING, Journal
from deploybus.dispatch import Dispatcher
from deploybus.envelope import Envelope
from deploybus.errors import BusError, DeployBusError, LapsedError
from deploybus.heartbeat import Heartbeat
from deploybus.refs import check_name, check_ref
from deploybus.runner import STOP_GRACE, Context, Service

#: Result and progress messages expire after this many seconds.
EVENT_TTL = 24 * 3600

#: Actions a deploy.request may ask for.
ACTIONS = ("deploy", "rollback")

#: Seconds between attempts to publish results the broker did not take.
RETRY_INTERVAL = 5.0

#: A running deploy that has sent no progress for this long sends a "still
#: working" line, so a watcher (the orchestrator's stuck threshold) can tell a
#: slow step (a big fetch or checkout, a quiet script) from a dead agent.
HEARTBEAT = 15.0

#: Steps whose journal record is fsynced (accepted and done always are).
SYNCED_STEPS = frozenset({"switch"})

#: Progress messages waiting for the broker beyond this are dropped.
OUTBOX_LIMIT = 1000

#: Progress of one deploy within this many seconds goes out as one message...
PROGRESS_LINGER = 0.5
#: ...of at most this many entries.
PROGRESS_BATCH = 50


def _now() -> str:
    return envelope.fmt_time(envelope.now())


class _JournalTracker(steps.Tracker):
    """Writes each step (and the running script's process group) to the journal."""

    def __init__(self, journal: Journal, rollout: str, entry: dict[str, Any]) -> None:
        self.journal, self.rollout, self.entry = journal, rollout, entry

    def step(self, step: str, *, lazy: bool = False, **fields: Any) -> None:
        self.entry.update(fields)
        self.entry.update(state=RUNNING, step=step, step_at=_now())
        if lazy:
            return  # written with the next record (see steps.Tracker.step)
        # Every write survives the agent being killed (rename); the one before
        # the switch must also survive a power cut, so that recovery knows the
        # release it may have to switch back from.
        self.journal.write(self.rollout, self.entry, sync=step in SYNCED_STEPS)

    def script(self, pgid: int | None, start: int | None) -> None:
        if pgid is None:
            # Forgotten with the next write, not written now: a record left
            # behind is harmless, since recovery kills a group only while
            # it is still the one recorded (leader's start time).
            self.entry.pop("script", None)
        else:
            self.entry["script"] = {"pgid": pgid, "start": start}
            self.journal.write(self.rollout, self.entry, sync=False)


class _Job:
    def __init__(self, rollout: str, entry: dict[str, Any], *, recover: bool = False) -> None:
        self.rollout, self.entry, self.recover = rollout, entry, recover
        self.last_progress = time.monotonic()
        self.started = time.monotonic()
        req = entry.get("request") or {}
        self.project = str(req.get("project"))
        self.base = {"project": self.project, "environment": req.get("environment"),
                     "ref": req.get("ref"), "action": entry.get("action") or "deploy",
                     "request_id": req.get("id")}


class DeployAgent(Service):
    """See the module docstring."""

    name = "deploy_agent"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        hc = ctx.config.host(ctx.host)
        self.root, self.state_dir = hc.root, hc.state_dir
        self.journal = Journal(self.state_dir / "journal")
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats)
        self.verifier: Any = None
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._running: dict[str, _Job] = {}
        self._stopping = False
        self._outbox: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue()
        self._unpublished: dict[str, dict[str, Any]] = {}
        # acknowledgements the bus refused, sent again with the results
        self._unsent_acks: dict[str, dict[str, Any]] = {}
        self._publisher = threading.Thread(target=self._publish_loop, daemon=True,
                                           name="agent-outbox")
        self._ticker = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                        name="agent-ticker")
        # The agent's own presence: liveness says "agent down" when it stops.
        self.heartbeat = Heartbeat(ctx, "agent", interval=hc.heartbeat, extra=self._busy,
                                   log=self.log)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        gitutil.no_prompts()
        self.journal.ensure()
        self.root.mkdir(parents=True, exist_ok=True)
        self.verifier = self.ctx.config.verifier(replay_path=self.state_dir / "seen.jsonl")
        self._publisher.start()
        self._ticker.start()
        self.recover()
        self.dispatcher.subscribe(topics.requests_for(self.ctx.host), self.on_request,
                                  queue=topics.agent_queue(self.ctx.host),
                                  types={"deploy.request"}, prefetch=1)
        self.heartbeat.start()
        self.log.info("agent ready", root=str(self.root), state_dir=str(self.state_dir))

    def _busy(self) -> dict[str, Any]:
        with self._cond:
            return {"deploying": {p: j.rollout for p, j in self._running.items()}}

    def recover(self) -> None:
        """Queue what a killed agent left unfinished; resend unpublished results."""
        pruned = self.journal.prune()
        if pruned:
            self.log.info("old journal entries removed", count=len(pruned))
        for rollout, entry in self.journal.entries():
            state = entry.get("state")
            if state in (ACCEPTED, RUNNING):
                self.log.warning("interrupted request found; recovering", rollout=rollout,
                                 state=state, step=entry.get("step"))
                self._enqueue(_Job(rollout, entry, recover=True))
            elif state == DONE and not entry.get("published"):
                self._outbox.put(("deploy.result", rollout, entry.get("result") or {}))

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Stop taking requests, let running deploys finish within ``timeout``,
        report queued ones as not started, send what is left to send."""
        deadline = time.monotonic() + timeout
        self.heartbeat.stop()
        self.dispatcher.close(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in list(self._workers.values()):
            t.join(max(0.0, deadline - time.monotonic()))
        still = [p for p, t in self._workers.items() if t.is_alive()]
        if still:
            self.log.warning("deploys still running at stop; the next start recovers them",
                             projects=still)
        self._outbox.put(None)
        self._publisher.join(max(1.0, deadline - time.monotonic()))
        gitutil.close_resolvers()

    def healthy(self) -> bool:
        return self._publisher.is_alive() and self.heartbeat.alive()

    # -- events ------------------------------------------------------------------------------

    def _envelope(self, type: str, rollout: str, body: dict[str, Any]) -> bytes:
        env = envelope.new(type, {"rollout": rollout, "host": self.ctx.host, **body},
                           sender=self.ctx.sender, correlation=rollout, ttl=EVENT_TTL)
        if self.ctx.signing_key is not None:
            env = self.ctx.signing_key.sign(env)
        return env.encode()

    def publish(self, type: str, rollout: str, body: dict[str, Any]) -> None:
        """Publish now, on the calling thread (raises BusError)."""
        self.ctx.bus.publish(topics.EVENTS, self._envelope(type, rollout, body))

    def _progress(self, job: _Job) -> steps.Progress:
        base = {k: v for k, v in job.base.items() if k != "request_id"}

        def progress(step: str, message: str, lines: list[str] | None) -> None:
            job.last_progress = time.monotonic()
            if self._outbox.qsize() >= OUTBOX_LIMIT:
                self.ctx.stats.incr("progress_dropped")
                return
            self._outbox.put(("deploy.progress", job.rollout,
                              base | {"entries": [{"step": step, "message": message,
                                                   "lines": lines or [], "at": _now()}]}))
        return progress

    def _publish_loop(self) -> None:
        """The outbox: progress and results in order; results retried until sent.

        Progress lines of one rollout that come within PROGRESS_LINGER of each
        other go out as one message (up to PROGRESS_BATCH lines), and the
        last ones ride on the rollout's result when it follows within that
        time: a deploy sends a message or two rather than one per step,
        which is what the broker, the orchestrator and every watcher pay for."""
        carried: deque[Any] = deque()  # taken from the outbox while gathering progress
        while True:
            if carried:
                item = carried.popleft()
            else:
                try:
                    item = self._outbox.get(timeout=RETRY_INTERVAL if self._unpublished
                                            or self._unsent_acks else None)
                except queue.Empty:
                    item = ("retry", "", {})
            try:
                if item is not None and item[0] == "deploy.progress":
                    item = self._gather(item, carried)
                if item is not None and item[0] == "deploy.progress":
                    try:
                        self.publish(*item)
                    except BusError as exc:
                        self.ctx.stats.incr("progress_dropped")
                        self.log.warning("progress not sent", rollout=item[1], error=str(exc))
                    continue
                if item is not None and item[0] == "deploy.ack":
                    self._unsent_acks[item[1]] = item[2]
                if item is not None and item[0] == "deploy.result":
                    self._unpublished[item[1]] = item[2]
                    self._unsent_acks.pop(item[1], None)  # a result says it all
                if self._unpublished or self._unsent_acks:
                    self._send_results()
            except Exception:  # the outbox never dies silently: log and go on
                self.log.exception("outbox error")
            if item is None:
                return

    def _gather(self, first: tuple[str, str, dict[str, Any]],
                carried: deque[Any]) -> tuple[str, str, dict[str, Any]]:
        """``first`` merged with the progress of the same rollout that follows
        within PROGRESS_LINGER; if that rollout's result comes within the
        time, the result carrying the entries. The first other item taken
        from the outbox (another rollout's progress or result, the stop
        sentinel) goes to ``carried``, to be handled next."""
        entries = list(first[2]["entries"])
        deadline = time.monotonic() + PROGRESS_LINGER
        while len(entries) < PROGRESS_BATCH:
            try:
                nxt = self._outbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is not None and nxt[0] == "deploy.result" and nxt[1] == first[1]:
                return nxt[0], nxt[1], nxt[2] | {"entries": entries}
            if nxt is None or nxt[0] != "deploy.progress" or nxt[1] != first[1]:
                carried.append(nxt)
                break
            entries.extend(nxt[2]["entries"])
        return first[0], first[1], first[2] | {"entries": entries}

    def _heartbeat_loop(self) -> None:
        """While deploys run, a line for each that has been quiet for HEARTBEAT
        seconds. Sleeps without waking while the agent is idle."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._running) or self._stopping)
                if self._stopping:
                    return
                self._cond.wait(HEARTBEAT / 3)
                jobs = list(self._running.values())
            now = time.monotonic()
            for job in jobs:
                if now - job.last_progress >= HEARTBEAT and not job.recover:
                    step = job.entry.get("step") or "start"
                    self._progress(job)(step, f"still working on {step} "
                                              f"({now - job.started:.0f}s since start)", None)

    def _send_results(self) -> None:
        for rollout, ack in list(self._unsent_acks.items()):
            try:
                self.publish("deploy.progress", rollout, ack)
            except BusError as exc:
                self.log.warning("acknowledgement not sent yet; will retry", rollout=rollout,
                                 error=str(exc), retry_in=RETRY_INTERVAL)
                return
            del self._unsent_acks[rollout]
        for rollout, result in list(self._unpublished.items()):
            try:
                self.publish("deploy.result", rollout, result)
            except BusError as exc:
                self.log.warning("result not sent yet; will retry", rollout=rollout,
                                 error=str(exc), retry_in=RETRY_INTERVAL)
                return
            del self._unpublished[rollout]
            entry = self.journal.get(rollout)
            if entry is not None and entry.get("state") == DONE:
                entry["published"] = True
                try:
                    self.journal.write(rollout, entry, sync=False)
                except OSError as exc:  # sent anyway; at worst sent again after a restart
                    self.log.warning("could not mark result sent", rollout=rollout,
                                     error=str(exc))

    def audit(self, env: Envelope, decision: str, **fields: Any) -> None:
        entry = {"at": _now(), "decision": decision, "id": env.id, "sender": env.sender,
                 "key": (env.sig or {}).get("key"), **fields}
        with open(self.state_dir / "audit.jsonl", "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    # -- the request ---------------------------------------------------------------------------

    def on_request(self, env: Envelope, _d: Delivery) -> None:
        body = env.body
        raw_rollout = body.get("rollout") if isinstance(body.get("rollout"), str) else None
        try:
            rollout = check_name(raw_rollout or env.correlation, "rollout id")
        except DeployBusError as exc:
            self.refuse(env, "unknown", str(exc))
            return
        action = body.get("action") or "deploy"
        assert self.verifier is not None
        try:
            # Who signed it comes first; freshness and replay only after the
            # journal, so that a redelivery is answered, not refused.
            signer = self.verifier.signer(env)
        except DeployBusError as exc:
            self.refuse(env, rollout, str(exc))
            return
        earlier = self.journal.get(rollout)
        if earlier is not None:
            self.answer_from_journal(env, rollout, earlier, signer, action)
            return
        try:
            if action not in ACTIONS:
                raise DeployBusError(f"unknown action {action!r:.40}")
            project = check_name(body.get("project"), "project")
            environment = check_name(body.get("environment"), "environment")
            release = None
            if action == "deploy":
                ref = check_ref(body.get("ref"))
            else:
                ref = str(body.get("ref") or "rollback")[:200]
                if body.get("release") is not None:
                    release = check_name(body.get("release"), "release")
            user = str(body.get("user") or "unknown")[:128]
            if body.get("host") != self.ctx.host:
                raise DeployBusError(f"request is for host {body.get('host')!r:.60}, "
                                     f"not {self.ctx.host!r}")
            signer = self.verifier.verify(env, project=project, environment=environment)
            if project not in self.ctx.config.projects:
                raise DeployBusError(f"unknown project {project!r}")
            ec = self.ctx.config.environments.get(environment)
            if ec is None or self.ctx.host not in ec.hosts:
                raise DeployBusError(f"host {self.ctx.host} is not in environment {environment!r}")
            if ec.projects is not None and project not in ec.projects:
                raise DeployBusError(f"project {project!r} is not deployed to {environment!r}")
        except DeployBusError as exc:
            # lapsed: it waited too long (a broker outage, say); its sender may ask anew
            self.refuse(env, rollout, str(exc), lapsed=isinstance(exc, LapsedError))
            return
        entry = {"rollout": rollout, "action": action, "state": ACCEPTED, "accepted": _now(),
                 "request": {"id": env.id, "project": project, "environment": environment,
                             "ref": ref, "release": release, "user": user,
                             "host": self.ctx.host, "signer": signer, "sender": env.sender}}
        try:
            self.journal.write(rollout, entry)
        except OSError as exc:
            self.refuse(env, rollout, f"cannot record the request: {exc}")
            return
        self.audit(env, "accepted", rollout=rollout, action=action, project=project,
                   environment=environment, ref=ref, release=release, user=user, signer=signer)
        self.log.info(f"{action} accepted", rollout=rollout, project=project, ref=ref,
                      release=release, user=user, signer=signer)
        job = _Job(rollout, entry)
        self.acknowledge(job, self._queue_note(project))
        self._enqueue(job)

    def _queue_note(self, project: str) -> str:
        with self._cond:
            ahead = ([self._running[project].rollout] if project in self._running else []) \
                + [j.rollout for j in self._queues.get(project, ())]
        return f"accepted; waiting for {', '.join(ahead)} to finish" if ahead else "accepted"

    def acknowledge(self, job: _Job, message: str) -> None:
        """Tell the orchestrator at once that the request is here: it fails a
        host whose agent stays silent for the environment's ack_timeout.
        Sent now rather than through the outbox (which holds progress back
        to batch it); if the bus refuses, the outbox keeps it and tries again
        with the results (unless the result goes first: it says more)."""
        body = {k: v for k, v in job.base.items() if k != "request_id"} | {
            "entries": [{"step": "accepted", "message": message, "lines": [], "at": _now()}]}
        try:
            self.publish("deploy.progress", job.rollout, body)
        except BusError as exc:
            self.log.warning("acknowledgement not sent; will retry", rollout=job.rollout,
                             error=str(exc))
            self._outbox.put(("deploy.ack", job.rollout, body))

    def answer_from_journal(self, env: Envelope, rollout: str, entry: dict[str, Any],
                            signer: str, action: str) -> None:
        """A request for a rollout this agent already has: never run it again."""
        body, req = env.body, entry.get("request")
        if req is not None:
            if (req.get("project"), req.get("environment"), entry.get("action")) != \
                    (body.get("project"), body.get("environment"), action):
                self.refuse(env, rollout, f"rollout id {rollout} was already used here for "
                                          f"another request")
                return
            if not any(r.allows(signer, str(req.get("project")), str(req.get("environment")))
                       for r in self.verifier.policy):
                self.refuse(env, rollout, f"signer {signer!r} may not deploy "
                                          f"{req.get('project')!r} to {req.get('environment')!r}")
                return
        state = entry.get("state")
        self.audit(env, "duplicate", rollout=rollout, state=state,
                   status=(entry.get("result") or {}).get("status"))
        if state == DONE:
            result = entry.get("result") or {}
            self.log.info("request already handled; answering from journal", rollout=rollout,
                          id=env.id, status=result.get("status"))
            self.publish("deploy.result", rollout, result | {"duplicate": True})
        else:
            self.log.info("request already accepted and in progress; not running it again",
                          rollout=rollout, id=env.id, state=state)
            self.acknowledge(_Job(rollout, entry), "already accepted; in progress")

    def refuse(self, env: Envelope, rollout: str, reason: str, *, lapsed: bool = False) -> None:
        self.ctx.stats.incr("refused")
        self.log.warning("deploy request refused", rollout=rollout, id=env.id, reason=reason)
        self.audit(env, "refused", rollout=rollout, reason=reason)
        body = env.body
        self.publish("deploy.result", rollout, {
            "status": "refused", "reason": reason, "request_id": env.id,
            "action": str(body.get("action") or "deploy")[:32],
            "project": str(body.get("project"))[:64], "ref": str(body.get("ref"))[:200]}
            | ({"lapsed": True} if lapsed else {}))

    # -- workers -------------------------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            self._queues.setdefault(job.project, deque()).append(job)
            t = self._workers.get(job.project)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._work, args=(job.project,), daemon=True,
                                     name=f"deploy-{job.project}")
                self._workers[job.project] = t
                t.start()
            self._cond.notify_all()

    def _work(self, project: str) -> None:
        """One project's requests, one at a time, in the order they were accepted."""
        q = self._queues[project]
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(q) or self._stopping)
                if not q:
                    return
                job = q.popleft()
                job.started = job.last_progress = time.monotonic()
                self._running[project] = job
                self._cond.notify_all()
            try:
                if self._stopping and not job.recover:
                    result = {"status": "failed",
                              "reason": "agent stopped before the deploy started"}
                else:
                    result = self._execute(job)
            except Exception as exc:  # a worker never dies silently
                self.log.exception("deploy crashed", rollout=job.rollout)
                result = {"status": "failed", "reason": f"agent error: {type(exc).__name__}: "
                                                        f"{exc}"}
            try:
                self._finish(job, result)
            except Exception:
                self.log.exception("could not record the result", rollout=job.rollout)
            finally:
                with self._cond:
                    self._running.pop(project, None)

    def _execute(self, job: _Job) -> dict[str, Any]:
        entry = job.entry
        req_d = entry.get("request") or {}
        pc = self.ctx.config.projects.get(job.project)
        progress = self._progress(job)
        where = {"root": self.root, "state_dir": self.state_dir, "host": self.ctx.host,
                 "progress": progress}
        if job.recover:
            return steps.recover(entry, pc, **where)
        if pc is None:
            return {"status": "failed", "reason": f"project {job.project!r} is no longer "
                                                  f"configured on this host"}
        req = steps.Request(rollout=job.rollout, project=job.project,
                            environment=str(req_d.get("environment")),
                            ref=str(req_d.get("ref")), user=str(req_d.get("user")),
                            action=str(entry.get("action") or "deploy"),
                            release=req_d.get("release"))
        tracker = _JournalTracker(self.journal, job.rollout, entry)
        run: Callable[..., dict[str, Any]] = \
            steps.rollback if req.action == "rollback" else steps.deploy
        return run(req, pc, tracker=tracker, **where)

    def _finish(self, job: _Job, result: dict[str, Any]) -> None:
        result = job.base | result
        entry = job.entry
        entry.pop("script", None)
        entry.update(state=DONE, result=result, published=False, finished=_now())
        self.journal.write(job.rollout, entry)
        self.log.info(f"{job.base['action']} finished", rollout=job.rollout,
                      status=result["status"], release=result.get("release"),
                      reason=result.get("reason"))
        self._outbox.put(("deploy.result", job.rollout, result))
