"""From transport deliveries to envelope handlers, with dead-lettering.

Every daemon subscribes through :class:`Dispatcher`. A delivery whose body is
not a valid envelope, or whose type does not belong on its topic, is logged
with the reason, counted, republished to the dead-letter topic, and acked: it
never reaches the handler and never stops the daemon. A handler that raises
is treated the same way, so a poison message cannot loop. Only if the
dead-letter publish itself fails is the message handed back to the broker,
so nothing is lost.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable

import structlog

from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, Subscription, Transport
from deploybus.envelope import Envelope, decode, fmt_time, now
from deploybus.errors import BusError, EnvelopeError
from deploybus.runner import Stats

EnvelopeHandler = Callable[[Envelope, Delivery], None]


class Dispatcher:
    """Decode, validate, dispatch, dead-letter. One per service."""

    def __init__(self, bus: Transport, *, daemon: str, host: str, stats: Stats) -> None:
        self.bus, self.daemon, self.host, self.stats = bus, daemon, host, stats
        self.log = structlog.get_logger("deploybus.dispatch").bind(daemon=daemon, host=host)
        self.subscriptions: list[Subscription] = []
        self._declared = False

    def subscribe(self, topic: str, handler: EnvelopeHandler, *, queue: str | None = None,
                  types: Iterable[str] | None = None, prefetch: int = 10,
                  auto_ack: bool = True) -> Subscription:
        """Call ``handler(envelope, delivery)`` for valid messages of ``types``.
        With ``auto_ack`` the delivery is acked when the handler returns."""
        allowed = frozenset(types) if types else None
        if not self._declared:
            self.bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
            self._declared = True

        def on_delivery(d: Delivery) -> None:
            self.stats.incr("received")
            try:
                env = decode(d.body)
                if allowed is not None and env.type not in allowed:
                    raise EnvelopeError(f"type {env.type!r} does not belong on {d.topic!r}")
            except EnvelopeError as exc:
                self.reject(d, f"invalid message: {exc}")
                return
            try:
                handler(env, d)
            except Exception as exc:
                self.log.exception("handler failed", topic=d.topic, id=env.id, type=env.type)
                self.reject(d, f"handler failed: {type(exc).__name__}: {exc}")
                return
            if auto_ack:
                d.ack()

        sub = self.bus.subscribe(topic, on_delivery, queue=queue, prefetch=prefetch)
        self.subscriptions.append(sub)
        return sub

    def reject(self, d: Delivery, reason: str) -> None:
        """Log, count and dead-letter ``d``, then ack it."""
        self.stats.incr("rejected")
        self.log.warning("message rejected", topic=d.topic, reason=reason, size=len(d.body))
        try:
            text, encoding = d.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(d.body).decode(), "base64"
        letter = {"reason": reason, "topic": d.topic, "daemon": self.daemon, "host": self.host,
                  "at": fmt_time(now()), "encoding": encoding, "body": text}
        try:
            self.bus.publish(DEADLETTER_TOPIC, json.dumps(letter).encode())
        except BusError as exc:
            self.log.error("dead-letter publish failed; handing message back", error=str(exc))
            d.nack(requeue=True)
            return
        self.stats.incr("deadlettered")
        d.ack()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every subscription, waiting up to ``timeout`` for handlers in progress."""
        for sub in self.subscriptions:
            sub.cancel(timeout)
        self.subscriptions.clear()
