"""Continuous delivery, end to end, with a real CI server: a push through the
installed post-receive hook makes a real Buildbot build that commit; on
SUCCESS the orchestrator auto-deploys it to three agents and ``current`` on
each is that commit; a failing build deploys nothing and says so in the
audit trail. Real processes on RabbitMQ (AMQP and STOMP): the hook, the CI
bridge, the orchestrator, three agents and fetchers, a Buildbot master and
worker. (The Jenkins path: tests/e2e/test_cd_jenkins.py, against the
wire-compatible fake, since no Jenkins server can be installed here.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ci.buildbot_harness import Buildbot
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, git, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

HOSTS = ["h1", "h2", "h3"]


def ci_cluster(base: Path, url: str, server_yaml: str, job: str) -> Cluster:
    return Cluster(
        base, url, HOSTS,
        top_extra=f"ci:\n{server_yaml}",
        app_extra=(f"    ci:\n      server: ci1\n      job: {job}\n"
                   f"      refs: [\"refs/heads/main\"]\n      settle: 0.3\n"),
        env_extra="    auto_deploy:\n      refs: [\"refs/heads/main\"]\n      on: ci_success\n")


def push_commit(c: Cluster, ci_exit: int, version: str) -> str:
    """A commit on main whose own ci.sh exits ``ci_exit``, pushed through the hook."""
    (c.work / "ci.sh").write_text(f"echo testing {version}; exit {ci_exit}\n")
    (c.work / "VERSION").write_text(version + "\n")
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


@pytest.fixture(params=["rabbitmq-amqp", "rabbitmq-stomp"])
def cd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Cluster, Buildbot]]:
    url = broker_url(request.param, request, f"cd{uuid.uuid4().hex[:8]}")
    c = ci_cluster(tmp_path / "c", url, "  ci1: {type: buildbot, url: \"http://0.0.0.0:9\", poll: 0.3}\n",
                   "app")
    c.base.mkdir()
    c.setup()
    bb = Buildbot(tmp_path / "bb", jobs={"app": c.bare}).start()
    c.config.write_text(c.config.read_text().replace("http://0.0.0.0:9", bb.url))
    try:
        c.start_all(fetchers=True)
        bridge = c.start_ci_bridge()
        assert bridge.ready.wait(60), c.logs()
        yield c, bb
    finally:
        c.stop()
        bb.stop()
        c.save_logs()


def test_a_green_build_is_deployed_and_a_red_one_is_not(cd: tuple[Cluster, Buildbot]) -> None:
    c, bb = cd
    green = push_commit(c, 0, "v-green")
    assert wait_for(lambda: all(deployed_commit(c, h) == green for h in HOSTS), 120), \
        c.logs() + bb.logs()
    (r,) = c.history()
    assert r["state"] == "succeeded" and r["commit"] == green and r["ref"] == "refs/heads/main"
    assert r["user"].startswith("ci:app#"), r["user"]
    trail = json.loads(c.cli("audit", "--json").stdout)
    (accepted,) = [a for a in trail if a["action"] == "accepted"]
    assert accepted["actor"] == "ci" and accepted["detail"]["trigger"].startswith("ci1/app#")

    red = push_commit(c, 1, "v-red")
    assert wait_for(lambda: any(a["action"] == "auto-deploy-skipped" for a in json.loads(
        c.cli("audit", "--json").stdout)), 120), c.logs() + bb.logs()
    skipped = [a for a in json.loads(c.cli("audit", "--json").stdout)
               if a["action"] == "auto-deploy-skipped"]
    assert f"of {red[:12]} (refs/heads/main) FAILURE: not deployed" in \
        skipped[0]["detail"]["reason"]
    assert len(c.history()) == 1, "a failed build was deployed"
    assert all(deployed_commit(c, h) == green for h in HOSTS)
