"""One rollout, run by the orchestrator in a thread of its own.

The hosts are split into phases by the strategy (canary, then batches).
Inside a phase at most ``window`` hosts are in flight. A host counts as
failed when it reports failure or refusal, when its agent was heard before
but its heartbeats stopped (offline: it is reported, not waited on; see
:mod:`deploybus.liveness`), when its agent does not acknowledge the request
within the environment's ``ack_timeout`` (the request expires unread, so it
never runs later), when it shows no progress for ``stuck`` seconds, or when
it does not finish within ``request_timeout``. Time the orchestrator spends cut off
from the broker does not count against a host: answer and stuck deadlines
move back by the outage, a host is judged offline only on silence the
orchestrator was connected to hear, and a host that refused its request
only because it arrived past its expiry (``lapsed``) after an outage is
asked anew (at most MAX_REASK times; a refused request was never applied).
Once more than ``max_failures`` hosts
have failed no new host is started; hosts still in flight are waited for,
the rest are marked skipped, and with ``auto_rollback`` the hosts this
rollout switched are switched back to the release they had. The rollout
ends ``succeeded`` only if every host succeeded, ``partial`` if it went
through with some failures within ``max_failures``, ``failed`` if it halted
or no host succeeded (:func:`deploybus.states.outcome`).

Everything needed to go on is in the store: a restarted orchestrator
resumes from the host steps, asks hosts still marked ``requested`` again (the
agent answers from its journal if it already did the work), and never
redeploys a host that finished.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploybus import topics
from deploybus.daemons.orchestrator.mailbox import Key
from deploybus.haproxy import HAProxy, HAProxyError
from deploybus.liveness import HostLiveness, judge
from deploybus.protocol import (
    Action,
    ControlAction,
    DeployRequest,
    Failure,
    Result,
    RolloutState,
    RolloutStatus,
    Status,
    StepState,
)
from deploybus.states import FAILED_STEPS, SETTLED_STEPS, outcome
from deploybus.strategy import Strategy

if TYPE_CHECKING:
    from deploybus.daemons.orchestrator.service import Orchestrator

#: How often a host whose request lapsed during a broker outage is asked anew.
MAX_REASK = 3

#: Seconds an automatic rollback waits for each host.
ROLLBACK_TIMEOUT = 300.0

#: Seconds beyond ``ack_timeout`` allowed for an acknowledgement to travel back.
ACK_GRACE = 1.0


class Stopping(Exception):
    """The orchestrator is shutting down: leave the rollout for the next start."""


@dataclass(frozen=True)
class Outcome:
    """How a host's part in a rollout ended: its agent's result, or what the
    orchestrator decided (no acknowledgement, no answer, stuck, offline,
    not drained)."""

    state: StepState
    failure: Failure | None = None
    reason: str | None = None
    release: str | None = None
    commit: str | None = None
    previous_release: str | None = None

    @classmethod
    def of(cls, result: Result) -> Outcome:
        state = {Status.SUCCEEDED: StepState.SUCCEEDED, Status.FAILED: StepState.FAILED,
                 Status.REFUSED: StepState.REFUSED}[result.status]
        failure = result.failure or (Failure.REFUSED if result.status is Status.REFUSED
                                     else None if state is StepState.SUCCEEDED
                                     else Failure.AGENT_ERROR)
        return cls(state, failure, result.reason, result.release, result.commit,
                   result.previous_release)

    @classmethod
    def failed(cls, failure: Failure, reason: str) -> Outcome:
        state = StepState.OFFLINE if failure is Failure.OFFLINE else StepState.FAILED
        return cls(state, failure, reason)


class RolloutRun:
    """See the module docstring."""

    def __init__(self, orch: Orchestrator, record: dict[str, Any], strategy: Strategy,
                 request_timeout: float, haproxy: HAProxy | None = None, *,
                 ack_timeout: float = 30.0) -> None:
        self.orch, self.store, self.cond = orch, orch.store, orch.cond
        self.mailbox = orch.mailbox
        self.links = orch.ctx.bus.links
        self._settled: set[str] = set()
        self._excused = self.links.excused()
        # host -> the bus's downtime when it was last asked; host -> times asked anew
        self._asked_at: dict[str, float] = {}
        self._reasked: dict[str, int] = {}
        # host -> when its agent must have acknowledged (monotonic)
        self._ack_by: dict[str, float] = {}
        self.id: str = record["id"]
        self.project: str = record["project"]
        self.environment: str = record["environment"]
        self.ref: str = record["ref"]
        self.commit: str | None = record.get("commit")
        self.user: str = record["user"]
        self.action = Action(record.get("action") or "deploy")
        self.target_release: str | None = record.get("target_release")
        self.hosts: list[str] = [h["host"] for h in record["hosts"]]
        self.strategy = strategy
        self.request_timeout = request_timeout
        self.ack_timeout = ack_timeout
        self.haproxy = haproxy
        self.paused = record["state"] == "paused"
        self.abort_reason: str | None = None
        self.promoted = False
        self.log = orch.log.bind(rollout=self.id)
        self.thread = threading.Thread(target=self.run, name=f"rollout-{self.id}", daemon=True)

    # -- control (called from the orchestrator's handler thread) -----------------------

    def control(self, action: ControlAction, actor: str) -> str:
        """Apply ``action``; returns what it did, for whoever asked."""
        with self.cond:
            if action is ControlAction.PAUSE:
                done = "already paused" if self.paused else \
                    "pausing: hosts in flight finish, no more start"
                self.paused = True
            elif action is ControlAction.RESUME:
                done = "resumed" if self.paused else "it was not paused; nothing to resume"
                self.paused = False
            elif action is ControlAction.PROMOTE:
                done = "promoted: the batches after the canary go on" if not self.promoted \
                    else "already promoted"
                self.promoted, self.paused = True, False
            else:
                done = "aborting: hosts in flight finish, the rest are skipped"
                self.abort_reason = f"aborted by {actor}"
            self.cond.notify_all()
        return done

    # -- helpers -----------------------------------------------------------------------

    def _wait(self, predicate: Any, timeout: float | None) -> None:
        """Wait on the shared condition; raise Stopping on shutdown."""
        with self.cond:
            self.cond.wait_for(lambda: self.orch.stopping.is_set() or predicate(), timeout)
        if self.orch.stopping.is_set():
            raise Stopping

    def _status(self, state: RolloutState, reason: str | None = None, **extra: Any) -> None:
        self.orch.status(self.id, state, reason, **extra)

    def _offline(self, host: str) -> str | None:
        """Why ``host`` cannot deploy now (its agent's heartbeats stopped, or
        everything on it went silent), or None to ask it. A host whose agent
        was never heard from is asked anyway while something else on it is
        alive: the acknowledgement deadline tells a silent agent."""
        def blocked() -> HostLiveness | None:
            h = self.store.host(host)
            live = judge(host, h["daemons"] if h else None)
            if live.can_deploy or live.verdict == "never seen" \
                    or "agent" not in live.daemons and live.verdict != "down":
                return None
            return live

        live = blocked()
        if live is None:
            return None
        limit = max(d.limit for d in live.daemons.values())
        # An old heartbeat only means something if we were listening: after a
        # broker outage (or our own start) give the host `limit` seconds of
        # connected time to be heard before calling it offline, counted from
        # when its link is surely back too.
        while self.links.heard_for() < limit:
            self._wait(lambda: False, min(0.5, max(0.05, limit - self.links.heard_for())))
            live = blocked()
            if live is None:
                return None  # heard again: no need to wait out the rest
        return f"{'host down' if live.verdict == 'down' else live.verdict}: {live.detail}"

    def _outage_lag(self) -> float:
        """Seconds since the last call in which no answer could arrive (the
        bus was down, or the hosts were still coming back after it: see
        LinkClock.excused): deadlines move back by as much."""
        excused = self.links.excused()
        lag, self._excused = excused - self._excused, excused
        return lag

    def _credit_outage(self, deadlines: dict[str, float], *, undo: bool = False) -> None:
        """Move ``deadlines`` (and the hosts' stuck clocks) back by :meth:`_outage_lag`."""
        lag = self._outage_lag()
        if lag > 0:
            for host in deadlines:
                deadlines[host] += lag
                if host in self._ack_by:
                    self._ack_by[host] += lag
            self.mailbox.postpone([Key(self.id, h, undo) for h in deadlines], lag)

    def _key(self, host: str, undo: bool = False) -> Key:
        return Key(self.id, host, undo)

    def _request_many(self, hosts: list[str], *, action: Action, release: str | None,
                      ttl: float, undo: bool = False) -> None:
        """Ask ``hosts`` at once: one batch on the bus."""
        requests = []
        for host in hosts:
            requests.append(DeployRequest(
                rollout=self.id, project=self.project, environment=self.environment,
                host=host, user=self.user, action=action,
                ref=self.ref if action is Action.DEPLOY else None,
                commit=self.commit if action is Action.DEPLOY else None,
                release=release, undo=undo, position=self.hosts.index(host)))
            self.mailbox.expect(self._key(host, undo))

        def record(ids: list[str]) -> None:
            # Before the requests go out: from then on these ids are answered.
            for host, request_id in zip(hosts, ids, strict=True):
                self.mailbox.sent(self._key(host, undo), request_id)

        self.orch.send_requests(requests, ttl=ttl, before=record)
        down = self.links.downtime()
        ack_by = time.monotonic() + self.ack_timeout + ACK_GRACE
        for host in hosts:
            self._asked_at[host] = down
            self._ack_by[host] = ack_by

    # -- the run -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Stopping:
            self.log.info("rollout left for the next start")
        except Exception as exc:  # a rollout thread never dies silently
            if self.orch.stopping.is_set():
                self.log.info("rollout left for the next start", error=str(exc))
                return
            self.log.exception("rollout crashed")
            self._status(RolloutState.FAILED, f"orchestrator error: {exc}")
            self.orch.finished(self)
        else:
            self.orch.finished(self)

    def _run(self) -> None:
        steps = self.store.steps(self.id)
        failures = sum(1 for s in steps.values() if s["state"] in FAILED_STEPS)
        # Hosts settled so far (before a restart too): counted here, not by
        # reading every step back from the store after each host.
        self._settled = {h for h, s in steps.items() if s["state"] in SETTLED_STEPS}
        phases = self.strategy.phases(self.hosts)
        self._status(RolloutState.PAUSED if self.paused else RolloutState.RUNNING,
                     hosts=self.hosts, phases=phases, strategy=self.strategy.to_dict(),
                     # a rollback's "ref" is the store's label (rollback:previous),
                     # not a ref: a status carrying it would be refused as invalid
                     ref=self.ref if self.action is Action.DEPLOY else None,
                     commit=self.commit)
        for i, phase in enumerate(phases):
            todo = [h for h in phase if steps.get(h, {}).get("state") not in SETTLED_STEPS]
            failures += self._phase(i, todo, failures)
            if self.abort_reason or failures > self.strategy.max_failures:
                break
            if i < len(phases) - 1:
                self._between(i)
                if self.abort_reason:
                    break
        steps = self.store.steps(self.id)
        for host, st in steps.items():
            if st["state"] not in SETTLED_STEPS:
                self.store.set_step(self.id, host, state="skipped")
                st["state"] = "skipped"
        self._finish(steps, failures)

    def _finish(self, steps: dict[str, dict[str, Any]], failures: int) -> None:
        """The rollout's final state, with a reason that names the failed hosts."""
        ok = sum(1 for s in steps.values() if s["state"] == "succeeded")
        failed = [h for h, s in steps.items() if s["state"] in FAILED_STEPS]
        counts = {"succeeded": ok, "failed": failures, "total": len(steps),
                  "failed_host": failed[0] if failed else None}
        first = f"; {failed[0]}: {steps[failed[0]]['state']}: {steps[failed[0]]['message']}" \
            if failed else ""
        if self.abort_reason:
            self._status(RolloutState.ABORTED, self.abort_reason,
                         rolled_back=self._maybe_rollback() or None, **counts)
            return
        halted = failures > self.strategy.max_failures
        state = RolloutState(outcome((s["state"] for s in steps.values()), halted=halted))
        rolled: dict[str, str] = {}
        if halted:
            reason: str | None = (f"halted: {failures} host(s) failed (max_failures "
                                  f"{self.strategy.max_failures}): {', '.join(failed)}{first}")
            rolled = self._maybe_rollback()
        elif state is RolloutState.FAILED:
            reason = f"no host succeeded: {', '.join(failed) or 'none'} failed{first}"
        elif state is RolloutState.PARTIAL:
            reason = (f"{ok} of {len(steps)} hosts succeeded; {', '.join(failed)} failed "
                      f"(within max_failures {self.strategy.max_failures}){first}")
        else:
            reason = None
        self._status(state, reason, rolled_back=rolled or None, hosts=self.hosts, **counts)

    def _phase(self, index: int, todo: list[str], failures_before: int) -> int:
        """Run one phase; returns the number of hosts that failed in it."""
        window = self.strategy.in_flight(todo) if todo else 0
        pending = list(todo)
        inflight: dict[str, float] = {}  # host -> deadline (request timeout)
        failures = 0
        steps = self.store.steps(self.id)
        while pending or inflight:
            halted = self.abort_reason or failures_before + failures > self.strategy.max_failures
            starting: list[str] = []
            while pending and not halted and not self.paused \
                    and len(inflight) + len(starting) < window:
                host = pending.pop(0)
                offline = self._offline(host)
                if offline:
                    failures += 1
                    self._settle(host, Outcome.failed(Failure.OFFLINE, offline), index)
                    halted = failures_before + failures > self.strategy.max_failures
                    continue
                if self.haproxy is not None:
                    try:
                        self.haproxy.drain(host)
                        self.store.add_log(self.id, host, "drain",
                                           f"{self.haproxy.backend}/{self.haproxy.server(host)}"
                                           " out of rotation (maint)")
                    except HAProxyError as exc:
                        failures += 1
                        self._settle(host, Outcome.failed(Failure.DRAIN,
                                                          f"could not drain: {exc}"), index)
                        continue
                starting.append(host)
            # Recorded before any is asked, in one transaction: after a restart a
            # host marked requested is asked again (its agent answers a repeat
            # from its journal), never skipped.
            self.store.set_steps(self.id, [h for h in starting
                                           if steps.get(h, {}).get("state") != "requested"],
                                 state="requested")
            if starting:
                self._request_many(starting, action=self.action, release=self.target_release,
                                   ttl=self.ack_timeout)
            self._credit_outage(inflight)
            for host in starting:
                inflight[host] = time.monotonic() + self.request_timeout
            if not inflight:
                if pending and self.paused and not halted:
                    self._status(RolloutState.PAUSED, "paused; resume or promote to go on")
                    self._wait(lambda: not self.paused or self.abort_reason, None)
                    self._status(RolloutState.RUNNING)
                    continue
                break
            self._wait(lambda: any(self.mailbox.has_result(self._key(h)) for h in inflight),
                       max(0.05, min(self._deadline(h, d) for h, d in inflight.items())
                           - time.monotonic()))
            self._credit_outage(inflight)
            now = time.monotonic()
            for host in list(inflight):
                result = self.mailbox.take(self._key(host))
                if result is not None and self._lapsed_in_outage(host, result):
                    self.store.add_log(self.id, host, "request",
                                       f"asked again: {result.reason} during a broker outage")
                    self._request_many([host], action=self.action,
                                       release=self.target_release, ttl=self.ack_timeout)
                    inflight[host] = time.monotonic() + self.request_timeout
                    continue
                if result is not None:
                    settled = Outcome.of(result)
                elif not self.mailbox.acked(self._key(host)) \
                        and self._ack_by.get(host, now) <= now:
                    settled = Outcome.failed(Failure.NOT_ANSWERING, (
                        f"agent not answering: no acknowledgement from {host} within "
                        f"{self.ack_timeout:.0f}s (the request expires unread)"))
                elif inflight[host] <= now:
                    settled = Outcome.failed(Failure.NO_ANSWER, f"no answer from {host} within "
                                                                f"{self.request_timeout:.0f}s")
                elif self._deadline(host, inflight[host]) <= now:
                    settled = Outcome.failed(Failure.STUCK, f"stuck: no progress from {host} "
                                                            f"for {self.strategy.stuck:.0f}s")
                else:
                    continue
                del inflight[host]
                if settled.state is not StepState.SUCCEEDED:
                    failures += 1
                self._settle(host, settled, index)
        return failures

    def _lapsed_in_outage(self, host: str, result: Result) -> bool:
        """The host refused its request only because it arrived after its expiry,
        and the bus was down meanwhile: the wait was the outage's, not the
        host's, so it is asked anew (a refused request was never applied). At
        most MAX_REASK times per host."""
        if result.status is not Status.REFUSED or not result.lapsed:
            return False
        if self.links.downtime() <= self._asked_at.get(host, float("inf")):
            return False
        if self._reasked.get(host, 0) >= MAX_REASK:
            return False
        self._reasked[host] = self._reasked.get(host, 0) + 1
        return True

    def _deadline(self, host: str, request_deadline: float) -> float:
        key = self._key(host)
        deadline = min(request_deadline, self.mailbox.last_progress(key) + self.strategy.stuck)
        if not self.mailbox.acked(key) and host in self._ack_by:
            deadline = min(deadline, self._ack_by[host])
        return deadline

    def _settle(self, host: str, settled: Outcome, phase: int) -> None:
        if self.haproxy is not None and (settled.failure is None or settled.failure.answered):
            # The host answered, so `current` is a complete release that passed its
            # health check (or the old one, untouched): it may take traffic again.
            try:
                self.haproxy.ready(host)
                self.store.add_log(self.id, host, "drain", "back in rotation (ready)")
            except HAProxyError as exc:
                self.store.add_log(self.id, host, "drain", f"could not set ready: {exc}")
        self.store.set_step(self.id, host, state=settled.state, release=settled.release,
                            commit=settled.commit, previous_release=settled.previous_release,
                            message=settled.reason)
        self._settled.add(host)
        self.orch.send(topics.STATUS, RolloutStatus(
            rollout=self.id, state=RolloutState.RUNNING, host=host, host_state=settled.state,
            failure=settled.failure, reason=settled.reason, release=settled.release,
            phase=phase, done=len(self._settled), total=len(self.hosts)), correlation=self.id)

    def _between(self, index: int) -> None:
        """After phase ``index``: the pause of the strategy, or wait for promote."""
        if self.strategy.pause == "promote" and index == 0 and self.strategy.canary:
            if not self.promoted:
                self.paused = True
                self._status(RolloutState.PAUSED,
                             "canary done; promote to continue, abort to stop")
                self._wait(lambda: self.promoted or not self.paused or self.abort_reason, None)
                self._status(RolloutState.RUNNING)
        elif isinstance(self.strategy.pause, int | float) and self.strategy.pause > 0:
            deadline = time.monotonic() + float(self.strategy.pause)
            self._wait(lambda: self.abort_reason is not None or time.monotonic() >= deadline,
                       float(self.strategy.pause))
        if self.paused:
            self._status(RolloutState.PAUSED, "paused; resume to go on")
            self._wait(lambda: not self.paused or self.abort_reason, None)
            self._status(RolloutState.RUNNING)

    def _rollback_target(self, host: str, step: dict[str, Any]) -> str | None:
        """The release ``host`` had before this rollout: from the orchestrator's
        own records (the last release an earlier rollout of this project left
        there), else what the host itself said in its signed result."""
        return self.store.last_release(self.project, host, before=self.id) \
            or step.get("previous_release")

    def _maybe_rollback(self) -> dict[str, str]:
        """Switch hosts this rollout moved back to where they were, if asked to."""
        if not self.strategy.auto_rollback or self.action is not Action.DEPLOY:
            return {}
        outcome: dict[str, str] = {}
        targets = {h: s for h, s in self.store.steps(self.id).items()
                   if s["state"] == "succeeded" and not s.get("rolled_back")}
        asked = []
        for host, st in targets.items():
            target = self._rollback_target(host, st)
            if not target:
                outcome[host] = "nothing to roll back to (first deploy)"
                self.store.set_step(self.id, host, rolled_back="none")
                continue
            self._request_many([host], action=Action.ROLLBACK, release=target,
                               ttl=ROLLBACK_TIMEOUT, undo=True)
            asked.append(host)
        self._outage_lag()  # what was down before the requests went out does not count
        deadline = time.monotonic() + ROLLBACK_TIMEOUT
        waiting = list(asked)
        while waiting and time.monotonic() < deadline:
            self._wait(lambda: any(self.mailbox.has_result(self._key(h, True))
                                   for h in waiting), deadline - time.monotonic())
            deadline += self._outage_lag()
            for host in list(waiting):
                res = self.mailbox.take(self._key(host, True))
                if res is not None:
                    waiting.remove(host)
                    ok = res.status is Status.SUCCEEDED
                    outcome[host] = "rolled back" if ok else f"rollback failed: {res.reason}"
                    self.store.set_step(self.id, host, rolled_back="ok" if ok else "failed")
        for host in waiting:
            outcome[host] = "rollback: no answer"
            self.store.set_step(self.id, host, rolled_back="failed")
        self.log.info("auto-rollback done", outcome=outcome)
        return outcome
