"""The transport contract, run on every bus: memory, RabbitMQ AMQP, RabbitMQ
STOMP and ActiveMQ STOMP. What passes here is what the daemons may rely on."""

from __future__ import annotations

import queue
import threading
import time
import uuid

import pytest

from deploybus.bus import Delivery, Transport, connect
from deploybus.errors import BusError
from tests.conftest import REAL_BROKERS, broker_url

pytestmark = pytest.mark.broker

WAIT = 10.0


class Inbox:
    """Collects deliveries; settles them as told."""

    def __init__(self, *, ack: bool = True) -> None:
        self.q: queue.Queue[Delivery] = queue.Queue()
        self.ack = ack
        self.held: list[Delivery] = []

    def __call__(self, d: Delivery) -> None:
        if self.ack:
            d.ack()
        else:
            self.held.append(d)
        self.q.put(d)

    def get(self, timeout: float = WAIT) -> Delivery:
        return self.q.get(timeout=timeout)

    def bodies(self, n: int, timeout: float = WAIT) -> list[bytes]:
        return [self.get(timeout).body for _ in range(n)]

    def nothing(self, within: float = 0.7) -> bool:
        try:
            self.q.get(timeout=within)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def bus(bus_url: str):
    t = connect(bus_url, client_name="contract")
    yield t
    t.close()


def open_bus(url: str) -> Transport:
    return connect(url, client_name="contract-2")


def test_fanout_subscriber_receives(bus: Transport) -> None:
    inbox = Inbox()
    bus.subscribe("deploy.events", inbox)
    bus.publish("deploy.events", b'{"n": 1}')
    d = inbox.get()
    assert d.body == b'{"n": 1}'
    assert d.topic == "deploy.events"


def test_binary_body_round_trips(bus: Transport) -> None:
    inbox = Inbox()
    bus.subscribe("blob.x", inbox)
    body = bytes(range(256)) * 4 + b"\x00end"
    bus.publish("blob.x", body)
    assert inbox.get().body == body


def test_every_fanout_subscriber_gets_a_copy(bus: Transport) -> None:
    a, b = Inbox(), Inbox()
    bus.subscribe("presence", a)
    bus.subscribe("presence", b)
    bus.publish("presence", b"hello")
    assert a.get().body == b"hello" and b.get().body == b"hello"


def test_wildcard_fanout(bus: Transport) -> None:
    inbox = Inbox()
    bus.subscribe("deploy.requests.#", inbox)
    bus.publish("deploy.requests.web1", b"1")
    bus.publish("other.topic", b"x")
    bus.publish("deploy.requests.web2", b"2")
    assert sorted(inbox.bodies(2)) == [b"1", b"2"]
    assert inbox.nothing()


def test_durable_queue_keeps_messages_while_nobody_listens(bus: Transport, bus_url: str) -> None:
    bus.declare("deploy.requests.h1", "agent-h1")
    for i in range(5):
        bus.publish("deploy.requests.h1", f"m{i}".encode())
    inbox = Inbox()
    other = open_bus(bus_url)
    try:
        other.subscribe("deploy.requests.h1", inbox, queue="agent-h1")
        assert inbox.bodies(5) == [f"m{i}".encode() for i in range(5)]
    finally:
        other.close()


def test_publish_for_waits_in_a_queue_nobody_subscribed_yet(bus: Transport,
                                                          bus_url: str) -> None:
    """A rollout sent before the first orchestrator ran on a broker waits for
    it; the queue is the one the consumer's durable subscription uses."""
    bus.publish_for("deploy.rollouts", "orchestrator-rollouts", b"first")
    inbox = Inbox()
    other = open_bus(bus_url)
    try:
        other.subscribe("deploy.rollouts", inbox, queue="orchestrator-rollouts")
        assert inbox.bodies(1) == [b"first"]
        bus.publish_for("deploy.rollouts", "orchestrator-rollouts", b"second")
        bus.publish("deploy.rollouts", b"third")
        assert inbox.bodies(2) == [b"second", b"third"]
        assert inbox.nothing()
    finally:
        other.close()


def test_batch_arrives_whole_and_in_order(bus: Transport, bus_url: str) -> None:
    bus.declare("deploy.requests.b1", "agent-b1")
    bus.declare("deploy.requests.b2", "agent-b2")
    bus.publish_batch([(f"deploy.requests.b{1 + i % 2}", f"m{i}".encode()) for i in range(6)])
    bus.publish_batch([("deploy.requests.b1", b"after")])  # a batch of one, too
    other = open_bus(bus_url)
    try:
        one, two = Inbox(), Inbox()
        other.subscribe("deploy.requests.b1", one, queue="agent-b1")
        other.subscribe("deploy.requests.b2", two, queue="agent-b2")
        assert one.bodies(4) == [b"m0", b"m2", b"m4", b"after"]
        assert two.bodies(3) == [b"m1", b"m3", b"m5"]
    finally:
        other.close()


def test_competing_consumers_share_a_durable_queue(bus: Transport, bus_url: str) -> None:
    seen: list[bytes] = []
    lock = threading.Lock()
    done = threading.Event()

    def handler(d: Delivery) -> None:
        with lock:
            seen.append(d.body)
            if len(seen) >= 20:
                done.set()
        d.ack()

    other = open_bus(bus_url)
    try:
        bus.subscribe("work.items", handler, queue="workers", prefetch=1)
        other.subscribe("work.items", handler, queue="workers", prefetch=1)
        for i in range(20):
            bus.publish("work.items", str(i).encode())
        assert done.wait(WAIT)
        time.sleep(0.5)
        assert sorted(seen, key=int) == [str(i).encode() for i in range(20)], \
            "each message exactly once across the two consumers"
    finally:
        other.close()


def test_nack_requeue_redelivers(bus: Transport) -> None:
    first = threading.Event()
    got: queue.Queue[Delivery] = queue.Queue()

    def handler(d: Delivery) -> None:
        if not first.is_set():
            first.set()
            d.nack(requeue=True)
        else:
            d.ack()
            got.put(d)

    bus.subscribe("retry.me", handler, queue="retry")
    bus.publish("retry.me", b"again")
    d = got.get(timeout=WAIT)
    assert d.body == b"again" and d.redelivered


def test_unacked_message_goes_back_when_consumer_closes(bus_url: str) -> None:
    t1 = open_bus(bus_url)
    held = Inbox(ack=False)
    t1.subscribe("deploy.requests.h2", held, queue="agent-h2")
    t1.publish("deploy.requests.h2", b"do it")
    assert held.get().body == b"do it"
    t1.close()  # crashed before acking
    t2 = open_bus(bus_url)
    try:
        again = Inbox()
        t2.subscribe("deploy.requests.h2", again, queue="agent-h2")
        d = again.get()
        assert d.body == b"do it"
        assert again.nothing(), "acked once, delivered no more"
    finally:
        t2.close()


def test_prefetch_bounds_unacked_messages(bus: Transport) -> None:
    held = Inbox(ack=False)
    bus.subscribe("bulk.items", held, queue="bulk", prefetch=2)
    for i in range(6):
        bus.publish("bulk.items", str(i).encode())
    # The handler is called one message at a time but does not ack: only
    # `prefetch` messages may be handed over until something is acked.
    assert held.get().body == b"0"
    assert held.get().body == b"1"
    assert held.nothing(1.0), "a third message arrived with two unacked"
    held.held[0].ack()
    assert held.get().body == b"2"


def test_fanout_subscription_ends_with_cancel(bus: Transport) -> None:
    inbox = Inbox()
    sub = bus.subscribe("short.lived", inbox)
    bus.publish("short.lived", b"1")
    assert inbox.get().body == b"1"
    sub.cancel()
    bus.publish("short.lived", b"2")
    assert inbox.nothing()


def test_handler_that_raises_loses_its_message_not_the_subscription(bus: Transport) -> None:
    """The handler-failure policy every transport shares
    (deploybus.bus.base.deliver): the message is dropped, not handed back to
    the head of the queue, and the one behind it is delivered."""
    got: queue.Queue[bytes] = queue.Queue()

    def handler(d: Delivery) -> None:
        got.put(d.body)
        if d.body == b"boom":
            raise RuntimeError("boom")
        d.ack()

    bus.subscribe("poison.items", handler, queue="poison", prefetch=1)
    bus.publish("poison.items", b"boom")
    bus.publish("poison.items", b"fine")
    assert got.get(timeout=WAIT) == b"boom"
    assert got.get(timeout=WAIT) == b"fine"
    with pytest.raises(queue.Empty):
        got.get(timeout=0.7)


#: Bigger than the test brokers take: RabbitMQ's max_message_size (128 MiB by
#: default) and ActiveMQ's STOMP frame data (100 MiB).
TOO_BIG = 130 * 1024 * 1024


@pytest.mark.parametrize("kind", REAL_BROKERS)
def test_publish_the_broker_refuses_raises_bus_error(kind: str,
                                                     request: pytest.FixtureRequest) -> None:
    """A message the broker refuses is a BusError, never a driver's error
    (ActiveMQ closes the connection, which stomp.py reported as a bare
    BrokenPipeError), and the transport goes on working."""
    url = broker_url(kind, request, f"t{uuid.uuid4().hex[:10]}")
    t = connect(url, client_name="contract", publish_timeout=5)
    try:
        inbox = Inbox()
        t.subscribe("after.refusal", inbox)
        with pytest.raises(BusError):
            t.publish("too.big", b"x" * TOO_BIG)
        t.publish("after.refusal", b"still here")
        assert inbox.get().body == b"still here"
    finally:
        t.close()
