"""Dead letters never wedge a queue (deploybus.dispatch).

One message must not be able to stop a daemon from handling what comes
after it: a body whose dead letter the broker would refuse, a dead-letter
publish that fails, a flood of bad messages, a message that keeps coming
back. Real brokers where the finding is about them (their message size
limits, their redelivery), the memory bus where a broker adds nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing

from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, Transport, connect
from deploybus.bus.memory import MemoryTransport
from deploybus.dispatch import (
    DEADLETTER_BURST,
    DEADLETTER_RATE,
    DELIVERY_MEMORY,
    LETTER_BODY_CAP,
    LETTER_MAX,
    MAX_DELIVERIES,
    DeliveryCounts,
    Dispatcher,
    Message,
    dead_letter,
)
from deploybus.envelope import Envelope, new
from deploybus.errors import BusConnectionError
from deploybus.protocol import Role
from deploybus.runner import Stats
from deploybus.signing import Signer
from tests.conftest import REAL_BROKERS, broker_url

pytestmark = pytest.mark.integration

TOPIC = "deploy.requests.web1"
QUEUE = "agent-web1"
WAIT = 30.0

#: Bytes JSON writes as six (\u00XX): the worst case for a letter that
#: carries a body as text.
CONTROL = bytes(b for b in range(1, 32) if b not in b"\b\t\n\f\r")

#: A body bigger than the broker's limit once JSON-escaped (x6) though under
#: it as it is: RabbitMQ's max_message_size is 128 MiB, ActiveMQ's STOMP
#: frames carry at most 100 MiB (StompWireFormat.MAX_DATA_LENGTH).
OVER_LIMIT_ESCAPED = 24 * 1024 * 1024


def control_bytes(n: int) -> bytes:
    return (CONTROL * (n // len(CONTROL) + 1))[:n]


class TrustAll:
    """A verifier that takes every signer: these tests are about what happens
    after a message is refused or handed back, not about signatures."""

    def identify(self, env: Envelope, body: Any = None) -> Signer:
        return Signer("test", Role.ORCHESTRATOR)


def dispatcher_on(bus: Transport, stats: Stats) -> Dispatcher:
    return Dispatcher(bus, daemon="deploy_agent", host="web1", stats=stats,
                      verifier=TrustAll())  # type: ignore[arg-type]


def valid(name: str) -> bytes:
    """A message the dispatcher hands to its handler (a presence of web1)."""
    return new("presence", {"host": "web1", "daemon": "agent", "interval": 5.0,
                            "version": name}, sender="agent@web1").encode()


class Handled:
    """The messages a handler got, by name; ``hand_back`` names the ones it
    gives back to the broker every time (``nack(requeue=True)``)."""

    def __init__(self, *, hand_back: str | None = None) -> None:
        self.names: list[str] = []
        self.cond = threading.Condition()
        self.hand_back = hand_back

    def __call__(self, msg: Message, d: Delivery) -> None:
        name = getattr(msg.body, "version", None) or ""
        with self.cond:
            self.names.append(name)
            self.cond.notify_all()
        if name == self.hand_back:
            d.nack(requeue=True)
        else:
            d.ack()

    def wait_for(self, name: str, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: name in self.names, timeout)


class Letters:
    """Dead letters read from the durable dead-letter queue."""

    def __init__(self, bus: Transport) -> None:
        self.q: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
        bus.subscribe(DEADLETTER_TOPIC, self._on_letter, queue=DEADLETTER_QUEUE)

    def _on_letter(self, d: Delivery) -> None:
        self.q.put((len(d.body), json.loads(d.body)))
        d.ack()

    def get(self, timeout: float = WAIT) -> tuple[int, dict[str, Any]]:
        return self.q.get(timeout=timeout)

    def count(self, within: float = 0.5) -> int:
        n = 0
        while True:
            try:
                self.q.get(timeout=within)
            except queue.Empty:
                return n
            n += 1


def carried(letter: dict[str, Any]) -> bytes:
    if letter["encoding"] == "base64":
        return base64.b64decode(letter["body"])
    return str(letter["body"]).encode()


def nothing_left(bus: Transport, *, within: float = 0.5) -> bool:
    """No message waits in the agent's queue (the dispatcher is closed)."""
    got = threading.Event()
    sub = bus.subscribe(TOPIC, lambda d: got.set(), queue=QUEUE)
    try:
        return not got.wait(within)
    finally:
        sub.cancel()


@pytest.fixture
def memory_bus() -> Iterator[MemoryTransport]:
    t = MemoryTransport(f"memory://deadletter-{uuid.uuid4().hex}")
    yield t
    t.close()


# -- the letter is capped ------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    control_bytes(900 * 1024),
    "é".encode() * 500_000,
    "\U0001f600".encode() * 300_000,
    b'"\\' * 400_000,
    b"\xff\xfe" * 400_000,
    b"[" * 100_000,
], ids=["control", "two-byte", "astral", "quotes", "not-utf8", "brackets"])
def test_letter_is_bounded_whatever_the_body(body: bytes) -> None:
    raw = dead_letter(body, reason="handler failed: " + "\x01\U0001f600" * 100_000,
                      topic="t." * 5000 + "t", daemon="deploy_agent", host="web1")
    assert len(raw) <= LETTER_MAX
    letter = json.loads(raw)
    assert letter["size"] == len(body)
    assert letter["sha256"] == hashlib.sha256(body).hexdigest()
    assert letter["truncated"] is True
    head = carried(letter)
    assert 0 < len(head) <= LETTER_BODY_CAP and body.startswith(head)
    assert len(head) >= LETTER_BODY_CAP - 3  # at most a split character left out


def test_small_body_goes_whole() -> None:
    body = b'{"hello": "world"}'
    letter = json.loads(dead_letter(body, reason="r", topic="t", daemon="d", host="h"))
    assert (letter["encoding"], letter["body"], letter["truncated"]) == \
        ("utf-8", body.decode(), False)
    assert letter["size"] == len(body)


def test_dispatcher_letter_of_a_huge_body_is_capped(memory_bus: MemoryTransport) -> None:
    stats = Stats()
    letters = Letters(memory_bus)
    d = dispatcher_on(memory_bus, stats)
    try:
        handled = Handled()
        d.subscribe(TOPIC, handled, queue=QUEUE, prefetch=1)
        poison = control_bytes(900 * 1024)
        memory_bus.publish(TOPIC, poison)
        memory_bus.publish(TOPIC, valid("behind"))
        assert handled.wait_for("behind", 5)
        size, letter = letters.get(5)
        assert size <= LETTER_MAX
        assert letter["truncated"] is True and letter["size"] == len(poison)
        assert letter["sha256"] == hashlib.sha256(poison).hexdigest()
        assert poison.startswith(carried(letter))
    finally:
        d.close()


# -- a letter that cannot be published is dropped, not handed back --------------------------

class NoLetters(MemoryTransport):
    """A memory bus whose dead-letter publishes fail, as on a broker that
    refuses them (too big, no permission, gone)."""

    def publish(self, topic: str, body: bytes, *, headers: Any = None) -> None:
        if topic == DEADLETTER_TOPIC:
            raise BusConnectionError("publish to 'deploybus.deadletter' failed: refused")
        super().publish(topic, body, headers=headers)


def test_unpublishable_letter_drops_the_message_and_the_next_is_handled() -> None:
    bus = NoLetters(f"memory://deadletter-{uuid.uuid4().hex}")
    stats = Stats()
    d = dispatcher_on(bus, stats)
    try:
        handled = Handled()
        d.subscribe(TOPIC, handled, queue=QUEUE, prefetch=1)
        bus.publish(TOPIC, b"garbage that cannot be dead-lettered")
        bus.publish(TOPIC, valid("behind"))
        assert handled.wait_for("behind", 5), "the queue is wedged behind the bad message"
        assert stats["deadletter_dropped"] == 1
        assert stats["deadlettered"] == 0
        assert stats["received"] == 2, "the bad message came back"
        d.close()
        assert nothing_left(bus), "the bad message was not acked"
    finally:
        d.close()
        bus.close()


# -- on real brokers: a body whose old letter the broker refuses ----------------------------

@pytest.mark.broker
@pytest.mark.parametrize("kind", REAL_BROKERS)
def test_poison_over_the_broker_limit_does_not_wedge_a_prefetch_1_queue(
        kind: str, request: pytest.FixtureRequest) -> None:
    url = broker_url(kind, request, f"t{uuid.uuid4().hex[:10]}")
    bus = connect(url, client_name="deadletter")
    reader = connect(url, client_name="deadletter-reader")
    stats = Stats()
    d = dispatcher_on(bus, stats)
    try:
        letters = Letters(reader)
        handled = Handled()
        d.subscribe(TOPIC, handled, queue=QUEUE, prefetch=1)
        small, huge = control_bytes(900 * 1024), control_bytes(OVER_LIMIT_ESCAPED)
        bus.publish(TOPIC, small)
        bus.publish(TOPIC, huge)
        bus.publish(TOPIC, valid("behind"))
        assert handled.wait_for("behind", 60), f"the queue is wedged: {stats.snapshot()}"
        got = sorted((letters.get(), letters.get()), key=lambda x: x[1]["size"])
        for (size, letter), body in zip(got, (small, huge), strict=True):
            assert size <= LETTER_MAX
            assert letter["truncated"] is True and letter["size"] == len(body)
            assert letter["sha256"] == hashlib.sha256(body).hexdigest()
            assert body.startswith(carried(letter))
            assert letter["reason"].startswith("invalid message: ")
        assert (stats["deadlettered"], stats["deadletter_dropped"]) == (2, 0)
    finally:
        d.close()
        bus.close()
        reader.close()


# -- a flood of bad messages: letters rate-limited, every message acked ---------------------

def test_flood_of_bad_messages_is_rate_limited_and_acked(memory_bus: MemoryTransport) -> None:
    stats = Stats()
    letters = Letters(memory_bus)
    with structlog.testing.capture_logs() as logs:
        d = dispatcher_on(memory_bus, stats)
        try:
            handled = Handled()
            d.subscribe(TOPIC, handled, queue=QUEUE)
            started = time.monotonic()
            for i in range(3000):
                memory_bus.publish(TOPIC, b"unsigned request %d" % i)
            deadline = started + WAIT
            while stats["rejected"] < 3000 and time.monotonic() < deadline:
                time.sleep(0.01)
            elapsed = time.monotonic() - started
            assert stats["rejected"] == 3000
            memory_bus.publish(TOPIC, valid("right after"))
            assert handled.wait_for("right after", 1), "the daemon is still busy with the flood"
        finally:
            d.close()
    published = stats["deadlettered"]
    assert published <= DEADLETTER_BURST + DEADLETTER_RATE * elapsed + 1, (published, elapsed)
    assert published >= DEADLETTER_BURST
    assert stats["deadletter_suppressed"] == 3000 - published
    assert letters.count() == published
    assert nothing_left(memory_bus), "a suppressed message was not acked"
    warned = [e for e in logs if e["event"] == "message rejected"]
    assert len(warned) == published, "one log line per suppressed message"
    summaries = [e for e in logs if e["event"].startswith("dead letters suppressed")]
    assert 1 <= len(summaries) <= 2 + elapsed / 5
    assert sum(e["suppressed"] for e in summaries) == 3000 - published


# -- a message that keeps coming back is set aside ----------------------------------------

def test_message_handed_back_again_and_again_is_set_aside(memory_bus: MemoryTransport) -> None:
    stats = Stats()
    letters = Letters(memory_bus)
    d = dispatcher_on(memory_bus, stats)
    try:
        handled = Handled(hand_back="boomerang")
        d.subscribe(TOPIC, handled, queue=QUEUE, prefetch=1, auto_ack=False)
        boomerang = valid("boomerang")
        memory_bus.publish(TOPIC, boomerang)
        memory_bus.publish(TOPIC, valid("behind"))
        assert handled.wait_for("behind", 5), "the message loops"
        _, letter = letters.get(5)
        assert letter["reason"] == f"set aside after {MAX_DELIVERIES} deliveries"
        assert carried(letter) == boomerang and letter["truncated"] is False
        assert handled.names.count("boomerang") == MAX_DELIVERIES
        assert stats["set_aside"] == 1
        d.close()
        assert nothing_left(memory_bus)
    finally:
        d.close()


@pytest.mark.broker
def test_broker_redelivery_loop_is_set_aside(bus_url: str) -> None:
    """The same through each broker's own redelivery (RabbitMQ's
    ``redelivered``, ActiveMQ's copy handed back to the queue)."""
    bus = connect(bus_url, client_name="deadletter")
    stats = Stats()
    d = dispatcher_on(bus, stats)
    try:
        letters = Letters(bus)
        handled = Handled(hand_back="boomerang")
        d.subscribe(TOPIC, handled, queue=QUEUE, prefetch=1, auto_ack=False)
        bus.publish(TOPIC, valid("boomerang"))
        bus.publish(TOPIC, valid("behind"))
        assert handled.wait_for("behind"), f"the message loops: {handled.names[:20]}"
        _, letter = letters.get()
        assert letter["reason"] == f"set aside after {MAX_DELIVERIES} deliveries"
        assert handled.names.count("boomerang") == MAX_DELIVERIES
    finally:
        d.close()
        bus.close()


def test_handled_messages_are_forgotten_and_the_memory_is_bounded() -> None:
    counts = DeliveryCounts()
    assert counts.count((1, b"a"), redelivered=False) == 1
    assert counts.count((1, b"a"), redelivered=False) == 2
    assert counts.count((2, b"a"), redelivered=False) == 1  # another subscription
    assert counts.count((1, b"b"), redelivered=True) == 2  # came back before we knew it
    counts.forget((1, b"a"))
    assert counts.count((1, b"a"), redelivered=False) == 1
    for i in range(DELIVERY_MEMORY + 10):
        counts.count((3, i.to_bytes(4, "big")), redelivered=False)
    assert len(counts) == DELIVERY_MEMORY


def test_a_handled_message_sent_again_is_handled_again(memory_bus: MemoryTransport) -> None:
    stats = Stats()
    d = dispatcher_on(memory_bus, stats)
    try:
        handled = Handled()
        d.subscribe(TOPIC, handled, queue=QUEUE)
        same = valid("again")
        for _ in range(MAX_DELIVERIES + 2):
            memory_bus.publish(TOPIC, same)
        deadline = time.monotonic() + 5
        while len(handled.names) < MAX_DELIVERIES + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handled.names == ["again"] * (MAX_DELIVERIES + 2)
        assert stats["set_aside"] == 0
    finally:
        d.close()
