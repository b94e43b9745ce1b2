"""The post-receive hook on real git pushes and the machine's RabbitMQ: a
push is queued in the outbox in milliseconds and published by the detached
drainer; with the bus away it stays queued and goes out, in order, on the
next push once the bus is back; an outbox that cannot be written falls back
to publishing directly."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deploybus import config, envelope, topics
from deploybus.bus import Delivery, connect
from deploybus.outbox import Outbox
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, git, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.broker]

DEAD = "amqp://guest:guest@127.0.0.1:1//"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Cluster:
    url = broker_url("rabbitmq-amqp", request, f"hk{uuid.uuid4().hex[:8]}")
    c = Cluster(tmp_path / "c", url, ["h1"])
    c.setup()
    return c


class Pushes:
    """``git.push`` messages as a subscriber on the bus sees them."""

    def __init__(self, url: str) -> None:
        self.q: queue.Queue[envelope.Envelope] = queue.Queue()
        self.bus = connect(url)
        self.bus.subscribe(topics.GIT_COMMITS, self._on, queue=f"t-{uuid.uuid4().hex[:6]}")

    def _on(self, d: Delivery) -> None:
        self.q.put(envelope.decode(d.body))
        d.ack()

    def take(self, n: int, timeout: float = 20) -> list[envelope.Envelope]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out.append(self.q.get(timeout=max(0.1, deadline - time.monotonic())))
        return out


def commit(c: Cluster, text: str) -> str:
    (c.work / "VERSION").write_text(text + "\n")
    git("add", "-A", cwd=c.work)
    git("commit", "-q", "-m", text, cwd=c.work)
    return git("rev-parse", "HEAD", cwd=c.work).strip()


def outbox(c: Cluster) -> Path:
    return c.base / "server" / "outbox.db"


def test_a_push_is_queued_then_published_signed_by_the_git_key(cluster: Cluster) -> None:
    watch = Pushes(cluster.bus_url)
    try:
        new = commit(cluster, "1")
        out = cluster.push("main")
        assert "1 push event for app queued for the bus" in out
        (env,) = watch.take(1)
        assert env.type == "git.push" and env.body["new"] == new
        assert env.body["ref"] == "refs/heads/main" and env.body["created"] is True
        assert config.load(cluster.config).verifier().signer(env).name == "git"
        assert wait_for(lambda: Outbox(outbox(cluster)).status()["pending"] == 0, 10)
    finally:
        watch.bus.close()


def test_pushes_made_while_the_bus_is_away_go_out_in_order_when_it_is_back(
        cluster: Cluster) -> None:
    good = cluster.config.read_text()
    cluster.config.write_text(good.replace(cluster.bus_url, DEAD))
    commits = []
    for i in range(3):
        commits.append(commit(cluster, f"away {i}"))
        started = time.monotonic()
        out = cluster.push("main")
        assert time.monotonic() - started < 3, "the push does not wait for the bus"
        assert "queued for the bus" in out
    assert wait_for(lambda: Outbox(outbox(cluster)).status()["pending"] == 3, 10)
    # the drainers that ran while the bus was away recorded why
    assert wait_for(lambda: Outbox(outbox(cluster)).status()["error"] is not None, 15)
    watch = Pushes(cluster.bus_url)
    try:
        cluster.config.write_text(good)
        commits.append(commit(cluster, "back"))
        cluster.push("main")
        got = watch.take(4)
        assert [e.body["new"] for e in got] == commits
        time.sleep(1)
        assert watch.q.empty(), "nothing published twice"
        assert Outbox(outbox(cluster)).status()["pending"] == 0
    finally:
        watch.bus.close()


def test_outbox_status_says_what_waits(cluster: Cluster) -> None:
    cluster.config.write_text(cluster.config.read_text().replace(cluster.bus_url, DEAD))
    commit(cluster, "1")
    cluster.push("main")
    assert wait_for(lambda: Outbox(outbox(cluster)).status()["error"] is not None, 15)
    r = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(cluster.config),
                        "outbox", "status"], capture_output=True, text=True, env=cluster.env)
    assert r.returncode == 0, r.stderr  # not yet a minute old
    assert "1 event(s) waiting" in r.stdout and "last error:" in r.stdout


def test_an_outbox_that_cannot_be_written_falls_back_to_publishing(cluster: Cluster) -> None:
    box = outbox(cluster)
    for p in box.parent.glob("outbox.db*"):
        p.unlink()
    box.mkdir()  # a directory where the file should be: sqlite cannot open it
    watch = Pushes(cluster.bus_url)
    try:
        new = commit(cluster, "1")
        out = cluster.push("main")
        assert "cannot queue the push" in out and "publishing directly" in out
        assert "published 1 push event(s)" in out
        (env,) = watch.take(1)
        assert env.body["new"] == new
    finally:
        watch.bus.close()
