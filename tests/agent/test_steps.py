"""The agent's deploy steps with real git, real scripts and real processes,
on an in-process bus: shared links, health checks, post-switch and switching
back, rollback, keep N, scripts' environment, user, timeout and output."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from deploybus import envelope
from tests.agent.harness import process_gone, wait_until
from tests.conftest import free_port

pytestmark = pytest.mark.unit


def release_dirs(h) -> list[str]:  # noqa: ANN001
    return sorted(p.name for p in h.site.layout().releases.iterdir())


# -- shared ------------------------------------------------------------------------------

def test_shared_entries_are_linked_into_each_release_and_survive_it(harness) -> None:
    h = harness({"app": {"shared": ["log", ".env", "storage/uploads"], "scripts": {
        "post": 'echo "written by $DEPLOYBUS_RELEASE" > log/post.$DEPLOYBUS_RELEASE '
                '&& grep -q SECRET .env'}}}, start=False)
    h.repo.commit("v1", {"app.py": "print(1)\n", "storage/uploads/seed.txt": "seed v1\n",
                         "storage/cache/keep": ""})
    lay = h.site.layout()
    (lay.shared).mkdir(parents=True)
    (lay.shared / ".env").write_text("SECRET=1\n")  # provisioned by the operator
    h.start()
    r1 = h.deploy("v1")
    assert r1["status"] == "succeeded", r1
    cur = lay.current
    for entry in ("log", ".env", "storage/uploads"):
        link = cur / entry
        assert link.is_symlink(), entry
        assert not os.path.isabs(os.readlink(link)), "links are relative: releases can move"
        assert link.resolve() == (lay.shared / entry).resolve()
    assert (cur / ".env").read_text() == "SECRET=1\n"
    # The repository's copy seeded the shared directory the first time.
    assert (lay.shared / "storage" / "uploads" / "seed.txt").read_text() == "seed v1\n"
    assert (cur / "storage" / "cache").is_dir() and not (cur / "storage").is_symlink()

    h.repo.commit("v2", {"storage/uploads/seed.txt": "seed v2\n"})
    r2 = h.deploy("v2")
    assert r2["status"] == "succeeded", r2
    # What the first release wrote is still there for the second...
    assert sorted(p.name for p in (cur / "log").iterdir()) == sorted(
        [f"post.{r1['release']}", f"post.{r2['release']}"])
    # ... and shared data is never overwritten by a later checkout.
    assert (cur / "storage" / "uploads" / "seed.txt").read_text() == "seed v1\n"
    assert (lay.releases / r1["release"] / "log").resolve() == (lay.shared / "log").resolve()


def test_shared_entry_under_a_symlinked_directory_of_the_checkout_is_refused(harness) -> None:
    # (git archive's own checks already refuse links that leave the checkout;
    # this one stays inside, and the shared link would still not land where
    # the config says.)
    h = harness({"app": {"shared": ["data/uploads"]}}, start=False)
    os.symlink("elsewhere", h.repo.work / "data")
    h.repo.commit("v1", {"elsewhere/file": "x\n"})
    h.start()
    r = h.deploy("v1")
    assert r["status"] == "failed"
    assert r["reason"] == "shared entry 'data/uploads': data in the release is not a directory"
    assert not h.site.layout().current.exists()
    assert not (h.site.layout().releases / f"{r['release']}.partial").exists()


# -- health --------------------------------------------------------------------------------

def test_failing_health_command_keeps_the_old_release_serving(harness) -> None:
    h = harness({"app": {"health": {"command": "test -f HEALTHY", "retries": 3,
                                    "interval": 0.1, "timeout": 5}}}, start=False)
    h.repo.commit("v1", {"HEALTHY": "yes\n"})
    h.start()
    r1 = h.deploy("v1")
    assert r1["status"] == "succeeded", r1
    h.repo.commit("v2", remove=("HEALTHY",))
    r2 = h.deploy("v2")
    assert r2["status"] == "failed"
    assert r2["reason"].startswith("health check failed after 3 attempt(s): health check "
                                   "(attempt 3/3) failed with exit code 1")
    lay = h.site.layout()
    assert lay.current_release() == r1["release"]
    assert lay.info(r2["release"])["state"] == "failed"
    steps = [p["message"] for p in h.events.progress(r2["rollout"]) if p["step"] == "health"]
    assert sum("running health check" in m for m in steps) == 3


def test_health_url_checks_what_the_post_script_started(harness, tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "server.pid"
    h = harness({"app": {
        "scripts": {"post": f"nohup python3 -m http.server {port} --bind 127.0.0.1 "
                            f"--directory . >/dev/null 2>&1 & echo $! > {pidfile}"},
        "health": {"url": f"http://127.0.0.1:{port}/VERSION", "retries": 50,
                   "interval": 0.1, "timeout": 2}}}, start=False)
    h.repo.commit("v1")
    h.start()
    try:
        r = h.deploy("v1")
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert r["status"] == "succeeded", r
    messages = [p["message"] for p in h.events.progress(r["rollout"])]
    assert any(f"GET http://127.0.0.1:{port}/VERSION answered 200" in m for m in messages)

    # Nothing listens any more: the next release fails its check and is not served.
    h.restart({"app": {"health": {"url": f"http://127.0.0.1:{port}/VERSION", "retries": 2,
                                  "interval": 0.1, "timeout": 1}}})
    h.repo.commit("v2")
    r2 = h.deploy("v2")
    assert r2["status"] == "failed"
    assert "health check failed after 2 attempt(s)" in r2["reason"]
    assert "Connection refused" in r2["reason"]
    assert h.site.layout().current_release() == r["release"]


# -- post_switch and switching back ----------------------------------------------------------------

def test_failing_post_switch_switches_back_and_reruns_it_for_the_old_release(
        harness, tmp_path: Path) -> None:
    log = tmp_path / "post_switch.log"
    h = harness({"app": {"scripts": {
        "post_switch": f'echo "$DEPLOYBUS_ACTION $DEPLOYBUS_RELEASE $(cat VERSION)" >> {log}; '
                       f'grep -q v1 VERSION || {{ echo "reload failed"; exit 4; }}'}}},
        start=False)
    h.repo.commit("v1")
    h.start()
    r1 = h.deploy("v1")
    assert r1["status"] == "succeeded", r1
    h.repo.commit("v2")
    r2 = h.deploy("v2")
    assert r2["status"] == "failed"
    assert r2["reason"] == (f"post_switch script failed with exit code 4: reload failed; "
                            f"switched back to {r1['release']}")
    assert r2["previous_release"] == r1["release"]
    lay = h.site.layout()
    assert lay.current_release() == r1["release"]
    assert (lay.current / "VERSION").read_text() == "v1\n"
    assert lay.info(r2["release"])["state"] == "failed"
    assert log.read_text().splitlines() == [
        f"deploy {r1['release']} v1", f"deploy {r2['release']} v2",
        f"rollback {r1['release']} v1"]


def test_failing_post_switch_on_the_first_deploy_removes_current_again(harness) -> None:
    h = harness({"app": {"scripts": {"post_switch": "exit 1"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    r = h.deploy("v1")
    assert r["status"] == "failed"
    assert r["reason"].endswith("; current removed again (first deploy)")
    lay = h.site.layout()
    assert not os.path.lexists(lay.current)
    assert lay.info(r["release"])["state"] == "failed"


# -- rollback ----------------------------------------------------------------------------------------

def test_rollback_goes_to_the_newest_earlier_good_release(harness, tmp_path: Path) -> None:
    log = tmp_path / "post_switch.log"
    h = harness({"app": {"scripts": {
        "post": "test ! -f BROKEN",
        "post_switch": f'echo "$DEPLOYBUS_ACTION $DEPLOYBUS_RELEASE $DEPLOYBUS_COMMIT '
                       f'$DEPLOYBUS_PREVIOUS_RELEASE" >> {log}'}}}, start=False)
    c1 = h.repo.commit("v1")
    h.start()
    r1 = h.deploy("v1")
    h.repo.commit("v2")
    r2 = h.deploy("v2")
    h.repo.commit("v3", {"BROKEN": "1"})
    r3 = h.deploy("v3")
    h.repo.commit("v4", remove=("BROKEN",))
    r4 = h.deploy("v4")
    assert [r["status"] for r in (r1, r2, r3, r4)] == ["succeeded", "succeeded", "failed",
                                                        "succeeded"]
    lay = h.site.layout()
    assert (lay.releases / r3["release"]).is_dir(), "a failed release is kept, marked failed"

    back = h.deploy(None, action="rollback")
    assert back["status"] == "succeeded", back
    assert (back["action"], back["release"], back["previous_release"]) == \
        ("rollback", r2["release"], r4["release"]), "the failed v3 is skipped"
    assert lay.current_release() == r2["release"]
    assert log.read_text().splitlines()[-1] == \
        f"rollback {r2['release']} {r2['commit']} {r4['release']}"

    again = h.deploy(None, action="rollback")
    assert (again["status"], again["release"], again["commit"]) == \
        ("succeeded", r1["release"], c1)
    none_left = h.deploy(None, action="rollback")
    assert none_left["status"] == "failed"
    assert none_left["reason"] == f"no good release older than {r1['release']} to roll back to"

    to_failed = h.deploy(None, action="rollback", release=r3["release"])
    assert to_failed["status"] == "failed"
    assert to_failed["reason"] == f"release {r3['release']} is marked failed; not rolling " \
                                  f"back to it"
    missing = h.deploy(None, action="rollback", release="20000101T000000-deadbeef-nothere")
    assert "does not exist here" in missing["reason"]
    forward = h.deploy(None, action="rollback", release=r4["release"])
    assert forward["status"] == "succeeded" and lay.current_release() == r4["release"]
    assert lay.current_release() == r4["release"]


def test_failing_post_switch_during_rollback_switches_back(harness, tmp_path: Path) -> None:
    h = harness({"app": {"scripts": {"post_switch": "grep -q v2 VERSION"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    h.restart({"app": {}})
    r1 = h.deploy("v1")
    h.repo.commit("v2")
    r2 = h.deploy("v2")
    h.restart({"app": {"scripts": {"post_switch": "grep -q v2 VERSION"}}})
    back = h.deploy(None, action="rollback")
    assert back["status"] == "failed"
    assert back["release"] == r1["release"]
    assert back["reason"].endswith(f"switched back to {r2['release']}")
    assert h.site.layout().current_release() == r2["release"]


def test_rollback_with_nothing_deployed_fails(harness) -> None:
    h = harness({"app": {}})
    r = h.deploy(None, action="rollback")
    assert (r["status"], r["reason"]) == ("failed", "nothing is deployed here to roll back from")


# -- keep N -----------------------------------------------------------------------------------------

def test_cleanup_keeps_current_and_the_rollback_target(harness) -> None:
    h = harness({"app": {"keep": 1, "scripts": {"post": "test ! -f BROKEN"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    r1 = h.deploy("v1")
    h.repo.commit("v2")
    r2 = h.deploy("v2")
    assert release_dirs(h) == sorted([r1["release"], r2["release"]]), \
        "keep 1, but v1 is where a rollback would go"
    h.repo.commit("v3", {"BROKEN": "1"})
    r3 = h.deploy("v3")
    h.repo.commit("v4", remove=("BROKEN",))
    r4 = h.deploy("v4")
    assert r3["status"] == "failed" and r4["status"] == "succeeded"
    assert release_dirs(h) == sorted([r2["release"], r4["release"]])
    back = h.deploy(None, action="rollback")
    assert back["release"] == r2["release"]


# -- the journal and acking --------------------------------------------------------------------------

def test_request_is_journaled_and_acked_before_the_deploy_runs(harness, tmp_path: Path) -> None:
    started = tmp_path / "pre.started"
    h = harness({"app": {"scripts": {"pre": f"touch {started}; sleep 2"}}}, start=False)
    h.repo.commit("v1")
    agent = h.start()
    env = h.site.request("v1")
    rollout = h.site.send(h.bus, env)
    assert wait_until(started.exists, 10)
    sub = agent.agent.dispatcher.subscriptions[0]
    assert sub.unacked == {} and not sub.q.messages, \
        "the broker has its ack while the deploy still runs"
    entry = h.site.journal(rollout)
    assert entry["state"] == "running" and entry["step"] == "pre"
    assert entry["request"]["id"] == env.id and entry["request"]["ref"] == "v1"
    assert entry["script"]["pgid"] > 0
    result = h.events.result(rollout)
    assert result["status"] == "succeeded"
    assert wait_until(lambda: h.site.journal(rollout).get("published") is True, 10)
    done = h.site.journal(rollout)
    assert done["state"] == "done" and done["result"]["release"] == result["release"]
    assert "script" not in done


def test_a_request_is_acknowledged_at_once_even_behind_another_deploy(harness,
                                                                     tmp_path: Path) -> None:
    """The orchestrator fails a host whose agent stays silent for ack_timeout:
    the agent says "accepted" on receipt, before the deploy (or the deploy
    ahead of it in the project's queue) runs, and again for a repeat of a
    request still in progress."""
    started = tmp_path / "pre.started"
    h = harness({"app": {"scripts": {"pre": f"touch {started}; sleep 3"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    first = h.site.send(h.bus, h.site.request("v1"))
    assert wait_until(started.exists, 10)
    t0 = time.monotonic()
    second_env = h.site.request("v1")
    second = h.site.send(h.bus, second_env)
    ack = h.events.wait(lambda e: e.type == "deploy.progress" and e.body.get("rollout") == second,
                        timeout=2)
    assert time.monotonic() - t0 < 1.0, "the acknowledgement waited for something"
    (entry,) = ack.body["entries"]
    assert entry["step"] == "accepted"
    assert entry["message"] == f"accepted; waiting for {first} to finish"
    assert not h.events.results(first), "acknowledged before the deploy ahead of it ended"
    # asked again meanwhile (an orchestrator that restarted): the result
    # answers the repeat, the one request id that orchestrator knows
    again = h.site.request("v1", rollout=second)
    h.site.send(h.bus, again)
    h.events.wait(lambda e: e.type == "deploy.progress" and e.body.get("rollout") == second
                  and e.body["entries"][0]["message"] == "already accepted; in progress", 5)
    assert h.events.result(first)["status"] == "succeeded"
    result = h.events.result(second)
    assert result["status"] == "succeeded" and result["request_id"] == again.id
    steps = [e["step"] for e in h.events.progress(first)]
    assert steps[0] == "accepted" and steps.count("accepted") == 1, steps


def test_a_rollout_is_never_run_twice(harness, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    h = harness({"app": {"scripts": {"pre": f"echo run >> {runs}"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    env = h.site.request("v1")
    rollout = h.site.send(h.bus, env)
    first = h.events.result(rollout)
    h.site.send(h.bus, env)  # a broker redelivery: same message id
    again = h.events.result(rollout, duplicate=True)
    resent = h.site.request("v1", rollout=rollout)  # a resend: new id, same rollout
    h.site.send(h.bus, resent)
    assert wait_until(lambda: len(h.events.results(rollout)) == 3, 10)
    assert runs.read_text() == "run\n"
    for r in h.events.results(rollout)[1:]:
        assert r["duplicate"] is True and r["release"] == first["release"]
    assert again["status"] == "succeeded"
    other = h.site.request(None, rollout=rollout, action="rollback")
    h.site.send(h.bus, other)
    refused = h.events.wait(lambda e: getattr(e, "type", "") == "deploy.result"
                            and e.body.get("request_id") == other.id).body
    assert refused["status"] == "refused"
    assert refused["reason"] == f"rollout id {rollout} was already used here for another request"
    decisions = [e["decision"] for e in _audit(h)]
    assert decisions == ["accepted", "duplicate", "duplicate", "refused"]


def _audit(h) -> list[dict]:  # noqa: ANN001
    import json
    return [json.loads(x) for x in (h.site.state / "audit.jsonl").read_text().splitlines()]


def test_unpublished_result_is_sent_when_the_agent_starts(harness) -> None:
    h = harness({"app": {}}, start=False)
    j = h.site.state / "journal"
    j.mkdir(parents=True)
    (j / "r-unsent.json").write_text(
        '{"state": "done", "published": false, "rollout": "r-unsent", "action": "deploy", '
        '"request": {"id": "request-0001", "project": "app", "environment": "prod"}, '
        '"result": {"status": "succeeded", "release": "R"}}')
    h.start()
    assert h.events.result("r-unsent")["release"] == "R"
    assert wait_until(lambda: h.site.journal("r-unsent")["published"] is True, 10)


def test_a_deploy_killed_after_its_release_was_ok_is_reported_complete(harness,
                                                                       tmp_path: Path) -> None:
    """The steps after post_switch are recorded lazily: the journal of a deploy
    killed in cleanup still names an earlier step. The release's "ok" and
    ``current`` tell recovery that it was complete; nothing is switched back."""
    log = tmp_path / "post_switch.log"
    h = harness({"app": {"scripts": {"post_switch": f"echo $DEPLOYBUS_ACTION >> {log}"}}},
                start=False)
    h.repo.commit("v1")
    h.repo.commit("v2")
    h.start()
    r1, r2 = h.deploy("v1"), h.deploy("v2")
    assert r1["status"] == r2["status"] == "succeeded"
    lay = h.site.layout()
    h.agents[0].stop()  # a warm stop; the journal entry below stands for a kill -9 in cleanup
    (h.site.state / "journal" / "r-killed.json").write_text(json.dumps({
        "rollout": "r-killed", "action": "deploy", "state": "running", "step": "post_switch",
        "release": r2["release"], "previous_release": r1["release"],
        "request": {"id": "request-0002", "project": "app", "environment": "prod", "ref": "v2",
                    "user": "tester"}}))
    h.start()
    result = h.events.result("r-killed")
    assert result["status"] == "succeeded", result
    assert result["reason"] == \
        "agent restarted after the deploy was complete (its journal was at post_switch)"
    assert lay.current_release() == r2["release"]
    assert log.read_text().split() == ["deploy", "deploy"], "post_switch did not run again"


# -- scripts ------------------------------------------------------------------------------------------

def test_scripts_get_the_deploybus_environment(harness, tmp_path: Path) -> None:
    out = tmp_path / "env"
    h = harness({"app": {"scripts": {"post": f"env | grep ^DEPLOYBUS_ | sort > {out}.$(cat VERSION)"}}},
                start=False)
    c1 = h.repo.commit("v1")
    h.start()
    r1 = h.deploy("v1")
    c2 = h.repo.commit("v2")
    r2 = h.deploy("v2")
    env = dict(line.split("=", 1) for line in Path(f"{out}.v2").read_text().splitlines())
    lay = h.site.layout()
    assert env == {
        "DEPLOYBUS_ACTION": "deploy", "DEPLOYBUS_COMMIT": c2, "DEPLOYBUS_ENV": "prod",
        "DEPLOYBUS_HOST": "h1", "DEPLOYBUS_PREVIOUS_COMMIT": c1,
        "DEPLOYBUS_PREVIOUS_RELEASE": r1["release"], "DEPLOYBUS_PROJECT": "app",
        "DEPLOYBUS_REF": "v2", "DEPLOYBUS_RELEASE": r2["release"],
        "DEPLOYBUS_RELEASE_DIR": str(lay.releases / r2["release"]),
        "DEPLOYBUS_ROLLOUT_ID": r2["rollout"], "DEPLOYBUS_SHARED_DIR": str(lay.shared),
        "DEPLOYBUS_USER": "tester"}


@pytest.mark.skipif(os.geteuid() != 0, reason="running scripts as another user needs root")
def test_scripts_run_as_the_configured_user_and_own_the_release(harness) -> None:
    h = harness({"app": {"user": "nobody", "shared": ["tmp"], "scripts": {
        "post": "id -un; touch made-by-post; touch tmp/x", "post_switch": "id -un"},
        "health": {"command": "id -un"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    r = h.deploy("v1")
    assert r["status"] == "succeeded", r
    lines = [line for p in h.events.progress(r["rollout"]) for line in p["lines"]]
    assert lines.count("nobody") == 3  # post, health, post_switch
    rel = h.site.layout().releases / r["release"]
    nobody = 65534
    assert (rel / "made-by-post").stat().st_uid == nobody
    assert (rel / "VERSION").stat().st_uid == nobody
    assert (h.site.layout().shared / "tmp" / "x").stat().st_uid == nobody


def test_unknown_user_fails_before_anything_runs(harness, tmp_path: Path) -> None:
    h = harness({"app": {"user": "no-such-user-here", "scripts": {"pre": f"touch {tmp_path}/x"}}},
                start=False)
    h.repo.commit("v1")
    h.start()
    r = h.deploy("v1")
    assert (r["status"], r["reason"]) == ("failed",
                                          "user 'no-such-user-here' does not exist on this host")
    assert not (tmp_path / "x").exists()


def test_script_timeout_kills_everything_the_script_started(harness, tmp_path: Path) -> None:
    bg = tmp_path / "bg.pid"
    h = harness({"app": {"script_timeout": 1, "scripts": {
        "pre": f"sleep 30 & echo $! > {bg}; sleep 30"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    started = time.monotonic()
    r = h.deploy("v1")
    assert (r["status"], r["reason"]) == ("failed", "pre script timed out after 1s")
    assert time.monotonic() - started < 10
    assert wait_until(lambda: process_gone(int(bg.read_text())), 5)
    assert not h.site.layout().current.exists()


def test_output_is_streamed_while_the_script_runs(harness) -> None:
    h = harness({"app": {"scripts": {
        "pre": "echo first; sleep 2; for i in $(seq 1 120); do echo line $i; done; sleep 1"}}},
        start=False)
    h.repo.commit("v1")
    h.start()
    env = h.site.request("v1")
    rollout = h.site.send(h.bus, env)
    h.events.wait(lambda e: getattr(e, "type", "") == "deploy.progress"
                  and any("first" in x.get("lines", [])
                          for x in envelope.progress_entries(e.body)), 5)
    first_at = time.monotonic()
    result = h.events.result(rollout)
    assert result["status"] == "succeeded"
    assert time.monotonic() - first_at > 2, "the first line came while the script ran"
    batches = [p["lines"] for p in h.events.progress(rollout) if p["message"] == "pre output"]
    lines = [x for b in batches for x in b]
    assert lines == ["first"] + [f"line {i}" for i in range(1, 121)]
    assert max(len(b) for b in batches) <= 50 and len(batches) >= 4


def test_output_is_bounded(harness) -> None:
    h = harness({"app": {"output": {"max_bytes": 20000, "line_chars": 100}, "scripts": {
        "pre": "head -c 300000 /dev/zero | tr '\\0' x; echo; yes 0123456789 | head -n 100000"}}},
        start=False)
    h.repo.commit("v1")
    h.start()
    r = h.deploy("v1")
    assert r["status"] == "succeeded"
    progress = h.events.progress(r["rollout"])
    lines = [x for p in progress if p["message"] == "pre output" for x in p["lines"]]
    assert lines[0] == "x" * 100 + " ... [line cut]"
    assert re.fullmatch(r"\.\.\. output truncated after (\d+) bytes", lines[-1])
    assert 19900 < int(lines[-1].split()[-2]) <= 20000
    assert lines[1:-1] == ["0123456789"] * (len(lines) - 2)
    assert sum(len(x) + 1 for x in lines) < 21000
    assert any("bytes of output not shown" in p["message"] for p in progress)


# -- concurrency and stopping --------------------------------------------------------------------

def test_projects_run_side_by_side_and_each_project_one_at_a_time(harness,
                                                                  tmp_path: Path) -> None:
    log = tmp_path / "log"
    pre = (f'echo "start $DEPLOYBUS_PROJECT $DEPLOYBUS_ROLLOUT_ID" >> {log}; sleep 1; '
           f'echo "end $DEPLOYBUS_PROJECT $DEPLOYBUS_ROLLOUT_ID" >> {log}')
    h = harness({"a": {"scripts": {"pre": pre}}, "b": {"scripts": {"pre": pre}}}, start=False)
    h.repo.commit("v1")
    h.start()
    a1, a2, b1 = (h.site.request("v1", project=p) for p in ("a", "a", "b"))
    for env in (a1, a2, b1):
        h.site.send(h.bus, env)
    for env in (a1, a2, b1):
        assert h.events.result(env.body["rollout"])["status"] == "succeeded"
    events = log.read_text().splitlines()
    ra1, ra2, rb1 = (e.body["rollout"] for e in (a1, a2, b1))
    assert events.index(f"end a {ra1}") < events.index(f"start a {ra2}"), "a: one at a time"
    assert events.index(f"start b {rb1}") < events.index(f"end a {ra1}"), "b ran beside a"


def test_warm_stop_finishes_the_running_deploy_and_reports_queued_ones(
        harness, tmp_path: Path) -> None:
    started = tmp_path / "started"
    h = harness({"app": {"scripts": {"pre": f"touch {started}; sleep 1.5"}}}, start=False)
    h.repo.commit("v1")
    agent = h.start()
    first, second = h.site.request("v1"), h.site.request("v1")
    h.site.send(h.bus, first)
    h.site.send(h.bus, second)
    assert wait_until(started.exists, 10)
    assert wait_until(lambda: h.site.journal(second.body["rollout"]) is not None, 10)
    agent.stop()
    h.agents.clear()
    assert h.events.result(first.body["rollout"], 5)["status"] == "succeeded"
    queued = h.events.result(second.body["rollout"], 5)
    assert (queued["status"], queued["reason"]) == ("failed",
                                                    "agent stopped before the deploy started")
    assert h.site.journal(second.body["rollout"])["state"] == "done"


def test_a_quiet_step_still_sends_heartbeats(harness, monkeypatch) -> None:
    from deploybus.daemons.deploy_agent import workers as agent_mod
    monkeypatch.setattr(agent_mod, "HEARTBEAT", 0.5)
    h = harness({"app": {"scripts": {"pre": "sleep 2.5"}}}, start=False)
    h.repo.commit("v1")
    h.start()
    r = h.deploy("v1")
    assert r["status"] == "succeeded"
    beats = [p for p in h.events.progress(r["rollout"])
             if p["message"].startswith("still working on pre")]
    assert len(beats) >= 2, h.events.progress(r["rollout"])
    assert all(b["step"] == "pre" for b in beats)
