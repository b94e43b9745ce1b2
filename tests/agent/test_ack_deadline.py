"""A deploy that runs far longer than the broker's ack deadline (RabbitMQ's
``consumer_timeout``) is neither redelivered into a second run nor lost.

The shared RabbitMQ keeps its 30-minute default, so this test starts a
RabbitMQ node of its own (same Debian package, own port, node name and
directory) with ``consumer_timeout = 2000`` ms, checked every 500 ms
(``channel_tick_interval``). A control consumer that holds a message
unacked is thrown off by that broker within seconds, which shows the
deadline is live; the agent, whose pre script sleeps four times the
deadline, has already acked: while the script still sleeps the agent's
queue holds no message, ready or unacknowledged, and afterwards there is
exactly one run, one accepted audit entry and one result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest

from deploybus.bus import connect
from tests.agent.harness import AgentProcess, Events, Site, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.broker]

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
DEADLINE_MS = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A throwaway RabbitMQ node with a short consumer timeout."""

    def __init__(self) -> None:
        if not os.path.exists(SERVER):
            pytest.fail(f"{SERVER} not found: install Debian's rabbitmq-server "
                        f"(`make brokers`)", pytrace=False)
        self.dir = Path(tempfile.mkdtemp(prefix="deploybus-rabbit-"))
        self.port, self.dist = _free_port(), _free_port()
        self.name = f"deploybus-ct-{uuid.uuid4().hex[:8]}@localhost"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {DEADLINE_MS}\n")
        (self.dir / "advanced.config").write_text(
            "[{rabbit, [{channel_tick_interval, 500}]}].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.env = {**os.environ, "HOME": str(self.dir), "RABBITMQ_NODENAME": self.name,
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_PID_FILE": str(self.dir / "pid")}
        self.proc = subprocess.Popen([SERVER], env=self.env, cwd=self.dir,
                                     stdout=open(self.dir / "out.log", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until(self._listening, 90, 0.2):
            out = (self.dir / "out.log").read_text()[-3000:]
            self.stop()
            pytest.fail(f"the test's RabbitMQ node did not start:\n{out}", pytrace=False)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def queues(self) -> dict[str, tuple[int, int]]:
        """queue name -> (messages ready, messages unacknowledged)."""
        cookie = (self.dir / ".erlang.cookie").read_text().strip()
        out = subprocess.run([CTL, "-q", "-n", self.name, "--erlang-cookie", cookie,
                              "list_queues", "name", "messages_ready",
                              "messages_unacknowledged"], env=self.env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = [line.split("\t") for line in out.stdout.splitlines()[1:] if line.strip()]
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.stop()


def control_consumer_is_thrown_off(url: str) -> float:
    """Hold one message unacked; return the seconds until the broker closes the channel."""
    with kombu.Connection(url) as conn:
        ch = conn.channel()
        q = kombu.Queue(f"control-{uuid.uuid4().hex[:6]}", kombu.Exchange("amq.topic",
                        type="topic", no_declare=True), routing_key="control.x",
                        durable=False, auto_delete=True)(ch)
        q.declare()
        conn.Producer(ch).publish(b"hold me", exchange="amq.topic", routing_key="control.x")
        got: list[object] = []
        consumer = kombu.Consumer(ch, queues=[q], on_message=got.append, no_ack=False)
        consumer.consume()
        started = time.monotonic()
        while time.monotonic() - started < 30:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 - the broker's PRECONDITION_FAILED
                assert "acknowledgement" in str(exc) and "timed out" in str(exc), exc
                assert got, "the message had been delivered"
                return time.monotonic() - started
    raise AssertionError("the broker never enforced its consumer timeout")


def test_deploy_longer_than_the_ack_deadline_runs_once_and_is_reported(
        node: Node, tmp_path: Path) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}."
    runs, started = tmp_path / "runs", tmp_path / "started"
    sleep = 4 * DEADLINE_MS / 1000
    site = Site(tmp_path, f"{node.url}?prefix={prefix}", {"app": {"scripts": {
        "pre": f"echo run >> {runs}; touch {started}; sleep {sleep}"}}})
    site.repo.commit("v1")
    bus = connect(site.bus_url)
    events = Events(bus)
    agent = AgentProcess(site)
    try:
        t0 = time.monotonic()
        rollout = site.send(bus, site.request("v1"))
        assert wait_until(started.exists, 30), agent.logs()
        # Evidence the deadline is real on this broker: a consumer that does
        # not ack is thrown off within a few seconds.
        thrown_off_after = control_consumer_is_thrown_off(node.url)
        assert thrown_off_after < sleep
        # Meanwhile the deploy still runs, and the broker holds nothing for the agent.
        entry = site.journal(rollout)
        assert entry["state"] == "running" and entry["step"] == "pre"
        assert node.queues()[f"{prefix}agent-h1"] == (0, 0), "acked before the deploy ended"
        result = events.result(rollout, 60)
        elapsed = time.monotonic() - t0
        assert result["status"] == "succeeded", result
        assert elapsed > sleep > DEADLINE_MS / 1000
        time.sleep(2 * DEADLINE_MS / 1000)  # time for any redelivery to show up
        assert runs.read_text() == "run\n", "one run, no redelivery into a second"
        assert len(events.results(rollout)) == 1
        audit = [json.loads(x) for x in (site.state / "audit.jsonl").read_text().splitlines()]
        assert [e["decision"] for e in audit] == ["accepted"]
        assert node.queues()[f"{prefix}agent-h1"] == (0, 0)
        assert "lost its connection" not in agent.logs(), "the agent's channel stayed up"
        assert agent.stop() == 0
    finally:
        agent.daemon.stop()
        bus.close()
