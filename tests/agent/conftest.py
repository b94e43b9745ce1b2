"""Fixtures for the agent tests: a site (repo, config, keys) on an isolated
in-process bus, an agent running in this process, and an event collector."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus.bus import connect
from tests.agent.harness import Events, InProcessAgent, Site


class Harness:
    """One site, its in-process agent(s) and a test-side bus connection."""

    def __init__(self, base: Path, projects: dict[str, dict[str, Any]]) -> None:
        self.site = Site(base, f"memory://agent-{uuid.uuid4().hex}", projects)
        self.bus = connect(self.site.bus_url)
        self.events = Events(self.bus)
        self.agents: list[InProcessAgent] = []

    @property
    def repo(self):  # noqa: ANN201
        return self.site.repo

    def start(self) -> InProcessAgent:
        a = InProcessAgent(self.site).start()
        self.agents.append(a)
        return a

    def restart(self, projects: dict[str, dict[str, Any]] | None = None) -> InProcessAgent:
        """Stop the running agent(s) warmly; start a new one (with new projects)."""
        for a in self.agents:
            a.stop()
        self.agents.clear()
        if projects is not None:
            self.site.write_config(projects)
        return self.start()

    def deploy(self, ref: str | None = "v1", timeout: float = 60, **kw: Any) -> dict[str, Any]:
        """Send a request and wait for its result."""
        env = self.site.request(ref, **kw)
        rollout = self.site.send(self.bus, env)
        return self.events.result(rollout, timeout)

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.bus.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(projects: dict[str, dict[str, Any]], *, start: bool = True) -> Harness:
        h = Harness(tmp_path, projects)
        made.append(h)
        if start:
            h.start()
        return h

    yield make
    for h in made:
        h.close()
