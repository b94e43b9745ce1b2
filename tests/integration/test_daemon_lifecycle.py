"""A daemon process's life: READY=1 to systemd, warm stop that finishes the
deploy in flight, cold stop on the second signal, config errors as exit 78."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deploybus import envelope, gitutil, topics
from deploybus.bus import Delivery, connect
from deploybus.runner import EXIT_COLD, EXIT_CONFIG
from deploybus.signing import SigningKey
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster

pytestmark = pytest.mark.broker


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path):
    url = broker_url("rabbitmq-amqp", request, f"l{uuid.uuid4().hex[:10]}")
    c = Cluster(tmp_path, url, ["h1"])
    c.setup()
    c.commit_and_tag("v1.0")
    c.push("main", "v1.0")
    yield c
    c.stop()


def use_pre_script(c: Cluster, script: str) -> None:
    text = c.config.read_text()
    start = text.index("      pre: ")
    end = text.index("\n", start)
    c.config.write_text(text[:start] + f"      pre: {script}" + text[end:])


def send_request(c: Cluster) -> tuple[str, queue.Queue[envelope.Envelope], object]:
    key = SigningKey.load(c.key("orchestrator"))  # as the orchestrator asks an agent
    rid = uuid.uuid4().hex[:16]
    refname, commit = gitutil.resolve_remote(str(c.bare), "v1.0")
    env = key.sign(envelope.new("deploy.request", {
        "rollout": rid, "project": "app", "environment": "prod", "ref": refname,
        "commit": commit, "host": "h1", "user": "tester"}, sender="test", correlation=rid,
        ttl=300))
    events: queue.Queue[envelope.Envelope] = queue.Queue()

    def on_event(d: Delivery) -> None:
        e = envelope.decode(d.body)
        if e.correlation == rid:
            events.put(e)
        d.ack()

    bus = connect(c.bus_url)
    bus.subscribe(topics.EVENTS, on_event)
    bus.publish(topics.requests_for("h1"), env.encode())
    return rid, events, bus


def in_step(step: str):  # noqa: ANN201
    """A progress message (or a result carrying entries) with an entry of ``step``."""
    return lambda e: "entries" in e.body and any(
        x.get("step") == step for x in envelope.progress_entries(e.body))


def wait_event(events: queue.Queue[envelope.Envelope], pred, timeout: float = 30):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            e = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if pred(e):
            return e
    raise AssertionError("expected event did not arrive")


def test_ready_notification_reaches_systemd(cluster: Cluster, tmp_path: Path) -> None:
    import systemd.daemon  # noqa: F401 - a test dependency: make test installs it
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    cluster.env["NOTIFY_SOCKET"] = sock_path
    agent = cluster.start("agent", "agent", "--host", "h1")
    try:
        assert sock.recv(4096) == b"READY=1"
        assert agent.ready.is_set() or agent.ready.wait(5)
        agent.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert agent.proc.wait(30) == 0
    finally:
        sock.close()


def test_warm_stop_finishes_the_deploy_in_flight(cluster: Cluster) -> None:
    use_pre_script(cluster, "sleep 3")
    agent = cluster.start("agent", "agent", "--host", "h1")
    assert agent.ready.wait(60)
    rid, events, bus = send_request(cluster)
    try:
        wait_event(events, in_step("pre"))
        agent.proc.send_signal(signal.SIGTERM)
        result = wait_event(events, lambda e: e.type == "deploy.result")
        assert result.body["status"] == "succeeded"
        assert agent.proc.wait(30) == 0
    finally:
        bus.close()
    assert (cluster.current("h1") / "VERSION").read_text() == "v1.0\n"


def test_second_signal_is_a_cold_stop(cluster: Cluster) -> None:
    use_pre_script(cluster, "sleep 60")
    agent = cluster.start("agent", "agent", "--host", "h1")
    assert agent.ready.wait(60)
    rid, events, bus = send_request(cluster)
    try:
        wait_event(events, in_step("pre"))
        agent.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert agent.alive(), "the first signal waits for the deploy in flight"
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == EXIT_COLD
        assert time.monotonic() - started < 5
    finally:
        bus.close()
    assert not cluster.current("h1").exists(), "a killed deploy never switched"


def test_config_error_exits_78_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bus:\n  url: memory://\nprojects:\n  app:\n    git: /x\n    scirpts: {}\n")
    r = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(cfg), "agent"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert r.returncode == EXIT_CONFIG
    assert f"{cfg}:6: projects.app.scirpts: unknown key (did you mean 'scripts'?)" in r.stderr


@pytest.mark.parametrize("daemon", ["agent", "orchestrator"])
def test_refused_broker_credentials_exit_78_at_once(cluster: Cluster, daemon: str) -> None:
    """A daemon the broker refuses does not retry for ever: it exits 78 (a
    config error; systemd does not restart it) naming the broker and vhost."""
    cluster.config.write_text(cluster.config.read_text().replace("guest:guest@", "guest:n0@"))
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(cluster.config),
                        daemon, *(["--host", "h1"] if daemon == "agent" else [])],
                       capture_output=True, text=True, env=cluster.env, timeout=60)
    assert r.returncode == EXIT_CONFIG, r.stderr[-2000:]
    assert time.monotonic() - started < 10
    assert f"deploybus {daemon}: broker amqp://guest:***@127.0.0.1:5672/" in r.stderr, r.stderr
    assert "refused the connection" in r.stderr and "n0@" not in r.stderr
