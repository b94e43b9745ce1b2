"""Shared fixtures: real brokers, isolated per test.

A test that needs a broker that is not running fails with a message saying
how to start it (``make brokers``); it never skips silently. RabbitMQ tests
run in a throwaway vhost made for the session; every test also gets its own
topic prefix, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

RABBIT_AMQP = ("127.0.0.1", 5672)
RABBIT_STOMP = ("127.0.0.1", 61613)
ACTIVEMQ_STOMP = ("127.0.0.1", int(os.environ.get("DEPLOYBUS_ACTIVEMQ_STOMP_PORT", "61614")))

#: The kind of test each folder named after a kind holds; a test in a
#: component's folder (tests/agent, tests/ci...) says its kind itself
#: (docs/testing.md).
KINDS = ("unit", "integration", "contract", "e2e", "fault", "browser")
KIND_FOLDERS = {"unit": "unit", "integration": "integration", "contract": "contract",
                "e2e": "e2e", "faults": "fault", "browser": "browser"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test its kind marker: from a kind's folder, or its own
    mark in a component's folder (missing: an error naming the test)."""
    unmarked = []
    for item in items:
        folder = item.path.parent.name
        if folder in KIND_FOLDERS:
            item.add_marker(KIND_FOLDERS[folder])
        elif not any(item.get_closest_marker(k) for k in KINDS):
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError(
            "tests without a kind (mark the module: pytestmark = pytest.mark.<kind>, one of "
            f"{', '.join(KINDS)}; docs/testing.md): {', '.join(unmarked[:10])}")


HOW_TO_START = "start the brokers with `make brokers` (runs scripts/setup-brokers.sh as root)"

#: The broker paths every transport-level test runs on.
BROKERS = ["memory", "rabbitmq-amqp", "rabbitmq-stomp", "activemq-stomp"]
#: The real ones (the end-to-end tests need separate processes).
REAL_BROKERS = BROKERS[1:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=2):
            return True
    except OSError:
        return False


def require(addr: tuple[str, int], what: str) -> None:
    if not _listening(addr):
        pytest.fail(f"{what} is not listening on {addr[0]}:{addr[1]}: {HOW_TO_START}",
                    pytrace=False)


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[str]:
    """A vhost for this test session, deleted (with all its queues) at the end."""
    require(RABBIT_AMQP, "RabbitMQ (AMQP)")
    vhost = f"deploybus-test-{uuid.uuid4().hex[:8]}"
    for cmd in (["rabbitmqctl", "-q", "add_vhost", vhost],
                ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed: {r.stderr.strip()}; {HOW_TO_START}",
                        pytrace=False)
    yield vhost
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True,
                   timeout=60)


def broker_url(kind: str, request: pytest.FixtureRequest, prefix: str) -> str:
    if kind == "memory":
        return f"memory://{prefix}"
    if kind == "rabbitmq-amqp":
        vhost = request.getfixturevalue("rabbit_vhost")
        return f"amqp://guest:guest@127.0.0.1:5672/{vhost}?prefix={prefix}."
    if kind == "rabbitmq-stomp":
        require(RABBIT_STOMP, "RabbitMQ's STOMP plugin")
        vhost = request.getfixturevalue("rabbit_vhost")
        return f"stomp://guest:guest@127.0.0.1:61613/?vhost={vhost}&prefix={prefix}."
    if kind == "activemq-stomp":
        require(ACTIVEMQ_STOMP, "ActiveMQ (STOMP connector)")
        return f"stomp://admin:admin@{ACTIVEMQ_STOMP[0]}:{ACTIVEMQ_STOMP[1]}/?prefix={prefix}."
    raise ValueError(kind)


@pytest.fixture(params=BROKERS)
def bus_url(request: pytest.FixtureRequest) -> str:
    """A fresh, isolated bus URL on each broker path."""
    return broker_url(request.param, request, f"t{uuid.uuid4().hex[:10]}")
