"""The in-process bus (``memory://``): the embedded default of ``deploybus up``.

It behaves like a small topic broker so that everything above the transport
runs unchanged: named durable queues keep messages while nobody consumes,
fan-out subscriptions get copies, unacked messages go back on cancel, and
prefetch bounds what one consumer holds. ``memory://name`` selects a separate
broker; all transports with the same name in one process share it. Nothing
survives the process: use a real broker where that matters.
"""

from __future__ import annotations

import functools
import itertools
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from deploybus.bus.base import (
    DEFAULT_PREFETCH,
    Delivery,
    Handler,
    LinkClock,
    Subscription,
    Transport,
    Worker,
    check_topic,
    get_logger,
    topic_matches,
)

log = get_logger("deploybus.bus.memory")


@dataclass
class _Message:
    topic: str
    body: bytes
    headers: dict[str, str]
    redelivered: bool = False


class _Queue:
    def __init__(self, name: str, *, durable: bool) -> None:
        self.name, self.durable = name, durable
        self.patterns: set[str] = set()
        self.messages: deque[_Message] = deque()
        self.cond = threading.Condition()
        self.consumers = 0


class MemoryBroker:
    """Holds the queues of one ``memory://name`` bus."""

    _brokers: dict[str, MemoryBroker] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, _Queue] = {}

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        with cls._lock:
            return cls._brokers.setdefault(name, cls())

    def queue(self, name: str, pattern: str, *, durable: bool) -> _Queue:
        with self.lock:
            q = self.queues.get(name)
            if q is None:
                q = self.queues[name] = _Queue(name, durable=durable)
            q.patterns.add(pattern)
            return q

    def drop(self, q: _Queue) -> None:
        with self.lock:
            self.queues.pop(q.name, None)

    def route(self, msg: _Message) -> None:
        with self.lock:
            targets = [q for q in self.queues.values()
                       if any(topic_matches(p, msg.topic) for p in q.patterns)]
        for q in targets:
            with q.cond:
                q.messages.append(_Message(msg.topic, msg.body, dict(msg.headers)))
                q.cond.notify()


class _MemorySubscription(Worker, Subscription):
    _ids = itertools.count(1)

    def __init__(self, broker: MemoryBroker, q: _Queue, handler: Handler, prefetch: int) -> None:
        super().__init__(handler, name=f"memory-sub-{q.name}-{next(self._ids)}", log=log,
                         where={"queue": q.name})
        self.broker, self.q = broker, q
        self.prefetch = max(1, prefetch)
        self.unacked: dict[int, _Message] = {}
        self.stopped = False
        self._tags = itertools.count(1)
        q.consumers += 1
        self.start_worker()

    def _settle(self, tag: int, requeue: bool) -> None:
        with self.q.cond:
            msg = self.unacked.pop(tag, None)
            if msg is not None and requeue:
                msg.redelivered = True
                self.q.messages.appendleft(msg)
            self.q.cond.notify_all()

    def next_delivery(self) -> Delivery | None:
        with self.q.cond:
            while not self.stopped and (not self.q.messages
                                        or len(self.unacked) >= self.prefetch):
                self.q.cond.wait()
            if self.stopped:
                return None
            msg = self.q.messages.popleft()
            tag = next(self._tags)
            self.unacked[tag] = msg
        return Delivery(
            topic=msg.topic, body=msg.body, headers=msg.headers, redelivered=msg.redelivered,
            _ack=functools.partial(self._settle, tag, False),
            _nack=functools.partial(self._settle, tag),
        )

    def cancel(self, timeout: float = 5.0) -> None:
        with self.q.cond:
            if self.stopped:
                return
            self.stopped = True
            self.q.cond.notify_all()
        self.join_worker(timeout)
        with self.q.cond:
            # Like a broker on a closed channel: what was not acked goes back.
            for tag in sorted(self.unacked, reverse=True):
                msg = self.unacked.pop(tag)
                msg.redelivered = True
                self.q.messages.appendleft(msg)
            self.q.consumers -= 1
            self.q.cond.notify_all()
        if not self.q.durable:
            self.broker.drop(self.q)


class MemoryTransport(Transport):
    """In-process transport; see the module docstring."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.links = LinkClock()
        self.broker = MemoryBroker.named(urlsplit(url).netloc or "default")
        self.subs: list[_MemorySubscription] = []

    def publish(self, topic: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        self.broker.route(_Message(check_topic(topic), bytes(body), dict(headers or {})))

    def subscribe(self, topic: str, handler: Handler, *, queue: str | None = None,
                  prefetch: int = DEFAULT_PREFETCH) -> Subscription:
        check_topic(topic, pattern=queue is None)
        name = queue or f"fanout-{uuid.uuid4().hex}"
        q = self.broker.queue(name, topic, durable=queue is not None)
        sub = _MemorySubscription(self.broker, q, handler, prefetch)
        self.subs.append(sub)
        return sub

    def declare(self, topic: str, queue: str) -> None:
        self.broker.queue(queue, check_topic(topic), durable=True)

    def close(self, timeout: float = 5.0) -> None:
        for sub in self.subs:
            sub.cancel(timeout)
        self.subs.clear()
