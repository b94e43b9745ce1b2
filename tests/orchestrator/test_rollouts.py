"""Rollouts people can trust: strategies, halting, rollback, locks, windows,
control and resuming after the orchestrator dies. Real processes on RabbitMQ:
one orchestrator, one agent per host, real git, real scripts."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.e2e.cluster import Cluster, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

def fail_on(c: Cluster, host: str, ref: str) -> None:
    d = c.root(host) / "app"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"fail-{ref}").write_text("")


def intervals(c: Cluster, host: str) -> list[tuple[float, float]]:
    path = c.root(host) / "app" / "app.timeline"
    starts, ends = [], []
    for line in path.read_text().splitlines():
        kind, t = line.split()
        (starts if kind == "start" else ends).append(float(t))
    return list(zip(starts, ends, strict=False))


def asked(c: Cluster, host: str, rollout: str) -> list[str]:
    return [e["decision"] for e in c.audit(host) if e.get("rollout") == rollout]


def rollout_id(out: str) -> str:
    return out.split()[1].rstrip(":")


def test_one_after_another_by_default_and_all_at_once_on_request(make) -> None:  # noqa: ANN001
    c = make(n=4, sleep=0.5)
    r = c.deploy("app", "v1.0")
    assert r.returncode == 0, r.stdout + c.logs()
    spans = sorted(intervals(c, h)[-1] for h in c.hosts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), \
        f"default strategy overlapped hosts: {spans}"
    r = c.deploy("app", "v2.0", "--batch", "100%", "--window", "0")
    assert r.returncode == 0, r.stdout + c.logs()
    spans = sorted(intervals(c, h)[-1] for h in c.hosts)
    assert max(s for s, _ in spans) < min(e for _, e in spans), \
        f"all at once should have every host in flight together: {spans}"
    assert {c.version(h) for h in c.hosts} == {"v2.0"}


def test_canary_then_batches(make) -> None:  # noqa: ANN001
    c = make(n=5, sleep=0.3)
    r = c.deploy("app", "v1.0", "--canary", "h3", "--batch", "2", "--window", "0")
    assert r.returncode == 0, r.stdout + c.logs()
    assert "(h3 | h1,h2 | h4,h5)" in r.stdout, r.stdout
    span = {h: intervals(c, h)[-1] for h in c.hosts}
    assert span["h3"][1] <= min(span[h][0] for h in ("h1", "h2", "h4", "h5"))
    assert max(span["h1"][1], span["h2"][1]) <= min(span["h4"][0], span["h5"][0])
    assert {c.version(h) for h in c.hosts} == {"v1.0"}


def test_failing_canary_halts_before_the_first_batch(make) -> None:  # noqa: ANN001
    c = make(n=4)
    fail_on(c, "h1", "v1.0")
    r = c.deploy("app", "v1.0", "--canary", "1", "--batch", "50%")
    assert r.returncode == 1, r.stdout
    assert "halted" in r.stdout and "marker says fail" in r.stdout
    rid = rollout_id(r.stdout)
    last = c.history()[0]
    assert last["id"] == rid
    assert [h["state"] for h in last["hosts"]] == ["failed", "skipped", "skipped", "skipped"]
    for h in ("h2", "h3", "h4"):
        assert asked(c, h, rid) == [], f"{h} was asked to deploy after the canary failed"
        assert c.version(h) is None


def test_auto_rollback_returns_switched_hosts_to_their_release(make) -> None:  # noqa: ANN001
    c = make(n=4)
    assert c.deploy("app", "v1.0", "--batch", "100%", "--window", "0").returncode == 0
    before = {h: os.readlink(c.current(h)) for h in c.hosts}
    fail_on(c, "h3", "v2.0")
    r = c.deploy("app", "v2.0", "--canary", "1", "--batch", "2", "--window", "0",
                 "--auto-rollback")
    assert r.returncode == 1, r.stdout + c.logs()
    last = c.history()[0]
    states = {h["host"]: (h["state"], h["rolled_back"]) for h in last["hosts"]}
    assert states["h3"][0] == "failed"
    assert states["h4"] == ("skipped", None)
    switched = [h for h, (st, _) in states.items() if st == "succeeded"]
    assert "h1" in switched
    for h in switched:
        assert states[h][1] == "ok", states
    for h in c.hosts:
        assert os.readlink(c.current(h)) == before[h], f"{h} is not back on its release"
        assert c.version(h) == "v1.0"


def test_two_rollouts_at_once_exactly_one_runs(make) -> None:  # noqa: ANN001
    c = make(n=2, sleep=4)  # the first is surely running when the second asks
    first = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: any(r["state"] == "running" for r in c.history()), 30)
    second = c.deploy("app", "v2.0")
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out1
    assert second.returncode == 77, second.stdout
    holder = rollout_id(out1)
    assert f"locked by rollout {holder}" in second.stdout
    assert {c.version(h) for h in c.hosts} == {"v1.0"}
    # The lock ends with the rollout.
    assert c.deploy("app", "v2.0").returncode == 0


def test_manual_lock_refuses_with_owner_and_reason_until_unlocked(make) -> None:  # noqa: ANN001
    c = make(n=1)
    r = c.cli("lock", "app", "--env", "prod", "--reason", "database migration",
              "--user", "alice")
    assert r.returncode == 0, r.stderr
    r = c.deploy("app", "v1.0")
    assert r.returncode == 77
    assert "locked by a manual lock (owner alice, reason: database migration" in r.stdout
    assert c.cli("unlock", "app", "--env", "prod").returncode == 0
    assert c.deploy("app", "v1.0").returncode == 0
    actions = [a["action"] for a in json.loads(c.cli("audit", "--json").stdout)]
    assert {"lock", "unlock", "refused", "accepted"} <= set(actions)


def test_deploy_window_refuses_and_audited_override_passes(make) -> None:  # noqa: ANN001
    c = make(n=1, env_extra='    windows:\n      deny: ["* 00:00-24:00"]\n')
    r = c.deploy("app", "v1.0")
    assert r.returncode == 77
    assert "closed for deploys" in r.stdout and "* 00:00-24:00" in r.stdout
    assert c.version("h1") is None
    r = c.deploy("app", "v1.0", "--override", "hotfix for incident 42")
    assert r.returncode == 0, r.stdout
    trail = json.loads(c.cli("audit", "--json").stdout)
    override = [a for a in trail if a["action"] == "window-override"]
    assert override and override[0]["detail"]["reason"] == "hotfix for incident 42"


def test_pause_until_promoted_after_the_canary(make) -> None:  # noqa: ANN001
    c = make(n=3)
    p = c.deploy_async("app", "v1.0", "--canary", "1", "--batch", "100%", "--pause",
                       "promote")
    assert wait_for(lambda: c.history() and c.history()[0]["state"] == "paused", 60)
    rid = c.history()[0]["id"]
    assert c.version("h1") == "v1.0" and c.version("h2") is None
    time.sleep(1)
    assert c.version("h2") is None, "nothing moves while paused"
    assert c.cli("promote", rid).returncode == 0
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert {c.version(h) for h in c.hosts} == {"v1.0"}


def test_abort_starts_no_more_hosts(make) -> None:  # noqa: ANN001
    c = make(n=3, sleep=6)  # h1 is still deploying when the abort arrives
    p = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: c.history() and c.history()[0]["hosts"][0]["state"] == "requested",
                    30)
    rid = c.history()[0]["id"]
    assert c.cli("abort", rid).returncode == 0
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "aborted by" in out, out
    states = [h["state"] for h in c.history()[0]["hosts"]]
    assert states[1:] == ["skipped", "skipped"]


def test_orchestrator_killed_mid_rollout_resumes_without_redeploying(make) -> None:  # noqa: ANN001
    c = make(n=3, sleep=1.5)
    p = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: c.history() and c.history()[0]["hosts"][0]["state"] == "succeeded",
                    60)
    orch = next(d for d in c.daemons if d.name == "orchestrator")
    orch.proc.send_signal(signal.SIGKILL)
    orch.proc.wait()
    c.daemons.remove(orch)
    time.sleep(1)
    new = c.start("orchestrator", "orchestrator")
    assert new.ready.wait(60)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out + c.logs()
    rid = c.history()[0]["id"]
    assert {c.version(h) for h in c.hosts} == {"v1.0"}
    assert asked(c, "h1", rid) == ["accepted"], "h1 finished before the kill: not asked again"
    for h in c.hosts:
        assert len(list((c.root(h) / "app" / "releases").iterdir())) == 1


def test_rollback_command_returns_hosts_to_the_previous_release(make) -> None:  # noqa: ANN001
    c = make(n=2)
    assert c.deploy("app", "v1.0").returncode == 0
    first = {h: os.readlink(c.current(h)) for h in c.hosts}
    assert c.deploy("app", "v2.0").returncode == 0
    assert {c.version(h) for h in c.hosts} == {"v2.0"}
    r = c.cli("rollback", "app", "--env", "prod", "--wait")
    assert r.returncode == 0, r.stdout + c.logs()
    assert {h: os.readlink(c.current(h)) for h in c.hosts} == first
    # --to a named release: forward again to v2.0's release on h1 only.
    target = c.history()[1]["hosts"][0]["release"]
    r = c.cli("rollback", "app", "--env", "prod", "--hosts", "h1", "--to", target, "--wait")
    assert r.returncode == 0, r.stdout
    assert c.version("h1") == "v2.0" and c.version("h2") == "v1.0"


def test_stuck_host_counts_as_failed(make) -> None:  # noqa: ANN001
    c = make(n=2, sleep=30)
    started = time.monotonic()
    r = c.deploy("app", "v1.0", "--stuck", "3")
    assert r.returncode == 1, r.stdout
    assert "stuck: no progress from h1 for 3s" in r.stdout
    assert time.monotonic() - started < 25, "a stuck host is not waited on"
    assert [h["state"] for h in c.history()[0]["hosts"]] == ["failed", "skipped"]


def test_offline_host_is_reported_not_waited_on(make) -> None:  # noqa: ANN001
    c = make(n=3)
    beats = [c.start(f"keepalive-{h}", "keepalive", "--host", h, "--interval", "1")
             for h in c.hosts]
    assert all(b.ready.wait(60) for b in beats)
    assert wait_for(lambda: len(json.loads(c.cli("hosts", "--json").stdout)) == 3, 30)
    beats[1].proc.send_signal(signal.SIGKILL)  # h2 goes silent
    time.sleep(4)
    started = time.monotonic()
    r = c.deploy("app", "v1.0", "--max-failures", "1")
    assert r.returncode == 0, r.stdout + c.logs()
    assert time.monotonic() - started < 30
    steps = {h["host"]: h for h in c.history()[0]["hosts"]}
    assert steps["h2"]["state"] == "offline"
    assert "last heartbeat" in steps["h2"]["message"]
    assert steps["h1"]["state"] == steps["h3"]["state"] == "succeeded"
    assert asked(c, "h2", c.history()[0]["id"]) == []


def test_pause_and_resume(make) -> None:  # noqa: ANN001
    c = make(n=3, sleep=3)
    p = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: c.history() and c.history()[0]["hosts"][0]["state"] == "requested",
                    30)
    rid = c.history()[0]["id"]
    assert c.cli("pause", rid).returncode == 0
    assert wait_for(lambda: c.history()[0]["state"] == "paused", 30), c.history()[0]
    assert [h["state"] for h in c.history()[0]["hosts"]][1:] == ["pending", "pending"]
    time.sleep(1)
    assert c.version("h2") is None
    assert c.cli("resume", rid).returncode == 0
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert {c.version(h) for h in c.hosts} == {"v1.0"}
