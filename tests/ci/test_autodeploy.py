"""Auto-deploy of green builds, by the real orchestrator in this process (a
scripted agent answers for host h1): exactly the built commit, once per
build; never a failed build, one signed by a CI key the policy does not
name, or a commit older than what the environment runs; locks apply; every
decision is in the audit trail."""

from __future__ import annotations

import os
import queue
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, topics
from deploybus.bus import connect
from deploybus.config import parse
from deploybus.daemons.orchestrator import service
from deploybus.runner import Context
from deploybus.signing import SigningKey
from deploybus.store import Store

pytestmark = pytest.mark.integration

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


class Site:
    def __init__(self, tmp_path: Path) -> None:
        self.keys = {n: SigningKey.generate(n) for n in ("ops", "ci", "rogue", "h1")}
        for k in self.keys.values():
            k.save(tmp_path)
        repo, work = tmp_path / "app.git", tmp_path / "work"
        git("init", "-q", "--bare", str(repo), cwd=tmp_path)
        git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
        self.commits = []
        for i in range(2):
            git("commit", "-q", "--allow-empty", "-m", f"c{i}", cwd=work)
            self.commits.append(git("rev-parse", "HEAD", cwd=work))
        git("push", "-q", str(repo), "main", cwd=work)
        self.cfg = parse(f"""
bus: {{url: "memory://auto-{uuid.uuid4().hex}"}}
keys:
  trusted:
    ops: {{key: ops.pub, role: orchestrator}}
    ci: {{key: ci.pub, role: ci}}
    rogue: {{key: rogue.pub, role: ci}}
    h1: {{key: h1.pub, role: host}}
  policy: [{{signer: ci, projects: [app], environments: [dev]}}]
state: {{url: "sqlite:///{tmp_path / 's.db'}", dir: {tmp_path / 'server'}}}
projects: {{app: {{git: {repo}}}}}
environments:
  dev:
    hosts: [h1]
    auto_deploy: {{refs: ["refs/heads/main"], on: ci_success}}
""", tmp_path / "c.yaml")
        self.bus = connect(self.cfg.bus_url)
        self.store = Store(self.cfg.state_url)
        self.orch = service.Orchestrator(Context(config=self.cfg, bus=self.bus, host="o",
                                                 signing_key=self.keys["ops"]), self.store)
        self.requests: queue.Queue[dict] = queue.Queue()
        self.bus.subscribe(topics.requests_for("h1"), self._agent, queue="agent-h1")
        self.orch.start()

    def _agent(self, d: Any) -> None:
        env = envelope.decode(d.body)
        d.ack()
        self.requests.put(env.body)
        self.bus.publish(topics.EVENTS, self.keys["h1"].sign(envelope.new("deploy.result", {
            "rollout": env.body["rollout"], "host": "h1", "request_id": env.id,
            "status": "succeeded", "commit": env.body["commit"], "release": "r"},
            sender="h1", ttl=60)).encode())

    def build(self, commit: str, result: str | None = "SUCCESS", *, number: int = 7,
              key: str = "ci", state: str = "finished") -> None:
        self.bus.publish(topics.CI_EVENTS, self.keys[key].sign(envelope.new("ci.build", {
            "project": "app", "ref": "refs/heads/main", "commit": commit, "state": state,
            "backend": "jenkins", "job": "app-build", "build": f"jenkins/app-build#{number}",
            "number": number, **({"result": result} if result else {})},
            sender="ci", ttl=600)).encode())

    def rollouts(self) -> list[dict]:
        return self.store.rollouts(50)

    def audit(self, action: str) -> list[dict]:
        return [a for a in self.store.audit_trail(100) if a["action"] == action]

    def settle(self) -> None:
        """Wait until no rollout runs."""
        assert wait(lambda: all(r["state"] in ("succeeded", "failed", "refused", "partial")
                                for r in self.rollouts()), 20), self.rollouts()

    def close(self) -> None:
        self.orch.stop(5)
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
        time.sleep(0.05)
    return bool(pred())


def test_a_green_build_deploys_exactly_its_commit_once(site: Site) -> None:
    c1 = site.commits[1]
    site.build(c1)
    assert wait(lambda: site.rollouts())
    site.settle()
    (r,) = site.rollouts()
    assert (r["state"], r["commit"], r["ref"], r["user"]) == ("succeeded", c1,
                                                              "refs/heads/main",
                                                              "ci:app-build#7")
    assert site.requests.get(timeout=5)["commit"] == c1
    (accepted,) = site.audit("accepted")
    assert accepted["actor"] == "ci" and accepted["detail"]["trigger"] == "jenkins/app-build#7"
    site.build(c1)  # the same event again (a redelivery, or FINALIZED after COMPLETED)
    time.sleep(1)
    assert len(site.rollouts()) == 1


@pytest.mark.parametrize("result", ["FAILURE", "ABORTED", "UNSTABLE", "NOT_BUILT"])
def test_a_build_that_did_not_succeed_deploys_nothing_and_says_so(site: Site,
                                                                  result: str) -> None:
    site.build(site.commits[1], result)
    assert wait(lambda: site.audit("auto-deploy-skipped"))
    (skipped,) = site.audit("auto-deploy-skipped")
    assert skipped["environment"] == "dev"
    assert f"build jenkins/app-build#7 of {site.commits[1][:12]} (refs/heads/main) {result}: " \
           "not deployed" == skipped["detail"]["reason"]
    assert site.rollouts() == []


def test_queued_started_superseded_and_unsigned_builds_deploy_nothing(site: Site) -> None:
    for state in ("queued", "started"):
        site.build(site.commits[1], None, state=state)
    site.build(site.commits[1], None, state="superseded", number=8)
    site.bus.publish(topics.CI_EVENTS, envelope.new("ci.build", {
        "project": "app", "ref": "refs/heads/main", "commit": site.commits[1],
        "state": "finished", "result": "SUCCESS", "backend": "jenkins", "job": "app-build",
        "build": "jenkins/app-build#9"}, sender="evil", ttl=600).encode())
    time.sleep(1.5)
    assert site.rollouts() == []


def test_a_ci_key_the_policy_does_not_name_deploys_nothing(site: Site) -> None:
    site.build(site.commits[1], key="rogue")
    assert wait(lambda: site.audit("auto-deploy-skipped"))
    assert "rogue (ci) may not deploy app to dev" in \
        site.audit("auto-deploy-skipped")[0]["detail"]["reason"]
    assert site.rollouts() == []


def test_an_older_commit_than_what_runs_is_not_deployed(site: Site) -> None:
    old, new = site.commits
    site.build(new, number=2)
    assert wait(lambda: site.rollouts())
    site.settle()
    site.build(old, number=1)  # a late green build of an older commit
    assert wait(lambda: site.audit("auto-deploy-skipped"))
    assert f"{old[:12]} is older than what dev runs ({new[:12]})" in \
        site.audit("auto-deploy-skipped")[0]["detail"]["reason"]
    site.build(new, number=3)  # a rebuild of what runs
    assert wait(lambda: len(site.audit("auto-deploy-skipped")) == 2)
    assert len(site.rollouts()) == 1


def test_a_lock_refuses_an_auto_deploy_and_it_is_audited(site: Site) -> None:
    site.store.acquire_lock(project="app", environment="dev", owner="alice",
                            reason="db migration", ttl=600)
    site.build(site.commits[1])
    assert wait(lambda: site.rollouts())
    (r,) = site.rollouts()
    assert r["state"] == "refused" and "locked by a manual lock (owner alice" in r["reason"]
    assert site.audit("refused")[0]["actor"] == "ci"
    assert site.requests.empty()
