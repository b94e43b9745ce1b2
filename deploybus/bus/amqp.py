"""AMQP 0-9-1 transport (kombu) for RabbitMQ.

URL: ``amqp://user:pass@host:5672/vhost?prefix=&heartbeat=30`` (``amqps://``
for TLS). Everything goes through the ``amq.topic`` exchange with the topic as
routing key, which is where RabbitMQ's STOMP plugin publishes ``/topic/...``:
STOMP and AMQP clients of one RabbitMQ see each other's messages.

Publishing uses publisher confirms, so a publish that returns is on the
broker. Each subscription owns a connection and a thread that drains it,
reconnecting with capped backoff; the handler runs on that thread and must
settle the message there.

A broker that refuses the user, password, vhost or a permission raises
:class:`BusAuthError` at once, from every call: retrying will not help. Only
a subscription that was already consuming goes on retrying (with the
refusal logged as an error): its password may be rotated back.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import amqp.exceptions
import kombu
import kombu.exceptions

from deploybus.bus.base import (
    DEFAULT_PREFETCH,
    Backoff,
    Delivery,
    Handler,
    LinkClock,
    Subscription,
    Transport,
    check_topic,
    deliver,
    get_logger,
    refused,
)
from deploybus.errors import BusAuthError, BusConnectionError

log = get_logger("deploybus.bus.amqp")

#: Seconds a consumer waits for a frame before checking heartbeats and whether
#: it was cancelled: bounds how long cancel() and close() take.
DRAIN_TIMEOUT = 0.25

#: Errors kombu raises besides the transport's own connection/channel errors.
_DRIVER_ERRORS = (OSError, kombu.exceptions.OperationalError)

#: Errors that mean the broker refused us, not that it is away (see
#: :class:`BusAuthError`): 403 ACCESS_REFUSED (login refused, or no permission
#: on an exchange or queue), 530 NOT_ALLOWED (unknown vhost, or no access to
#: it) and 402 INVALID_PATH (the spec's unknown vhost). Not 320
#: CONNECTION_FORCED: that is a broker shutting down or an operator closing
#: connections, an outage like any other.
_AUTH_ERRORS = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed,
                amqp.exceptions.InvalidPath)


class _Sub(Subscription):
    """One consumer: its own connection, and its own thread that connects,
    drains and reconnects.

    The handler runs on that thread, and so this transport does not use the
    shared :class:`~deploybus.bus.base.Worker` (it does use the shared
    handler-failure policy, :func:`~deploybus.bus.base.deliver`): a py-amqp
    channel is not thread-safe, so a message must be acked or rejected on
    the thread that drains its connection, and handing the handler call to
    another thread would need every settle sent back to this one. The price:
    while a handler runs, this connection sends no heartbeats; a handler
    that takes longer than about two heartbeat intervals loses the
    connection and the broker redelivers its message (the dispatcher sets
    such a message aside after a few deliveries)."""

    def __init__(self, t: AmqpTransport, topic: str, handler: Handler, queue: str | None,
                 prefetch: int) -> None:
        self.t, self.topic, self.handler, self.queue = t, topic, handler, queue
        self.prefetch = max(1, prefetch)
        self.stop = threading.Event()
        self.ready = threading.Event()
        #: Set once subscribe() may return: consuming, or refused for good.
        self.settled = threading.Event()
        #: Why the first connect was refused (subscribe() raises it).
        self.refusal: BusAuthError | None = None
        self._handed_over = False  # subscribe() has returned (or given up waiting)
        self._lock = threading.Lock()
        t.links.down(self)  # until it consumes
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"amqp-sub-{queue or topic}")
        self.thread.start()

    def _kombu_queue(self) -> kombu.Queue:
        p = self.t.prefix
        if self.queue:
            return kombu.Queue(p + self.queue, self.t.exchange, routing_key=p + self.topic,
                               durable=True, auto_delete=False)
        return kombu.Queue(f"{p}fanout-{uuid.uuid4().hex}", self.t.exchange,
                           routing_key=p + self.topic, durable=False, exclusive=True,
                           auto_delete=True)

    def _run(self) -> None:
        backoff = Backoff(stop=self.stop)
        while not self.stop.is_set():
            conn = self.t._connection(heartbeat=self.t.heartbeat)
            try:
                conn.ensure_connection(max_retries=1)
                channel = conn.channel()
                q = self._kombu_queue()(channel)
                q.declare()
                channel.basic_qos(0, self.prefetch, False)
                consumer = kombu.Consumer(channel, queues=[q], on_message=self._on_message,
                                          no_ack=False)
                with consumer:
                    backoff.reset()
                    self.ready.set()
                    self.settled.set()
                    self.t.links.up(self)
                    while not self.stop.is_set():
                        try:
                            conn.drain_events(timeout=DRAIN_TIMEOUT)
                        except TimeoutError:
                            conn.heartbeat_check()
            except _AUTH_ERRORS as exc:
                self.ready.clear()
                if self.stop.is_set():
                    break
                error = self.t._refused(exc)
                with self._lock:
                    # Final while subscribe() waits for the first connect;
                    # once it has returned, nobody could be told: retry.
                    final = not self._handed_over and not self.settled.is_set()
                    if final:
                        self.refusal = error
                        self.settled.set()
                if final:
                    return
                self.t.links.down(self)
                log.error("amqp broker refused the consumer; retrying", topic=self.topic,
                          queue=self.queue, error=str(error), retry_in=round(backoff.delay, 2))
                backoff.wait()
            except conn.connection_errors + conn.channel_errors + _DRIVER_ERRORS as exc:
                self.ready.clear()
                if self.stop.is_set():
                    break
                self.t.links.down(self)
                log.warning("amqp consumer lost its connection; reconnecting", topic=self.topic,
                            queue=self.queue, error=str(exc) or type(exc).__name__,
                            retry_in=round(backoff.delay, 2))
                backoff.wait()
            finally:
                try:
                    conn.release()
                except Exception:  # noqa: BLE001 - already broken
                    pass

    def hand_over(self) -> BusAuthError | None:
        """Called by subscribe() when it stops waiting: from now on a refusal
        is retried, not reported. Returns the refusal of the first connect,
        if that is what ended the wait."""
        with self._lock:
            self._handed_over = True
            return self.refusal

    def _on_message(self, message: Any) -> None:
        info = message.delivery_info or {}
        routing_key = info.get("routing_key", self.topic)
        if self.t.prefix and routing_key.startswith(self.t.prefix):
            routing_key = routing_key[len(self.t.prefix):]

        def settle(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - dead channel: broker redelivers
                log.warning("amqp ack failed; broker will redeliver", error=str(exc))

        delivery = Delivery(
            topic=routing_key, body=message.body if isinstance(message.body, bytes)
            else str(message.body).encode(),
            headers={k: str(v) for k, v in (message.headers or {}).items()},
            redelivered=bool(info.get("redelivered")),
            _ack=lambda: settle(message.ack),
            _nack=lambda requeue: settle(message.reject, requeue),
        )
        deliver(self.handler, delivery, log, topic=self.topic)

    def cancel(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self.t.links.up(self)  # a cancelled consumer is not a link that is down
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=timeout)


class AmqpTransport(Transport):
    """AMQP transport; see the module docstring."""

    def __init__(self, url: str, *, client_name: str = "deploybus",
                 publish_timeout: float = 30.0) -> None:
        self.url = url
        # kombu counts retries, not seconds: with the policy below a retry
        # costs about two seconds once the interval has grown.
        self.publish_retries = max(1, int(publish_timeout / 2))
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.prefix = q.pop("prefix", "")
        self.heartbeat = int(q.pop("heartbeat", "30"))
        self.broker_url = parts._replace(query="").geturl()
        #: The vhost as kombu reads it from the path ("/" when there is none).
        self.vhost = unquote(parts.path[1:]) or "/"
        self.client_name = client_name
        self.exchange = kombu.Exchange("amq.topic", type="topic", durable=True, no_declare=True)
        self._pub_lock = threading.Lock()
        self._pub: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._tx: tuple[kombu.Connection, Any] | None = None
        self._subs: list[_Sub] = []
        # The consumers' connections: the ones a lost answer would come over.
        self.links = LinkClock()

    def _connection(self, *, heartbeat: int = 0) -> kombu.Connection:
        return kombu.Connection(self.broker_url, heartbeat=heartbeat, connect_timeout=5,
                                transport_options={"confirm_publish": True,
                                                   "client_properties": {
                                                       "connection_name": self.client_name}})

    def _refused(self, exc: Any) -> BusAuthError:
        """``exc`` (one of :data:`_AUTH_ERRORS`) as the error to raise."""
        return refused(self.url, self.vhost, f"({exc.reply_code}) {exc.reply_text}")

    def _errback(self, exc: Exception, interval: float) -> None:
        log.warning("amqp publish: broker unreachable; retrying", error=str(exc),
                    retry_in=interval)

    def publish(self, topic: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        check_topic(topic)
        with self._pub_lock:
            producer = self._producer
            if self._pub is None or producer is None:
                self._pub = self._connection()
                producer = self._producer = self._pub.Producer(serializer=None)
            conn = self._pub
            try:
                producer.publish(
                    body, exchange=self.exchange, routing_key=self.prefix + topic,
                    delivery_mode=2, headers=dict(headers or {}),
                    content_type="application/json", content_encoding="binary",
                    retry=True, declare=[],
                    retry_policy={"max_retries": self.publish_retries, "interval_start": 0.2,
                                  "interval_step": 0.5, "interval_max": 2,
                                  "errback": self._errback},
                )
            except _AUTH_ERRORS as exc:  # kombu does not retry these: nor do we
                self._drop_pub()
                raise self._refused(exc) from None
            except conn.connection_errors + conn.channel_errors + _DRIVER_ERRORS as exc:
                self._drop_pub()
                raise BusConnectionError(f"publish to {topic!r} failed: {exc}") from None

    def publish_batch(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """All ``messages`` in one AMQP transaction: published without waiting,
        then one ``tx.commit``, which returns once the broker has taken every
        one (as a publisher confirm does for one). A batch of requests to 50
        hosts costs one round trip instead of 50, which matters most when the
        hosts' work already keeps the CPUs busy. Its own connection: a channel
        cannot be in confirm and transaction mode at once."""
        if len(messages) < 2:
            for topic, body in messages:
                self.publish(topic, body)
            return
        routed = [(self.prefix + check_topic(topic), body) for topic, body in messages]
        with self._pub_lock:
            # A kept connection may have died with a broker restart since the
            # last batch: then one more try on a new one before giving up.
            for fresh in ((False, True) if self._tx is not None else (True,)):
                try:
                    self._commit_batch(routed)
                    return
                except BusAuthError:
                    raise
                except BusConnectionError:
                    if fresh:
                        raise

    def _commit_batch(self, routed: list[tuple[str, bytes]]) -> None:
        if self._tx is None:
            conn = kombu.Connection(self.broker_url, connect_timeout=5, transport_options={
                "client_properties": {"connection_name": self.client_name + "-tx"}})
        else:
            conn = self._tx[0]
        try:
            if self._tx is None:
                conn.ensure_connection(max_retries=self.publish_retries, errback=self._errback,
                                       interval_start=0.2, interval_step=0.5, interval_max=2)
                channel = conn.channel()
                channel.tx_select()
                self._tx = (conn, channel)
            channel = self._tx[1]
            for routing_key, body in routed:
                channel.basic_publish(
                    channel.prepare_message(body, priority=0, content_type="application/json",
                                            content_encoding="binary",
                                            properties={"delivery_mode": 2}),
                    exchange=self.exchange.name, routing_key=routing_key)
            channel.tx_commit()
        except conn.connection_errors + conn.channel_errors + _DRIVER_ERRORS as exc:
            self._tx = None
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - already broken
                pass
            if isinstance(exc, _AUTH_ERRORS):
                raise self._refused(exc) from None
            raise BusConnectionError(f"batch publish of {len(routed)} messages failed: "
                                     f"{exc}") from None

    def _drop_tx(self) -> None:
        if self._tx is not None:
            try:
                self._tx[0].release()
            except Exception:  # noqa: BLE001
                pass
            self._tx = None

    def _drop_pub(self) -> None:
        self._producer = None
        if self._pub is not None:
            try:
                self._pub.release()
            except Exception:  # noqa: BLE001
                pass
            self._pub = None

    def subscribe(self, topic: str, handler: Handler, *, queue: str | None = None,
                  prefetch: int = DEFAULT_PREFETCH) -> Subscription:
        check_topic(topic, pattern=queue is None)
        sub = _Sub(self, topic, handler, queue, prefetch)
        self._subs.append(sub)
        if not sub.settled.wait(30):
            log.warning("subscribed while disconnected; will consume on reconnect", topic=topic)
        refusal = sub.hand_over()
        if refusal is not None:
            sub.cancel()
            self._subs.remove(sub)
            raise refusal from None
        return sub

    def declare(self, topic: str, queue: str) -> None:
        """On the publishing connection: a publisher that declares the queue it
        publishes for (the CLI) pays two round trips, not a connection."""
        q = kombu.Queue(self.prefix + queue, self.exchange,
                        routing_key=self.prefix + check_topic(topic),
                        durable=True, auto_delete=False)
        with self._pub_lock:
            if self._pub is None or self._producer is None:
                self._pub = self._connection()
            conn = self._pub
            try:
                if self._producer is None:
                    # the publish's retry policy: within about publish_timeout
                    conn.ensure_connection(max_retries=self.publish_retries,
                                           errback=self._errback, interval_start=0.2,
                                           interval_step=0.5, interval_max=2)
                    self._producer = conn.Producer(serializer=None)
                q(self._producer.channel).declare()
            except _AUTH_ERRORS as exc:
                self._drop_pub()
                raise self._refused(exc) from None
            except conn.connection_errors + conn.channel_errors + _DRIVER_ERRORS as exc:
                self._drop_pub()
                raise BusConnectionError(f"declare {queue!r} failed: {exc}") from None

    def close(self, timeout: float = 5.0) -> None:
        for sub in self._subs:
            sub.cancel(timeout)
        self._subs.clear()
        with self._pub_lock:
            self._drop_pub()
            self._drop_tx()
