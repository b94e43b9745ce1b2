"""Fixtures for the unit tests: an isolated in-process bus per test."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import NamedTuple

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


class OrchestratorSetup(NamedTuple):
    """An orchestrator's config and the keys of everyone around it."""

    cfg: Config
    #: the orchestrator's own key (role orchestrator)
    key: SigningKey
    #: a person who may ask for app on prod (role person)
    person: SigningKey
    #: host h1's key (role host): its agent's results
    host: SigningKey


@pytest.fixture
def orchestrator_config(tmp_path) -> OrchestratorSetup:  # noqa: ANN001
    """A config for an orchestrator on a memory bus of its own (project app,
    a real bare repository with tag v1; environment prod with host h1,
    request_timeout 30 s) and the keys: the orchestrator's, a person's, h1's."""
    keys = {name: SigningKey.generate(name) for name in ("ops", "alice", "h1")}
    for k in keys.values():
        k.save(tmp_path)
    repo = tmp_path / "app.git"
    work = tmp_path / "app-work"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    for cmd, cwd in ((["git", "init", "-q", "--bare", str(repo)], tmp_path),
                     (["git", "init", "-q", "-b", "main", str(work)], tmp_path),
                     (["git", "commit", "-q", "--allow-empty", "-m", "v1"], work),
                     (["git", "tag", "v1"], work),
                     (["git", "push", "-q", str(repo), "main", "v1"], work)):
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    cfg = parse(f"""
bus: {{url: "memory://orch-{uuid.uuid4().hex}"}}
keys:
  signing: ops.key
  trusted:
    ops: {{key: ops.pub, role: orchestrator}}
    alice: {{key: alice.pub, role: person}}
    h1: {{key: h1.pub, role: host}}
  policy: [{{signer: alice}}]
projects: {{app: {{git: {repo}}}}}
environments: {{prod: {{hosts: [h1], request_timeout: 30}}}}
""", tmp_path / "c.yaml")
    return OrchestratorSetup(cfg, keys["ops"], keys["alice"], keys["h1"])
