"""The agent's workers: one thread per project runs its requests one after
another (:mod:`.steps`); different projects deploy at the same time. A
ticker thread sends a "still working" line for a deploy that has been quiet
for :data:`HEARTBEAT` seconds, so a watcher (the orchestrator's stuck
threshold) can tell a slow step from a dead agent. A warm stop lets running
deploys finish and reports queued ones as not started.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from deploybus import envelope
from deploybus.daemons.deploy_agent import steps
from deploybus.daemons.deploy_agent.journal import RUNNING, Journal

#: A running deploy that has sent no progress for this long sends a "still
#: working" line.
HEARTBEAT = 15.0

#: Steps whose journal record is fsynced (accepted and done always are).
SYNCED_STEPS = frozenset({"switch"})


def _now() -> str:
    return envelope.fmt_time(envelope.now())


class JournalTracker(steps.Tracker):
    """Writes each step (and the running script's process group) to the journal."""

    def __init__(self, journal: Journal, key: str, entry: dict[str, Any]) -> None:
        self.journal, self.key, self.entry = journal, key, entry

    def step(self, step: str, *, lazy: bool = False, **fields: Any) -> None:
        self.entry.update(fields)
        self.entry.update(state=RUNNING, step=step, step_at=_now())
        if lazy:
            return  # written with the next record (see steps.Tracker.step)
        # Every write survives the agent being killed (rename); the one before
        # the switch must also survive a power cut, so that recovery knows the
        # release it may have to switch back from.
        self.journal.write(self.key, self.entry, sync=step in SYNCED_STEPS)

    def script(self, pgid: int | None, start: int | None) -> None:
        if pgid is None:
            # Forgotten with the next write, not written now: a record left
            # behind is harmless, since recovery kills a group only while
            # it is still the one recorded (leader's start time).
            self.entry.pop("script", None)
        else:
            self.entry["script"] = {"pgid": pgid, "start": start}
            self.journal.write(self.key, self.entry, sync=False)


class Job:
    """One request the agent accepted (or found unfinished in its journal)."""

    def __init__(self, key: str, entry: dict[str, Any], *, recover: bool = False) -> None:
        self.key, self.entry, self.recover = key, entry, recover
        self.rollout = str(entry.get("rollout") or key)
        self.last_progress = time.monotonic()
        self.started = time.monotonic()
        req = entry.get("request") or {}
        self.project = str(req.get("project"))
        #: What every progress and result body of this job carries.
        self.base: dict[str, Any] = {
            "rollout": self.rollout, "request_id": req.get("id"),
            "action": entry.get("action") or "deploy", "undo": bool(entry.get("undo")),
            "project": self.project, "environment": req.get("environment"),
            "ref": req.get("ref")}


class Workers:
    """Per-project worker threads and the ticker; see the module docstring.
    ``execute(job)`` runs a job and returns its result body; ``finish(job,
    result)`` records and sends it; ``progress(job)`` is the job's progress
    callback."""

    def __init__(self, *, execute: Callable[[Job], dict[str, Any]],
                 finish: Callable[[Job, dict[str, Any]], None],
                 progress: Callable[[Job], steps.Progress], log: Any) -> None:
        self._execute, self._finish, self._progress, self.log = execute, finish, progress, log
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Job]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._running: dict[str, Job] = {}
        self._stopping = False
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="agent-ticker")

    def start(self) -> None:
        self._ticker.start()

    def stop(self, deadline: float) -> list[str]:
        """Start nothing more; wait for running deploys until ``deadline``
        (monotonic). Returns the projects still deploying then."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in list(self._threads.values()):
            t.join(max(0.0, deadline - time.monotonic()))
        return [p for p, t in self._threads.items() if t.is_alive()]

    def running(self) -> dict[str, str]:
        """Project -> rollout, of the deploys running now."""
        with self._cond:
            return {p: j.rollout for p, j in self._running.items()}

    def ahead_of(self, project: str) -> list[str]:
        """Rollouts a new request of ``project`` would wait behind."""
        with self._cond:
            running = [self._running[project].rollout] if project in self._running else []
            return running + [j.rollout for j in self._queues.get(project, ())]

    def readdress(self, key: str, request_id: str) -> bool:
        """The job of journal key ``key``, running or waiting, answers
        ``request_id`` from now on (an orchestrator that restarted asked
        again, and counts only answers to what it sent). False: no such job
        here any more."""
        with self._cond:
            jobs = [*self._running.values(), *(j for q in self._queues.values() for j in q)]
            for job in jobs:
                if job.key == key:
                    job.base["request_id"] = request_id
                    return True
        return False

    def enqueue(self, job: Job) -> None:
        with self._cond:
            self._queues.setdefault(job.project, deque()).append(job)
            t = self._threads.get(job.project)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._work, args=(job.project,), daemon=True,
                                     name=f"deploy-{job.project}")
                self._threads[job.project] = t
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
                    result = {"status": "failed", "failure": "agent-error",
                              "reason": "agent stopped before the deploy started"}
                else:
                    result = self._execute(job)
            except Exception as exc:  # a worker never dies silently
                self.log.exception("deploy crashed", rollout=job.rollout)
                result = {"status": "failed", "failure": "agent-error",
                          "reason": f"agent error: {type(exc).__name__}: {exc}"}
            try:
                self._finish(job, result)
            except Exception:
                self.log.exception("could not record the result", rollout=job.rollout)
            finally:
                with self._cond:
                    self._running.pop(project, None)

    def _tick(self) -> None:
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
