"""The notifier: rollout and CI outcomes -> webhooks and email, per project.

It takes ``deploy.rollout.status`` on ``deploy.status`` (durable queue
``notifier-status``) and ``ci.build`` on ``ci.events`` (``notifier-ci``).
The dispatcher lets through only messages signed by a trusted key whose
role may send them: statuses from an orchestrator key, builds from a CI
key (``protocol.SENDERS``); anything else is dead-lettered before it gets
here and causes nothing.

What each message means is :mod:`.events`. A status names its rollout
only, so the rollout's project, environment, ref, user, strategy and host
steps are read from the state database (``state.url``, as the web does):
the notifier needs read access to it. The notifications a message asks for,
one per target of its project (``projects.<p>.notify``: webhooks and email
addresses) and only for the events the project listens to, are recorded in
the notifier's own table (:mod:`.queue`, ``<state.dir>/notifier.db``)
*before* the message is acked. If the state database or the table cannot
be had, the handler waits and tries again (capped backoff, a warning each
time) and on a stop hands the message back: a message is never acked
without its notifications recorded. Each notification's id comes from its
rollout (or build) and target, so a message delivered twice, or a status
said again, sends nothing more.

Worker threads (:data:`WORKERS`) deliver what is due (:mod:`.senders`),
at most one delivery per target at a time, so a receiver that hangs holds
one worker and never the others. A failed try is retried with capped
exponential backoff (:class:`Retry`: about 1 s doubling to 5 min, each wait
drawn between half and all of the step) until it goes, or until
``attempts`` tries or ``max_age`` after it was recorded: then it is given
up. Every failed try is a warning in the log, giving up an error; the
counters ``notify_sent``, ``notify_failed`` (tries that failed),
``notify_gave_up``, ``notify_queued`` and ``notify_duplicate`` are in the
daemon's :class:`~deploybus.runner.Stats` and on every delivery's log line,
and a ``notifier stats`` line (with the table's pending count) is logged
every :data:`STATS_EVERY` seconds when they changed, and at stop. A
restart goes on with every pending row.

The notifier never publishes and never touches a rollout: a notification
that fails cannot fail or hold up a deploy.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deploybus import protocol, redact, topics
from deploybus.bus import Delivery
from deploybus.bus.base import Backoff
from deploybus.daemons.notifier import events, senders
from deploybus.daemons.notifier.queue import NewNotification, Queue, Row
from deploybus.dispatch import Dispatcher, Message
from deploybus.errors import DeployBusError
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.store import Store

#: Threads that deliver.
WORKERS = 4
#: Seconds between two ``notifier stats`` log lines (when something changed).
STATS_EVERY = 300.0
#: Longest a worker sleeps without looking at the table.
IDLE = 5.0
#: Counters this daemon keeps (in ``ctx.stats``).
COUNTERS = ("notify_queued", "notify_duplicate", "notify_filtered", "notify_sent",
            "notify_failed", "notify_gave_up", "notify_unknown_rollout", "notify_store_errors")

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """When a failed notification is tried again, and when it is given up."""

    #: Seconds before the second try; doubling after each failure ...
    first: float = 1.0
    #: ... up to this many seconds.
    cap: float = 300.0
    #: Tries in all before giving up.
    attempts: int = 12
    #: Seconds after it was recorded after which a notification is given up
    #: at its next failure.
    max_age: float = 24 * 3600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed try."""
        step = min(self.cap, self.first * 2 ** max(0, failures - 1))
        return step * random.uniform(0.5, 1.0)


class _Stopping(Exception):
    """The notifier stops while a handler waits for its database."""


class Notifier(Service):
    """See the module docstring."""

    name = "notifier"

    def __init__(self, ctx: Context, store: Store | None = None, *, retry: Retry | None = None,
                 workers: int = WORKERS, webhook_timeout: float = senders.WEBHOOK_TIMEOUT,
                 stats_every: float = STATS_EVERY) -> None:
        super().__init__(ctx)
        self._store_obj = store
        self.retry = retry or Retry()
        self.webhook_timeout = webhook_timeout
        self.stats_every = stats_every
        self.path = ctx.config.state_dir / "notifier.db"
        self.queue: Queue | None = None
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats,
                                     verifier=ctx.config.verifier())
        self.stopping = threading.Event()
        self.cond = threading.Condition()
        self.busy: set[str] = set()  # lanes with a delivery in progress
        self.workers = [threading.Thread(target=self._work, name=f"notifier-{i}", daemon=True)
                        for i in range(workers)]
        self._reported: dict[str, int] = {}
        self._reported_at = time.monotonic()
        self._report_lock = threading.Lock()

    # -- life ----------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.queue = Queue(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise DeployBusError(f"cannot open the notifier's table {self.path}: {exc}") \
                from None
        for w in self.workers:
            w.start()
        self.dispatcher.subscribe(topics.STATUS, self._acked(self.on_status),
                                  queue=topics.NOTIFIER_STATUS,
                                  types={"deploy.rollout.status"}, auto_ack=False)
        self.dispatcher.subscribe(topics.CI_EVENTS, self._acked(self.on_build),
                                  queue=topics.NOTIFIER_CI, types={"ci.build"}, auto_ack=False)
        projects = sorted(p.name for p in self.ctx.config.projects.values() if p.notify)
        self.log.info("notifier ready", projects=projects, table=str(self.path),
                      pending=self.queue.counts().get("pending", 0),
                      smtp=f"{self.ctx.config.smtp.host}:{self.ctx.config.smtp.port}"
                      if self.ctx.config.smtp else None)

    def stop(self, timeout: float = STOP_GRACE) -> None:
        deadline = time.monotonic() + timeout
        # First, so that a handler waiting for its database hands its message
        # back at once; one that is recording finishes (the table stays open).
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        self.dispatcher.close(timeout)
        for w in self.workers:
            if w.is_alive():
                w.join(max(0.0, deadline - time.monotonic()))
        if self.queue is not None:
            self.log.info("notifier stats", **self.report())
            if not any(w.is_alive() for w in self.workers):
                self.queue.close()

    def healthy(self) -> bool:
        return all(w.is_alive() for w in self.workers)

    def report(self) -> dict[str, int]:
        """The counters and the table's rows by state (``pending``, ``sent``,
        ``gave_up``)."""
        stats = self.ctx.stats.snapshot()
        out = {k: stats.get(k, 0) for k in COUNTERS}
        if self.queue is not None:
            try:
                counts = self.queue.counts()
            except sqlite3.Error:
                counts = {}
            out |= {f"table_{k}": counts.get(k, 0) for k in ("pending", "sent", "gave_up")}
        return out

    # -- messages ------------------------------------------------------------------

    @staticmethod
    def _acked(handler: Callable[[Message, Delivery], None]) -> Callable[[Message, Delivery],
                                                                          None]:
        """``handler``, then the ack; unless the notifier stops while the
        handler waits for a database: then the message is left unacked, and
        cancelling the subscription gives it back to the broker for the next
        start (a nack would hand it straight back to this subscription, and
        count as a delivery towards being set aside)."""
        def acked(msg: Message, d: Delivery) -> None:
            try:
                handler(msg, d)
            except _Stopping:
                return
            d.ack()
        return acked

    def on_status(self, msg: Message, _d: Delivery) -> None:
        """A rollout's status, from an orchestrator key."""
        body = msg.body
        assert isinstance(body, protocol.RolloutStatus)
        kind = events.status_kind(body)
        if kind is None or not any(p.notify for p in self.ctx.config.projects.values()):
            return
        record = self._persist("read the rollout from the state database",
                               lambda: self._store().rollout(body.rollout))
        if record is None:
            self.ctx.stats.incr("notify_unknown_rollout")
            self.log.warning("status of a rollout the state database does not know; "
                             "no notification (does the notifier read the orchestrator's "
                             "state.url?)", rollout=body.rollout, state=body.state,
                             message=msg.env.id)
            return
        self._record(events.from_status(body, kind, record, msg.env.at), msg)

    def on_build(self, msg: Message, _d: Delivery) -> None:
        """A CI build's event, from a CI key."""
        body = msg.body
        assert isinstance(body, protocol.CiBuild)
        occurrence = events.from_build(body, msg.env.at)
        if occurrence is not None:
            self._record(occurrence, msg)

    def _record(self, occ: events.Occurrence, msg: Message) -> None:
        """Record the notifications ``occ`` asks for (before the message is acked)."""
        pc = self.ctx.config.projects.get(occ.project)
        if pc is None or pc.notify is None:
            return
        facts = occ.for_project(pc.notify.events)
        if facts is None:
            self.ctx.stats.incr("notify_filtered")
            self.log.debug("not an event the project listens to", project=occ.project,
                           source=occ.source, candidates=list(occ.candidates))
            return
        notes = [NewNotification(source=occ.source, event=facts["event"], project=occ.project,
                                 kind="webhook", address=w.url, format=w.format,
                                 secret=w.secret, facts=facts) for w in pc.notify.webhooks]
        notes += [NewNotification(source=occ.source, event=facts["event"], project=occ.project,
                                  kind="email", address=a, facts=facts)
                  for a in pc.notify.email]
        if not notes:
            return
        queue = self.queue
        assert queue is not None
        added = self._persist("record the notifications", lambda: queue.add(notes))
        repeated = len(notes) - len(added)
        if repeated:
            self.ctx.stats.incr("notify_duplicate", repeated)
        if added:
            self.ctx.stats.incr("notify_queued", len(added))
            with self.cond:
                self.cond.notify_all()
        self.log.info("notifications recorded" if added else
                      "notifications already recorded; not again",
                      notification=facts["event"], project=occ.project, source=occ.source,
                      message=msg.env.id, new=len(added), repeated=repeated,
                      targets=[n.address if n.kind == "email" else senders.safe_url(n.address)
                               for n in notes])

    def _store(self) -> Store:
        if self._store_obj is None:
            self._store_obj = Store(self.ctx.config.state_url)
        return self._store_obj

    def _persist(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, tried again while the database it needs is away, until
        the notifier stops (:class:`_Stopping`)."""
        backoff = Backoff(initial=0.5, cap=30.0, stop=self.stopping)
        while True:
            try:
                return fn()
            except (DeployBusError, sqlite3.Error) as exc:
                self.ctx.stats.incr("notify_store_errors")
                self.log.warning(f"cannot {what}; retrying (the message waits)",
                                 error=redact.text(str(exc))[:500],
                                 retry_in=round(backoff.delay, 1))
                if not backoff.wait():
                    raise _Stopping from None

    # -- delivering ----------------------------------------------------------------

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                row = self._claim()
            except sqlite3.Error as exc:
                self.log.warning("cannot read the notifier's table; retrying",
                                 error=str(exc))
                self.stopping.wait(1.0)
                continue
            if row is None:
                self._idle()
                continue
            try:
                self._attempt(row)
            except Exception:  # a worker never dies: the row stays pending
                self.log.exception("delivery bookkeeping failed", delivery=row.delivery)
                self.stopping.wait(1.0)
            finally:
                with self.cond:
                    self.busy.discard(row.lane)
                    self.cond.notify_all()
            self._maybe_report()

    def _claim(self) -> Row | None:
        """The next due row of a lane nobody is delivering to, now marked busy."""
        assert self.queue is not None
        with self.cond:
            rows = self.queue.due(exclude_lanes=self.busy, limit=1)
            if not rows:
                return None
            self.busy.add(rows[0].lane)
            return rows[0]

    def _idle(self) -> None:
        assert self.queue is not None
        with self.cond:
            if self.stopping.is_set():
                return
            try:
                nxt = self.queue.next_at(exclude_lanes=self.busy)
            except sqlite3.Error:
                nxt = None
            wait = IDLE if nxt is None else min(IDLE, nxt - time.time())
            if wait > 0:
                self.cond.wait(wait)
        self._maybe_report()

    def _attempt(self, row: Row) -> None:
        assert self.queue is not None
        attempt = row.attempts + 1
        where = {"delivery": row.delivery, "notification": row.event, "project": row.project,
                 "kind": row.kind, "target": senders.target_label(row), "attempt": attempt}
        try:
            senders.deliver(row, smtp=self.ctx.config.smtp, timeout=self.webhook_timeout)
        except Exception as exc:
            error = str(exc) if isinstance(exc, senders.DeliveryError) else \
                redact.text(f"{type(exc).__name__}: {exc}")[:senders.ERROR_CHARS]
            self.ctx.stats.incr("notify_failed")
            if attempt >= self.retry.attempts or \
                    time.time() - row.created_at >= self.retry.max_age:
                self.queue.gave_up(row.id, attempts=attempt, error=error)
                self.ctx.stats.incr("notify_gave_up")
                self.log.error("notification given up", error=error, **where, **self._totals())
                return
            delay = self.retry.delay(attempt)
            self.queue.retry(row.id, attempts=attempt, next_at=time.time() + delay, error=error)
            self.log.warning("notification failed; will retry", error=error,
                             retry_in=round(delay, 2), **where, **self._totals())
            return
        self.queue.sent(row.id, attempts=attempt)
        self.ctx.stats.incr("notify_sent")
        self.log.info("notification sent", **where, **self._totals())

    def _totals(self) -> dict[str, int]:
        stats = self.ctx.stats
        return {"sent": stats["notify_sent"], "failed": stats["notify_failed"],
                "gave_up": stats["notify_gave_up"]}

    def _maybe_report(self) -> None:
        with self._report_lock:
            now = time.monotonic()
            if now - self._reported_at < self.stats_every:
                return
            self._reported_at = now
            counters = {k: self.ctx.stats[k] for k in COUNTERS}
            if counters == self._reported:
                return
            self._reported = counters
        self.log.info("notifier stats", **self.report())

    def pending(self) -> list[Any]:
        """The rows still to deliver (tests, people)."""
        assert self.queue is not None
        return [r for r in self.queue.rows() if r.state == "pending"]
