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
    r = c.cli("promote", rid)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"rollout {rid}: promoted: the batches after the canary go on"
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert {c.version(h) for h in c.hosts} == {"v1.0"}


def test_abort_starts_no_more_hosts(make) -> None:  # noqa: ANN001
    c = make(n=3, sleep=6)  # h1 is still deploying when the abort arrives
    p = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: c.history() and c.history()[0]["hosts"][0]["state"] == "requested",
                    30)
    rid = c.history()[0]["id"]
    r = c.cli("abort", rid)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aborting: hosts in flight finish, the rest are skipped" in r.stdout
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 4 and "aborted by" in out, out
    assert c.history()[0]["state"] == "aborted"
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
    new = c.start_orchestrator()
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


def test_a_host_whose_agent_died_is_reported_at_once_not_waited_on(make) -> None:  # noqa: ANN001
    """Liveness comes from each daemon's own heartbeat: h2's keepalive goes on
    beating, but its agent is dead, so h2 is "agent down" in `hosts` and
    offline in the rollout, at once; the rollout is partial, not succeeded."""
    c = make(n=3, heartbeat=1)
    beats = [c.start(f"keepalive-{h}", "keepalive", "--host", h) for h in c.hosts]
    assert all(b.ready.wait(60) for b in beats)
    assert wait_for(lambda: {h["verdict"] for h in c.host_rows().values()} == {"up"}, 30), \
        c.host_rows()
    c.daemon("agent-h2").proc.send_signal(signal.SIGKILL)
    assert wait_for(lambda: c.host_rows()["h2"]["verdict"] == "agent down", 10), c.host_rows()
    row = c.host_rows()["h2"]
    assert row["daemons"]["keepalive"]["alive"] and not row["daemons"]["agent"]["alive"]
    text = c.cli("hosts").stdout
    assert any(line.split()[:3] == ["h2", "agent", "down"] for line in text.splitlines()), text
    assert any(line.split()[:2] == ["h1", "up"] for line in text.splitlines()), text
    started = time.monotonic()
    r = c.deploy("app", "v1.0", "--max-failures", "1")
    assert time.monotonic() - started < 30
    assert r.returncode == 3, r.stdout + c.logs()
    rid = c.history()[0]["id"]
    assert "[h2] offline: agent down: agent silent" in r.stdout, r.stdout
    assert f"rollout {rid} partial: 2 of 3 hosts succeeded; h2 failed" in r.stdout, r.stdout
    last = c.history()[0]
    assert last["state"] == "partial"
    steps = {h["host"]: h for h in last["hosts"]}
    assert steps["h2"]["state"] == "offline"
    assert steps["h2"]["message"].startswith("agent down: agent silent"), steps["h2"]
    assert steps["h1"]["state"] == steps["h3"]["state"] == "succeeded"
    assert asked(c, "h2", rid) == []


def test_an_agent_that_stopped_answering_fails_its_host_within_ack_timeout(make) -> None:  # noqa: ANN001
    """h1's agent is frozen just before the deploy (its last heartbeat is
    fresh, so it is asked): no acknowledgement within ack_timeout (3 s) fails
    it with "agent not answering", not after request_timeout (60 s). Thawed,
    the agent finds the request expired and never runs it."""
    c = make(n=1, heartbeat=1, env_extra="    ack_timeout: 3\n")
    assert wait_for(lambda: c.host_rows()["h1"]["verdict"] == "up", 30)
    agent = c.daemon("agent-h1")
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = c.deploy("app", "v1.0")
        took = time.monotonic() - started
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert r.returncode == 1, r.stdout + c.logs()
    assert "[h1] failed: agent not answering: no acknowledgement from h1 within 3s" in r.stdout
    assert took < 20, f"a silent agent was waited on for {took:.0f}s"
    rid = c.history()[0]["id"]
    assert wait_for(lambda: asked(c, "h1", rid) == ["refused"], 20), c.audit("h1")
    assert c.version("h1") is None, "a request given up on ran after all"


def test_tolerated_failures_are_partial_and_all_failed_is_failed(make) -> None:  # noqa: ANN001
    """--max-failures says "keep going", not "call it a success"."""
    c = make(n=3)
    r = c.cli("deploy", "broken", "v1.0", "--env", "prod", "--max-failures", "3",
              "--window", "0", "--wait")
    assert r.returncode == 1, r.stdout
    assert sum(line.startswith(f"[{h}] failed: post script failed with exit code 3")
               for h in c.hosts for line in r.stdout.splitlines()) == 3, r.stdout
    rid = c.history()[0]["id"]
    assert f"rollout {rid} failed: no host succeeded: h1, h2, h3 failed" in r.stdout, r.stdout
    assert "[0/3 hosts succeeded]" in r.stdout
    assert c.history()[0]["state"] == "failed"
    fail_on(c, "h2", "v1.0")
    r = c.deploy("app", "v1.0", "--max-failures", "1")
    assert r.returncode == 3, r.stdout
    rid = c.history()[0]["id"]
    assert f"rollout {rid} partial: 2 of 3 hosts succeeded; h2 failed (within max_failures 1)" \
        in r.stdout, r.stdout
    assert c.history()[0]["state"] == "partial"
    text = c.cli("history").stdout.splitlines()[0]
    assert "PARTIAL (2/3 ok)" in text, text
    assert c.deploy("app", "v2.0").returncode == 0


def test_control_commands_wait_for_the_orchestrators_answer(make) -> None:  # noqa: ANN001
    c = make(n=1)
    r = c.cli("promote", "deadbeef")
    assert r.returncode == 77, r.stdout + r.stderr
    assert r.stderr.strip() == ("rollout deadbeef: promote refused: no rollout 'deadbeef' "
                                "is known")
    assert c.deploy("app", "v1.0").returncode == 0
    rid = c.history()[0]["id"]
    for action in ("abort", "pause", "resume"):
        r = c.cli(action, rid)
        assert r.returncode == 77, r.stdout + r.stderr
        assert f"{action} refused: rollout {rid} is succeeded; only a running or paused " \
            "rollout can be steered" in r.stderr


def test_pause_and_resume(make) -> None:  # noqa: ANN001
    c = make(n=3, sleep=3)
    p = c.deploy_async("app", "v1.0")
    assert wait_for(lambda: c.history() and c.history()[0]["hosts"][0]["state"] == "requested",
                    30)
    rid = c.history()[0]["id"]
    r = c.cli("pause", rid)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"rollout {rid}: pausing: hosts in flight finish, no more start"
    assert wait_for(lambda: c.history()[0]["state"] == "paused", 30), c.history()[0]
    assert [h["state"] for h in c.history()[0]["hosts"]][1:] == ["pending", "pending"]
    time.sleep(1)
    assert c.version("h2") is None
    assert c.cli("resume", rid).returncode == 0
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert {c.version(h) for h in c.hosts} == {"v1.0"}
