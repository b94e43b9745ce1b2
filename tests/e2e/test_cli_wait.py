"""``deploybus deploy --wait`` when no orchestrator answers: it says so after
a while (without printing the bus credentials), keeps waiting, and exits
with EX_TEMPFAIL at its timeout. The rollout is not lost: it waits for the
first orchestrator, even on a broker where none has ever run."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from deploybus.cli.deploying import SILENCE_HINT_AFTER
from deploybus.exits import EXIT_TEMPFAIL
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, wait_for

pytestmark = pytest.mark.broker


def test_wait_says_when_no_orchestrator_answers(request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    url = broker_url("rabbitmq-amqp", request, f"w{uuid.uuid4().hex[:10]}")
    c = Cluster(tmp_path, url, ["h1"])
    c.setup()  # no daemon started: nobody will answer
    started = time.monotonic()
    r = c.cli("deploy", "app", "v1.0", "--env", "prod", "--wait",
              "--timeout", str(SILENCE_HINT_AFTER + 2))
    took = time.monotonic() - started
    assert r.returncode == EXIT_TEMPFAIL, r.stdout + r.stderr
    assert f"no word from the orchestrator after {SILENCE_HINT_AFTER:.0f}s" in r.stderr
    # the whole URL, vhost included, with the password hidden
    vhost = request.getfixturevalue("rabbit_vhost")
    assert f"amqp://guest:***@127.0.0.1:5672/{vhost}?prefix=" in r.stderr, r.stderr
    assert "guest:guest" not in r.stderr, r.stderr
    assert "still not finished after 12s" in r.stderr
    assert took < SILENCE_HINT_AFTER + 10, "the hint must not add to the timeout"


@pytest.mark.parametrize("kind", ["rabbitmq-amqp", "rabbitmq-stomp", "activemq-stomp"])
def test_a_rollout_sent_before_any_orchestrator_ran_waits_for_the_first(
        request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    url = broker_url(kind, request, f"f{uuid.uuid4().hex[:10]}")  # a bus nobody used
    c = Cluster(tmp_path, url, ["h1"])
    c.setup()
    c.commit_and_tag("v1.0")
    c.push("main", "v1.0")
    r = c.cli("deploy", "app", "v1.0", "--env", "prod")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        c.start_all(fetchers=False)
        assert wait_for(lambda: bool(c.history()) and c.history()[0]["state"] == "succeeded",
                        60), c.logs()
        assert c.version("h1") == "v1.0"
    finally:
        c.stop()


@pytest.mark.parametrize("kind", ["rabbitmq-amqp", "rabbitmq-stomp"])
@pytest.mark.parametrize("wrong", ["password", "vhost"])
def test_refused_credentials_or_vhost_fail_at_once_naming_the_broker(
        request: pytest.FixtureRequest, tmp_path: Path, kind: str, wrong: str) -> None:
    """Not 30-42 s of retries then a bare ACCESS_REFUSED: at once, exit 78,
    with the URL (password hidden), the vhost and the config file."""
    url = broker_url(kind, request, f"a{uuid.uuid4().hex[:10]}")
    vhost = request.getfixturevalue("rabbit_vhost")
    url = url.replace("guest:guest@", "guest:n0tit@") if wrong == "password" \
        else url.replace(vhost, "no-such-vhost")
    c = Cluster(tmp_path, url, ["h1"])
    c.setup()
    for args in (["deploy", "app", "v1.0", "--env", "prod", "--wait"],
                 ["deploy", "app", "v1.0", "--env", "prod"], ["promote", "deadbeef"]):
        started = time.monotonic()
        r = c.cli(*args)
        took = time.monotonic() - started
        assert r.returncode == 78, r.stdout + r.stderr
        assert took < 5, f"{args[0]} took {took:.1f}s to give up"
        assert "refused the connection" in r.stderr and "127.0.0.1" in r.stderr, r.stderr
        assert (vhost if wrong == "password" else "no-such-vhost") in r.stderr, r.stderr
        assert "n0tit" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert f"(config: {c.config})" in r.stderr, r.stderr
