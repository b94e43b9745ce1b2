"""One rule says whether a host can deploy and which of its daemons are
alive (deploybus.liveness); the store keeps each daemon's last heartbeat;
the outcome of a finished rollout follows from its hosts (deploybus.states)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploybus.liveness import ago, host_rows, judge
from deploybus.states import outcome
from deploybus.store import Store


def beat(age: float, interval: float = 10) -> dict:
    return {"age": age, "interval": interval}


@pytest.mark.parametrize("daemons, verdict, detail", [
    (None, "never seen", "no heartbeat ever"),
    ({"agent": beat(2), "keepalive": beat(4)}, "up", "agent 2s, keepalive 4s"),
    # the agent is what deploys: keepalive alive alone is not "up"
    ({"agent": beat(45), "keepalive": beat(2)}, "agent down", "agent silent 45s, keepalive 2s"),
    ({"keepalive": beat(2)}, "agent down", "no agent heartbeat ever, keepalive 2s"),
    ({"agent": beat(2), "fetcher": beat(300)}, "degraded", "agent 2s, fetcher silent 5m"),
    ({"agent": beat(400), "keepalive": beat(7200)}, "down", "agent silent 6m, keepalive silent 2h"),
    # the limit is three of the daemon's own intervals
    ({"agent": beat(2.9, interval=1)}, "up", "agent 2s"),
    ({"agent": beat(3.1, interval=1)}, "down", "agent silent 3s"),
])
def test_verdicts(daemons, verdict, detail) -> None:  # noqa: ANN001
    live = judge("h1", daemons)
    assert (live.verdict, live.detail) == (verdict, detail)
    assert live.can_deploy == (verdict in ("up", "degraded"))


def test_ago() -> None:
    assert [ago(s) for s in (0, 59, 60, 3599, 3600, 86400 * 3)] == \
        ["0s", "59s", "1m", "59m", "1h", "3d"]


def test_store_keeps_each_daemons_heartbeat(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.record_presence("h1", {"host": "h1", "daemon": "agent", "interval": 2},
                          daemon="agent")
    store.record_presence("h1", {"host": "h1", "interval": 5, "version": "1.2",
                                 "projects": {"app": {"release": "r1"}}})
    store.record_presence("h2", {"host": "h2", "interval": "junk"}, daemon="fetcher")
    h1 = store.host("h1")
    assert h1 is not None
    assert set(h1["daemons"]) == {"agent", "keepalive"}
    assert h1["daemons"]["agent"]["interval"] == 2 and h1["daemons"]["keepalive"]["interval"] == 5
    assert h1["info"]["projects"] == {"app": {"release": "r1"}}, "the keepalive's info is the host's"
    assert judge("h1", h1["daemons"]).verdict == "up"
    h2 = store.host("h2")
    assert h2 is not None and h2["info"] == {} and h2["daemons"]["fetcher"]["interval"] == 10.0
    assert judge("h2", h2["daemons"]).verdict == "agent down"
    assert store.host("h3") is None
    assert [h["name"] for h in store.hosts()] == ["h1", "h2"]


def test_host_rows_list_configured_hosts_then_strangers(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.record_presence("web1", {"interval": 10}, daemon="agent")
    store.record_presence("zz-stranger", {"interval": 10}, daemon="agent")
    rows = host_rows({"prod": ["web1", "web2"], "staging": ["web1"]}, store.hosts())
    assert [(r["name"], r["verdict"], r["environments"], r["configured"]) for r in rows] == [
        ("web1", "up", ["prod", "staging"], True),
        ("web2", "never seen", ["prod"], True),
        ("zz-stranger", "up", [], False)]


@pytest.mark.parametrize("states, halted, expected", [
    (["succeeded", "succeeded", "succeeded"], False, "succeeded"),
    (["succeeded", "failed", "succeeded"], False, "partial"),
    (["succeeded", "offline", "refused"], False, "partial"),
    (["failed", "failed", "failed"], False, "failed"),   # within max_failures, none succeeded
    (["succeeded", "failed", "skipped"], True, "failed"),
    (["succeeded", "skipped"], False, "partial"),
    ([], False, "failed"),
])
def test_outcome(states, halted, expected) -> None:  # noqa: ANN001
    assert outcome(states, halted=halted) == expected
