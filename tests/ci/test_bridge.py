"""The CI bridge's promises, with a scripted CI server in this process (the
real ones: tests/ci/test_jenkins.py against the wire-compatible fake,
tests/ci/test_buildbot.py and tests/e2e/test_cd.py against a real
Buildbot): a push is recorded before it is acked; a burst of pushes to one
ref builds the newest commit and reports the others superseded; a CI server
that is away is retried, the push kept, one error event said; a bridge
killed mid-build picks up from the store and publishes the result once."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, protocol, topics
from deploybus.bus import connect
from deploybus.config import parse
from deploybus.daemons.ci_bridge import records
from deploybus.daemons.ci_bridge.backend import Backend, BuildStatus, Trigger
from deploybus.daemons.ci_bridge.service import CiBridge
from deploybus.errors import CiUnavailable
from deploybus.runner import Context
from deploybus.signing import SigningKey
from deploybus.store import Store

pytestmark = pytest.mark.integration


class Scripted(Backend):
    """A CI server the test steers: builds queue, start and finish when told."""

    type = "scripted"

    def __init__(self) -> None:
        super().__init__("jenkins", {})
        self.lock = threading.Lock()
        self.triggered: list[Trigger] = []
        self.states: dict[int, BuildStatus] = {}
        self.away = False

    def trigger(self, t: Trigger) -> dict[str, Any]:
        with self.lock:
            if self.away:
                raise CiUnavailable("connection refused")
            self.triggered.append(t)
            n = len(self.triggered)
            self.states[n] = BuildStatus(state="queued", handle={"queue": n})
            return {"queue": n}

    def poll(self, handle: dict[str, Any], *, tail: int = 50) -> BuildStatus:
        with self.lock:
            if self.away:
                raise CiUnavailable("connection refused")
            return self.states[handle["queue"]]

    def finish(self, n: int, result: str = "SUCCESS") -> None:
        with self.lock:
            self.states[n] = BuildStatus(state="finished", handle={"queue": n, "number": n},
                                         result=result, number=n, url=f"http://ci/{n}",
                                         duration=1.5, console_tail=["ok"])


class Site:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ci_key, self.git_key = SigningKey.generate("ci"), SigningKey.generate("git")
        for k in (self.ci_key, self.git_key):
            k.save(tmp_path)
        (tmp_path / "jenkins.cred").write_text("u:t\n")
        self.cfg = parse(f"""
bus: {{url: "memory://ci-{uuid.uuid4().hex}"}}
keys:
  trusted:
    ci: {{key: ci.pub, role: ci}}
    git: {{key: git.pub, role: git}}
ci:
  jenkins: {{type: jenkins, url: "http://127.0.0.1:1", credentials: jenkins.cred, poll: 0.05}}
projects:
  app:
    git: /nowhere.git
    ci: {{server: jenkins, job: app-build, refs: ["refs/heads/*"],
          parameters: {{COMMIT: "{{commit}}", BRANCH: "{{short_ref}}", KIND: release}}}}
  other: {{git: /nowhere.git}}
""", tmp_path / "c.yaml")
        self.bus = connect(self.cfg.bus_url)
        self.store = Store(f"sqlite:///{tmp_path / 's.db'}")
        self.events: queue.Queue[dict] = queue.Queue()
        self.bus.subscribe(topics.CI_EVENTS, lambda d: (self.events.put(
            envelope.decode(d.body).body), d.ack()))
        self.backend = Scripted()
        self.bridge: CiBridge | None = None

    def start(self, settle: float = 0.3) -> CiBridge:
        self.bridge = CiBridge(Context(config=self.cfg, bus=self.bus, host="ci",
                                       signing_key=self.ci_key), self.store, settle=settle)
        self.bridge.backends["jenkins"] = self.backend
        self.bridge.start()
        return self.bridge

    def push(self, commit: str, ref: str = "refs/heads/main", project: str = "app") -> None:
        self.bus.publish(topics.GIT_COMMITS, self.git_key.sign(envelope.new(
            "git.push", {"project": project, "ref": ref, "old": "1" * 40, "new": commit},
            sender="hook", ttl=600)).encode())

    def event(self, timeout: float = 10) -> dict:
        return self.events.get(timeout=timeout)

    def finished(self, timeout: float = 10) -> dict:
        """The next finished event; a build the bridge saw only queued and then
        finished is said to have started in between (it did)."""
        e = self.event(timeout)
        if e["state"] == "started":
            e = self.event(timeout)
        assert e["state"] == "finished", e
        return e

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.stop(5)
        self.bus.close()


@pytest.fixture
def site(tmp_path: Path) -> Any:
    s = Site(tmp_path)
    yield s
    s.close()


def wait(pred: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_a_push_becomes_one_build_and_its_events_in_order(site: Site) -> None:
    site.start()
    site.push("a" * 40)
    assert wait(lambda: site.backend.triggered)
    (t,) = site.backend.triggered
    assert (t.project, t.ref, t.commit, t.job) == ("app", "refs/heads/main", "a" * 40,
                                                   "app-build")
    assert t.parameters == {"COMMIT": "a" * 40, "BRANCH": "main", "KIND": "release"}
    queued = site.event()
    assert (queued["state"], queued["commit"], queued["job"]) == ("queued", "a" * 40,
                                                                  "app-build")
    site.backend.finish(1)
    finished = site.finished()
    assert (finished["state"], finished["result"], finished["number"]) == ("finished",
                                                                           "SUCCESS", 1)
    assert finished["build"] == queued["build"] and finished["console_tail"] == ["ok"]
    assert finished["url"] == "http://ci/1" and finished["duration"] == 1.5
    # a push of a project without ci:, a deleted ref, and a ref it does not build: nothing
    site.push("b" * 40, project="other")
    site.push("c" * 40, ref="refs/tags/v1")
    time.sleep(1)
    assert len(site.backend.triggered) == 1 and site.events.empty()


def test_a_burst_builds_the_newest_commit_and_supersedes_the_rest(site: Site) -> None:
    site.start(settle=1.0)
    commits = [f"{i:x}" * 40 for i in range(1, 11)]
    for c in commits:
        site.push(c[:40])
    assert wait(lambda: site.backend.triggered, 15)
    time.sleep(1.5)
    assert [t.commit for t in site.backend.triggered] == [commits[-1][:40]]
    events = [site.event() for _ in range(10)]
    superseded = [e for e in events if e["state"] == "superseded"]
    assert len(superseded) == 9, events
    assert {e["commit"] for e in superseded} == {c[:40] for c in commits[:-1]}
    assert all("superseded by" in e["reason"] for e in superseded)
    assert [e["commit"] for e in events if e["state"] == "queued"] == [commits[-1][:40]]


def test_a_ci_server_away_is_retried_the_push_kept_and_said_once(site: Site) -> None:
    site.backend.away = True
    site.start()
    site.push("d" * 40)
    error = site.event()
    assert error["state"] == "error" and error["retrying"] is True
    assert "jenkins is unavailable: connection refused; retrying, the push is kept" \
        == error["reason"]
    time.sleep(2)  # several retries, no more events
    assert site.events.empty()
    site.backend.away = False
    queued = site.event(40)
    assert queued["state"] == "queued" and queued["commit"] == "d" * 40
    assert len(site.backend.triggered) == 1
    assert records.Builds(site.store).recent()[0]["state"] == "queued"


def test_a_bridge_killed_mid_build_publishes_the_result_once_after_restart(site: Site) -> None:
    bridge = site.start()
    site.push("e" * 40)
    assert site.event()["state"] == "queued"
    # "kill": stop its thread dead, without letting it finish anything
    bridge.stopping.set()
    bridge.wake.set()
    bridge.thread.join(5)
    bridge.dispatcher.close(0)
    site.backend.finish(1, "FAILURE")
    site.start()  # a new bridge on the same store
    finished = site.finished()
    assert (finished["state"], finished["result"]) == ("finished", "FAILURE")
    time.sleep(1)
    assert site.events.empty(), "the result was published twice"
    assert len(site.backend.triggered) == 1, "the build was triggered again"


def test_a_redelivered_push_is_not_built_twice(site: Site) -> None:
    site.start()
    env = site.git_key.sign(envelope.new("git.push", {
        "project": "app", "ref": "refs/heads/main", "old": "1" * 40, "new": "f" * 40},
        sender="hook", ttl=600)).encode()
    site.bus.publish(topics.GIT_COMMITS, env)
    site.bus.publish(topics.GIT_COMMITS, env)  # the broker delivers it again
    assert site.event()["state"] == "queued"
    time.sleep(1)
    assert len(site.backend.triggered) == 1


def test_unsigned_pushes_build_nothing(site: Site) -> None:
    site.start()
    site.bus.publish(topics.GIT_COMMITS, envelope.new("git.push", {
        "project": "app", "ref": "refs/heads/main", "old": "1" * 40, "new": "9" * 40},
        sender="evil", ttl=600).encode())
    site.bus.publish(topics.GIT_COMMITS, site.ci_key.sign(envelope.new("ci.build", {
        "project": "app", "ref": "refs/heads/main", "commit": "9" * 40, "state": "queued",
        "backend": "x", "job": "j", "build": "x/j#1"}, sender="evil", ttl=600)).encode())
    time.sleep(1)
    assert site.backend.triggered == [] and records.Builds(site.store).recent() == []
    assert protocol.SENDERS["git.push"] == {protocol.Role.GIT, protocol.Role.CI}
