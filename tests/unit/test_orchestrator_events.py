"""The orchestrator keeps every progress entry a host sends, including the
last ones, which an agent puts on its deploy.result when they come together."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from deploybus import envelope, protocol, topics
from deploybus.bus import Transport, connect
from deploybus.config import parse
from deploybus.daemons.orchestrator import rollout, service
from deploybus.daemons.orchestrator.mailbox import Key
from deploybus.dispatch import Message
from deploybus.runner import Context
from deploybus.signing import SigningKey
from deploybus.states import FINAL_STATES
from deploybus.store import Store


def message(orch: service.Orchestrator, key: SigningKey, type: str, body: dict) -> Message:
    """A signed message as the dispatcher hands it to a handler."""
    env = key.sign(envelope.new(type, body, sender="a", ttl=60))
    typed = protocol.parse(type, body)
    return Message(env, typed, orch.verifier.identify(env, typed))


def test_entries_on_progress_and_on_result_are_both_logged(tmp_path: Path,
                                                           orchestrator_config) -> None:  # noqa: ANN001
    cfg, key, _person, host = orchestrator_config
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.create_rollout(id="r1", project="app", environment="prod", ref="v1", user="u",
                         hosts=["h1"], strategy={})
    orch = service.Orchestrator(Context(config=cfg, bus=connect(cfg.bus_url), host="o",
                                        signing_key=key), store)
    orch.mailbox.expect(Key("r1", "h1"))
    orch.mailbox.sent(Key("r1", "h1"), "request-01")

    def entry(step: str, message: str) -> dict:
        return {"step": step, "message": message, "lines": [], "at": "2026-11-29T00:00:00Z"}

    orch.on_event(message(orch, host, "deploy.progress", {
        "rollout": "r1", "host": "h1", "request_id": "request-01",
        "entries": [entry("fetch", "resolving v1")]}), None)  # type: ignore[arg-type]
    orch.on_event(message(orch, host, "deploy.result", {
        "rollout": "r1", "host": "h1", "request_id": "request-01", "status": "succeeded",
        "release": "rel1", "entries": [entry("checkout", "201 entries checked out"),
                                       entry("switch", "current -> releases/rel1")]}),
        None)  # type: ignore[arg-type]
    logs = [(ln["step"], ln["text"]) for ln in store.rollout("r1")["logs"]]
    assert logs == [("fetch", "resolving v1"), ("checkout", "201 entries checked out"),
                    ("switch", "current -> releases/rel1")]
    result = orch.mailbox.take(Key("r1", "h1"))
    assert result is not None and result.status == "succeeded"


class FakeAgent:
    """Answers h1's requests on the memory bus as a script says (an answer
    of None: says nothing)."""

    def __init__(self, bus, key: SigningKey, answers: list) -> None:  # noqa: ANN001
        self.bus, self.key, self.answers, self.requests = bus, key, answers, []
        self.orch: service.Orchestrator | None = None
        self.asked_at = 0.0
        self.rollout = ""
        self.last_request = ""
        bus.subscribe(topics.requests_for("h1"), self.on_request, queue="h1-requests")

    def on_request(self, d) -> None:  # noqa: ANN001
        env = envelope.decode(d.body)
        d.ack()
        self.requests.append(env.id)
        self.last_request = env.id
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        self.rollout = env.body["rollout"]
        result = answer(self)
        if result is None:
            return  # a silent agent
        body = {"rollout": env.body["rollout"], "host": "h1", "request_id": env.id,
                "project": "app", **result}
        self.bus.publish(topics.EVENTS, self.key.sign(envelope.new(
            "deploy.result", body, sender="agent@h1", correlation=env.body["rollout"],
            ttl=60)).encode())


def lapsed_after_outage(agent: FakeAgent) -> dict:
    # the orchestrator's link goes down and comes back while the request waits
    agent.bus.links.down("test")
    time.sleep(0.3)
    agent.bus.links.up("test")
    return {"status": "refused", "lapsed": True, "reason": "message expired at ..."}


def lapsed_and_repeated_during_the_reask(agent: FakeAgent) -> dict:
    """A lapsed refusal whose twin (the broker delivered the request twice)
    reaches the orchestrator while the request asked anew is on its way."""
    answer = lapsed_after_outage(agent)
    first, publish_batch = agent.requests[0], agent.bus.publish_batch

    def reask(messages: list) -> None:
        agent.bus.publish_batch = publish_batch
        assert agent.orch is not None
        agent.orch.on_event(message(agent.orch, agent.key, "deploy.result", {
            "rollout": "r1", "host": "h1", "request_id": first, **answer}),
            None)  # type: ignore[arg-type]
        publish_batch(messages)

    agent.bus.publish_batch = reask
    return answer


def lapsed_no_outage(_agent: FakeAgent) -> dict:
    return {"status": "refused", "lapsed": True, "reason": "message expired at ..."}


def succeeded(_agent: FakeAgent) -> dict:
    return {"status": "succeeded", "release": "r1", "commit": "c" * 40}


def silent(_agent: FakeAgent) -> None:
    return None


def ack_then_slow(agent: FakeAgent) -> dict:
    """Acknowledges at once, as the agent does, then takes 2.5 s to deploy."""
    agent.bus.publish(topics.EVENTS, agent.key.sign(envelope.new(
        "deploy.progress", {"rollout": agent.rollout, "host": "h1",
                            "request_id": agent.last_request, "entries": [
                                {"step": "accepted", "message": "accepted", "lines": [],
                                 "at": "x"}]},
        sender="agent@h1", correlation=agent.rollout, ttl=60)).encode())
    time.sleep(2.5)
    return succeeded(agent)


def failed(_agent: FakeAgent) -> dict:
    return {"status": "failed", "reason": "post script failed with exit code 3"}


def run_rollout(tmp_path: Path, setup: tuple, answers: list,
                before: Callable[[Store, Transport], None] | None = None,
                strategy: dict | None = None) -> tuple[dict, FakeAgent, Store]:
    cfg, key, person, host = setup
    bus = connect(cfg.bus_url)
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    if before is not None:
        before(store, bus)
    orch = service.Orchestrator(Context(config=cfg, bus=bus, host="o", signing_key=key), store)
    agent = FakeAgent(bus, host, answers)
    agent.orch = orch
    finals: queue.Queue[dict] = queue.Queue()

    def on_status(d) -> None:  # noqa: ANN001
        b = envelope.decode(d.body).body
        if b.get("state") in FINAL_STATES and not b.get("host"):
            finals.put(b)
        d.ack()

    bus.subscribe(topics.STATUS, on_status)
    orch.start()
    try:
        env = envelope.new("deploy.rollout", {"rollout": "r1", "project": "app",
                                              "environment": "prod", "ref": "v1", "user": "u",
                                              "strategy": strategy or {}},
                           sender="t", correlation="r1", ttl=60)
        bus.publish(topics.ROLLOUTS, person.sign(env).encode())
        return finals.get(timeout=20), agent, store
    finally:
        orch.stop(5)
        bus.close()


def back_after_us(agent: FakeAgent) -> dict:
    """An outage of 1.5 s; the host's own link comes back 2.5 s after ours
    (its reconnect loop was waiting), then it answers."""
    agent.bus.links.down("test")
    time.sleep(1.5)
    agent.bus.links.up("test")
    time.sleep(2.5)
    return succeeded(agent)


def test_a_host_coming_back_after_us_is_not_held_to_the_deadline_meanwhile(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    """Request timeout 2 s: the answer comes 4 s after the request, 1.5 s of
    them in the outage. The wait after the outage, up to as long as the
    outage lasted, is the host's link coming back, not the host."""
    cfg = orchestrator_config.cfg
    cfg.environments["prod"].request_timeout = 2.0
    final, agent, _store = run_rollout(tmp_path, orchestrator_config, [back_after_us])
    assert final["state"] == "succeeded", final
    assert len(agent.requests) == 1


def test_a_host_heard_again_after_an_outage_is_asked_without_waiting_out_the_allowance(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    """h1 beats every second and was last heard before a 2 s outage: the
    orchestrator listens before calling it offline (3 beats and the 2 s the
    host's link may take to come back, 5 s), but asks it as soon as it is
    heard again."""
    heard: list[float] = []
    done = threading.Event()

    def stale_then_heard(store: Store, bus: Transport) -> None:
        store.record_presence("h1", {"interval": 1})
        bus.links.down("test")
        time.sleep(3.5)  # the heartbeat is 3.5 s old: past 3 beats
        bus.links.up("test")

        def beat() -> None:  # its keepalive is back 0.5 s after us
            while not done.wait(0.5 if not heard else 1.0):
                store.record_presence("h1", {"interval": 1})
                heard.append(time.monotonic())

        threading.Thread(target=beat, daemon=True).start()

    def answer(agent: FakeAgent) -> dict:
        agent.asked_at = time.monotonic()
        return succeeded(agent)

    try:
        final, agent, _store = run_rollout(tmp_path, orchestrator_config, [answer],
                                           before=stale_then_heard)
    finally:
        done.set()
    assert final["state"] == "succeeded", final
    assert heard and agent.asked_at - heard[0] < 1.5, \
        f"asked {agent.asked_at - heard[0]:.1f}s after the host was heard again"


def test_request_lapsed_in_a_broker_outage_is_asked_anew(tmp_path: Path,
                                                         orchestrator_config) -> None:  # noqa: ANN001
    final, agent, store = run_rollout(tmp_path, orchestrator_config,
                                      [lapsed_after_outage, succeeded])
    assert final["state"] == "succeeded", final
    assert len(agent.requests) == 2 and agent.requests[0] != agent.requests[1]
    logs = [ln["text"] for ln in store.rollout("r1")["logs"]]
    assert any(t.startswith("asked again: message expired") for t in logs), logs


def test_a_twin_of_the_lapsed_refusal_is_not_taken_for_the_answer_to_the_new_request(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    final, agent, _store = run_rollout(tmp_path, orchestrator_config,
                                       [lapsed_and_repeated_during_the_reask, succeeded])
    assert final["state"] == "succeeded", final
    assert len(agent.requests) == 2


def test_request_lapsed_without_an_outage_is_a_refusal(tmp_path: Path,
                                                       orchestrator_config) -> None:  # noqa: ANN001
    final, agent, _store = run_rollout(tmp_path, orchestrator_config,
                                       [lapsed_no_outage, succeeded])
    assert final["state"] == "failed" and "refused" in final["reason"], final
    assert len(agent.requests) == 1, "a host that let its request lapse is not asked again"


def test_asked_anew_at_most_max_reask_times(tmp_path: Path,
                                           orchestrator_config) -> None:  # noqa: ANN001
    final, agent, _store = run_rollout(tmp_path, orchestrator_config, [lapsed_after_outage])
    assert final["state"] == "failed", final
    assert len(agent.requests) == 1 + rollout.MAX_REASK


def test_batch_retried_through_an_outage_is_signed_anew(tmp_path: Path) -> None:
    """Requests kept through a broker outage go out with a fresh time to live:
    signed once before the outage, they would arrive expired."""
    from deploybus.errors import BusConnectionError

    key = SigningKey.generate("ops")
    cfg = parse(f'bus: {{url: "memory://orch-{uuid.uuid4().hex}"}}\n', tmp_path / "c.yaml")
    bus = connect(cfg.bus_url)
    orch = service.Orchestrator(Context(config=cfg, bus=bus, host="o", signing_key=key),
                                Store(f"sqlite:///{tmp_path / 's.db'}"))
    tries: list[list[tuple[str, bytes]]] = []

    def flaky(messages: list[tuple[str, bytes]]) -> None:
        tries.append(messages)
        if len(tries) < 3:
            raise BusConnectionError("broker away")

    bus.publish_batch = flaky  # type: ignore[method-assign]
    started = envelope.now()
    ids = orch.send_requests([protocol.DeployRequest(
        rollout="r", project="app", environment="prod", host="h1", user="u")], ttl=2.0)
    assert len(tries) == 3
    first, last = (envelope.decode(t[0][1]) for t in (tries[0], tries[-1]))
    assert ids == [last.id] and first.id != last.id
    # two waits of the backoff, of at least 0.25 and 0.5 s (each is jittered down to half)
    assert (last.at_time - started).total_seconds() >= 0.7, "signed before the backoff"
    assert last.expires_time > envelope.now(), "the request that went out had expired"
    bus.close()


def test_an_agent_that_never_acknowledges_fails_its_host_after_ack_timeout(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    """request_timeout 30 s bounds a deploy; a request nobody acknowledges
    fails the host after ack_timeout (2 s), and expires unread then."""
    orchestrator_config.cfg.environments["prod"].ack_timeout = 2.0
    started = time.monotonic()
    final, agent, store = run_rollout(tmp_path, orchestrator_config, [silent])
    took = time.monotonic() - started
    assert final["state"] == "failed", final
    assert "agent not answering: no acknowledgement from h1 within 2s" in final["reason"], final
    assert 2.0 <= took < 8, f"the silent agent was given up on after {took:.1f}s"
    (step,) = store.rollout("r1")["hosts"]
    assert step["state"] == "failed" and step["message"].startswith("agent not answering")
    assert len(agent.requests) == 1


def test_an_acknowledged_deploy_may_take_longer_than_ack_timeout(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    orchestrator_config.cfg.environments["prod"].ack_timeout = 1.0
    final, agent, _store = run_rollout(tmp_path, orchestrator_config, [ack_then_slow])
    assert final["state"] == "succeeded", final
    assert len(agent.requests) == 1


def test_requests_expire_when_the_acknowledgement_is_due(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    """A request's time to live is ack_timeout: an agent that comes back after
    its host was given up on finds it expired and never runs it."""
    orchestrator_config.cfg.environments["prod"].ack_timeout = 7.0
    seen: list[envelope.Envelope] = []

    def spy(_store: Store, bus: Transport) -> None:
        bus.subscribe(topics.requests_for("h1"),
                      lambda d: (seen.append(envelope.decode(d.body)), d.ack()))

    final, _agent, _store = run_rollout(tmp_path, orchestrator_config, [succeeded], before=spy)
    assert final["state"] == "succeeded", final
    (request,) = seen
    ttl = (request.expires_time - request.at_time).total_seconds()
    assert abs(ttl - 7.0) < 0.01, ttl


def test_failures_within_max_failures_make_the_rollout_failed_when_no_host_succeeded(
        tmp_path: Path, orchestrator_config) -> None:  # noqa: ANN001
    """Tolerating failures means going on, not calling it a success."""
    final, _agent, store = run_rollout(tmp_path, orchestrator_config, [failed],
                                       strategy={"max_failures": 3})
    assert final["state"] == "failed", final
    assert final["reason"].startswith("no host succeeded: h1 failed"), final
    assert (final["succeeded"], final["failed"], final["total"]) == (0, 1, 1)
    assert store.rollout("r1")["state"] == "failed"
