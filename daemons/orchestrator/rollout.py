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
from typing import TYPE_CHECKING, Any

from deploybus import topics
from deploybus.haproxy import HAProxy, HAProxyError
from deploybus.liveness import HostLiveness, judge
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


class RolloutRun:
    """See the module docstring."""

    def __init__(self, orch: Orchestrator, record: dict[str, Any], strategy: Strategy,
                 request_timeout: float, haproxy: HAProxy | None = None, *,
                 ack_timeout: float = 30.0) -> None:
        self.orch, self.store, self.cond = orch, orch.store, orch.cond
        self._settled: set[str] = set()
        self._excused = orch.ctx.bus.links.excused()
        # host -> the bus's downtime when it was last asked; host -> times asked anew
        self._asked_at: dict[str, float] = {}
        self._reasked: dict[str, int] = {}
        self.id: str = record["id"]
        self.project: str = record["project"]
        self.environment: str = record["environment"]
        self.ref: str = record["ref"]
        self.user: str = record["user"]
        self.action: str = record.get("action") or "deploy"
        self.target_release: str | None = record.get("target_release")
        self.hosts: list[str] = [h["host"] for h in record["hosts"]]
        self.strategy = strategy
        self.request_timeout = request_timeout
        self.ack_timeout = ack_timeout
        # host -> when its agent must have acknowledged (monotonic)
        self._ack_by: dict[str, float] = {}
        self.haproxy = haproxy
        self.paused = record["state"] == "paused"
        self.abort_reason: str | None = None
        self.promoted = False
        self.log = orch.log.bind(rollout=self.id)
        self.thread = threading.Thread(target=self.run, name=f"rollout-{self.id}", daemon=True)

    # -- control (called from the orchestrator's handler thread) -----------------------

    def control(self, action: str, actor: str) -> str:
        """Apply ``action``; returns what it did, for whoever asked."""
        with self.cond:
            if action == "pause":
                done = "already paused" if self.paused else \
                    "pausing: hosts in flight finish, no more start"
                self.paused = True
            elif action == "resume":
                done = "resumed" if self.paused else "it was not paused; nothing to resume"
                self.paused = False
            elif action == "promote":
                done = "promoted: the batches after the canary go on" if not self.promoted \
                    else "already promoted"
                self.promoted, self.paused = True, False
            else:  # abort
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
        links = self.orch.ctx.bus.links
        while links.heard_for() < limit:
            self._wait(lambda: False, min(0.5, max(0.05, limit - links.heard_for())))
            live = blocked()
            if live is None:
                return None  # heard again: no need to wait out the rest
        return f"{'host down' if live.verdict == 'down' else live.verdict}: {live.detail}"

    def _outage_lag(self) -> float:
        """Seconds since the last call in which no answer could arrive (the
        bus was down, or the hosts were still coming back after it: see
        LinkClock.excused): deadlines move back by as much."""
        excused = self.orch.ctx.bus.links.excused()
        lag, self._excused = excused - self._excused, excused
        return lag

    def _credit_outage(self, deadlines: dict[str, float], rollout: str) -> None:
        """Move ``deadlines`` (and the hosts' stuck clocks) back by :meth:`_outage_lag`."""
        lag = self._outage_lag()
        if lag > 0:
            for host in deadlines:
                deadlines[host] += lag
                if host in self._ack_by:
                    self._ack_by[host] += lag
            self.orch.postpone(rollout, deadlines, lag)

    def _request(self, host: str, *, rollout: str, action: str, release: str | None,
                 ttl: float) -> None:
        self._request_many([host], rollout=rollout, action=action, release=release, ttl=ttl)

    def _request_many(self, hosts: list[str], *, rollout: str, action: str,
                      release: str | None, ttl: float) -> None:
        """Ask ``hosts`` at once: one batch on the bus."""
        messages = []
        for host in hosts:
            body: dict[str, Any] = {"rollout": rollout, "project": self.project,
                                    "environment": self.environment, "ref": self.ref,
                                    "host": host, "user": self.user, "action": action,
                                    "position": self.hosts.index(host)}
            if release:
                body["release"] = release
            self.orch.expect(rollout, host)
            messages.append((topics.requests_for(host), "deploy.request", body, rollout, ttl))

        def record(ids: list[str]) -> None:
            # Before the requests go out: from then on only a refusal of these
            # ids is an answer (a twin of an earlier one's may still come).
            for host, request_id in zip(hosts, ids, strict=True):
                self.orch.sent(rollout, host, request_id)

        self.orch.send_many(messages, before=record)
        down = self.orch.ctx.bus.links.downtime()
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
            self.orch.status(self.id, "failed", f"orchestrator error: {exc}")
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
        self.orch.status(self.id, "paused" if self.paused else "running", hosts=self.hosts,
                         phases=phases, strategy=self.strategy.to_dict())
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
            self.orch.status(self.id, "aborted", self.abort_reason,
                             rolled_back=self._maybe_rollback(), **counts)
            return
        halted = failures > self.strategy.max_failures
        state = outcome((s["state"] for s in steps.values()), halted=halted)
        rolled: dict[str, str] = {}
        if halted:
            reason: str | None = (f"halted: {failures} host(s) failed (max_failures "
                                  f"{self.strategy.max_failures}): {', '.join(failed)}{first}")
            rolled = self._maybe_rollback()
        elif state == "failed":
            reason = f"no host succeeded: {', '.join(failed) or 'none'} failed{first}"
        elif state == "partial":
            reason = (f"{ok} of {len(steps)} hosts succeeded; {', '.join(failed)} failed "
                      f"(within max_failures {self.strategy.max_failures}){first}")
        else:
            reason = None
        self.orch.status(self.id, state, reason, rolled_back=rolled, hosts=self.hosts, **counts)

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
                    self._settle(host, {"status": "offline", "reason": offline}, index)
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
                        self._settle(host, {"status": "failed",
                                            "reason": f"could not drain: {exc}"}, index)
                        continue
                starting.append(host)
            # Recorded before any is asked, in one transaction: after a restart a
            # host marked requested is asked again (its agent answers a repeat
            # from its journal), never skipped.
            self.store.set_steps(self.id, [h for h in starting
                                           if steps.get(h, {}).get("state") != "requested"],
                                 state="requested")
            if starting:
                self._request_many(starting, rollout=self.id, action=self.action,
                                   release=self.target_release, ttl=self.ack_timeout)
            self._credit_outage(inflight, self.id)
            for host in starting:
                inflight[host] = time.monotonic() + self.request_timeout
            if not inflight:
                if pending and self.paused and not halted:
                    self.orch.status(self.id, "paused", "paused; resume or promote to go on")
                    self._wait(lambda: not self.paused or self.abort_reason, None)
                    self.orch.status(self.id, "running", None)
                    continue
                break
            self._wait(lambda: any(self.orch.has_result(self.id, h) for h in inflight),
                       max(0.05, min(self._deadline(h, d) for h, d in inflight.items())
                           - time.monotonic()))
            self._credit_outage(inflight, self.id)
            now = time.monotonic()
            for host in list(inflight):
                result = self.orch.take_result(self.id, host)
                if result is not None and self._lapsed_in_outage(host, result):
                    self.store.add_log(self.id, host, "request",
                                       f"asked again: {result.get('reason')} during a broker "
                                       "outage")
                    self._request_many([host], rollout=self.id, action=self.action,
                                       release=self.target_release, ttl=self.ack_timeout)
                    inflight[host] = time.monotonic() + self.request_timeout
                    continue
                if result is None:
                    if not self.orch.acked(self.id, host) and self._ack_by.get(host, now) <= now:
                        result = {"status": "failed", "reason":
                                  f"agent not answering: no acknowledgement from {host} within "
                                  f"{self.ack_timeout:.0f}s (the request expires unread)"}
                    elif inflight[host] <= now:
                        result = {"status": "failed", "reason":
                                  f"no answer from {host} within {self.request_timeout:.0f}s"}
                    elif self._deadline(host, inflight[host]) <= now:
                        result = {"status": "failed", "reason":
                                  f"stuck: no progress from {host} for "
                                  f"{self.strategy.stuck:.0f}s"}
                    else:
                        continue
                del inflight[host]
                if result.get("status") != "succeeded":
                    failures += 1
                self._settle(host, result, index)
        return failures

    def _lapsed_in_outage(self, host: str, result: dict[str, Any]) -> bool:
        """The host refused its request only because it arrived after its expiry,
        and the bus was down meanwhile: the wait was the outage's, not the
        host's, so it is asked anew (a refused request was never applied). At
        most MAX_REASK times per host."""
        if result.get("status") != "refused" or not result.get("lapsed"):
            return False
        if self.orch.ctx.bus.links.downtime() <= self._asked_at.get(host, float("inf")):
            return False
        if self._reasked.get(host, 0) >= MAX_REASK:
            return False
        self._reasked[host] = self._reasked.get(host, 0) + 1
        return True

    def _deadline(self, host: str, request_deadline: float) -> float:
        last = self.orch.last_progress(self.id, host)
        deadline = min(request_deadline, last + self.strategy.stuck)
        if not self.orch.acked(self.id, host) and host in self._ack_by:
            deadline = min(deadline, self._ack_by[host])
        return deadline

    def _settle(self, host: str, result: dict[str, Any], phase: int) -> None:
        state = str(result.get("status"))
        if self.haproxy is not None and state in ("succeeded", "failed", "refused") \
                and "no answer" not in str(result.get("reason")) \
                and not str(result.get("reason", "")).startswith(("stuck", "could not drain")):
            # The host answered, so `current` is a complete release that passed its
            # health check (or the old one, untouched): it may take traffic again.
            try:
                self.haproxy.ready(host)
                self.store.add_log(self.id, host, "drain", "back in rotation (ready)")
            except HAProxyError as exc:
                self.store.add_log(self.id, host, "drain", f"could not set ready: {exc}")
        self.store.set_step(self.id, host, state=state, release=result.get("release"),
                            commit=result.get("commit"),
                            previous_release=result.get("previous_release"),
                            message=result.get("reason"))
        self._settled.add(host)
        self.orch.send(topics.STATUS, "deploy.rollout.status",
                       {"rollout": self.id, "state": "running", "host": host,
                        "host_state": state, "reason": result.get("reason"),
                        "release": result.get("release"), "phase": phase,
                        "done": len(self._settled), "total": len(self.hosts)},
                       correlation=self.id)

    def _between(self, index: int) -> None:
        """After phase ``index``: the pause of the strategy, or wait for promote."""
        if self.strategy.pause == "promote" and index == 0 and self.strategy.canary:
            if not self.promoted:
                self.paused = True
                self.orch.status(self.id, "paused",
                                 "canary done; promote to continue, abort to stop")
                self._wait(lambda: self.promoted or not self.paused or self.abort_reason, None)
                self.orch.status(self.id, "running", None)
        elif isinstance(self.strategy.pause, int | float) and self.strategy.pause > 0:
            deadline = time.monotonic() + float(self.strategy.pause)
            self._wait(lambda: self.abort_reason is not None or time.monotonic() >= deadline,
                       float(self.strategy.pause))
        if self.paused:
            self.orch.status(self.id, "paused", "paused; resume to go on")
            self._wait(lambda: not self.paused or self.abort_reason, None)
            self.orch.status(self.id, "running", None)

    def _maybe_rollback(self) -> dict[str, str]:
        """Switch hosts this rollout moved back to where they were, if asked to."""
        if not self.strategy.auto_rollback or self.action != "deploy":
            return {}
        outcome: dict[str, str] = {}
        rb = f"{self.id}.rb"
        targets = {h: s for h, s in self.store.steps(self.id).items()
                   if s["state"] == "succeeded" and not s.get("rolled_back")}
        for host, st in targets.items():
            if not st.get("previous_release"):
                outcome[host] = "nothing to roll back to (first deploy)"
                self.store.set_step(self.id, host, rolled_back="none")
                continue
            self._request(host, rollout=rb, action="rollback",
                          release=st["previous_release"], ttl=ROLLBACK_TIMEOUT)
        self._outage_lag()  # what was down before the requests went out does not count
        deadline = time.monotonic() + ROLLBACK_TIMEOUT
        waiting = [h for h in targets if h not in outcome]
        while waiting and time.monotonic() < deadline:
            self._wait(lambda: any(self.orch.has_result(rb, h) for h in waiting),
                       deadline - time.monotonic())
            deadline += self._outage_lag()
            for host in list(waiting):
                res = self.orch.take_result(rb, host)
                if res is not None:
                    waiting.remove(host)
                    ok = res.get("status") == "succeeded"
                    outcome[host] = "rolled back" if ok else f"rollback failed: {res.get('reason')}"
                    self.store.set_step(self.id, host, rolled_back="ok" if ok else "failed")
        for host in waiting:
            outcome[host] = "rollback: no answer"
            self.store.set_step(self.id, host, rolled_back="failed")
        self.log.info("auto-rollback done", outcome=outcome)
        return outcome
