"""A broker that refuses our credentials or vhost is not a broker that is down:
every call raises :class:`BusAuthError` at once, naming the broker (password
redacted) and the vhost, instead of retrying for half a minute. Only a
subscription that was already consuming retries a refusal (its password may
be rotated back), logging it as an error.

ActiveMQ as set up here (scripts/setup-brokers.sh) accepts any user and
password on STOMP, so it has no case of its own."""

from __future__ import annotations

import queue
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from deploybus.bus import Delivery, Transport, connect
from deploybus.errors import BusAuthError
from tests.conftest import HOW_TO_START, RABBIT_AMQP, RABBIT_STOMP, require

pytestmark = pytest.mark.broker

KINDS = ["rabbitmq-amqp", "rabbitmq-stomp"]

#: A refusal must come this fast (a retrying transport took 30-42 s).
AT_ONCE = 3.0

#: A wrong password, percent-encoded in the URL: neither form may show up.
SECRET_QUOTED = f"wrong%2Fs3cret-{uuid.uuid4().hex[:6]}"
SECRET = SECRET_QUOTED.replace("%2F", "/")


def url(kind: str, *, user: str = "guest", password: str = "guest", vhost: str) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    if kind == "rabbitmq-amqp":
        require(RABBIT_AMQP, "RabbitMQ (AMQP)")
        return f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}?prefix={prefix}"
    require(RABBIT_STOMP, "RabbitMQ's STOMP plugin")
    return f"stomp://{user}:{password}@127.0.0.1:61613/?vhost={vhost}&prefix={prefix}"


def port(kind: str) -> int:
    return RABBIT_AMQP[1] if kind == "rabbitmq-amqp" else RABBIT_STOMP[1]


def rabbitmqctl(*args: str) -> None:
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {r.stderr.strip()}; " \
                              f"{HOW_TO_START}"


@pytest.fixture
def opened() -> Iterator[list[Transport]]:
    """Transports a test opened, closed at the end (a refused one must close fast)."""
    buses: list[Transport] = []
    yield buses
    for bus in buses:
        started = time.monotonic()
        bus.close()
        assert time.monotonic() - started < 6, "close() of a refused transport hung"


def refused_url(kind: str, case: str, rabbit_vhost: str) -> tuple[str, str]:
    """The URL the broker refuses for ``case``, and the vhost it names."""
    if case == "password":
        return url(kind, password=SECRET_QUOTED, vhost=rabbit_vhost), rabbit_vhost
    vhost = f"deploybus-nosuch-{uuid.uuid4().hex[:8]}"
    return url(kind, vhost=vhost), vhost


def assert_clear(exc: BusAuthError, kind: str, vhost: str) -> None:
    msg = str(exc)
    assert f"127.0.0.1:{port(kind)}" in msg, msg
    assert f"vhost {vhost!r}" in msg, msg
    assert vhost in msg.split(" refused ")[0], f"the URL lost its vhost: {msg}"
    assert SECRET not in msg and SECRET_QUOTED not in msg and "s3cret" not in msg, msg
    assert ":guest@" not in msg and "guest:***@" in msg, msg


def raises_at_once(call: Any) -> BusAuthError:
    started = time.monotonic()
    with pytest.raises(BusAuthError) as info:
        call()
    took = time.monotonic() - started
    assert took < AT_ONCE, f"refusal took {took:.1f}s: {info.value}"
    return info.value


@pytest.mark.parametrize("case", ["password", "vhost"])
@pytest.mark.parametrize("kind", KINDS)
def test_subscribe_refused_at_once(kind: str, case: str, rabbit_vhost: str,
                                   opened: list[Transport]) -> None:
    target, vhost = refused_url(kind, case, rabbit_vhost)
    bus = connect(target, client_name="auth")
    opened.append(bus)
    exc = raises_at_once(lambda: bus.subscribe("auth.events", lambda d: d.ack()))
    assert_clear(exc, kind, vhost)
    # The same transport, afterwards: still at once, still clear.
    assert_clear(raises_at_once(lambda: bus.publish("auth.events", b"{}")), kind, vhost)
    assert_clear(raises_at_once(lambda: bus.subscribe("auth.other", lambda d: d.ack(),
                                                      queue="auth-q")), kind, vhost)


@pytest.mark.parametrize("case", ["password", "vhost"])
@pytest.mark.parametrize("kind", KINDS)
def test_publish_refused_at_once(kind: str, case: str, rabbit_vhost: str,
                                 opened: list[Transport]) -> None:
    target, vhost = refused_url(kind, case, rabbit_vhost)
    bus = connect(target, client_name="auth")
    opened.append(bus)
    assert_clear(raises_at_once(lambda: bus.publish("auth.events", b"{}")), kind, vhost)
    assert_clear(raises_at_once(lambda: bus.publish_batch(
        [("auth.a", b"{}"), ("auth.b", b"{}")])), kind, vhost)
    assert_clear(raises_at_once(lambda: bus.declare("auth.rollouts", "auth-q")), kind, vhost)
    # On a transport of its own, so that it is the first call there.
    fresh = connect(target, client_name="auth")
    opened.append(fresh)
    assert_clear(raises_at_once(lambda: fresh.publish_for("auth.rollouts", "auth-q", b"{}")),
                 kind, vhost)


class Recorder:
    """Stands in for a bus module's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def errors(self) -> list[str]:
        return [str(kw.get("error")) for level, _, kw in self.lines if level == "error"]


@pytest.mark.parametrize("kind", KINDS)
def test_refused_after_being_up_keeps_retrying(kind: str, monkeypatch: pytest.MonkeyPatch,
                                               opened: list[Transport]) -> None:
    """The password of a consuming subscription's user changes and its
    connection drops: the refusal is logged as an error, the subscription
    keeps trying, and consumes again once the password is back."""
    require(RABBIT_AMQP, "RabbitMQ (AMQP)")
    from deploybus.bus import amqp as amqp_mod
    from deploybus.bus import stomp as stomp_mod
    module = amqp_mod if kind == "rabbitmq-amqp" else stomp_mod
    recorder = Recorder()
    monkeypatch.setattr(module, "log", recorder)

    tag = uuid.uuid4().hex[:8]
    vhost, user, password = f"deploybus-auth-{tag}", f"deploybus-auth-{tag}", f"pw-{tag}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("add_user", user, password)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        target = url(kind, user=user, password=password, vhost=vhost)
        bus = connect(target, client_name="auth")
        opened.append(bus)
        got: queue.Queue[Delivery] = queue.Queue()

        def keep(d: Delivery) -> None:
            d.ack()
            got.put(d)

        bus.subscribe("auth.events", keep, queue="auth-rotated")

        rabbitmqctl("change_password", user, f"rotated-{tag}")
        rabbitmqctl("close_all_connections", "-p", vhost, "password rotated")
        deadline = time.monotonic() + 20
        while not recorder.errors() and time.monotonic() < deadline:
            time.sleep(0.2)
        errors = recorder.errors()
        assert errors, f"no refusal logged at error level: {recorder.lines}"
        assert f"vhost {vhost!r}" in errors[0] and "127.0.0.1:" in errors[0], errors[0]
        assert password not in errors[0] and f"rotated-{tag}" not in errors[0], errors[0]

        rabbitmqctl("change_password", user, password)
        # Published by the default user, as AMQP: the subscription must be back.
        prefix = target.split("prefix=")[1]
        with connect(f"amqp://guest:guest@127.0.0.1:5672/{vhost}?prefix={prefix}",
                     client_name="auth-publisher") as publisher:
            publisher.publish("auth.events", b'{"back": true}')
        assert got.get(timeout=30).body == b'{"back": true}'
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True,
                       timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True,
                       timeout=60)
