"""From transport deliveries to envelope handlers, with dead-lettering.

Every daemon subscribes through :class:`Dispatcher`. A delivery whose body is
not a valid envelope, or whose type does not belong on its topic, is logged
with the reason, counted, republished to the dead-letter topic, and acked: it
never reaches the handler and never stops the daemon. A handler that raises
is treated the same way, so a poison message cannot loop.

Dead letters never wedge a queue:

* A letter carries at most :data:`LETTER_BODY_CAP` bytes of the body (as
  UTF-8 text if it is plain text, else base64), with the body's ``size``,
  its ``sha256`` and ``truncated``; a letter stays under :data:`LETTER_MAX`
  bytes whatever came in, far below any broker's message limit. (The
  whole body, JSON-escaped, took six bytes per control byte: a 24 MiB body
  made a letter RabbitMQ refuses, and the message went back to the head of
  its queue for ever.)
* A letter that cannot be published is logged as an error and counted
  (``deadletter_dropped``), and the message is acked all the same: dropped,
  never handed back to the head of its queue, where with prefetch 1 nothing
  behind it would be handled. Its size and sha256 are in the error line.
* Letters are rate-limited per dispatcher (a token bucket:
  :data:`DEADLETTER_RATE` a second, bursts of :data:`DEADLETTER_BURST`).
  Beyond that a rejected message is acked and counted
  (``deadletter_suppressed``) with neither letter nor log line of its own;
  a summary is logged at most every :data:`SUPPRESSED_LOG_EVERY` seconds
  (and by :meth:`Dispatcher.close`). A flood of bad messages costs the
  broker and the logs a bounded amount.
* A message delivered :data:`MAX_DELIVERIES` times without being handled
  (settled other than by handing it back) is set aside at its next
  delivery: dead-lettered as "set aside after N deliveries" (counted
  ``set_aside``) instead of handled again. A delivery counts when the
  broker marks it redelivered or this process saw the same body on the
  same subscription before.

What the set-aside does not cover: the counts live in this process's
memory, in a bounded LRU of body hashes (:data:`DELIVERY_MEMORY` entries).
A message that crashes the process, hangs it or gets it killed is not
counted across restarts: after each one the broker's flag makes it count
two, never more, so it is tried again on every restart (systemd's restart
limit is what stops that loop). A message pushed out of the LRU by that
many others starts counting again. Messages are told apart by the hash of
their bytes: the same bytes sent again before the first copy was handled
count as a redelivery of it (envelopes carry a unique id, so that is the
same message sent twice).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, Subscription, Transport
from deploybus.envelope import Envelope, decode, fmt_time, now
from deploybus.errors import BusError, EnvelopeError
from deploybus.protocol import Body, parse
from deploybus.runner import Stats
from deploybus.signing import Signer, Verifier


@dataclass(frozen=True)
class Message:
    """A message a handler gets: the envelope, its typed body
    (:mod:`deploybus.protocol`) and who signed it, checked."""

    env: Envelope
    body: Body
    signer: Signer


MessageHandler = Callable[[Message, Delivery], None]

#: Bytes of a rejected body that its dead letter carries; the rest is cut
#: (``truncated: true``; ``size`` and ``sha256`` are of the whole body).
LETTER_BODY_CAP = 16 * 1024
#: Characters of a rejection reason a letter carries (and a log line): a
#: handler's exception text can be anything.
LETTER_REASON_CAP = 500
#: Characters of the topic a letter carries.
LETTER_TOPIC_CAP = 256
#: Upper bound of a letter's size in bytes, whatever came in: the body at
#: most tripled by JSON escapes (plain text only: see :func:`dead_letter`)
#: or 4/3 by base64, the reason and topic at most 6 bytes a character, and
#: the short fields. Far below any broker's limit (RabbitMQ 128 MiB, ActiveMQ
#: STOMP 100 MiB).
LETTER_MAX = 64 * 1024

#: Dead letters a dispatcher publishes a second, sustained (token bucket).
DEADLETTER_RATE = 20.0
#: ... and at most in one burst.
DEADLETTER_BURST = 200
#: Seconds between two log lines that sum up letters not published.
SUPPRESSED_LOG_EVERY = 5.0

#: Deliveries of one message without its being handled, after which the
#: next one sets it aside.
MAX_DELIVERIES = 5
#: Messages whose deliveries are remembered (LRU of 32-byte hashes).
DELIVERY_MEMORY = 1024

#: Characters JSON escapes as six bytes; a body with them goes as base64.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _text(head: bytes, *, cut: bool) -> str | None:
    """``head`` as text if it is UTF-8 without control characters (but tab and
    line ends); a character split by the cut is left out."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (cut and exc.end == len(head) and exc.reason == "unexpected end of data"):
            return None
        try:
            text = head[:exc.start].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None if _CONTROL.search(text) else text


def dead_letter(body: bytes, *, reason: str, topic: str, daemon: str, host: str) -> bytes:
    """The dead letter of ``body``: ``{reason, topic, daemon, host, at, size,
    sha256, truncated, encoding, body}``, at most :data:`LETTER_MAX` bytes.
    It carries the first :data:`LETTER_BODY_CAP` bytes of the body, as text
    (``encoding: utf-8``) if they are plain text, else base64: JSON writes a
    control byte as six."""
    head = body[:LETTER_BODY_CAP]
    truncated = len(head) < len(body)
    text = _text(head, cut=truncated)
    encoding = "utf-8"
    if text is None:
        text, encoding = base64.b64encode(head).decode(), "base64"
    letter = {"reason": reason[:LETTER_REASON_CAP], "topic": topic[:LETTER_TOPIC_CAP],
              "daemon": daemon, "host": host, "at": fmt_time(now()), "size": len(body),
              "sha256": hashlib.sha256(body).hexdigest(), "truncated": truncated,
              "encoding": encoding, "body": text}
    raw = json.dumps(letter).encode()
    if len(raw) > LETTER_MAX:  # only with absurd daemon or host names
        letter.update(daemon=daemon[:64], host=host[:64], body="", truncated=bool(body))
        raw = json.dumps(letter).encode()
    return raw


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` takes
    one if there is one. Thread-safe."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            t = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (t - self._at) * self.rate)
            self._at = t
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class DeliveryCounts:
    """How many times each message came without being handled: an LRU of at
    most ``size`` keys (a subscription and the sha256 of a body). See the
    module docstring for what it cannot know."""

    def __init__(self, size: int = DELIVERY_MEMORY) -> None:
        self.size = size
        self._counts: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self._lock = threading.Lock()

    def count(self, key: tuple[int, bytes], *, redelivered: bool) -> int:
        """Count a delivery of ``key``; the deliveries so far, this one in. One
        the broker calls redelivered that is not remembered counts two."""
        with self._lock:
            n = self._counts.pop(key, 1 if redelivered else 0) + 1
            self._counts[key] = n
            if len(self._counts) > self.size:
                self._counts.popitem(last=False)
            return n

    def forget(self, key: tuple[int, bytes]) -> None:
        with self._lock:
            self._counts.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)


class Dispatcher:
    """Decode, validate, dispatch, dead-letter. One per service."""

    def __init__(self, bus: Transport, *, daemon: str, host: str, stats: Stats,
                 verifier: Verifier | None = None) -> None:
        self.bus, self.daemon, self.host, self.stats = bus, daemon, host, stats
        #: Who may send what (deploybus.signing): every message is checked
        #: here. Without one, no key is trusted and every message is refused.
        self.verifier = verifier or Verifier({}, [])
        self.log = structlog.get_logger("deploybus.dispatch").bind(daemon=daemon, host=host)
        self.subscriptions: list[Subscription] = []
        self._declared = False
        self._letters = TokenBucket(DEADLETTER_RATE, DEADLETTER_BURST)
        self._deliveries = DeliveryCounts()
        self._sub_ids = itertools.count(1)
        self._quiet_lock = threading.Lock()
        self._quiet = 0  # letters suppressed since the last summary line
        self._quiet_reason = ""
        self._quiet_logged: float | None = None  # time.monotonic() of that line

    def subscribe(self, topic: str, handler: MessageHandler, *, queue: str | None = None,
                  types: Iterable[str] | None = None, prefetch: int = 10,
                  auto_ack: bool = True) -> Subscription:
        """Call ``handler(message, delivery)`` for valid, trusted messages of
        ``types``: a well-formed envelope, a body its type's class accepts,
        signed by a trusted key whose role may send that type (a host's
        messages by that host's key; see Verifier.identify). Anything else
        is dead-lettered with the reason. With ``auto_ack`` the delivery is
        acked when the handler returns."""
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
                body = parse(env.type, env.body)
            except EnvelopeError as exc:
                self.reject(d, f"invalid message: {exc}")
                return
            try:
                signer = self.verifier.identify(env, body)
            except EnvelopeError as exc:
                self.stats.incr("untrusted")
                self.reject(d, f"untrusted message: {exc}")
                return
            try:
                handler(Message(env, body, signer), d)
            except Exception as exc:
                self.log.exception("handler failed", topic=d.topic, id=env.id, type=env.type)
                self.reject(d, f"handler failed: {type(exc).__name__}: {exc}")
                return
            if auto_ack:
                d.ack()

        sub = self.bus.subscribe(topic, self._set_aside(on_delivery), queue=queue,
                                 prefetch=prefetch)
        self.subscriptions.append(sub)
        return sub

    def _set_aside(self, on_delivery: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """``on_delivery`` behind the count of deliveries: a message that came
        :data:`MAX_DELIVERIES` times without being handled is dead-lettered
        instead (see the module docstring)."""
        sub_id = next(self._sub_ids)

        def counted(d: Delivery) -> None:
            key = (sub_id, hashlib.sha256(d.body).digest())
            if self._deliveries.count(key, redelivered=d.redelivered) > MAX_DELIVERIES:
                self.stats.incr("received")
                self.stats.incr("set_aside")
                self.reject(d, f"set aside after {MAX_DELIVERIES} deliveries")
            else:
                on_delivery(d)
            if d.settled and not d.requeued:
                self._deliveries.forget(key)
        return counted

    def reject(self, d: Delivery, reason: str) -> None:
        """Log, count and dead-letter ``d``, then ack it, whatever becomes of
        the letter: published, suppressed by the rate limit, or not
        publishable. Never handed back (see the module docstring)."""
        self.stats.incr("rejected")
        if not self._letters.take():
            self.stats.incr("deadletter_suppressed")
            self._suppressed(reason)
            d.ack()
            return
        reason = reason[:LETTER_REASON_CAP]
        self.log.warning("message rejected", topic=d.topic, reason=reason, size=len(d.body))
        letter = dead_letter(d.body, reason=reason, topic=d.topic, daemon=self.daemon,
                             host=self.host)
        try:
            self.bus.publish(DEADLETTER_TOPIC, letter)
        except BusError as exc:
            self.stats.incr("deadletter_dropped")
            self.log.error("dead-letter publish failed; message dropped", topic=d.topic,
                           reason=reason, size=len(d.body),
                           sha256=hashlib.sha256(d.body).hexdigest(), error=str(exc))
        else:
            self.stats.incr("deadlettered")
        d.ack()
        self._suppressed(None)

    def _suppressed(self, reason: str | None) -> None:
        """Count a letter not published (``reason``) or, with None, just log
        the summary if one is due: at most every :data:`SUPPRESSED_LOG_EVERY`
        seconds, the first one at once."""
        with self._quiet_lock:
            if reason is not None:
                self._quiet += 1
                self._quiet_reason = reason
            t = time.monotonic()
            if not self._quiet or (self._quiet_logged is not None
                                   and t - self._quiet_logged < SUPPRESSED_LOG_EVERY):
                return
            n, self._quiet, self._quiet_logged = self._quiet, 0, t
            last = self._quiet_reason[:LETTER_REASON_CAP]
        self._log_suppressed(n, last)

    def _log_suppressed(self, n: int, last: str) -> None:
        self.log.warning("dead letters suppressed: too many rejected messages", suppressed=n,
                         total=self.stats["deadletter_suppressed"], last_reason=last,
                         rate=DEADLETTER_RATE, burst=DEADLETTER_BURST)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every subscription, waiting up to ``timeout`` for handlers in progress."""
        for sub in self.subscriptions:
            sub.cancel(timeout)
        self.subscriptions.clear()
        with self._quiet_lock:  # what the last summary did not count yet
            n, self._quiet = self._quiet, 0
        if n:
            self._log_suppressed(n, self._quiet_reason[:LETTER_REASON_CAP])
