"""Which statuses are notifications, and the words they make (the mapping
the real orchestrator's statuses go through in test_outcomes.py)."""

from __future__ import annotations

import pytest

from deploybus.daemons.notifier import events
from deploybus.protocol import BuildState, CiBuild, ControlAction, RolloutState, RolloutStatus

pytestmark = pytest.mark.unit
AT = "2026-01-01T00:00:00Z"
COMMIT = "a" * 40


def record(**kw: object) -> dict:
    steps = kw.pop("steps", {"h1": ("succeeded", None), "h2": ("failed", None)})
    base = {"project": "app", "environment": "production", "ref": "refs/tags/v1.4",
            "commit": COMMIT, "user": "alice", "action": "deploy", "state": "failed",
            "strategy": {"max_failures": 0},
            "hosts": [{"host": h, "state": st, "rolled_back": rb, "message": None}
                      for h, (st, rb) in steps.items()]}  # type: ignore[attr-defined]
    return base | kw


def test_only_rollout_starts_and_ends_are_notifications() -> None:
    kind = events.status_kind
    assert kind(RolloutStatus(rollout="r", state=RolloutState.RUNNING, hosts=["h1"],
                              phases=[["h1"]])) == "started"
    assert kind(RolloutStatus(rollout="r", state=RolloutState.PAUSED, hosts=["h1"],
                              phases=[["h1"]])) == "started"  # resumed while paused
    for state in ("succeeded", "partial", "failed", "aborted"):
        assert kind(RolloutStatus(rollout="r", state=RolloutState(state))) == "finished"
    # a host settled, a pause, a resume, a refusal, control answers (even naming a
    # final state): nothing
    assert kind(RolloutStatus(rollout="r", state=RolloutState.RUNNING, host="h1",
                              host_state="failed", done=1, total=2)) is None
    assert kind(RolloutStatus(rollout="r", state=RolloutState.PAUSED, reason="p")) is None
    assert kind(RolloutStatus(rollout="r", state=RolloutState.RUNNING)) is None
    assert kind(RolloutStatus(rollout="r", state=RolloutState.REFUSED, reason="x")) is None
    assert kind(RolloutStatus(rollout="r", state=RolloutState.FAILED,
                              control=ControlAction.ABORT, control_id="c" * 32,
                              control_refused="already finished")) is None
    assert kind(RolloutStatus(rollout="r", state=None, control_id="c" * 32,
                              control_refused="unknown")) is None


def test_most_specific_event_the_project_listens_to() -> None:
    s = RolloutStatus(rollout="r-123", state=RolloutState.FAILED, succeeded=3, failed=2,
                      total=5, reason="halted: ...")
    rec = record(steps={"h1": ("succeeded", "ok"), "h2": ("failed", None),
                        "h3": ("failed", None), "h4": ("succeeded", "ok"),
                        "h5": ("succeeded", "ok")})
    occ = events.from_status(s, "finished", rec, AT)
    assert occ.candidates == ("rolled_back", "halted", "failed")
    assert occ.for_project(["failed"])["event"] == "failed"  # type: ignore[index]
    assert occ.for_project(["failed", "halted"])["event"] == "halted"  # type: ignore[index]
    assert occ.for_project(["succeeded", "started"]) is None
    facts = occ.for_project(["failed"])
    assert facts is not None
    assert facts["text"] == ("app v1.4 to production: halted, failed on 2 of 5 hosts (h2, h3); "
                             "rolled back on h1, h4, h5 (rollout r-123)")
    # within max_failures: not halted
    occ = events.from_status(s, "finished", record(strategy={"max_failures": 2}), AT)
    assert occ.candidates == ("failed",)


def test_words_for_the_cases_without_hosts_or_rollback() -> None:
    # the orchestrator failed a rollout before any host (its own error): no counts
    s = RolloutStatus(rollout="r-9", state=RolloutState.FAILED,
                      reason="project or environment no longer configured")
    facts = events.from_status(s, "finished", record(steps={}), AT).for_project(["failed"])
    assert facts is not None
    assert facts["text"] == ("app v1.4 to production: failed: project or environment no "
                             "longer configured (rollout r-9)")
    # auto-rollback on a first deploy: nothing to go back to, which is no failure
    s = RolloutStatus(rollout="r-1", state=RolloutState.FAILED, succeeded=1, failed=1, total=2,
                      rolled_back={"h1": "nothing to roll back to (first deploy)"})
    occ = events.from_status(s, "finished", record(
        steps={"h1": ("succeeded", "none"), "h2": ("failed", None)}), AT)
    assert occ.candidates == ("halted", "failed")
    facts = occ.for_project(["failed"])
    assert facts is not None and "rollback" not in facts["text"]
    # a rollback that could not switch a host back says so
    s = RolloutStatus(rollout="r-2", state=RolloutState.FAILED, succeeded=1, failed=1, total=2,
                      rolled_back={"h1": "rollback failed: switch failed"})
    facts = events.from_status(s, "finished", record(
        steps={"h1": ("succeeded", "failed"), "h2": ("failed", None)}), AT).for_project(
        ["failed"])
    assert facts is not None and facts["text"].endswith("; rollback failed on h1 (rollout r-2)")


def test_ci_failed_only_for_a_finished_build_without_success() -> None:
    def build(state: str, result: str | None) -> CiBuild:
        return CiBuild(project="app", ref="refs/heads/main", commit=COMMIT,
                       state=BuildState(state), backend="jenkins", job="app", build="j/app#1",
                       result=result)
    assert events.from_build(build("finished", "SUCCESS"), AT) is None
    assert events.from_build(build("finished", "success"), AT) is None
    assert events.from_build(build("started", None), AT) is None
    assert events.from_build(build("error", None), AT) is None
    for result in ("FAILURE", "UNSTABLE", "ABORTED", "failure", None):
        occ = events.from_build(build("finished", result), AT)
        assert occ is not None and occ.candidates == ("ci_failed",)


def test_slack_reserved_characters_are_escaped() -> None:
    assert events.slack_text("a <b> & c") == "a &lt;b&gt; &amp; c"


def test_secrets_in_reasons_do_not_leave() -> None:
    s = RolloutStatus(rollout="r-3", state=RolloutState.FAILED,
                      reason="fetch failed: https://ci:ghp_token123@git.example.org/app.git")
    facts = events.from_status(s, "finished", record(steps={}), AT).for_project(["failed"])
    assert facts is not None
    assert "ghp_token123" not in str(facts)
