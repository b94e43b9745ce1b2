"""The CI bridge: pushes -> CI builds; builds -> signed ``ci.build`` events.

It takes ``git.push`` (signed by a git or CI key) from its durable queue
``ci-bridge``. For a project whose config has ``ci:`` and a ref it builds,
it records the build in the state database (:mod:`.records`) *before* the
push is acknowledged: a push is never dropped. A burst of pushes to one ref
settles first (the project's ``ci.settle`` seconds): older pending builds of the same ref are
superseded and reported so, and only the newest commit is built.

One thread does the rest, from the records, so that a restart (even kill
-9) picks up where it was: it triggers due builds on their CI server
(:mod:`.backend`), polls queued and running ones to their result, and
publishes each state once, in order, as ``ci.build`` on ``ci.events``. A CI
server that is away (down, 5xx) is retried with capped, jittered backoff,
the push kept; one ``ci.build`` error event (``retrying: true``) says so
per outage. A server that refuses (credentials, no such job) makes the
build an error.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from deploybus import protocol, topics
from deploybus.bus import Delivery
from deploybus.daemons.ci_bridge import records
from deploybus.daemons.ci_bridge.backend import Backend, Trigger, backend_for
from deploybus.dispatch import Dispatcher, Message
from deploybus.errors import BusError, CiRefused, CiUnavailable, DeployBusError
from deploybus.refs import short_ref_name
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.store import Store, utcnow

#: Backoff against a CI server that is away: first wait, cap (seconds).
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 30.0


ZERO = "0" * 40


class _Away:
    """A CI server that is away: when to try it next, and whether its outage
    was announced."""

    def __init__(self) -> None:
        self.step = BACKOFF_FIRST
        self.next_try = 0.0
        self.announced = False

    def failed(self) -> float:
        wait = self.step * random.uniform(0.5, 1.0)
        self.next_try = time.monotonic() + wait
        self.step = min(BACKOFF_CAP, self.step * 2)
        return wait


class CiBridge(Service):
    """See the module docstring."""

    name = "ci_bridge"

    def __init__(self, ctx: Context, store: Store | None = None, *,
                 settle: float | None = None) -> None:
        super().__init__(ctx)
        self.store = store or Store(ctx.config.state_url)
        self.builds = records.Builds(self.store)
        self.settle = settle
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats,
                                     verifier=ctx.config.verifier())
        self.backends: dict[str, Backend] = {}
        self.away: dict[str, _Away] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="ci-bridge")

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        if self.ctx.signing_key is None:
            raise DeployBusError("the CI bridge needs a ci key to sign its events "
                                 "(--key or keys.signing)")
        self.thread.start()
        self.dispatcher.subscribe(topics.GIT_COMMITS, self.on_push, queue=topics.CI_BRIDGE,
                                  types={"git.push", "svn.commit"})
        self.log.info("ci bridge ready", servers=sorted(self.ctx.config.ci_servers))

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.dispatcher.close(timeout)
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)
        for backend in self.backends.values():
            backend.close()

    def healthy(self) -> bool:
        return self.thread.is_alive()

    # -- pushes --------------------------------------------------------------------

    def on_push(self, msg: Message, _d: Delivery) -> None:
        """Record the build a push asks for; the push is acked when this returns."""
        body = msg.body
        if not isinstance(body, protocol.GitPush):
            return  # svn.commit shares git.commits; svn projects have no CI builds (yet)
        pc = self.ctx.config.projects.get(body.project)
        if pc is None or pc.ci is None or body.deleted or not body.new or body.new == ZERO:
            return
        if not pc.ci.builds(body.ref):
            return
        build, superseded = self.builds.record(
            push_id=msg.env.id, project=body.project, ref=body.ref, commit=body.new,
            server=pc.ci.server, job=pc.ci.job,
            settle=self.settle if self.settle is not None else pc.ci.settle)
        if build is None:
            self.log.info("push already recorded; redelivery", push=msg.env.id)
            return
        self.log.info("build recorded", build=build["id"], project=body.project, ref=body.ref,
                      commit=body.new, superseding=[b["id"] for b in superseded])
        self.wake.set()

    # -- the thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._trigger_due()
                self._poll_active()
                self._announce()
            except DeployBusError as exc:  # the store or the bus away: try again soon
                self.log.warning("ci bridge round failed; retrying", error=str(exc))
            except Exception:  # the thread never dies silently
                self.log.exception("ci bridge round failed")
            self.wake.wait(self._sleep())
            self.wake.clear()

    def _sleep(self) -> float:
        polls = [s.poll for s in self.ctx.config.ci_servers.values()] or [2.0]
        wait = min(polls)
        try:
            due = self.builds.next_due()
        except DeployBusError:
            return wait
        if due is not None:
            wait = min(wait, max(0.05, (due - utcnow()).total_seconds()))
        return wait

    def _backend(self, server: str) -> Backend:
        backend = self.backends.get(server)
        if backend is None:
            cs = self.ctx.config.ci_servers.get(server)
            if cs is None:
                raise CiRefused(f"no CI server {server!r} in the config")
            backend = backend_for(server, {"type": cs.type, "url": cs.url,
                                           "credentials": cs.credentials,
                                           "timeout": cs.timeout, "poll": cs.poll})
            self.backends[server] = backend
        return backend

    def _is_away(self, server: str) -> bool:
        away = self.away.get(server)
        return away is not None and time.monotonic() < away.next_try

    def _went_away(self, build: dict[str, Any], exc: CiUnavailable) -> None:
        away = self.away.setdefault(build["server"], _Away())
        wait = away.failed()
        self.log.warning("CI server away; retrying", server=build["server"], error=str(exc),
                         retry_in=round(wait, 1))
        if not away.announced:
            away.announced = True
            self._publish(build, state="error", reason=f"{build['server']} is unavailable: "
                                                       f"{exc}; retrying, the push is kept",
                          retrying=True)

    def _came_back(self, server: str) -> None:
        if self.away.pop(server, None) is not None:
            self.log.info("CI server back", server=server)

    def _trigger_due(self) -> None:
        for build in self.builds.due():
            if self.stopping.is_set() or self._is_away(build["server"]):
                continue
            pc = self.ctx.config.projects.get(build["project"])
            if pc is None or pc.ci is None:
                self.builds.set(build["id"], state=records.ERROR,
                                reason="the project has no ci: any more")
                continue
            values = {"commit": build["commit"], "ref": build["ref"],
                      "short_ref": short_ref_name(build["ref"]), "project": build["project"]}
            params = {k: v.format(**values) for k, v in pc.ci.parameters.items()}
            try:
                handle = self._backend(build["server"]).trigger(Trigger(
                    project=build["project"], ref=build["ref"], commit=build["commit"],
                    job=build["job"], parameters=params))
            except CiUnavailable as exc:
                self._went_away(build, exc)
                continue
            except CiRefused as exc:
                self.builds.set(build["id"], state=records.ERROR, reason=str(exc))
                continue
            self._came_back(build["server"])
            self.builds.set(build["id"], state=records.QUEUED, handle=handle)
            self.log.info("build queued", build=build["id"], server=build["server"],
                          job=build["job"], handle=handle)

    def _poll_active(self) -> None:
        for build in self.builds.active():
            if self.stopping.is_set() or self._is_away(build["server"]):
                continue
            try:
                st = self._backend(build["server"]).poll(build["handle"])
            except CiUnavailable as exc:
                self._went_away(build, exc)
                continue
            except CiRefused as exc:
                self.builds.set(build["id"], state=records.ERROR, reason=str(exc))
                continue
            self._came_back(build["server"])
            fields: dict[str, Any] = {"handle": st.handle}
            for name in ("number", "url", "duration", "result"):
                if getattr(st, name) is not None:
                    fields[name] = getattr(st, name)
            if st.state == "started" and build["state"] == records.QUEUED:
                fields["state"] = records.STARTED
            elif st.state == "finished":
                fields.update(state=records.FINISHED, console_tail=st.console_tail[-200:])
            elif st.state == "cancelled":
                fields.update(state=records.ERROR,
                              reason=f"cancelled in the CI queue{f': {st.why}' if st.why else ''}")
            if fields != {"handle": build["handle"]}:
                self.builds.set(build["id"], **fields)

    def _announce(self) -> None:
        """Publish each build's new state once, in order."""
        for build in self.builds.unannounced():
            state = build["state"]
            if state == records.PENDING:
                self.builds.set(build["id"], announced=state)
                continue
            # a build that moved on faster than we announced: the steps it skipped
            # are said too (queued before started), so watchers see every state
            skipped = [s for s in (records.QUEUED, records.STARTED)
                       if records.ORDER[s] < records.ORDER[state]
                       and records.ORDER.get(build["announced"] or "", -1) < records.ORDER[s]
                       and state == records.FINISHED]
            try:
                for s in skipped:
                    self._publish(build, state=s)
                self._publish(build, state=state)
            except BusError as exc:
                self.log.warning("ci.build not published yet; will retry", build=build["id"],
                                 error=str(exc))
                return
            self.builds.set(build["id"], announced=state)

    def _publish(self, build: dict[str, Any], *, state: str, reason: str | None = None,
                 retrying: bool = False) -> None:
        final = state in (records.FINISHED,)
        number = build.get("number")
        body = protocol.CiBuild(
            project=build["project"], ref=build["ref"], commit=build["commit"],
            state=protocol.BuildState(state), backend=build["server"], job=build["job"],
            build=f"{build['server']}/{build['job']}#{build['id']}",
            result=build.get("result") if final else None, number=number,
            url=build.get("url"), duration=build.get("duration") if final else None,
            console_tail=build.get("console_tail", [])[-200:] if final else [],
            reason=reason or build.get("reason"), retrying=retrying)
        self.ctx.bus.publish(topics.CI_EVENTS, protocol.seal(
            body, key=self.ctx.signing_key, sender=self.ctx.sender,
            correlation=f"ci-{build['id']}"))
        self.log.info("ci.build published", build=build["id"], state=state,
                      result=body.result, number=number)
