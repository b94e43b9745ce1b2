"""STOMP 1.2 transport (stomp.py) for RabbitMQ's STOMP plugin, ActiveMQ and Artemis.

URL: ``stomp://user:pass@host:61613/?vhost=/&prefix=&flavor=auto&heartbeat=10000``
(``stomp+ssl://`` for TLS). The broker flavour is read from the ``server``
header of the CONNECTED frame unless ``flavor=rabbitmq|activemq`` says so.

Destinations, by flavour (see docs/architecture.md, "The bus"):

* RabbitMQ: publish to ``/topic/<topic>`` (the ``amq.topic`` exchange, so AMQP
  clients see the same messages); durable subscriptions are ``/topic``
  subscriptions with ``x-queue-name``, ``durable:true`` and
  ``auto-delete:false``; prefetch is ``prefetch-count``.
* ActiveMQ: publish to ``/topic/VirtualTopic.<topic>`` with
  ``persistent:true``; durable subscriptions consume the virtual-topic queue
  ``/queue/Consumer.<queue>.VirtualTopic.<topic>``; prefetch is
  ``activemq.prefetchSize``.

Publishing asks for a RECEIPT and waits for it, so a publish that returns is
on the broker. A supervisor thread reconnects with capped backoff and
resubscribes; acks for messages from a dropped connection are skipped.

An ERROR frame before CONNECTED is the broker refusing the user, password or
vhost (:class:`BusAuthError`). Before the transport has ever connected that
is final: every call raises it at once and the supervisor stops. After that,
it is retried like an outage, logged as an error (a password may be rotated
back).
"""

from __future__ import annotations

import functools
import queue as queuemod
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import stomp
import stomp.exception

from deploybus.bus.base import (
    DEFAULT_PREFETCH,
    Backoff,
    Delivery,
    Handler,
    LinkClock,
    Subscription,
    Transport,
    Worker,
    check_topic,
    get_logger,
    refused,
)
from deploybus.errors import BusAuthError, BusConnectionError, BusError

log = get_logger("deploybus.bus.stomp")

#: Frame headers the broker sets; not copied when a message is handed back.
_BROKER_HEADERS = frozenset({"ack", "subscription", "message-id", "destination", "redelivered",
                             "content-length", "expires", "priority", "timestamp",
                             "original-destination", "persistent"})

#: Header of the anchor an ActiveMQ durable subscription sends its own queue
#: (see StompTransport._send_subscribe); consumers ack anchors unseen.
ANCHOR = "x-deploybus-anchor"

#: Seconds to wait for CONNECTED after opening a connection.
CONNECT_TIMEOUT = 10.0

#: How long publish() waits for a connection and the broker's receipt.
PUBLISH_TIMEOUT = 30.0

#: Seconds between two looks, while a call waits for the connection, at
#: whether the first connect was refused for good (then it raises at once).
REFUSAL_CHECK = 0.1

#: What stomp.py raises when a frame cannot be sent: its own errors, and the
#: socket's (a broker that closed the connection on us shows as a broken
#: pipe, which stomp.py passes through untranslated).
_SEND_ERRORS = (stomp.exception.StompException, OSError)


class _Sub(Worker, Subscription):
    """One subscription: stomp.py's receiver thread puts its frames in
    ``inbox`` (see :class:`_Listener`), the :class:`Worker` thread hands them
    to the handler, so a slow handler never holds up the connection's
    heartbeats, receipts or other subscriptions."""

    def __init__(self, transport: StompTransport, topic: str, handler: Handler,
                 queue: str | None, prefetch: int) -> None:
        super().__init__(handler, name=f"stomp-sub-{queue or topic}", log=log,
                         where={"topic": topic})
        self.transport, self.topic = transport, topic
        self.queue, self.prefetch = queue, max(1, prefetch)
        self.id = uuid.uuid4().hex
        self.inbox: queuemod.Queue[tuple[int, Any] | None] = queuemod.Queue()
        self.cancelled = False
        self.start_worker()

    def next_delivery(self) -> Delivery | None:
        t = self.transport
        while True:
            item = self.inbox.get()
            if item is None:
                return None
            gen, frame = item
            if self.cancelled:
                continue
            ack_id = frame.headers.get("ack") or frame.headers.get("message-id")
            if ANCHOR in frame.headers:
                t._settle(gen, ack_id, self.id, ack=True)
                continue
            return Delivery(
                topic=t._topic_of(frame.headers.get("destination", ""), self.topic),
                body=frame.body if isinstance(frame.body, bytes) else frame.body.encode(),
                headers=dict(frame.headers),
                redelivered=frame.headers.get("redelivered") == "true"
                or frame.headers.get("x-deploybus-redelivered") == "true",
                _ack=functools.partial(t._settle, gen, ack_id, self.id, ack=True),
                _nack=functools.partial(self._nack, gen, ack_id, frame),
            )

    def _nack(self, gen: int, ack_id: str | None, frame: Any, requeue: bool) -> None:
        self.transport._settle(gen, ack_id, self.id, ack=False, requeue=requeue,
                               resend=self._resend(frame))

    def _resend(self, frame: Any) -> tuple[str, bytes, dict[str, str]] | None:
        """Where and what to send to hand a message back on ActiveMQ (durable only)."""
        if not self.queue:
            return None
        dest, _ = self.transport._sub_dest(self)
        keep = {k: v for k, v in frame.headers.items()
                if k not in _BROKER_HEADERS and not k.startswith("activemq")}
        return dest, frame.body, keep

    def cancel(self, timeout: float = 5.0) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.inbox.put(None)
        # Let the handler in progress finish and ack before the broker is told.
        self.join_worker(timeout)
        self.transport._unsubscribe(self)


class _Listener(stomp.ConnectionListener):
    def __init__(self, transport: StompTransport, gen: int) -> None:
        self.t, self.gen = transport, gen
        self.connected = threading.Event()
        #: Set on CONNECTED, or on an ERROR frame before it.
        self.answered = threading.Event()
        #: The ERROR frame that came instead of CONNECTED: the broker refused us.
        self.refusal: Any = None

    def on_connected(self, frame: Any) -> None:
        self.t._server = frame.headers.get("server", "")
        self.connected.set()
        self.answered.set()

    def on_message(self, frame: Any) -> None:
        sub = self.t._subs.get(frame.headers.get("subscription", ""))
        if sub is not None:
            sub.inbox.put((self.gen, frame))

    def on_receipt(self, frame: Any) -> None:
        waiter = self.t._receipts.pop(frame.headers.get("receipt-id", ""), None)
        if waiter is not None:
            waiter.set()

    def on_error(self, frame: Any) -> None:
        if not self.connected.is_set():
            self.refusal = frame  # _connect_once raises it
            self.answered.set()
            return
        log.warning("broker error frame", message=frame.headers.get("message"),
                    body=(frame.body[:300] if frame.body else None))

    def on_heartbeat_timeout(self) -> None:
        log.warning("stomp heartbeat timeout; reconnecting")
        self.t._lost(self.gen)

    def on_disconnected(self) -> None:
        self.t._lost(self.gen)


class StompTransport(Transport):
    """STOMP transport; see the module docstring."""

    def __init__(self, url: str, *, client_name: str = "deploybus",
                 publish_timeout: float = PUBLISH_TIMEOUT) -> None:
        self.url = url
        self.publish_timeout = publish_timeout
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 61613
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.vhost = q.get("vhost", "/")
        self.prefix = q.get("prefix", "")
        self.flavor = q.get("flavor", "auto")
        self.heartbeat = int(q.get("heartbeat", "10000"))
        self.use_ssl = parts.scheme == "stomp+ssl"
        self.client_name = client_name
        self.links = LinkClock()
        self.links.down(self)  # until the first CONNECTED
        self._lock = threading.RLock()
        self._conn: stomp.Connection12 | None = None
        self._gen = 0
        self._server = ""
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ever_connected = False
        #: Why the first connect was refused, for good: every call raises it.
        self._refusal: BusAuthError | None = None
        self._subs: dict[str, _Sub] = {}
        self._receipts: dict[str, threading.Event] = {}
        self._supervisor: threading.Thread | None = None

    # -- connection management -------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._supervisor is None:
                self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                    name=f"stomp-supervisor-{self.client_name}")
                self._supervisor.start()

    def _supervise(self) -> None:
        backoff = Backoff(stop=self._stop)
        while not self._stop.is_set():
            if self._connected.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._connect_once()
                backoff.reset()
            except BusAuthError as exc:
                if not self._ever_connected:
                    # Wrong from the start: no retry will help. _ready() sees
                    # it and ends every wait for the connection.
                    self._refusal = exc
                    log.error("stomp broker refused the connection; giving up",
                              host=self.host, port=self.port, error=str(exc))
                    return
                log.error("stomp broker refused the connection; retrying", host=self.host,
                          port=self.port, error=str(exc), retry_in=round(backoff.delay, 2))
                if not backoff.wait():
                    return
            except Exception as exc:  # noqa: BLE001 - any driver error means "retry"
                log.warning("stomp connect failed; retrying", host=self.host, port=self.port,
                            error=str(exc) or type(exc).__name__, retry_in=round(backoff.delay, 2))
                if not backoff.wait():
                    return

    def _connect_once(self) -> None:
        conn = stomp.Connection12([(self.host, self.port)], heartbeats=(self.heartbeat, self.heartbeat),
                                  vhost=self.vhost, auto_decode=False, reconnect_attempts_max=1,
                                  timeout=10)
        if self.use_ssl:
            conn.set_ssl([(self.host, self.port)], ssl_version=ssl.PROTOCOL_TLS_CLIENT)
        with self._lock:
            self._gen += 1
            gen = self._gen
        listener = _Listener(self, gen)
        conn.set_listener("deploybus", listener)
        # Our own wait, with a deadline: on a link that swallows frames a
        # blocking connect would wait for CONNECTED forever.
        conn.connect(self.user, self.password, wait=False,
                     headers={"client-id": f"{self.client_name}-{uuid.uuid4().hex[:8]}"})
        if not listener.answered.wait(CONNECT_TIMEOUT):
            threading.Thread(target=self._quiet_disconnect, args=(conn,), daemon=True).start()
            raise BusConnectionError(f"no CONNECTED frame within {CONNECT_TIMEOUT:.0f}s")
        if listener.refusal is not None:
            with self._lock:
                if gen == self._gen:
                    self._gen += 1  # its end is no "connection lost"
            threading.Thread(target=self._quiet_disconnect, args=(conn,), daemon=True).start()
            raise self._refused(listener.refusal)
        with self._lock:
            if gen != self._gen:
                raise BusConnectionError("connection replaced while connecting")
            self._conn = conn
            if self.flavor == "auto":
                self.flavor = "activemq" if "activemq" in self._server.lower() else "rabbitmq"
            waiters = [self._send_subscribe(conn, sub) for sub in list(self._subs.values())]
        deadline = time.monotonic() + PUBLISH_TIMEOUT
        for waiter in waiters:
            while not waiter.wait(0.2):
                if gen != self._gen or time.monotonic() > deadline:
                    break
        with self._lock:
            if gen != self._gen:
                raise BusConnectionError("connection lost while subscribing")
            self._connected.set()
            self._ever_connected = True
        self.links.up(self)
        log.info("stomp connected", host=self.host, port=self.port, server=self._server,
                 subscriptions=len(self._subs))

    def _refused(self, frame: Any) -> BusAuthError:
        """The ERROR frame that came instead of CONNECTED, as the error to raise."""
        body = frame.body or b""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        text = " ".join(text.split())[:300]
        reason = frame.headers.get("message") or "ERROR frame"
        return refused(self.url, self.vhost, f"{reason}: {text}" if text else reason)

    def _lost(self, gen: int) -> None:
        with self._lock:
            if gen != self._gen or self._stop.is_set():
                return
            self._gen += 1  # acks of the dead connection are now skipped
            conn, self._conn = self._conn, None
            self._connected.clear()
        self.links.down(self)
        log.warning("stomp connection lost", host=self.host, port=self.port)
        if conn is not None:
            threading.Thread(target=self._quiet_disconnect, args=(conn,), daemon=True).start()
        self._wake.set()

    @staticmethod
    def _quiet_disconnect(conn: stomp.Connection12) -> None:
        try:
            conn.disconnect()
        except Exception:  # noqa: BLE001 - it is already gone
            pass

    def _ready(self, timeout: float) -> stomp.Connection12:
        self._start()
        deadline = time.monotonic() + timeout
        # In short waits: a refusal of the first connect is final (see
        # _supervise) and ends the wait at once.
        while not self._connected.is_set():
            if self._refusal is not None:
                raise BusAuthError(str(self._refusal)) from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusConnectionError(f"no STOMP connection to {self.host}:{self.port} "
                                         f"within {timeout:.0f}s")
            self._connected.wait(min(REFUSAL_CHECK, left))
        conn = self._conn
        if conn is None:
            raise BusConnectionError("STOMP connection dropped")
        return conn

    # -- destinations ----------------------------------------------------------

    def _amq(self) -> bool:
        return self.flavor == "activemq"

    def _pub_dest(self, topic: str) -> str:
        name = self.prefix + topic
        return f"/topic/VirtualTopic.{name}" if self._amq() else f"/topic/{name}"

    def _sub_dest(self, sub: _Sub) -> tuple[str, dict[str, str]]:
        name = self.prefix + sub.topic
        if self._amq():
            headers = {"activemq.prefetchSize": str(sub.prefetch)}
            if sub.queue:
                return self._queue_dest(sub.topic, sub.queue), headers
            amq_pattern = ".".join(">" if w == "#" else w for w in name.split("."))
            return f"/topic/VirtualTopic.{amq_pattern}", headers
        headers = {"prefetch-count": str(sub.prefetch)}
        if sub.queue:
            headers.update({"x-queue-name": self.prefix + sub.queue, "durable": "true",
                            "auto-delete": "false"})
        return f"/topic/{name}", headers

    def _topic_of(self, destination: str, fallback: str) -> str:
        name = destination
        for lead in ("/topic/", "/exchange/amq.topic/", "/queue/"):
            if name.startswith(lead):
                name = name[len(lead):]
                break
        if name.startswith("Consumer."):
            name = name.split(".", 2)[2] if name.count(".") >= 2 else name
        name = name.removeprefix("VirtualTopic.")
        if self.prefix and name.startswith(self.prefix):
            name = name[len(self.prefix):]
        return name or fallback

    def _send_subscribe(self, conn: stomp.Connection12, sub: _Sub) -> threading.Event:
        """SUBSCRIBE with a receipt; the returned event is set once the broker has it.

        On ActiveMQ a durable subscription's queue is then sent an anchor, a
        persistent message its consumer drops (see :data:`ANCHOR`), and the
        event waits for that receipt instead: a queue that KahaDB has only in
        its index, not yet checkpointed, is gone after the broker is killed,
        and whatever is published to the virtual topic before the consumer
        subscribes again is dropped with it; a message in the journal brings
        the queue back."""
        dest, headers = self._sub_dest(sub)
        rid = uuid.uuid4().hex
        waiter = self._receipts[rid] = threading.Event()
        if sub.queue and self._amq():
            # One receipt, on the anchor: the broker takes a connection's
            # frames in order, so it also says the SUBSCRIBE was taken.
            conn.subscribe(dest, sub.id, ack="client-individual", headers=headers)
            conn.send(dest, b"", headers={"persistent": "true", ANCHOR: sub.id, "receipt": rid})
        else:
            conn.subscribe(dest, sub.id, ack="client-individual",
                           headers={**headers, "receipt": rid})
        return waiter

    # -- Transport API -----------------------------------------------------------

    def publish(self, topic: str, body: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        check_topic(topic)
        self._send(topic, body, headers, lambda: self._pub_dest(topic))

    def publish_for(self, topic: str, queue: str, body: bytes) -> None:
        """Straight to the queue, which a SEND creates if need be: on RabbitMQ
        ``/queue/<queue>`` (the queue a durable subscription names with
        ``x-queue-name``), on ActiveMQ the virtual topic's consumer queue.
        Other subscribers of ``topic`` do not get it."""
        check_topic(topic)
        self._send(topic, body, None, lambda: self._queue_dest(topic, queue))

    def _queue_dest(self, topic: str, queue: str) -> str:
        """The durable queue ``queue`` of ``topic`` as a destination to SEND to
        (and, on ActiveMQ, to subscribe to)."""
        if self._amq():
            consumer = (self.prefix + queue).replace(".", "_")
            return f"/queue/Consumer.{consumer}.VirtualTopic.{self.prefix + topic}"
        return f"/queue/{self.prefix + queue}"

    def _send(self, topic: str, body: bytes, headers: Mapping[str, str] | None,
              destination: Callable[[], str]) -> None:
        """SEND with a receipt, again on a new connection if one drops, until
        the broker confirms or ``publish_timeout`` passes. ``destination`` is
        asked once connected (it depends on the broker's flavour)."""
        # A clock, not a timer thread: a thread per publish cost more than the
        # publish itself.
        deadline = time.monotonic() + self.publish_timeout
        while time.monotonic() < deadline:
            conn = self._ready(self.publish_timeout)
            rid = uuid.uuid4().hex
            waiter = self._receipts[rid] = threading.Event()
            gen = self._gen
            try:
                hdrs = {"persistent": "true", "receipt": rid, **(headers or {})}
                conn.send(destination(), body, content_type="application/json", headers=hdrs)
                # Wait for the receipt, but notice a dropped connection early.
                while not waiter.wait(0.2):
                    if gen != self._gen or time.monotonic() >= deadline:
                        break
                if waiter.is_set():
                    return
            except _SEND_ERRORS as exc:
                log.warning("stomp publish failed; retrying", topic=topic,
                            error=str(exc) or type(exc).__name__)
                self._lost(gen)
            finally:
                self._receipts.pop(rid, None)
        raise BusConnectionError(f"publish to {topic!r} not confirmed within "
                                 f"{self.publish_timeout:.0f}s")

    def subscribe(self, topic: str, handler: Handler, *, queue: str | None = None,
                  prefetch: int = DEFAULT_PREFETCH) -> Subscription:
        check_topic(topic, pattern=queue is None)
        sub = _Sub(self, topic, handler, queue, prefetch)
        with self._lock:
            self._subs[sub.id] = sub
            conn = self._conn if self._connected.is_set() else None
            waiter = None
            if conn is not None:
                try:
                    waiter = self._send_subscribe(conn, sub)
                except _SEND_ERRORS:
                    self._lost(self._gen)  # resubscribed on reconnect
        self._start()
        if waiter is not None:
            # Live on return: what is published after subscribe() reaches us.
            if not waiter.wait(PUBLISH_TIMEOUT):
                log.warning("no receipt for SUBSCRIBE; continuing", topic=topic)
        else:
            # Wait for the first connection so a subscriber is live on return.
            try:
                self._ready(PUBLISH_TIMEOUT)
            except BusAuthError:
                sub.cancel()
                raise
            except BusConnectionError:
                log.warning("subscribed while disconnected; will subscribe on reconnect",
                            topic=topic)
        return sub

    def declare(self, topic: str, queue: str) -> None:
        conn = self._ready(PUBLISH_TIMEOUT)
        sub = _Sub(self, check_topic(topic), lambda d: d.nack(requeue=True), queue, 1)
        dest, headers = self._sub_dest(sub)
        try:
            # Subscribing creates the durable queue; unsubscribing keeps it.
            rid = uuid.uuid4().hex
            waiter = self._receipts[rid] = threading.Event()
            conn.subscribe(dest, sub.id, ack="client-individual",
                           headers={**headers, "prefetch-count": "0", "receipt": rid})
            waiter.wait(PUBLISH_TIMEOUT)
            conn.unsubscribe(sub.id)
        except _SEND_ERRORS as exc:
            raise BusConnectionError(f"declare {queue!r} failed: {exc}") from None
        finally:
            sub.cancelled = True
            sub.inbox.put(None)

    def _unsubscribe(self, sub: _Sub) -> None:
        with self._lock:
            self._subs.pop(sub.id, None)
            conn = self._conn if self._connected.is_set() else None
        if conn is not None:
            try:
                conn.unsubscribe(sub.id)
            except _SEND_ERRORS:
                pass

    def _settle(self, gen: int, ack_id: str | None, sub_id: str, *, ack: bool,
                requeue: bool = True,
                resend: tuple[str, bytes, dict[str, str]] | None = None) -> None:
        with self._lock:
            conn = self._conn
            if gen != self._gen or conn is None or ack_id is None:
                return  # connection gone: the broker redelivers
        try:
            if ack:
                conn.ack(ack_id)
            elif requeue and self._amq() and resend is not None:
                # ActiveMQ sends every NACKed message to its DLQ; to hand a
                # message back, put it on the consumer's own queue again.
                dest, body, headers = resend
                conn.send(dest, body, headers={**headers, "persistent": "true",
                                               "x-deploybus-redelivered": "true"})
                conn.ack(ack_id)
            elif requeue or self._amq():
                conn.nack(ack_id)
            else:
                conn.nack(ack_id, requeue="false")
        except _SEND_ERRORS as exc:
            log.warning("stomp ack failed; broker will redeliver",
                        error=str(exc) or type(exc).__name__)

    def close(self, timeout: float = 5.0) -> None:
        for sub in list(self._subs.values()):
            sub.cancel(timeout)
        self._stop.set()
        self._wake.set()
        with self._lock:
            conn, self._conn = self._conn, None
            self._gen += 1
            self._connected.clear()
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # noqa: BLE001
                pass
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)


__all__ = ["StompTransport", "BusError"]
