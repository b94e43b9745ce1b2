"""Topic matching (deploybus.bus.base) and the memory:// transport."""

from __future__ import annotations

import queue
import threading

import pytest

from deploybus.bus import connect, redact
from deploybus.bus.base import Delivery, Worker, check_topic, get_logger, topic_matches
from deploybus.bus.memory import MemoryTransport
from deploybus.errors import UnsupportedURL


@pytest.mark.parametrize("pattern, topic, expected", [
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.b", "a.b.c", False),
    ("a.b", "a", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.b", "b", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "ab", False),
    ("a.#", "b.a", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.c", True),
    ("a.#.c", "a.b.b.c", True),
    ("a.#.c", "a.b", False),
    ("#.c", "c", True),           # '#' matches zero words (AMQP)
    ("#.c", "a.c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.b", False),
    ("#.c.#", "c", True),
    ("#.c.#", "x.c.y", True),
    ("#.c.#", "xc", False),
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("deploy.requests.#", "deploy.requests.web1", True),
    ("deploy.requests.#", "deploy.requestsx", False),
    ("deploy.requests.*", "deploy.requests.web1.x", False),
    ("a+b", "a+b", True),         # no regex leaking through
    ("a.b", "aXb", False),
    ("a|b", "a", False),
])
def test_topic_matches(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("topic", ["", "a..b", ".a", "a."])
def test_check_topic_refuses_empty_words(topic):
    with pytest.raises(ValueError, match="empty word"):
        check_topic(topic, pattern=True)


def test_check_topic_wildcards_only_in_patterns():
    assert check_topic("a.*.#", pattern=True) == "a.*.#"
    with pytest.raises(ValueError, match="must not contain wildcards"):
        check_topic("a.*")


def test_connect_picks_transport_and_refuses_unknown(bus_name):
    t = connect(f"memory://{bus_name}")
    assert isinstance(t, MemoryTransport)
    t.close()
    with pytest.raises(UnsupportedURL, match="'redis'") as info:
        connect("redis://u:secret@h/0")
    assert "secret" not in str(info.value)


def test_redact():
    assert redact("amqp://guest:pw@h:5672/vh") == "amqp://guest:***@h:5672/vh"
    assert redact("memory://x") == "memory://x"


# -- memory transport -------------------------------------------------------------------

def test_durable_queue_keeps_messages_published_before_subscribe(bus, inbox_factory):
    bus.declare("deploy.requests.web1", "agent-web1")
    bus.publish("deploy.requests.web1", b"one", headers={"h": "1"})
    bus.publish("deploy.requests.web1", b"two")
    bus.publish("deploy.requests.web2", b"not for us")
    inbox = inbox_factory()
    bus.subscribe("deploy.requests.web1", inbox, queue="agent-web1")
    assert inbox.wait(2)
    assert [d.body for d in inbox.items] == [b"one", b"two"]
    assert inbox.items[0].headers == {"h": "1"}
    assert inbox.items[0].topic == "deploy.requests.web1"
    assert not inbox.wait(3, timeout=0.1)


def test_without_declare_nothing_is_kept(bus, inbox_factory):
    bus.publish("lost.topic", b"nobody listens")
    inbox = inbox_factory()
    bus.subscribe("lost.topic", inbox, queue="late")
    bus.publish("lost.topic", b"after")
    assert inbox.wait(1)
    assert [d.body for d in inbox.items] == [b"after"]


def test_durable_queue_outlives_its_consumer(bus, inbox_factory):
    first = inbox_factory()
    sub = bus.subscribe("jobs", first, queue="workers")
    sub.cancel()
    bus.publish("jobs", b"while nobody consumes")
    second = inbox_factory()
    bus.subscribe("jobs", second, queue="workers")
    assert second.wait(1)
    assert second.items[0].body == b"while nobody consumes"
    assert first.items == []


def test_same_named_bus_is_shared_other_names_are_not(bus, bus_name, inbox_factory):
    same, other = MemoryTransport(f"memory://{bus_name}"), MemoryTransport("memory://other-x")
    try:
        inbox = inbox_factory()
        bus.subscribe("ev", inbox)
        other.publish("ev", b"elsewhere")
        same.publish("ev", b"here")
        assert inbox.wait(1)
        assert not inbox.wait(2, timeout=0.1)
        assert [d.body for d in inbox.items] == [b"here"]
    finally:
        same.close()
        other.close()


def test_fanout_copies_to_every_subscriber(bus, inbox_factory):
    a, b, c = inbox_factory(), inbox_factory(), inbox_factory()
    bus.subscribe("deploy.events", a)
    bus.subscribe("deploy.*", b)
    bus.subscribe("presence", c)
    for i in range(3):
        bus.publish("deploy.events", b"%d" % i)
    assert a.wait(3) and b.wait(3)
    assert [d.body for d in a.items] == [b"0", b"1", b"2"]
    assert [d.body for d in b.items] == [b"0", b"1", b"2"]
    assert c.items == []


def test_fanout_subscription_ends_with_cancel(bus, inbox_factory):
    inbox = inbox_factory()
    sub = bus.subscribe("ev", inbox)
    bus.publish("ev", b"1")
    assert inbox.wait(1)
    sub.cancel()
    bus.publish("ev", b"2")
    assert not inbox.wait(2, timeout=0.1)
    assert not any(n.startswith("fanout-") for n in bus.broker.queues)


def test_durable_subscription_needs_an_exact_topic(bus, inbox_factory):
    with pytest.raises(ValueError, match="wildcards"):
        bus.subscribe("deploy.#", inbox_factory(), queue="q")


def test_competing_consumers_split_messages(bus, inbox_factory):
    # Neither consumer acks and prefetch is 1, so once one holds a message the
    # next must go to the other.
    a, b = inbox_factory(ack=False), inbox_factory(ack=False)
    bus.subscribe("work", a, queue="workers", prefetch=1)
    bus.subscribe("work", b, queue="workers", prefetch=1)
    bus.publish("work", b"m1")
    bus.publish("work", b"m2")
    assert a.wait(1) and b.wait(1)
    assert sorted(d.body for d in a.items + b.items) == [b"m1", b"m2"]
    # More work queues behind the unacked messages until they are acked.
    bus.publish("work", b"m3")
    assert not a.wait(2, timeout=0.1) and not b.wait(2, timeout=0.1)
    a.items[0].ack()
    assert a.wait(2)
    assert a.items[1].body == b"m3"


def test_competing_consumers_each_message_once(bus, inbox_factory):
    shared = inbox_factory()
    who: list[str] = []

    def consumer(name: str):
        def handle(d: Delivery) -> None:
            who.append(name)
            shared(d)
        return handle

    bus.subscribe("work", consumer("a"), queue="workers", prefetch=2)
    bus.subscribe("work", consumer("b"), queue="workers", prefetch=2)
    sent = [b"%d" % i for i in range(50)]
    for m in sent:
        bus.publish("work", m)
    assert shared.wait(50)
    assert not shared.wait(51, timeout=0.1)
    assert sorted(d.body for d in shared.items) == sorted(sent)
    assert set(who) <= {"a", "b"}


def test_nack_requeue_redelivers_with_flag(bus, inbox_factory):
    seen: list[tuple[bytes, bool]] = []
    done = threading.Event()

    def handler(d: Delivery) -> None:
        seen.append((d.body, d.redelivered))
        if not d.redelivered:
            d.nack(requeue=True)
        else:
            d.ack()
            done.set()

    bus.subscribe("retry", handler, queue="retry")
    bus.publish("retry", b"x")
    assert done.wait(2)
    assert seen == [(b"x", False), (b"x", True)]


def test_nack_without_requeue_drops(bus, inbox_factory):
    calls: list[bytes] = []
    second = threading.Event()

    def handler(d: Delivery) -> None:
        calls.append(d.body)
        d.nack(requeue=False)
        if d.body == b"b":
            second.set()

    bus.subscribe("drop", handler, queue="drop")
    bus.publish("drop", b"a")
    bus.publish("drop", b"b")
    assert second.wait(2)
    assert calls == [b"a", b"b"]


def test_settling_twice_is_a_no_op(bus, inbox_factory):
    inbox = inbox_factory(ack=False)
    bus.subscribe("q", inbox, queue="q")
    bus.publish("q", b"x")
    assert inbox.wait(1)
    d = inbox.items[0]
    d.ack()
    d.nack(requeue=True)  # too late: already acked
    assert d.settled
    assert not inbox.wait(2, timeout=0.15)


def test_handler_exception_does_not_kill_the_consumer(bus):
    got = threading.Event()
    bodies: list[bytes] = []

    def handler(d: Delivery) -> None:
        bodies.append(d.body)
        if d.body == b"boom":
            raise RuntimeError("boom")
        d.ack()
        got.set()

    bus.subscribe("p", handler, queue="p")
    bus.publish("p", b"boom")
    bus.publish("p", b"fine")
    assert got.wait(2)
    assert bodies == [b"boom", b"fine"]  # the poison one was not redelivered


def test_worker_survives_a_failed_handler_whose_drop_fails_too():
    """The shared consumer thread (deploybus.bus.base.Worker): a STOMP
    consumer whose broker had closed the connection under its handler saw the
    drop raise too (a broken pipe), and its thread died with it."""
    items: queue.Queue[Delivery | None] = queue.Queue()

    class Fed(Worker):
        def next_delivery(self) -> Delivery | None:
            return items.get()

    def broken(requeue: bool) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    handled = threading.Event()

    def handler(d: Delivery) -> None:
        if d.body == b"boom":
            raise RuntimeError("boom")
        handled.set()

    worker = Fed(handler, name="fed", log=get_logger("test"), where={"queue": "q"})
    worker.start_worker()
    items.put(Delivery(topic="t", body=b"boom", _nack=broken))
    items.put(Delivery(topic="t", body=b"fine"))
    assert handled.wait(2), "the consumer thread died"
    items.put(None)
    worker.join_worker(2)
    assert not worker.thread.is_alive()


def test_cancel_returns_unacked_messages(bus, bus_name, inbox_factory):
    held = inbox_factory(ack=False)
    sub = bus.subscribe("deploy.requests.h2", held, queue="agent-h2", prefetch=5)
    for m in (b"m1", b"m2", b"m3"):
        bus.publish("deploy.requests.h2", m)
    assert held.wait(3)
    held.items[0].ack()
    sub.cancel()
    other = MemoryTransport(f"memory://{bus_name}")
    try:
        again = inbox_factory()
        other.subscribe("deploy.requests.h2", again, queue="agent-h2")
        assert again.wait(2)
        assert not again.wait(3, timeout=0.1)
        assert [(d.body, d.redelivered) for d in again.items] == [(b"m2", True), (b"m3", True)]
    finally:
        other.close()
    held.items[1].ack()  # an ack after cancel changes nothing
    assert len(again.items) == 2


def test_close_returns_unacked_messages(bus_name, inbox_factory):
    t1 = MemoryTransport(f"memory://{bus_name}")
    held = inbox_factory(ack=False)
    t1.subscribe("q", held, queue="q")
    t1.publish("q", b"x")
    assert held.wait(1)
    t1.close()
    t2 = MemoryTransport(f"memory://{bus_name}")
    try:
        again = inbox_factory()
        t2.subscribe("q", again, queue="q")
        assert again.wait(1)
        assert again.items[0].redelivered
    finally:
        t2.close()


def test_prefetch_bounds_in_flight(bus, inbox_factory):
    held = inbox_factory(ack=False)
    bus.subscribe("bulk", held, queue="bulk", prefetch=2)
    for i in range(5):
        bus.publish("bulk", b"%d" % i)
    assert held.wait(2)
    assert not held.wait(3, timeout=0.15)
    assert len(held.items) == 2
    held.items[0].ack()
    assert held.wait(3)
    assert not held.wait(4, timeout=0.15)
    held.items[1].nack(requeue=False)
    held.items[2].ack()
    assert held.wait(5)
    assert [d.body for d in held.items] == [b"0", b"1", b"2", b"3", b"4"]


def test_prefetch_below_one_still_delivers(bus, inbox_factory):
    inbox = inbox_factory()
    bus.subscribe("z", inbox, queue="z", prefetch=0)
    bus.publish("z", b"x")
    assert inbox.wait(1)


def test_transport_is_a_context_manager(bus_name, inbox_factory):
    held = inbox_factory(ack=False)
    with MemoryTransport(f"memory://{bus_name}") as t:
        t.subscribe("q", held, queue="q")
        t.publish("q", b"x")
        assert held.wait(1)
    assert t.subs == []
