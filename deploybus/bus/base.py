"""The transport interface every bus implementation provides.

A transport moves bytes between dotted topics (``deploy.requests.web1``) and
knows nothing of envelopes or daemons. Subscriptions come in two kinds:

* **durable** (``queue="name"``): a named queue that survives the consumer and
  the broker restarting; consumers sharing the name compete for messages.
  Used for anything that must not be lost (deploy requests, rollouts).
* **fan-out** (``queue=None``): a private subscription that lives as long as
  the subscriber; every fan-out subscriber gets a copy. Used for watching
  (``deploybus deploy --wait``, the web page).

Patterns follow AMQP topic rules: ``*`` matches one word, ``#`` zero or more.
Durable subscriptions must name an exact topic (ActiveMQ cannot bind a
virtual-topic queue to a wildcard); fan-out subscriptions may use patterns.

Delivery is at-least-once. The handler of one subscription is called for one
message at a time, on a thread owned by the transport; it must call
:meth:`Delivery.ack` once the work is durable, or :meth:`Delivery.nack`.
An ack on a connection that has since dropped is skipped: the broker will
redeliver, which is why every handler is idempotent by message id.

What happens when a handler raises is written once, here (:func:`deliver`),
and so is the thread that calls the handler (:class:`Worker`); every
transport uses the first, and every transport whose driver allows it the
second.
"""

from __future__ import annotations

import abc
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from deploybus.errors import BusAuthError

#: How many unacknowledged messages a subscription may hold by default.
DEFAULT_PREFETCH = 10

#: Topic that rejected messages are republished to, with the reason.
DEADLETTER_TOPIC = "deploybus.deadletter"

#: Durable queue that keeps dead letters until someone reads them.
DEADLETTER_QUEUE = "deploybus-deadletter"


@dataclass
class Delivery:
    """One received message and the means to settle it."""

    topic: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    redelivered: bool = False
    _ack: Callable[[], None] | None = field(default=None, repr=False)
    _nack: Callable[[bool], None] | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)
    _requeued: bool = field(default=False, repr=False)

    def ack(self) -> None:
        """Tell the broker the message is done with; it will not come back."""
        if not self._settled and self._ack is not None:
            self._settled = True
            self._ack()

    def nack(self, requeue: bool = True) -> None:
        """Hand the message back (``requeue=True``) or drop it."""
        if not self._settled and self._nack is not None:
            self._settled = True
            self._requeued = requeue
            self._nack(requeue)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def requeued(self) -> bool:
        """Handed back with ``nack(requeue=True)``: it will come again."""
        return self._requeued


Handler = Callable[[Delivery], None]


class Subscription(abc.ABC):
    """A live subscription; :meth:`cancel` stops delivery to its handler."""

    @abc.abstractmethod
    def cancel(self, timeout: float = 5.0) -> None:
        """Stop delivering; wait up to ``timeout`` seconds for a handler call
        in progress to return. Unacked messages go back to the broker."""


def deliver(handler: Handler, delivery: Delivery, log: Any, **where: object) -> None:
    """Call ``handler`` with ``delivery``: the handler-failure policy of every
    transport, applied on the thread that consumes.

    A handler that raises has its message logged and dropped
    (``nack(requeue=False)``), and the subscription goes on with the next
    one. Dropped, not handed back: a message that made its handler raise
    would make it raise again, at the head of its queue, for ever. (The
    dispatcher catches its handlers' errors itself and dead-letters the
    message first; this is the floor under every subscriber.) A drop that
    fails in turn (the connection died with the handler) is logged too, so
    the consumer thread does not die of it; the broker redelivers what was
    not settled. ``where`` names the subscription in the log lines.
    """
    try:
        handler(delivery)
    except Exception:
        log.exception("handler raised; message dropped", **where)
        try:
            delivery.nack(requeue=False)
        except Exception:
            log.exception("could not drop the message; the broker will redeliver it", **where)


class Worker(abc.ABC):
    """The thread that calls one subscription's handler, one message at a time,
    under :func:`deliver`'s policy.

    A transport says where the next message comes from
    (:meth:`next_delivery`); the loop, the policy and the thread are the same
    on every transport that uses this. The thread is a daemon thread: one
    stuck in a handler does not keep the process alive past its shutdown
    order. It never ends silently: if anything but a handler's exception
    (which :func:`deliver` takes care of) ends it, that is logged.
    """

    def __init__(self, handler: Handler, *, name: str, log: Any,
                 where: Mapping[str, object]) -> None:
        self.handler = handler
        self._log = log
        self._where = dict(where)
        self.thread = threading.Thread(target=self._work, daemon=True, name=name)

    @abc.abstractmethod
    def next_delivery(self) -> Delivery | None:
        """Block until the next message for the handler; None once the
        subscription stops (the thread then ends)."""

    def start_worker(self) -> None:
        self.thread.start()

    def join_worker(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the handler call in progress (not
        from the handler itself: a handler may cancel its own subscription)."""
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=timeout)

    def _work(self) -> None:
        try:
            while (delivery := self.next_delivery()) is not None:
                deliver(self.handler, delivery, self._log, **self._where)
        except BaseException:
            self._log.exception("consumer thread ended by an error", thread=self.thread.name,
                                **self._where)
            raise


class _LazyLog:
    """structlog's logger ``name``, with structlog imported on first use: a
    command that only publishes (the CLI) does not pay for loading it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._log: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._log is None:
            import structlog
            self._log = structlog.get_logger(self._name)
        return getattr(self._log, attr)


def get_logger(name: str) -> Any:
    """The bus modules' logger (see :class:`_LazyLog`)."""
    return _LazyLog(name)


def refused(url: str, vhost: str, detail: str) -> BusAuthError:
    """The error for a broker that refused our credentials, vhost or
    permissions, worded alike on every transport: it names the broker (the
    URL with its password redacted, vhost and query kept) and the vhost, so
    that a person can tell which ``bus.url`` to fix. ``detail`` is the
    broker's own reason."""
    from deploybus.bus import redact  # the package imports this module first
    return BusAuthError(f"broker {redact(url)} refused the connection (vhost {vhost!r}): "
                        f"{detail.rstrip('. ')}; check the user, password and vhost in bus.url")


#: The longest wait between two reconnect attempts (:class:`Backoff`'s cap).
RECONNECT_CAP = 10.0
#: After a broker outage, how much later than ours a host's link may come
#: back: one wait at the cap and one connect attempt that timed out against
#: a broker still starting (each transport gives up on a connect within
#: 10 s).
RECONNECT_LAG = 2 * RECONNECT_CAP


class LinkClock:
    """When a transport's broker links were down, so that a caller does not
    count a broker outage against the hosts on the far side of it.

    A transport calls :meth:`down` when a link (its connection, or one
    consumer's) drops or is not up yet, and :meth:`up` once it carries
    messages again. The transport counts as down while any link is down.
    The orchestrator uses :meth:`excused` to push back its answer deadlines
    and :meth:`heard_for` to judge a host offline only on silence it was
    listening to.

    A host's link comes back on its own schedule, up to ``peer_lag`` seconds
    after ours (see :data:`RECONNECT_LAG`); after a shorter outage, by no
    more than the outage lasted, since a reconnect loop that began with
    ours waits at most about as long as it has been trying. So after each
    outage the clock goes on counting for that long: the hosts may still
    be coming back.
    """

    def __init__(self, peer_lag: float | None = None) -> None:
        self._lock = threading.Lock()
        self._down: set[object] = set()
        self._since = time.monotonic()  # when the current up or down period began
        self._total = 0.0
        self.peer_lag = RECONNECT_LAG if peer_lag is None else peer_lag
        self._lags = 0.0  # time allowed for hosts coming back after earlier outages
        self._last_lag = 0.0  # the same after the last outage (counted while up)

    def down(self, link: object) -> None:
        with self._lock:
            if not self._down:
                now = time.monotonic()
                self._lags += min(now - self._since, self._last_lag)
                self._last_lag = 0.0
                self._since = now
            self._down.add(link)

    def up(self, link: object) -> None:
        with self._lock:
            if link not in self._down:
                return
            self._down.discard(link)
            if not self._down:
                now = time.monotonic()
                outage = now - self._since
                self._total += outage
                self._last_lag = min(outage, self.peer_lag)
                self._since = now

    def downtime(self) -> float:
        """Seconds spent down so far, counting an outage still going on."""
        with self._lock:
            return self._total + (time.monotonic() - self._since if self._down else 0.0)

    def up_for(self) -> float:
        """Seconds since every link was last up together (0 while one is down)."""
        with self._lock:
            return 0.0 if self._down else time.monotonic() - self._since

    def excused(self) -> float:
        """Seconds in which no answer could be expected from a host: while
        down, and after each outage while the hosts may still be coming back."""
        with self._lock:
            span = time.monotonic() - self._since
            return self._total + self._lags + (span if self._down
                                               else min(span, self._last_lag))

    def heard_for(self) -> float:
        """Seconds a host's link has surely been up along with ours: :meth:`up_for`
        less the last outage's allowance for hosts coming back later (0 if
        that has not passed yet)."""
        with self._lock:
            if self._down:
                return 0.0
            return max(0.0, time.monotonic() - self._since - self._last_lag)


class Transport(abc.ABC):
    """Publish, subscribe, declare, close. Implementations translate driver
    errors into :class:`deploybus.errors.BusError` at this boundary."""

    url: str

    #: Up and down times of the broker links (see :class:`LinkClock`); a
    #: transport without a broker (the memory bus) is always up.
    links: LinkClock

    @abc.abstractmethod
    def publish(self, topic: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        """Send ``body`` to ``topic`` persistently; returns once the broker has it."""

    def publish_batch(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(topic, body)`` messages persistently, in order; returns once the
        broker has all of them. A transport may take them in one round trip
        (the orchestrator starts a whole batch of hosts this way); this one
        publishes them one by one. On error, some may have been sent."""
        for topic, body in messages:
            self.publish(topic, body)

    @abc.abstractmethod
    def subscribe(self, topic: str, handler: Handler, *, queue: str | None = None,
                  prefetch: int = DEFAULT_PREFETCH) -> Subscription:
        """Call ``handler`` for every message on ``topic`` (see module doc)."""

    def publish_for(self, topic: str, queue: str, body: bytes) -> None:
        """Send ``body`` so that durable ``queue`` (subscribed to ``topic``)
        holds it even if its consumer never subscribed yet: a rollout sent
        before the first orchestrator ran waits for it instead of going
        nowhere. Here: declare, then publish; a transport may send it to the
        queue alone (STOMP), so use it for a queue with one consumer."""
        self.declare(topic, queue)
        self.publish(topic, body)

    @abc.abstractmethod
    def declare(self, topic: str, queue: str) -> None:
        """Make sure durable ``queue`` exists and collects ``topic``, without consuming."""

    @abc.abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Stop every subscription and drop connections. Unacked messages go back.
        ``timeout`` bounds the wait for each subscription (see
        :meth:`Subscription.cancel`); a command about to exit passes 0."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@lru_cache(maxsize=1024)
def topic_regex(pattern: str) -> re.Pattern[str]:
    """Compile an AMQP topic pattern (``*`` one word, ``#`` any words)."""
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)?")
        elif word == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(word))
    rx = r"\.".join(parts)
    # "a.#" must match "a" too: let the dot before a trailing # be optional.
    rx = rx.replace(r"\.(?:[^.]+(?:\.[^.]+)*)?", r"(?:\.[^.]+(?:\.[^.]+)*)?")
    # "#.c" must match "c" too: a leading # may swallow its dot.
    rx = rx.replace(r"(?:[^.]+(?:\.[^.]+)*)?\.", r"(?:[^.]+\.)*")
    return re.compile(rf"^{rx}$")


def topic_matches(pattern: str, topic: str) -> bool:
    return topic_regex(pattern).match(topic) is not None


def check_topic(topic: str, *, pattern: bool = False) -> str:
    """Refuse empty words and wildcards where an exact topic is needed."""
    if not topic or any(not w for w in topic.split(".")):
        raise ValueError(f"bad topic {topic!r}: empty word")
    if not pattern and any(w in ("*", "#") for w in topic.split(".")):
        raise ValueError(f"topic {topic!r} must not contain wildcards here")
    return topic


class Backoff:
    """Capped exponential backoff for reconnect loops, interruptible by ``stop``.

    Each wait is drawn between half and all of the current step, so that
    the many clients a broker outage cut off at once do not all knock at
    the same instant when it comes back. ``delay`` is the next wait."""

    def __init__(self, *, initial: float = 0.2, cap: float = RECONNECT_CAP,
                 stop: threading.Event | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.stop = stop or threading.Event()
        self.reset()

    def reset(self) -> None:
        self._step = self.initial
        self.delay = self._jittered()

    def _jittered(self) -> float:
        return self._step * random.uniform(0.5, 1.0)

    def wait(self) -> bool:
        """Sleep the current delay; False if asked to stop meanwhile."""
        stopped = self.stop.wait(self.delay)
        self._step = min(self.cap, self._step * 2)
        self.delay = self._jittered()
        return not stopped
