"""kill -9 the broker in the middle of a rolling deploy to 20 agents, start it
again: every host ends on exactly one release, the rollout completes or names
the hosts that failed, and no request is applied twice.

The broker stays down longer than the environment's request timeout, and
the last hosts send heartbeats often enough that the outage makes them look
silent: the orchestrator must not count the outage against the hosts (no
"no answer within", no "host offline") and the rollout must still succeed.

These tests kill and restart the machine's real brokers (and wait for them
to be back, through scripts/setup-brokers.sh); they run last."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from deploybus.bus import Delivery, connect
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOSTS = [f"h{i:02d}" for i in range(1, 21)]
#: Hosts that also run a keepalive (2 s interval: 6 s of silence is offline).
BEATING = HOSTS[-4:]
REQUEST_TIMEOUT = 20
#: Longer than REQUEST_TIMEOUT and than BEATING's offline limit.
OUTAGE = 25
SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup-brokers.sh"

#: broker path -> pattern of the broker's main process for pgrep -f
PROCESSES = {"rabbitmq-amqp": "beam.smp.*rabbit", "rabbitmq-stomp": "beam.smp.*rabbit",
             "activemq-stomp": "java.*activemq"}


def kill_broker(kind: str) -> None:
    pids = subprocess.run(["pgrep", "-f", PROCESSES[kind]], capture_output=True,
                          text=True).stdout.split()
    assert pids, f"no broker process matching {PROCESSES[kind]!r}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def restart_brokers() -> None:
    r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "SETUP_PACKAGES": "rabbitmq-server activemq"})
    assert r.returncode == 0, f"brokers did not come back:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("kind", ["rabbitmq-amqp", "rabbitmq-stomp", "activemq-stomp"])
def test_broker_killed_mid_rollout(request: pytest.FixtureRequest, tmp_path: Path,
                                   kind: str) -> None:
    url = broker_url(kind, request, f"k{uuid.uuid4().hex[:10]}")
    c = Cluster(tmp_path, url, HOSTS, request_timeout=REQUEST_TIMEOUT, app_scripts={
        "pre": 'sleep "${TEST_SLEEP:-0}"', "post": "test -f VERSION"})
    c.env["TEST_SLEEP"] = "0.4"
    c.setup()
    c.commit_and_tag("v1.0")
    c.push("main", "v1.0")
    try:
        c.start_all(fetchers=False)
        beats = [c.start(f"keepalive-{h}", "keepalive", "--host", h, "--interval", "2")
                 for h in BEATING]
        assert all(b.ready.wait(60) for b in beats), c.logs()
        # every agent beats on its own (every 10 s); the last four hosts'
        # keepalives every 2 s
        assert wait_for(lambda: {h["verdict"] for h in c.host_rows().values()} == {"up"}, 30), \
            c.logs()
        assert all(set(c.host_rows()[h]["daemons"]) == {"agent", "keepalive"} for h in BEATING)
        p = c.deploy_async("app", "v1.0", "--batch", "100%", "--window", "4")
        assert wait_for(lambda: sum(h["state"] == "succeeded" for h in
                                    (c.history() or [{"hosts": []}])[0]["hosts"]) >= 4, 90), \
            c.logs()
        kill_broker(kind)
        time.sleep(OUTAGE)
        restart_brokers()
        assert wait_for(lambda: c.history()[0]["state"] in ("succeeded", "failed"), 240), \
            c.logs()
        p.kill()
        listeners = [d for d in c.daemons if not d.name.startswith("keepalive")]
        lost = [d.name for d in listeners
                if any("connection lost" in ln or "lost its connection" in ln for ln in d.lines)]
        assert len(lost) == len(listeners), f"only {lost} noticed the broker going away"
        rollout = c.history()[0]
        rid = rollout["id"]
        for step in rollout["hosts"]:
            h = step["host"]
            accepted = [e for e in c.audit(h) if e["decision"] == "accepted"
                        and e["rollout"] == rid]
            assert len(accepted) <= 1, f"{h} applied the request {len(accepted)} times"
            releases = list((c.root(h) / "app" / "releases").iterdir()) \
                if (c.root(h) / "app" / "releases").exists() else []
            if step["state"] == "succeeded":
                assert len(releases) == 1, (h, releases)
                assert c.version(h) == "v1.0"
            elif step["state"] == "skipped":  # never asked: the rollout halted first
                assert (rollout["reason"] or "").startswith("halted"), rollout["reason"]
                assert not accepted and not releases, (h, accepted, releases)
            else:
                assert h in (rollout["reason"] or ""), \
                    f"{h} ended {step['state']} but the rollout does not name it"
                assert len(releases) <= 1
        failed = [f"agent-{s['host']}" for s in rollout["hosts"]
                  if s["state"] not in ("succeeded", "skipped")]
        assert rollout["state"] == "succeeded", \
            f"{rollout['reason']}\n{c.logs('orchestrator', *failed, tail=80)}"
    finally:
        c.stop()
        c.save_logs()


def test_an_activemq_queue_subscribed_just_before_a_kill_keeps_what_comes_before_its_consumer(
        request: pytest.FixtureRequest) -> None:
    """KahaDB keeps a new queue only in its index until the next checkpoint
    (every 5 s): killed before that, ActiveMQ comes back without the queue,
    and what is published to the virtual topic before its consumer
    subscribes again goes nowhere. An agent that started just before a
    broker crash and reconnects after the orchestrator lost its request that
    way. The subscription's anchor (a persistent message to its own queue,
    dropped unseen by the consumer) brings the queue back."""
    url = broker_url("activemq-stomp", request, f"a{uuid.uuid4().hex[:10]}")
    got: queue.Queue[bytes] = queue.Queue()

    def handler(d: Delivery) -> None:
        got.put(d.body)
        d.ack()

    first = connect(url)
    first.subscribe("anchor.test", handler, queue="anchored")
    kill_broker("activemq-stomp")  # at once: well within the 5 s before a checkpoint
    first.close(timeout=1)  # its consumer is not back when the message is published
    assert got.empty(), f"the consumer's handler saw its anchor: {got.get()!r}"
    restart_brokers()
    publisher = connect(url)
    try:
        publisher.publish("anchor.test", b"after the crash")
    finally:
        publisher.close()
    again = connect(url)
    try:
        again.subscribe("anchor.test", handler, queue="anchored")
        try:
            body = got.get(timeout=30)
        except queue.Empty:
            raise AssertionError("what was published while the consumer was away is lost: "
                                 "ActiveMQ came back without the queue") from None
        assert body == b"after the crash"
        time.sleep(1)
        assert got.empty(), f"more than the one message reached the handler: {got.get()!r}"
    finally:
        again.close()
