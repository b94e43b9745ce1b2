"""The deploy agent at its edges: whatever goes wrong during a deploy,
``current`` stays on a release that passed every step; what a journal says
is checked before recovery acts on it; the commit a request signed is the
one deployed, whatever the mirror's refs say; credentials in git URLs stay
out of failure reasons.

Through the agent (the ``harness`` fixture of tests/agent) where the agent's
part matters, through :mod:`steps` directly where only the deploy does."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus import gitutil
from deploybus.config import ProjectConfig
from deploybus.daemons.deploy_agent import scripts, steps
from deploybus.daemons.deploy_agent.journal import Journal, check_entry
from deploybus.errors import DeployError, RefError
from deploybus.layout import Layout
from tests.agent import conftest as agent_conftest
from tests.agent.harness import Repo
from tests.e2e.cluster import git

pytestmark = pytest.mark.unit

#: The agent tests' fixture: a site, its in-process agent and a bus to it.
harness = agent_conftest.harness


def version(layout: Layout) -> str:
    return (layout.current / "VERSION").read_text().strip()


# -- any exception leaves current where it was ---------------------------------------------

def test_a_nul_in_the_user_leaves_current_on_the_old_release(harness) -> None:
    # No pre or post script: before, the first script to meet the NUL in
    # DEPLOYBUS_USER was post_switch, after the switch, and its ValueError
    # left current on a release marked pending.
    h = harness({"app": {"scripts": {"post_switch": "true"}}}, start=False)
    h.repo.commit("v1")
    h.repo.commit("v2")
    h.start()
    r1 = h.deploy("v1")
    assert r1["status"] == "succeeded", r1
    env = h.site.request("v2", user="eve\x00")
    rollout = h.site.send(h.bus, env)

    def answer(e: Any) -> bool:  # a result, or the dead letter of a message refused unread
        if isinstance(e, dict):
            return rollout in str(e.get("body"))
        return e.type == "deploy.result" and e.body.get("rollout") == rollout
    outcome = h.events.wait(answer, 60)
    if not isinstance(outcome, dict):
        assert outcome.body["status"] in ("failed", "refused"), outcome.body
    lay = h.site.layout()
    assert lay.current_release() == r1["release"]
    assert version(lay) == "v1"
    for release in lay.complete_releases():
        assert lay.info(release)["state"] in ("ok", "failed"), "nothing left pending"


def test_a_script_whose_environment_cannot_hold_a_value_fails_as_a_step(
        tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="pre script could not start: embedded null byte"):
        scripts.run_script("pre", "true", cwd=tmp_path, env={"DEPLOYBUS_USER": "eve\x00"},
                           timeout=5, progress=lambda step, message, lines: None)


def _fail_once(monkeypatch: pytest.MonkeyPatch, step: str, exc: Exception) -> list[str]:
    """scripts.run_script raises ``exc`` the first time ``step`` runs for a deploy."""
    real, calls = scripts.run_script, []

    def run_script(name: str, script: str, **kw: Any) -> None:
        calls.append(f"{name} {kw['env']['DEPLOYBUS_ACTION']}")
        if name == step and kw["env"]["DEPLOYBUS_ACTION"] == "deploy" and \
                calls.count(f"{step} deploy") == 2:
            raise exc
        real(name, script, **kw)
    monkeypatch.setattr(scripts, "run_script", run_script)
    return calls


def test_an_exception_after_the_switch_switches_back(harness, monkeypatch,
                                                     tmp_path: Path) -> None:
    log = tmp_path / "post_switch.log"
    h = harness({"app": {"scripts": {
        "post_switch": f'echo "$DEPLOYBUS_ACTION $(cat VERSION)" >> {log}'}}}, start=False)
    h.repo.commit("v1")
    h.repo.commit("v2")
    calls = _fail_once(monkeypatch, "post_switch", ValueError("embedded null byte"))
    h.start()
    r1 = h.deploy("v1")
    assert r1["status"] == "succeeded", r1
    r2 = h.deploy("v2")
    assert r2["status"] == "failed"
    assert r2["reason"] == (f"agent error: ValueError: embedded null byte; "
                            f"switched back to {r1['release']}")
    lay = h.site.layout()
    assert lay.current_release() == r1["release"] and version(lay) == "v1"
    assert lay.info(r2["release"])["state"] == "failed"
    assert calls == ["post_switch deploy", "post_switch deploy", "post_switch rollback"]
    assert log.read_text().splitlines() == ["deploy v1", "rollback v1"]
    r3 = h.deploy("v2")
    assert r3["status"] == "succeeded" and version(lay) == "v2", "the agent goes on"


def test_an_exception_before_the_switch_marks_the_release_failed(harness,
                                                                 monkeypatch) -> None:
    h = harness({"app": {"health": {"command": "true", "retries": 1}}}, start=False)
    h.repo.commit("v1")
    h.repo.commit("v2")
    real_check = steps.health.check
    seen: list[int] = []

    def check(*args: Any, **kw: Any) -> None:
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("a bug in the health check")
        real_check(*args, **kw)
    monkeypatch.setattr(steps.health, "check", check)
    h.start()
    r1 = h.deploy("v1")
    r2 = h.deploy("v2")
    assert r1["status"] == "succeeded"
    assert (r2["status"], r2["reason"]) == ("failed",
                                            "agent error: RuntimeError: a bug in the health check")
    lay = h.site.layout()
    assert lay.current_release() == r1["release"]
    assert lay.info(r2["release"])["state"] == "failed", "not left pending"
    assert not list(lay.releases.glob("*.partial"))


# -- journal recovery checks what it reads ----------------------------------------------------

def test_a_journal_entry_naming_a_release_outside_the_project_touches_nothing(
        harness, tmp_path: Path) -> None:
    log = tmp_path / "post_switch.log"
    h = harness({"app": {"scripts": {"post_switch": f"pwd >> {log}"}}}, start=False)
    h.repo.commit("v1")
    h.repo.commit("v2")
    h.start()
    r1, r2 = h.deploy("v1"), h.deploy("v2")
    assert r1["status"] == r2["status"] == "succeeded"
    h.agents[0].stop()
    h.agents.clear()
    lay = h.site.layout()
    # As if killed during post_switch of v2, with a planted previous release:
    # "releases/../../etc" is <root>/etc, which exists.
    lay.set_state(r2["release"], "pending")
    outside = h.site.root / "etc"
    outside.mkdir()
    (h.site.state / "journal" / "r-planted.json").write_text(json.dumps({
        "rollout": "r-planted", "action": "deploy", "state": "running", "step": "post_switch",
        "release": r2["release"], "previous_release": "../../etc",
        "request": {"id": "request-0001", "project": "app", "environment": "prod", "ref": "v2",
                    "user": "tester"}}))
    before = {p: sorted(os.listdir(p)) for p in (h.site.root, outside)}
    log_before = log.read_text()
    h.start()
    result = h.events.result("r-planted")
    assert result["status"] == "failed"
    assert "journal entry unusable (previous_release: invalid release '../../etc')" in \
        result["reason"], result
    assert result.get("previous_release") is None, "a bad name is not passed on"
    assert os.readlink(lay.current) == os.path.join("releases", r2["release"])
    assert {p: sorted(os.listdir(p)) for p in (h.site.root, outside)} == before
    assert log.read_text() == log_before, "no script ran"


@pytest.fixture
def journal_site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A project with one release deployed, for steps.recover."""
    lay = Layout(tmp_path / "srv", "app")
    lay.ensure()
    (lay.releases / "r1").mkdir()
    lay.write_info("r1", {"state": "ok"})
    lay.switch("r1")
    yield {"root": tmp_path / "srv", "state_dir": tmp_path / "state", "layout": lay}


GOOD_ENTRY: dict[str, Any] = {
    "rollout": "r-x", "action": "deploy", "state": "running", "step": "pre",
    "release": "r2", "previous_release": "r1", "script": {"pgid": 424242, "start": 1},
    "request": {"project": "app", "environment": "prod", "ref": "refs/tags/v1",
                "commit": "a" * 40, "user": "tester", "release": None}}


@pytest.mark.parametrize("path, value, problem", [
    (("previous_release",), "../../etc", "previous_release: invalid release"),
    (("release",), "../r2", "release: invalid release"),
    (("release",), "r2.partial", "release: invalid release"),
    (("rollout",), "../r", "rollout: invalid rollout id"),
    (("request", "project"), "../app", "request.project: invalid project"),
    (("request", "environment"), None, "request.environment: invalid environment"),
    (("request", "release"), "/etc", "request.release: invalid release"),
    (("request", "user"), "a\x00b", "request.user: user 'a\\x00b' contains control"),
    (("request", "commit"), "abc1234", "request.commit: commit must be a full commit id"),
    (("request", "ref"), "--upload-pack=x", "request.ref: ref"),
    (("step",), "post; rm -rf /", "step: unknown step"),
    (("action",), "explode", "action: unknown action"),
    (("script",), {"pgid": 1, "start": None}, "script: not a process group"),
    (("script",), {"pgid": 0}, "script: not a process group"),
    (("script",), {"pgid": -4242}, "script: not a process group"),
    (("script",), {"pgid": True}, "script: not a process group"),
    (("script",), {"pgid": "4242"}, "script: not a process group"),
    (("request",), "app", "request: missing"),
])
def test_recovery_checks_every_field_it_reads(journal_site: dict[str, Any], path: tuple[str, ...],
                                              value: Any, problem: str) -> None:
    entry = json.loads(json.dumps(GOOD_ENTRY))
    where = entry
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    killed: list[int] = []
    progress: list[str] = []
    result = steps.recover(entry, None, root=journal_site["root"],
                           state_dir=journal_site["state_dir"], host="h1",
                           progress=lambda step, message, lines: progress.append(message),
                           kill=lambda pgid, start: bool(killed.append(pgid)))
    assert result["status"] == "failed" and result["recovered"] is True
    assert result["reason"].startswith("interrupted: agent restarted; journal entry unusable ("
                                       + problem), result["reason"]
    assert result["reason"].endswith("); nothing was changed")
    assert result["release"] is None and result["previous_release"] is None
    assert killed == [], "no process killed on the word of a bad entry"
    assert os.readlink(journal_site["layout"].current) == os.path.join("releases", "r1")
    assert progress == [result["reason"]]


def test_a_good_entry_passes_the_checks() -> None:
    check_entry(GOOD_ENTRY, steps=steps.STEPS)
    rollback = {"rollout": "r-rb", "action": "rollback", "state": "accepted",
                "request": {"project": "app", "environment": "prod", "ref": None,
                            "release": "20261122T031000.123456-1a2b3c4d-4f2c9e01"}}
    check_entry(rollback, steps=steps.STEPS)
    bare = {"rollout": "r-old", "request": {"project": "app", "environment": "prod",
                                            "ref": "v1", "user": "x" * 128}}
    check_entry(bare, steps=steps.STEPS)


def test_journal_files_are_named_by_rollout_ids(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal")
    j.ensure()
    for bad in ("../x", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(RefError, match="invalid journal entry name"):
            j.path(bad)
    assert j.path("r" * 64 + ".undo") == j.dir / ("r" * 64 + ".undo.json")
    j.write("r1", {"state": "done", "published": True, "result": {}})
    (j.dir / "not a rollout.json").write_text("{}")
    assert [r for r, _ in j.entries()] == ["r1"]
    os.utime(j.dir / "r1.json", (0, 0))
    assert j.prune() == ["r1"]


# -- the signed commit is the one deployed ----------------------------------------------------

def test_through_the_agent_the_signed_commit_wins_over_a_shadowing_ref(harness) -> None:
    h = harness({"app": {"scripts": {"post": "echo $DEPLOYBUS_REF > REF"}}}, start=False)
    tagged = h.repo.commit("release/1.0")
    shadow = h.repo.commit("shadow", push=False)
    git("push", "-q", "origin", f"{shadow}:refs/release/1.0", cwd=h.repo.work)
    abbreviated = h.repo.commit("abbreviated")
    h.repo.commit("branch", push=False)
    git("branch", abbreviated[:7], cwd=h.repo.work)
    git("push", "-q", "origin", abbreviated[:7], cwd=h.repo.work)
    h.start()
    lay = h.site.layout()
    refname, commit = gitutil.resolve_remote(str(h.repo.bare), "release/1.0")
    assert commit == tagged
    for ref in (refname, "release/1.0"):  # the full refname, or the name as typed
        r = h.deploy(ref, commit=commit)
        assert (r["status"], r["commit"]) == ("succeeded", tagged), r
        assert version(lay) == "release/1.0", ref
        assert (lay.current / "REF").read_text() == "release/1.0\n"
    r = h.deploy(abbreviated[:7], commit=abbreviated)
    assert (r["status"], r["commit"]) == ("succeeded", abbreviated), r
    assert version(lay) == "abbreviated"


class Deployer:
    """steps.deploy of project ``app`` from ``repo`` (a mirror per site)."""

    def __init__(self, base: Path, repo: Repo, git_url: str | None = None) -> None:
        self.root, self.state = base / "srv", base / "state"
        self.repo = repo
        self.git_url = git_url or str(repo.bare)
        self.progress: list[str] = []
        self.layout = Layout(self.root, "app")

    def deploy(self, ref: str, commit: str | None, *, ref_name: str | None = None,
               user: str = "tester", scripts_: dict[str, str] | None = None) -> dict[str, Any]:
        pc = ProjectConfig(name="app", git=self.git_url, scripts=scripts_ or {})
        req = steps.Request(rollout=uuid.uuid4().hex[:16], project="app", environment="prod",
                            ref=ref, user=user, commit=commit, ref_name=ref_name)
        return steps.deploy(req, pc, root=self.root, state_dir=self.state, host="h1",
                            progress=lambda step, message, lines: self.progress.append(message))


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    yield Repo(tmp_path / "repo")
    gitutil.close_resolvers()


def test_a_refs_release_does_not_shadow_the_tag_of_the_signed_commit(repo: Repo,
                                                                     tmp_path: Path) -> None:
    tagged = repo.commit("release/1.0")
    shadow = repo.commit("shadow", push=False)
    git("push", "-q", "origin", f"{shadow}:refs/release/1.0", cwd=repo.work)
    refname, commit = gitutil.resolve_remote(str(repo.bare), "release/1.0")
    assert (refname, commit) == ("refs/tags/release/1.0", tagged)
    d = Deployer(tmp_path, repo)
    out = tmp_path / "env"
    r = d.deploy(refname, commit, ref_name="release/1.0",
                 scripts_={"post": f"echo $DEPLOYBUS_REF $DEPLOYBUS_COMMIT > {out}"})
    assert r["status"] == "succeeded", r
    assert version(d.layout) == "release/1.0", "the tag's content, not refs/release/1.0's"
    assert out.read_text().split() == ["release/1.0", tagged]
    info = d.layout.info(r["release"])
    assert (info["commit"], info["ref"], info["refname"]) == (tagged, "release/1.0", refname)
    # In the mirror, git's lookup of the name finds the shadow; a request
    # that still carries the short name, with the commit, deploys the commit.
    assert gitutil.resolve(gitutil.mirror_path(d.state, "app"), "release/1.0") == shadow
    r2 = d.deploy("release/1.0", tagged)
    assert r2["status"] == "succeeded" and r2["commit"] == tagged
    assert version(d.layout) == "release/1.0"


def test_a_branch_named_like_an_abbreviation_does_not_shadow_the_commit(
        repo: Repo, tmp_path: Path) -> None:
    wanted = repo.commit("wanted")
    repo.commit("branch", push=False)
    git("branch", wanted[:7], cwd=repo.work)
    git("push", "-q", "origin", wanted[:7], cwd=repo.work)
    with pytest.raises(RefError, match="give the full commit id"):
        gitutil.resolve_remote(str(repo.bare), wanted[:7])
    refname, commit = gitutil.resolve_remote(str(repo.bare), wanted)
    d = Deployer(tmp_path, repo)
    r = d.deploy(refname, commit)
    assert r["status"] == "succeeded", r
    assert version(d.layout) == "wanted"
    mirror = gitutil.mirror_path(d.state, "app")
    assert gitutil.resolve(mirror, wanted[:7]) != wanted, "git's lookup takes the branch"
    r2 = d.deploy(wanted[:7], wanted)
    assert r2["status"] == "succeeded" and version(d.layout) == "wanted"


def test_the_ref_name_scripts_see_defaults_to_the_short_name(repo: Repo,
                                                            tmp_path: Path) -> None:
    c1 = repo.commit("v1")
    d = Deployer(tmp_path, repo)
    out = tmp_path / "ref"
    r = d.deploy("refs/tags/v1", c1, scripts_={"pre": f"echo $DEPLOYBUS_REF > {out}"})
    assert r["status"] == "succeeded", r
    assert out.read_text() == "v1\n"


def test_a_commit_the_repository_lacks_fails_clearly(repo: Repo, tmp_path: Path) -> None:
    c1 = repo.commit("v1")
    d = Deployer(tmp_path, repo)
    assert d.deploy("refs/tags/v1", c1)["status"] == "succeeded"
    first = d.layout.current_release()
    missing = "0123456789abcdef" * 2 + "01234567"
    r = d.deploy("refs/tags/v2", missing)
    assert r["status"] == "failed"
    assert r["reason"] == (f"commit {missing} (refs/tags/v2) is not in {repo.bare}, even "
                           f"after fetching (deleted, or pushed elsewhere?)")
    assert r["release"] is None and d.layout.current_release() == first
    # an annotated tag's own id names a tag object, not a commit
    repo.commit("v2", push=False)
    git("tag", "-f", "-a", "-m", "v2", "v2", cwd=repo.work)
    git("push", "-q", "origin", "main", "v2", cwd=repo.work)
    tag_object = git("rev-parse", "v2", cwd=repo.work).strip()
    r = d.deploy("refs/tags/v2", tag_object)
    assert r["status"] == "failed" and "is not in" in r["reason"]
    assert d.layout.current_release() == first


def test_a_commit_missing_locally_is_fetched(repo: Repo, tmp_path: Path) -> None:
    c1 = repo.commit("v1")
    d = Deployer(tmp_path, repo)
    assert d.deploy("refs/tags/v1", c1)["status"] == "succeeded"
    c2 = repo.commit("v2")
    r = d.deploy("refs/tags/v2", c2)
    assert r["status"] == "succeeded" and version(d.layout) == "v2"
    assert any(m.startswith(f"{c2[:12]} not in local mirror; fetching") for m in d.progress)


def test_failure_reasons_hide_the_token_of_the_git_url(repo: Repo, tmp_path: Path) -> None:
    d = Deployer(tmp_path, repo, git_url="https://ci:s3cr3t-t0ken@127.0.0.1:1/app.git")
    r = d.deploy("refs/tags/v1", "ab" * 20)
    assert r["status"] == "failed"
    assert "s3cr3t-t0ken" not in r["reason"] and "https://ci:***@127.0.0.1:1/app.git" in \
        r["reason"], r["reason"]
    assert not any("s3cr3t-t0ken" in m for m in d.progress), d.progress


def test_a_user_with_control_characters_is_refused_before_anything_runs(
        repo: Repo, tmp_path: Path) -> None:
    c1 = repo.commit("v1")
    d = Deployer(tmp_path, repo)
    ran = tmp_path / "ran"
    r = d.deploy("refs/tags/v1", c1, user="eve\x00", scripts_={"pre": f"touch {ran}"})
    assert (r["status"], r["reason"]) == ("failed",
                                          "user 'eve\\x00' contains control characters")
    assert r["release"] is None and not ran.exists()
    assert d.layout.complete_releases() == []
