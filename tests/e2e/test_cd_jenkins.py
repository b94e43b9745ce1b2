"""Continuous delivery through Jenkins, end to end, and what goes wrong on
the way. No Jenkins server can be installed here, so Jenkins is the
wire-compatible fake of tests/ci/fake_jenkins.py (its documented remote
access JSON API, over HTTP, in this process); everything else is real
processes on RabbitMQ: the post-receive hook, the CI bridge, the
orchestrator, three agents and fetchers.

- a green build is deployed to the three hosts, exactly its commit; a red one
  is not, and the audit trail says why;
- Jenkins down for 30 s during a push, then back: one build, one rollout;
- the CI bridge killed with kill -9 mid-build: one result event, one rollout;
- ten pushes in a burst: one build, of the newest commit; nine superseded.
(The broker killed between build and result: tests/faults/test_ci.py.)
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, topics
from deploybus.bus import Delivery, connect
from tests.ci.fake_jenkins import FakeJenkins
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, git, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

HOSTS = ["h1", "h2", "h3"]


class Jenkins:
    """The fake Jenkins, with an executor that builds every queued item: a
    commit whose ``ci-result`` file says so fails, others succeed."""

    def __init__(self, c: Cluster) -> None:
        self.fake = FakeJenkins()
        self.fake.add_job("app-build", {"COMMIT": "", "BRANCH": ""})
        self.fake.start_server()
        self.c = c
        self.hold = threading.Event()  # set: builds wait in the queue
        self.stopping = threading.Event()
        self.done: set[int] = set()
        threading.Thread(target=self._executor, daemon=True).start()

    def _executor(self) -> None:
        while not self.stopping.wait(0.1):
            if self.hold.is_set():
                continue
            with self.fake.lock:
                items = [i for i in self.fake.queue.values()
                         if not i.left and i.id not in self.done]
            for item in items:
                commit = item.parameters.get("COMMIT", "")
                r = subprocess.run(["git", "show", f"{commit}:ci-result"], cwd=self.c.work,
                                   capture_output=True, text=True)
                result = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() \
                    else "SUCCESS"
                self.fake.finish(item.id, result, duration=0.5,
                                 console=[f"building {commit[:12]}", f"tests {result}"])
                self.done.add(item.id)

    def close(self) -> None:
        self.stopping.set()
        self.fake.stop()


def push_commit(c: Cluster, version: str, result: str = "SUCCESS") -> str:
    (c.work / "VERSION").write_text(version + "\n")
    (c.work / "ci-result").write_text(result + "\n")
    git("add", "-A", cwd=c.work)
    git("commit", "-q", "-m", version, cwd=c.work)
    commit = git("rev-parse", "HEAD", cwd=c.work).strip()
    c.push("main")
    return commit


def deployed_commit(c: Cluster, host: str) -> str | None:
    cur = c.current(host)
    if not cur.exists():
        return None
    info = c.root(host) / "app" / ".deploybus" / "releases" / f"{cur.resolve().name}.json"
    return str(json.loads(info.read_text())["commit"])


class CiEvents:
    """Every ci.build on the bus, as a watcher sees them."""

    def __init__(self, url: str) -> None:
        self.bus = connect(url)
        self.items: list[dict[str, Any]] = []
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.bus.subscribe(topics.CI_EVENTS, self._on)

    def _on(self, d: Delivery) -> None:
        body = envelope.decode(d.body).body
        self.items.append(body)
        self.q.put(body)
        d.ack()

    def of(self, state: str) -> list[dict[str, Any]]:
        return [e for e in self.items if e["state"] == state]


@pytest.fixture
def cd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    url = broker_url("rabbitmq-amqp", request, f"cj{uuid.uuid4().hex[:8]}")
    settle = getattr(request, "param", 0.3)
    c = Cluster(
        tmp_path / "c", url, HOSTS,
        top_extra='ci:\n  ci1: {type: jenkins, url: "http://0.0.0.0:9", '
                  'credentials: jenkins.cred, poll: 0.2}\n',
        app_extra=("    ci:\n      server: ci1\n      job: app-build\n"
                   "      refs: [\"refs/heads/main\"]\n"
                   "      parameters: {COMMIT: \"{commit}\", BRANCH: \"{short_ref}\"}\n"
                   f"      settle: {settle}\n"),
        env_extra="    auto_deploy:\n      refs: [\"refs/heads/main\"]\n      on: ci_success\n")
    c.base.mkdir()
    (c.base / "jenkins.cred").write_text("placeholder\n")
    c.setup()
    jenkins = Jenkins(c)
    (c.base / "jenkins.cred").write_text(f"{jenkins.fake.user}:{jenkins.fake.token}\n")
    c.config.write_text(c.config.read_text().replace("http://0.0.0.0:9", jenkins.fake.url))
    events = CiEvents(url)
    try:
        c.start_all(fetchers=True)
        assert c.start_ci_bridge().ready.wait(60), c.logs()
        yield c, jenkins, events
    finally:
        jenkins.close()
        events.bus.close()
        c.stop()
        c.save_logs()


def test_green_deployed_red_not(cd: Any) -> None:
    c, jenkins, events = cd
    green = push_commit(c, "v-green")
    assert wait_for(lambda: all(deployed_commit(c, h) == green for h in HOSTS), 90), c.logs()
    (trigger,) = jenkins.fake.triggers
    assert trigger["parameters"] == {"COMMIT": green, "BRANCH": "main"}
    (r,) = c.history()
    assert (r["state"], r["commit"], r["user"]) == ("succeeded", green, "ci:app-build#1")
    finished = events.of("finished")[0]
    assert finished["result"] == "SUCCESS" and finished["console_tail"][-1] == \
        "Finished: SUCCESS"
    red = push_commit(c, "v-red", "FAILURE")
    assert wait_for(lambda: len(events.of("finished")) == 2, 60)
    assert wait_for(lambda: any(a["action"] == "auto-deploy-skipped" for a in json.loads(
        c.cli("audit", "--json").stdout)), 30)
    time.sleep(1)
    assert len(c.history()) == 1 and all(deployed_commit(c, h) == green for h in HOSTS)
    assert any(f"{red[:12]} (refs/heads/main) FAILURE" in (a["detail"].get("reason") or "")
               for a in json.loads(c.cli("audit", "--json").stdout))


@pytest.mark.slow
def test_jenkins_down_for_30s_during_a_push_one_build_one_rollout(cd: Any) -> None:
    c, jenkins, events = cd
    jenkins.fake.stop()
    commit = push_commit(c, "v-while-down")
    assert wait_for(lambda: events.of("error"), 30), "the outage was not said"
    (error,) = events.of("error")
    assert error["retrying"] is True and "the push is kept" in error["reason"]
    time.sleep(30 - 2)
    jenkins.fake.start_server()
    assert wait_for(lambda: all(deployed_commit(c, h) == commit for h in HOSTS), 120), \
        c.logs()
    time.sleep(2)
    assert len(jenkins.fake.triggers) == 1, "built twice"
    assert len(c.history()) == 1, "deployed twice"
    assert len(events.of("error")) == 1, "one error event per outage"


def test_the_bridge_killed_mid_build_one_result_one_rollout(cd: Any) -> None:
    c, jenkins, events = cd
    jenkins.hold.set()  # the build waits in Jenkins's queue
    commit = push_commit(c, "v-kill")
    assert wait_for(lambda: events.of("queued"), 30), c.logs("ci-bridge")
    bridge = c.daemon("ci-bridge")
    bridge.proc.send_signal(signal.SIGKILL)
    bridge.proc.wait(10)
    c.daemons.remove(bridge)
    jenkins.hold.clear()  # it builds while the bridge is dead
    assert wait_for(lambda: jenkins.done, 10)
    assert c.start_ci_bridge().ready.wait(60)
    assert wait_for(lambda: all(deployed_commit(c, h) == commit for h in HOSTS), 90), c.logs()
    time.sleep(2)
    assert len(events.of("finished")) == 1, "the result was published twice"
    assert len(jenkins.fake.triggers) == 1 and len(c.history()) == 1


@pytest.mark.parametrize("cd", [4.0], indirect=True)
def test_ten_pushes_in_a_burst_build_the_newest_commit(cd: Any) -> None:
    """Ten pushes to main within the project's settle time (4 s here: each
    push runs the hook, which costs a push about 0.2 s today)."""
    c, jenkins, events = cd
    commits = []
    started = time.monotonic()
    for i in range(10):
        (c.work / "VERSION").write_text(f"burst {i}\n")
        git("add", "-A", cwd=c.work)
        git("commit", "-q", "-m", f"burst {i}", cwd=c.work)
        commits.append(git("rev-parse", "HEAD", cwd=c.work).strip())
        c.push("main")
    assert time.monotonic() - started < 4.0, "the pushes took longer than the settle time"
    assert wait_for(lambda: all(deployed_commit(c, h) == commits[-1] for h in HOSTS), 90), \
        c.logs()
    assert [t["parameters"]["COMMIT"] for t in jenkins.fake.triggers] == [commits[-1]]
    assert wait_for(lambda: len(events.of("superseded")) == 9, 10), events.items
    assert {e["commit"] for e in events.of("superseded")} == set(commits[:-1])
    assert len(c.history()) == 1
