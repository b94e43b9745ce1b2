"""Nothing accepted is lost, nothing is published twice: with RabbitMQ
killed, 100 signed GitHub webhooks are posted to a running ``deploybus
listener`` and 20 pushes go through the post-receive hook (all answered at
once); the listener is killed with kill -9 and started again, still without
a broker; then the broker comes back. Exactly 120 ``git.push`` events
arrive, each once, in the order they were accepted per source. Real
processes on the machine's RabbitMQ, which this test kills and restarts (it
runs with the other fault tests)."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from deploybus import envelope, topics
from deploybus.bus import Delivery, connect
from deploybus.outbox import Outbox
from tests.conftest import broker_url, free_port
from tests.e2e.cluster import Cluster, git
from tests.faults.test_broker_kill import kill_broker, restart_brokers

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SECRET = b"webhook secret"
PAYLOADS = Path(__file__).parents[1] / "listener" / "payloads"
WEBHOOKS, PUSHES = 100, 20


def webhook(url: str, i: int) -> None:
    gh = json.loads((PAYLOADS / "github-push.json").read_text())
    gh.update(ref="refs/heads/feature", before=f"{i:040x}", after=f"{i + 1:040x}")
    gh["repository"]["full_name"] = "team/app"
    body = json.dumps(gh).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": f"delivery-{i}",
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()})
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202, r.read()
    assert time.monotonic() - started < 1.0, "answered without waiting for the broker"


def test_broker_down_listener_killed_nothing_lost_nothing_twice(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = broker_url("rabbitmq-amqp", request, f"ob{uuid.uuid4().hex[:8]}")
    c = Cluster(tmp_path / "c", url, ["h1"],
                app_extra="    webhook: {secret: webhook.secret, repository: team/app}\n")
    c.base.mkdir()
    (c.base / "webhook.secret").write_bytes(SECRET)
    c.setup()
    port = free_port()
    hooks_url = f"http://127.0.0.1:{port}/hooks"
    got: queue.Queue[envelope.Envelope] = queue.Queue()

    def on(d: Delivery) -> None:
        got.put(envelope.decode(d.body))
        d.ack()

    watcher = connect(url)
    watcher.subscribe(topics.GIT_COMMITS, on, queue="fault-watch")
    listener = c.start("listener", "--key", str(c.key("git")), "listener",
                       "--bind", f"127.0.0.1:{port}")
    try:
        assert listener.ready.wait(60), c.logs("listener")
        kill_broker("rabbitmq-amqp")
        hook_commits = []
        for i in range(WEBHOOKS):
            webhook(hooks_url, 2 * i)
            if i % 5 == 4:
                (c.work / "VERSION").write_text(f"{i}\n")
                git("add", "-A", cwd=c.work)
                git("commit", "-q", "-m", f"{i}", cwd=c.work)
                hook_commits.append(git("rev-parse", "HEAD", cwd=c.work).strip())
                started = time.monotonic()
                assert "queued for the bus" in c.push("main")
                assert time.monotonic() - started < 3
        assert len(hook_commits) == PUSHES
        with Outbox(c.base / "server" / "outbox.db") as box:
            assert box.status()["pending"] == WEBHOOKS + PUSHES
        listener.proc.send_signal(signal.SIGKILL)
        listener.proc.wait(10)
        listener = c.start("listener-2", "--key", str(c.key("git")), "listener",
                           "--bind", f"127.0.0.1:{port}")
        assert listener.ready.wait(60), c.logs("listener-2")
        webhook(hooks_url, 2 * WEBHOOKS)  # still taken with no broker ...
        restart_brokers()
        events = []
        deadline = time.monotonic() + 120
        while len(events) < WEBHOOKS + PUSHES + 1 and time.monotonic() < deadline:
            try:
                events.append(got.get(timeout=1))
            except queue.Empty:
                pass
        time.sleep(5)
        while not got.empty():
            events.append(got.get())
        assert len(events) == WEBHOOKS + PUSHES + 1, (len(events), c.logs())
        assert len({e.id for e in events}) == len(events)
        from_webhooks = [int(e.body["new"], 16) for e in events
                         if e.body["ref"] == "refs/heads/feature"]
        assert from_webhooks == [2 * i + 1 for i in range(WEBHOOKS + 1)]
        from_hook = [e.body["new"] for e in events if e.body["ref"] == "refs/heads/main"]
        assert from_hook == hook_commits
        with Outbox(c.base / "server" / "outbox.db") as box:
            assert box.status()["pending"] == 0
    finally:
        watcher.close()
        c.stop()
        c.save_logs()
