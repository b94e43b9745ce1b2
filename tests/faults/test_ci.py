"""The broker killed with kill -9 between a CI build and its result: the
result is published once the broker is back, and the environment gets one
rollout of the built commit. Jenkins is the wire-compatible fake (no Jenkins
server can be installed here); everything else is real processes on the
machine's RabbitMQ, which this test kills and restarts (it runs with the
other fault tests, last)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_cd_jenkins import HOSTS, CiEvents, Jenkins, deployed_commit, push_commit
from tests.faults.test_broker_kill import kill_broker, restart_brokers

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_broker_killed_between_build_and_result_one_rollout(request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    url = broker_url("rabbitmq-amqp", request, f"ck{uuid.uuid4().hex[:8]}")
    c = Cluster(
        tmp_path / "c", url, HOSTS,
        top_extra='ci:\n  ci1: {type: jenkins, url: "http://0.0.0.0:9", '
                  'credentials: jenkins.cred, poll: 0.2}\n',
        app_extra=("    ci:\n      server: ci1\n      job: app-build\n"
                   "      refs: [\"refs/heads/main\"]\n"
                   "      parameters: {COMMIT: \"{commit}\", BRANCH: \"{short_ref}\"}\n"
                   "      settle: 0.3\n"),
        env_extra="    auto_deploy:\n      refs: [\"refs/heads/main\"]\n      on: ci_success\n")
    c.base.mkdir()
    (c.base / "jenkins.cred").write_text("placeholder\n")
    c.setup()
    jenkins = Jenkins(c)
    (c.base / "jenkins.cred").write_text(f"{jenkins.fake.user}:{jenkins.fake.token}\n")
    c.config.write_text(c.config.read_text().replace("http://0.0.0.0:9", jenkins.fake.url))
    events: Any = None
    try:
        c.start_all(fetchers=True)
        assert c.start_ci_bridge().ready.wait(60), c.logs()
        events = CiEvents(url)
        jenkins.hold.set()  # the build waits in Jenkins's queue
        commit = push_commit(c, "v-broker")
        assert wait_for(lambda: events.of("queued"), 30), c.logs("ci-bridge")
        events.bus.close()
        kill_broker("rabbitmq-amqp")
        jenkins.hold.clear()  # it builds while the broker is dead
        assert wait_for(lambda: jenkins.done, 10)
        time.sleep(3)
        restart_brokers()
        assert wait_for(lambda: all(deployed_commit(c, h) == commit for h in HOSTS), 180), \
            c.logs()
        time.sleep(3)
        rollouts = c.history()
        assert len(rollouts) == 1, rollouts
        assert rollouts[0]["commit"] == commit and rollouts[0]["state"] == "succeeded"
        assert len(jenkins.fake.triggers) == 1
    finally:
        jenkins.close()
        c.stop()
        c.save_logs()
