"""Fixtures for the unit tests: an isolated in-process bus per test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from deploybus.bus.memory import MemoryTransport
from deploybus.config import Config, parse
from deploybus.signing import SigningKey


@pytest.fixture
def bus_name() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def bus(bus_name: str) -> Iterator[MemoryTransport]:
    """A memory:// transport on a bus no other test shares."""
    t = MemoryTransport(f"memory://{bus_name}")
    yield t
    t.close()


class Inbox:
    """Collects deliveries; ``wait(n)`` blocks until n arrived (or times out)."""

    def __init__(self, *, ack: bool = True) -> None:
        self.items: list = []
        self.ack = ack
        self.cond = threading.Condition()

    def __call__(self, delivery) -> None:
        with self.cond:
            self.items.append(delivery)
            self.cond.notify_all()
        if self.ack:
            delivery.ack()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.items) >= n, timeout)


@pytest.fixture
def inbox_factory() -> Callable[..., Inbox]:
    return Inbox


@pytest.fixture
def orchestrator_config(tmp_path) -> tuple[Config, SigningKey]:  # noqa: ANN001
    """A config for an orchestrator on a memory bus of its own (project app,
    environment prod with host h1, request_timeout 30 s) and its signing key."""
    key = SigningKey.generate("ops")
    key.save(tmp_path)
    cfg = parse(f"""
bus: {{url: "memory://orch-{uuid.uuid4().hex}"}}
keys:
  signing: ops.key
  trusted: {{ops: ops.pub}}
  policy: [{{signer: ops}}]
projects: {{app: {{git: /nonexistent.git}}}}
environments: {{prod: {{hosts: [h1], request_timeout: 30}}}}
""", tmp_path / "c.yaml")
    return cfg, key
