"""Network faults between an agent and its broker, through a TCP proxy the
test controls: heartbeats notice a silent link, the agent reconnects, and
nothing is applied twice."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, wait_for
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PATHS = {"rabbitmq-amqp": ("127.0.0.1", 5672, "heartbeat=2"),
         "rabbitmq-stomp": ("127.0.0.1", 61613, "heartbeat=1000"),
         "activemq-stomp": ("127.0.0.1", 61614, "heartbeat=1000")}


@pytest.fixture(params=list(PATHS))
def proxied(request: pytest.FixtureRequest, tmp_path: Path):
    host, port, hb = PATHS[request.param]
    url = broker_url(request.param, request, f"n{uuid.uuid4().hex[:10]}")
    proxy = FaultProxy((host, port))
    via = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    via += ("&" if "?" in via else "?") + hb
    c = Cluster(tmp_path, url, ["h1"], app_scripts={
        "pre": 'sleep "${TEST_SLEEP:-0}"', "post": "test -f VERSION"})
    c.setup()
    for t in ("v1.0", "v2.0", "v3.0"):
        c.commit_and_tag(t)
    c.push("main", "v1.0", "v2.0", "v3.0")
    agent_cfg = c.base / "agent.yaml"
    agent_cfg.write_text(c.config.read_text().replace(url, via))
    orchestrator = c.start_orchestrator()
    agent = c.start("agent", "-c", str(agent_cfg), "agent", "--host", "h1")
    # Both ready before the first rollout, so that the test's faults hit a
    # running deploy path.
    assert agent.ready.wait(60) and orchestrator.ready.wait(60), c.logs()
    yield c, proxy, agent
    c.stop()
    proxy.close()


def accepted(c: Cluster) -> list[str]:
    return [e["rollout"] for e in c.audit("h1") if e["decision"] == "accepted"]


def test_silent_link_is_detected_and_the_agent_reconnects(proxied) -> None:  # noqa: ANN001
    c, proxy, agent = proxied
    r = c.deploy("app", "v1.0")
    assert r.returncode == 0, r.stdout + r.stderr + c.logs()
    before = proxy.accepted
    proxy.blackhole = True
    assert wait_for(lambda: any("connection lost" in ln or "lost its connection" in ln
                                for ln in agent.lines), 30), \
        "heartbeats did not notice the dead link:\n" + "".join(agent.lines[-20:])
    proxy.cut()
    proxy.blackhole = False
    assert wait_for(lambda: proxy.accepted > before, 30), "the agent did not reconnect"
    r = c.deploy("app", "v2.0")
    assert r.returncode == 0, r.stdout + c.logs()
    assert c.version("h1") == "v2.0"
    assert len(accepted(c)) == len(set(accepted(c))) == 2


def test_link_cut_during_a_deploy_applies_it_once(proxied) -> None:  # noqa: ANN001
    c, proxy, agent = proxied
    c.env["TEST_SLEEP"] = "0"
    assert c.deploy("app", "v1.0").returncode == 0
    p = c.deploy_async("app", "v3.0")
    assert wait_for(lambda: len(accepted(c)) == 2, 30), c.logs()
    proxy.cut()  # mid-deploy: the agent's connection resets
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out + c.logs()
    assert c.version("h1") == "v3.0"
    assert len(accepted(c)) == len(set(accepted(c))) == 2, accepted(c)
    releases = list((c.root("h1") / "app" / "releases").iterdir())
    assert len(releases) == 2, releases
    time.sleep(2)
    assert len(accepted(c)) == 2, "a redelivery ran the deploy again"


@pytest.mark.parametrize("kind", list(PATHS))
def test_link_clock_counts_the_outage(request: pytest.FixtureRequest, kind: str) -> None:
    """The transport's LinkClock (what the orchestrator credits back to hosts)
    goes down when its link dies, counts the time, and is up again after."""
    from deploybus.bus import connect

    host, port, hb = PATHS[kind]
    url = broker_url(kind, request, f"l{uuid.uuid4().hex[:10]}")
    proxy = FaultProxy((host, port))
    via = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    via += ("&" if "?" in via else "?") + hb
    bus = connect(via, client_name="link-clock")
    try:
        bus.subscribe("test.links", lambda d: d.ack(), queue=f"links-{uuid.uuid4().hex[:8]}")
        assert wait_for(lambda: bus.links.up_for() > 0.2, 30), "never came up"
        assert bus.links.downtime() < 30
        base = bus.links.downtime()
        proxy.blackhole = True
        proxy.cut()
        assert wait_for(lambda: bus.links.up_for() == 0.0, 30), "the outage went unnoticed"
        time.sleep(3)
        assert bus.links.downtime() - base >= 3, "an outage in progress must count"
        proxy.blackhole = False
        assert wait_for(lambda: bus.links.up_for() > 0.2, 40), "did not come back up"
        assert bus.links.downtime() - base >= 3
    finally:
        bus.close(timeout=1)
        proxy.close()
