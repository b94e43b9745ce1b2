"""The orchestrator tests' cluster: one orchestrator, N agents, real git."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import broker_url
from tests.e2e.cluster import Cluster

SCRIPTS = {
    "pre": 'echo "start $(date +%s.%N)" >> app.timeline; sleep "${TEST_SLEEP:-0}"',
    "post": 'echo "end $(date +%s.%N)" >> ../../app.timeline; '
            'if [ -e "../../fail-$DEPLOYBUS_REF" ]; then echo "marker says fail"; exit 4; fi',
}


@pytest.fixture
def make(request: pytest.FixtureRequest, tmp_path: Path):
    made: list[Cluster] = []

    def _make(n: int = 3, env_extra: str = "", sleep: float = 0, tags=("v1.0", "v2.0"),
              kind: str = "rabbitmq-amqp", heartbeat: float | None = None) -> Cluster:
        url = broker_url(kind, request, f"o{uuid.uuid4().hex[:10]}")
        c = Cluster(tmp_path / f"c{len(made)}", url, [f"h{i}" for i in range(1, n + 1)],
                    env_extra=env_extra, app_scripts=SCRIPTS, heartbeat=heartbeat)
        c.base.mkdir()
        c.env["TEST_SLEEP"] = str(sleep)
        c.setup()
        for t in tags:
            c.commit_and_tag(t)
        c.push("main", *tags)
        c.start_all(fetchers=False)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.stop()


