"""Think as anyone on the shared broker would: an unsigned message is noise,
and a key speaks only for its role.

Each test here is one finding of the protocol review, thrown at the real
orchestrator, agent and web (in this process, on the memory bus): it failed
on the code before keys had roles and every message was checked by the
dispatcher, and passes now.
"""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploybus import envelope, protocol, topics
from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, connect
from deploybus.config import parse
from deploybus.daemons.orchestrator import service
from deploybus.frontend.app import create_app
from deploybus.runner import Context
from deploybus.signing import SigningKey
from deploybus.store import Store
from tests.agent import conftest as agent_conftest
from tests.unit.conftest import OrchestratorSetup, orchestrator_config  # noqa: F401

pytestmark = pytest.mark.integration

#: The agent tests' fixture: a site, its in-process agent and a bus to it.
harness = agent_conftest.harness


class Orch:
    """A running orchestrator with its store, a watcher of its statuses and
    the keys of everyone around it."""

    def __init__(self, tmp_path: Path, setup: OrchestratorSetup) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.bus = connect(self.cfg.bus_url)
        self.store = Store(f"sqlite:///{tmp_path / 's.db'}")
        self.orch = service.Orchestrator(Context(config=self.cfg, bus=self.bus, host="o",
                                                 signing_key=setup.key), self.store)
        self.statuses: queue.Queue[dict] = queue.Queue()
        self.letters: queue.Queue[dict] = queue.Queue()
        self.requests: list[envelope.Envelope] = []
        self.bus.subscribe(topics.STATUS, self._status)
        self.bus.subscribe(topics.requests_for("h1"),
                           lambda d: (self.requests.append(envelope.decode(d.body)), d.ack()))
        self.orch.start()
        import json
        self.bus.subscribe(DEADLETTER_TOPIC, lambda d: (self.letters.put(json.loads(d.body)),
                                                        d.ack()), queue=DEADLETTER_QUEUE)

    def _status(self, d: Delivery) -> None:
        self.statuses.put(envelope.decode(d.body).body)
        d.ack()

    def rollout(self, key: SigningKey | None, rid: str = "r1", **extra: Any) -> str:
        env = envelope.new("deploy.rollout", {"rollout": rid, "project": "app",
                                              "environment": "prod", "ref": "v1",
                                              "user": "mallory", **extra},
                           sender="t", correlation=rid, ttl=60)
        self.bus.publish(topics.ROLLOUTS, (key.sign(env) if key else env).encode())
        return rid

    def final(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            b = self.statuses.get(timeout=max(0.01, deadline - time.monotonic()))
            if b.get("state") in ("succeeded", "partial", "failed", "refused", "aborted") \
                    and not b.get("host"):
                return b

    def letter(self, timeout: float = 10) -> dict:
        return self.letters.get(timeout=timeout)

    def close(self) -> None:
        self.orch.stop(5)
        self.bus.close()


@pytest.fixture
def orch(tmp_path: Path, orchestrator_config: OrchestratorSetup) -> Any:  # noqa: F811
    orchestrator_config.cfg.environments["prod"].ack_timeout = 2.0
    o = Orch(tmp_path, orchestrator_config)
    yield o
    o.close()


def result(rid: str, request_id: str, **body: Any) -> dict:
    return {"rollout": rid, "host": "h1", "request_id": request_id, "status": "succeeded",
            "release": "rel-forged", **body}


def test_a_forged_result_does_not_make_a_host_without_an_agent_succeed(orch: Orch) -> None:
    """Before: a deploy.result published by anyone made the rollout succeed
    for a host that has no agent, and the orchestrator signed that status."""
    stranger, other_host = SigningKey.generate("mallory"), orch.setup.person
    rid = orch.rollout(orch.setup.person)
    assert wait(lambda: orch.requests, 10), "the orchestrator asked h1"
    request_id = orch.requests[0].id
    for key in (None, stranger, other_host):  # unsigned, unknown, a person's key
        env = envelope.new("deploy.result", result(rid, request_id), sender="evil", ttl=60)
        orch.bus.publish(topics.EVENTS, (key.sign(env) if key else env).encode())
    # h1's own key, but answering a request nobody sent
    orch.bus.publish(topics.EVENTS, orch.setup.host.sign(envelope.new(
        "deploy.result", result(rid, "not-a-request-we-sent"), sender="h1", ttl=60)).encode())
    final = orch.final()
    assert final["state"] == "failed", final
    assert "agent not answering" in final["reason"], final
    step = orch.store.rollout(rid)["hosts"][0]
    assert step["state"] == "failed" and step["release"] is None
    reasons = [orch.letter()["reason"] for _ in range(3)]
    assert any("not signed" in r for r in reasons) and any("unknown key" in r for r in reasons)
    assert any("alice (person) may not send deploy.result" in r for r in reasons)
    assert orch.orch.ctx.stats["unasked_answers"] == 1


def test_unsigned_rollouts_leave_no_row_and_no_audit_under_a_chosen_name(orch: Orch) -> None:
    orch.rollout(None, "unsigned1")
    orch.rollout(SigningKey.generate("mallory"), "stranger1")
    orch.rollout(orch.setup.host, "from-a-host")  # a host may not ask for rollouts
    for _ in range(3):
        orch.letter()
    assert orch.store.rollouts(10) == [] and orch.store.audit_trail(10) == []
    assert orch.statuses.empty(), "noise was answered"


def test_a_person_is_recorded_as_the_key_not_as_the_name_the_body_gives(orch: Orch) -> None:
    rid = orch.rollout(orch.setup.person)  # body says "mallory"; the key is alice's
    orch.final()
    assert orch.store.rollout(rid)["user"] == "alice"
    assert {a["actor"] for a in orch.store.audit_trail(10)} == {"alice"}


def test_unsigned_or_malformed_presence_changes_nothing(orch: Orch, tmp_path: Path) -> None:
    """Before: unsigned presence put fake releases on the dashboard, a tiny
    interval made a live host look offline, and a list or an integer where
    the dashboard expects a mapping or text gave a 500."""
    host = orch.setup.host
    orch.bus.publish(topics.PRESENCE, envelope.new("presence", {
        "host": "h1", "daemon": "keepalive", "interval": 10,
        "projects": {"app": {"release": "forged", "ref": "evil"}}}, sender="x",
        ttl=30).encode())
    for bad in ({"interval": 1e-9}, {"projects": ["app"]},
                {"projects": {"app": {"commit": 5}}}, {"daemon": "nonsense"}):
        orch.bus.publish(topics.PRESENCE, host.sign(envelope.new("presence", {
            "host": "h1", "daemon": "keepalive", "interval": 10, **bad}, sender="x",
            ttl=30)).encode())
    # another host's key speaking for h1
    orch.bus.publish(topics.PRESENCE, orch.setup.key.sign(envelope.new("presence", {
        "host": "h1", "daemon": "agent", "interval": 10}, sender="x", ttl=30)).encode())
    for _ in range(6):
        orch.letter()
    assert orch.store.host("h1") is None, "noise became a host"
    app = create_app(orch.orch.ctx, orch.store)
    page = app.test_client().get("/", headers={"Host": "127.0.0.1"})
    assert page.status_code == 200 and b"forged" not in page.data


def test_forged_progress_stays_out_of_a_real_rollouts_log(orch: Orch) -> None:
    rid = orch.rollout(orch.setup.person)
    assert wait(lambda: orch.requests, 10)
    real = orch.requests[0].id
    entry = {"step": "post", "message": "rm -rf / ok", "lines": [], "at": "x"}
    for key, request_id in ((None, real), (orch.setup.person, real),
                            (orch.setup.host, "somebody-elses")):
        env = envelope.new("deploy.progress", {"rollout": rid, "host": "h1",
                                               "request_id": request_id,
                                               "entries": [entry]}, sender="x", ttl=60)
        orch.bus.publish(topics.EVENTS, (key.sign(env) if key else env).encode())
    orch.bus.publish(topics.EVENTS, orch.setup.host.sign(envelope.new("deploy.result", result(
        rid, real, entries=[{"step": "switch", "message": "the real one", "lines": [],
                             "at": "x"}]), sender="h1", ttl=60)).encode())
    assert orch.final()["state"] == "succeeded"
    logs = [ln["text"] for ln in orch.store.rollout(rid)["logs"]]
    assert logs == ["the real one"], logs


def test_a_status_not_signed_by_an_orchestrator_key_is_not_believed(
        orch: Orch, tmp_path: Path) -> None:
    """deploy --wait's exit code rests on the final status: a person's key
    (or none) cannot make it say succeeded."""
    from deploybus.cli.deploying import follow
    seen: list[dict] = []
    follow(orch.bus, orch.cfg, "r9", lambda env: seen.append(env.body))
    body = {"rollout": "r9", "state": "succeeded"}
    for key in (None, orch.setup.person, orch.setup.host, orch.setup.key):
        env = envelope.new("deploy.rollout.status", body, sender="x", correlation="r9",
                           ttl=60)
        orch.bus.publish(topics.STATUS, (key.sign(env) if key else env).encode())
    assert wait(lambda: seen, 5)
    time.sleep(0.3)
    assert seen == [body], "only the orchestrator's status counts"


def test_a_person_key_cannot_skip_the_orchestrator(harness) -> None:  # noqa: ANN001
    """Before: a key the policy allowed to ask for app/prod rollouts could sign
    a deploy.request and send it straight to an agent, past locks and the
    store. Now only an orchestrator key's request is taken."""
    h = harness({"app": {}}, start=False)
    h.repo.commit("v1")
    person = SigningKey.generate("alice")
    person.save(h.site.keys)
    doc = yaml.safe_load(h.site.config_path.read_text())
    doc["keys"]["trusted"]["alice"] = {"key": str(h.site.keys / "alice.pub"), "role": "person"}
    doc["keys"]["policy"] = [{"signer": "alice"}]  # alice may ask for any rollout
    h.site.config_path.write_text(yaml.safe_dump(doc))
    h.start()
    env = h.site.request("v1", key=person)
    h.site.send(h.bus, env)
    letter = h.events.wait(lambda e: isinstance(e, dict) and env.id in str(e.get("body")), 10)
    assert letter["reason"] == "untrusted message: alice (person) may not send deploy.request"
    assert not h.site.layout().current.exists()
    assert h.events.results(str(env.body["rollout"])) == []


def test_a_flood_of_unsigned_requests_costs_no_refusals_and_no_audit(harness) -> None:  # noqa: ANN001
    """Before: 3,000 unsigned requests made 3,000 published refusals and
    600 kB of audit in 2 s. Now they are dead-lettered (rate-limited), and
    the agent still deploys right after."""
    h = harness({"app": {}}, start=False)
    h.repo.commit("v1")
    agent = h.start()
    for _ in range(3000):
        rid = uuid.uuid4().hex[:16]
        h.bus.publish(topics.requests_for(h.site.host), envelope.new(
            "deploy.request", {"rollout": rid, "project": "app", "environment": "prod",
                               "host": h.site.host, "user": "x"}, sender="x",
            ttl=60).encode())
    assert h.deploy("v1")["status"] == "succeeded"
    results = [e for e in h.events.items if e.type == "deploy.result"]
    assert len(results) == 1, "an unsigned request was answered"
    assert not (h.site.state / "audit.jsonl").exists() or \
        len((h.site.state / "audit.jsonl").read_text().splitlines()) == 1
    stats = agent.agent.ctx.stats
    assert stats["untrusted"] == 3000
    assert len(h.events.letters) <= 400 and stats["deadletter_suppressed"] >= 2600


def test_the_typed_bodies_refuse_what_reached_git_or_scripts_before() -> None:
    """One validation, on receipt, by the class every sender builds with."""
    from deploybus.errors import EnvelopeError
    base = {"rollout": "r", "project": "app", "environment": "prod", "host": "h1",
            "user": "u"}
    for bad in ({"user": "eve\x00"}, {"ref": "--upload-pack=x"}, {"commit": "abc"},
                {"release": "../../etc"}, {"host": "h1 h2"}, {"extra": 1},
                {"action": "delete"}, {"position": -1}):
        with pytest.raises(EnvelopeError):
            protocol.parse("deploy.request", base | bad)
    assert protocol.parse("deploy.request", base).undo is False


def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_config_roles_are_checked(tmp_path: Path) -> None:
    """A key is trusted for one role; a policy rule cannot make an
    orchestrator or host key a requester."""
    from deploybus.errors import ConfigError
    SigningKey.generate("h1").save(tmp_path)
    with pytest.raises(ConfigError, match="give the key and its role"):
        parse("keys: {trusted: {h1: h1.pub}}\n", tmp_path / "c.yaml")
    cfg = parse("keys: {trusted: {h1: {key: h1.pub, role: host}}}\n", tmp_path / "c.yaml")
    assert cfg.trusted["h1"].host == "h1"
