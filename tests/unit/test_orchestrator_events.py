"""The orchestrator keeps every progress entry a host sends, including the
last ones, which an agent puts on its deploy.result when they come together."""

from __future__ import annotations

import uuid
from pathlib import Path

from deploybus import envelope
from deploybus.bus import connect
from deploybus.config import parse
from deploybus.daemons.orchestrator import service
from deploybus.runner import Context
from deploybus.signing import SigningKey
from deploybus.store import Store


def test_entries_on_progress_and_on_result_are_both_logged(tmp_path: Path) -> None:
    key = SigningKey.generate("ops")
    key.save(tmp_path)
    cfg = parse(f"""
bus: {{url: "memory://orch-{uuid.uuid4().hex}"}}
keys:
  signing: ops.key
  trusted: {{ops: ops.pub}}
  policy: [{{signer: ops}}]
projects: {{app: {{git: /nonexistent.git}}}}
environments: {{prod: {{hosts: [h1]}}}}
""", tmp_path / "c.yaml")
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.create_rollout(id="r1", project="app", environment="prod", ref="v1", user="u",
                         hosts=["h1"], strategy={})
    orch = service.Orchestrator(Context(config=cfg, bus=connect(cfg.bus_url), host="o",
                                        signing_key=key), store)
    orch.expect("r1", "h1")

    def entry(step: str, message: str) -> dict:
        return {"step": step, "message": message, "lines": [], "at": "2026-11-29T00:00:00Z"}

    orch.on_event(envelope.new("deploy.progress", {
        "rollout": "r1", "host": "h1", "entries": [entry("fetch", "resolving v1")]},
        sender="a"), None)  # type: ignore[arg-type]
    orch.on_event(envelope.new("deploy.result", {
        "rollout": "r1", "host": "h1", "status": "succeeded", "release": "rel1",
        "entries": [entry("checkout", "201 entries checked out"),
                    entry("switch", "current -> releases/rel1")]},
        sender="a"), None)  # type: ignore[arg-type]
    logs = [(ln["step"], ln["text"]) for ln in store.rollout("r1")["logs"]]
    assert logs == [("fetch", "resolving v1"), ("checkout", "201 entries checked out"),
                    ("switch", "current -> releases/rel1")]
    assert orch.take_result("r1", "h1")["status"] == "succeeded"
