"""Whoever asks for a rollout gets an answer, even when the orchestrator hits a bug."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from deploybus import envelope, topics
from deploybus.bus import Delivery, connect
from deploybus.daemons.orchestrator import service
from deploybus.runner import Context
from deploybus.store import Store


def test_unexpected_error_is_reported_not_swallowed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    orchestrator_config) -> None:  # noqa: ANN001
    cfg, key, person = orchestrator_config.cfg, orchestrator_config.key, orchestrator_config.person
    bus = connect(cfg.bus_url)
    orch = service.Orchestrator(Context(config=cfg, bus=bus, host="o", signing_key=key),
                                Store(f"sqlite:///{tmp_path / 's.db'}"))
    orch.start()
    statuses: queue.Queue[dict] = queue.Queue()

    def on_event(d: Delivery) -> None:
        env = envelope.decode(d.body)
        if env.type == "deploy.rollout.status":
            statuses.put(env.body)
        d.ack()

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(orch.store, "acquire_lock", boom)
    bus.subscribe(topics.STATUS, on_event)
    env = envelope.new("deploy.rollout", {"rollout": "r1", "project": "app",
                                          "environment": "prod", "ref": "v1", "user": "u"},
                       sender="t", correlation="r1", ttl=60)
    bus.publish(topics.ROLLOUTS, person.sign(env).encode())
    status = statuses.get(timeout=10)
    assert status["state"] == "failed"
    assert "orchestrator error: RuntimeError: a bug" in status["reason"]
    orch.stop(5)
    bus.close()
