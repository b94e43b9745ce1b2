"""deploybus.dispatch: bad messages are dead-lettered, counted, and do not
stop the daemon; a handler gets only well-formed messages signed by a key
whose role may send them."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery
from deploybus.dispatch import Dispatcher, Message
from deploybus.envelope import Envelope, new
from deploybus.errors import BusError
from deploybus.protocol import Role
from deploybus.runner import Stats
from deploybus.signing import SigningKey, TrustedKey, Verifier

TOPIC = "deploy.requests.web1"


#: The orchestrator's key: it may sign deploy requests; host web1's: its results.
ORCHESTRATOR = SigningKey.generate("orch")
WEB1 = SigningKey.generate("web1")
VERIFIER = Verifier({"orch": TrustedKey("orch", Role.ORCHESTRATOR, ORCHESTRATOR.public),
                     "web1": TrustedKey("web1", Role.HOST, WEB1.public, host="web1")}, [])


class Handled:
    def __init__(self, fail_on: str | None = None) -> None:
        self.envs: list[Envelope] = []
        self.cond = threading.Condition()
        self.fail_on = fail_on

    def __call__(self, msg: Message, d: Delivery) -> None:
        env = msg.env
        if self.fail_on is not None and env.body.get("rollout") == self.fail_on:
            raise RuntimeError(f"cannot handle {self.fail_on}")
        with self.cond:
            self.envs.append(env)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.envs) >= n, timeout)


@pytest.fixture
def stats() -> Stats:
    return Stats()


@pytest.fixture
def dispatcher(bus, stats):
    d = Dispatcher(bus, daemon="agent", host="web1", stats=stats, verifier=VERIFIER)
    yield d
    d.close()


@pytest.fixture
def letters(bus, inbox_factory):
    """Dead letters, read through the durable dead-letter queue."""
    inbox = inbox_factory()
    bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
    bus.subscribe(DEADLETTER_TOPIC, inbox, queue=DEADLETTER_QUEUE)
    return inbox


def body(n: str) -> dict:
    return {"rollout": n, "project": "app", "environment": "prod", "host": "web1", "user": "u"}


def request(n: str, key: SigningKey | None = ORCHESTRATOR) -> bytes:
    env = new("deploy.request", body(n), sender="orch@h", ttl=60)
    return (key.sign(env) if key else env).encode()


def letter(d: Delivery) -> dict:
    return json.loads(d.body)


def test_valid_message_reaches_handler_and_is_acked(bus, dispatcher, stats, inbox_factory):
    handled = Handled()
    dispatcher.subscribe(TOPIC, handled, queue="agent-web1", types={"deploy.request"})
    bus.publish(TOPIC, request("1"))
    assert handled.wait(1)
    assert handled.envs[0].body == body("1")
    # Acked: cancelling does not put it back on the queue.
    dispatcher.close()
    again = inbox_factory()
    bus.subscribe(TOPIC, again, queue="agent-web1")
    assert not again.wait(1, timeout=0.15)
    assert stats.snapshot() == {"received": 1}


def test_bad_messages_are_deadlettered_and_the_next_one_still_arrives(
        bus, dispatcher, stats, letters):
    handled = Handled()
    dispatcher.subscribe(TOPIC, handled, queue="agent-web1", types={"deploy.request"})
    garbage = b"\xff\xfe not json \x00"
    not_envelope = json.dumps({"hello": "world"}).encode()
    wrong_type = new("presence", {"host": "web1"}, sender="keepalive@web1").encode()
    unsigned = request("unsigned", key=None)
    wrong_role = request("from-a-host", key=WEB1)
    bad_body = ORCHESTRATOR.sign(new("deploy.request", {"n": 1}, sender="o", ttl=60)).encode()
    for raw in (garbage, not_envelope, wrong_type, unsigned, wrong_role, bad_body,
                request("ok")):
        bus.publish(TOPIC, raw)

    assert handled.wait(1)
    assert [e.body["rollout"] for e in handled.envs] == ["ok"]
    assert letters.wait(6)
    got = [letter(d) for d in letters.items]
    assert [g["topic"] for g in got] == [TOPIC] * 6
    assert {g["daemon"] for g in got} == {"agent"} and {g["host"] for g in got} == {"web1"}

    assert got[0]["encoding"] == "base64"
    assert base64.b64decode(got[0]["body"]) == garbage
    assert got[0]["reason"].startswith("invalid message: not JSON")

    assert got[1]["encoding"] == "utf-8" and got[1]["body"] == not_envelope.decode()
    assert got[1]["reason"] == "invalid message: missing field 'v'"

    assert got[2]["body"].encode() == wrong_type
    assert got[2]["reason"] == \
        f"invalid message: type 'presence' does not belong on '{TOPIC}'"
    assert got[3]["reason"] == "untrusted message: message is not signed"
    assert got[4]["reason"] == "untrusted message: web1 (host) may not send deploy.request"
    assert got[5]["reason"].startswith("invalid message: deploy.request: ")
    for g in got:
        assert g["at"].endswith("Z")

    s = stats.snapshot()
    assert (s["received"], s["rejected"], s["deadlettered"], s["untrusted"]) == (7, 6, 6, 2)


def test_rejected_messages_are_acked_not_redelivered(bus, dispatcher, letters, inbox_factory):
    handled = Handled()
    dispatcher.subscribe(TOPIC, handled, queue="agent-web1", types={"deploy.request"})
    bus.publish(TOPIC, b"garbage")
    assert letters.wait(1)
    dispatcher.close()
    again = inbox_factory()
    bus.subscribe(TOPIC, again, queue="agent-web1")
    assert not again.wait(1, timeout=0.15)


def test_handler_that_raises_is_deadlettered(bus, dispatcher, stats, letters):
    handled = Handled(fail_on="poison")
    dispatcher.subscribe(TOPIC, handled, queue="agent-web1")
    poison = request("poison")
    bus.publish(TOPIC, poison)
    bus.publish(TOPIC, request("fine"))
    assert handled.wait(1)
    assert [e.body["rollout"] for e in handled.envs] == ["fine"]
    assert letters.wait(1)
    got = letter(letters.items[0])
    assert got["reason"] == "handler failed: RuntimeError: cannot handle poison"
    assert got["body"].encode() == poison
    s = stats.snapshot()
    assert (s["received"], s["rejected"], s["deadlettered"]) == (2, 1, 1)


def test_without_types_any_known_type_is_accepted(bus, dispatcher):
    handled = Handled()
    dispatcher.subscribe("deploy.events", handled)
    answer = {"rollout": "r", "host": "web1", "request_id": "request-1"}
    bus.publish("deploy.events", WEB1.sign(new("deploy.progress", answer, sender="s",
                                                ttl=60)).encode())
    bus.publish("deploy.events", WEB1.sign(new("deploy.result", answer | {
        "status": "succeeded"}, sender="s", ttl=60)).encode())
    assert handled.wait(2)
    assert [e.type for e in handled.envs] == ["deploy.progress", "deploy.result"]


def test_subscribe_declares_the_deadletter_queue(bus, dispatcher, inbox_factory):
    # Letters are kept even when nobody reads the dead-letter queue yet.
    dispatcher.subscribe(TOPIC, Handled(), queue="agent-web1")
    bus.publish(TOPIC, b"garbage")
    inbox = inbox_factory()
    bus.subscribe(DEADLETTER_TOPIC, inbox, queue=DEADLETTER_QUEUE)
    assert inbox.wait(1)
    assert letter(inbox.items[0])["topic"] == TOPIC


def test_auto_ack_off_leaves_settling_to_the_handler(bus, dispatcher, inbox_factory):
    got = threading.Event()
    kept: list[Delivery] = []

    def handler(msg: Message, d: Delivery) -> None:
        kept.append(d)
        got.set()

    dispatcher.subscribe(TOPIC, handler, queue="agent-web1", auto_ack=False)
    bus.publish(TOPIC, request("1"))
    assert got.wait(1)
    assert not kept[0].settled
    dispatcher.close()  # unacked: goes back to the queue
    again = inbox_factory()
    bus.subscribe(TOPIC, again, queue="agent-web1")
    assert again.wait(1) and again.items[0].redelivered


def test_failed_deadletter_publish_drops_the_message_and_counts_it(stats):
    # Handing it back put it at the head of its queue again, for ever
    # (tests/security/test_deadletter.py has the whole story).
    settled: list[tuple[str, bool]] = []

    class Broken:
        def declare(self, topic, queue):
            pass

        def publish(self, topic, body, headers=None):
            raise BusError("broker gone")

        def subscribe(self, topic, handler, *, queue=None, prefetch=10):
            self.handler = handler
            return None

    bus = Broken()
    Dispatcher(bus, daemon="agent", host="web1", stats=stats).subscribe(TOPIC, Handled())
    d = Delivery(topic=TOPIC, body=b"garbage", _ack=lambda: settled.append(("ack", False)),
                 _nack=lambda requeue: settled.append(("nack", requeue)))
    bus.handler(d)
    assert settled == [("ack", False)]
    assert stats["rejected"] == 1 and stats["deadlettered"] == 0
    assert stats["deadletter_dropped"] == 1


def test_deeply_nested_json_is_deadlettered(bus, dispatcher, stats, letters):
    # A body the json module cannot parse without RecursionError must take the
    # same dead-letter path as any other garbage.
    handled = Handled()
    dispatcher.subscribe(TOPIC, handled, queue="agent-web1")
    bus.publish(TOPIC, b"[" * 100_000)
    bus.publish(TOPIC, request("after"))
    assert handled.wait(1)
    assert letters.wait(1, timeout=1)
    assert stats["deadlettered"] == 1
