"""kill -9 of a real agent process at every step of a deploy, then a restart.

The agent runs as its own process on RabbitMQ (AMQP). For each kill point a
deploy of v1 is made first, then a deploy of v2 (20,000 files) is stopped
dead at the point:

* ``fetch``: v2 is not in the host's mirror; the mirror's upload-pack is a
  wrapper that waits while a pause file exists
* ``pre``, ``post``, ``health``, ``post_switch``: the script (or health
  command) waits while a pause file exists
* ``checkout``: the 20,000-file export is under way (journal step and a
  half-filled ``.partial`` directory seen)
* ``before-rename``: gdb stops the agent at ``rename(2)`` of the new
  ``current`` link (the temporary link exists, ``current`` is untouched)
* ``after-rename``: gdb lets that ``rename(2)`` complete and stops the agent
  as it returns

No test hooks in the agent: the pauses live in this test's scripts and git
config, and gdb picks the exact system call.

At the kill and after the restart, ``current`` resolves to a complete
release (its file list equals ``git ls-tree`` of its commit). The restarted
agent reports the interrupted request failed (it had been acked, so the
broker never redelivers it), kills the script the dead agent left running,
switches back if the switch had happened, removes partial checkouts and
temporary links, answers a resend of the same rollout from its journal
without running it, and deploys a new rollout of v2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from deploybus.bus import connect
from tests.agent.harness import (
    AgentProcess,
    Events,
    Repo,
    Site,
    process_gone,
    tree,
    wait_until,
)
from tests.conftest import broker_url
from tests.e2e.cluster import git

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.broker]

SCRIPT_POINTS = {"pre": "pre", "post": "post", "health": "health",
                 "post_switch": "post_switch"}
POINTS = ["fetch", "pre", "checkout", "post", "health", "before-rename", "after-rename",
          "post_switch"]
#: The journal step the restarted agent names for each kill point.
STEP_OF = {"before-rename": "switch", "after-rename": "switch"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("crash-repo")
    r = Repo(base)
    r.commit("v1", {"README": "small release\n", "lib/a.py": "a = 1\n"})
    git("clone", "-q", "--mirror", str(r.bare), str(base / "v1only.git"), cwd=base)
    big = {f"d{d:02}/f{f:03}.txt": f"{d} {f} {uuid.uuid4().hex}\n" * 8
           for d in range(100) for f in range(200)}
    r.commit("v2", big, remove=("lib",))
    r.v1only = base / "v1only.git"  # type: ignore[attr-defined]
    return r


def pause(p: Path, step: str) -> str:
    return (f'echo $$ > {p}/{step}.pid; '
            f'if [ -e {p}/{step} ]; then touch {p}/{step}.reached; sleep 300; fi')


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path, repo: Repo) -> Site:
    url = broker_url("rabbitmq-amqp", request, f"k{uuid.uuid4().hex[:10]}")
    p = tmp_path / "pause"
    p.mkdir()
    s = Site(tmp_path, url, {"app": {
        "scripts": {"pre": pause(p, "pre"), "post": pause(p, "post"),
                    "post_switch": f'echo "$DEPLOYBUS_ACTION $DEPLOYBUS_RELEASE" >> '
                                   f'{p}/post_switch.log; ' + pause(p, "post_switch")},
        "health": {"command": pause(p, "health"), "retries": 1, "timeout": 600}}},
        repo=repo)
    s.pause = p  # type: ignore[attr-defined]
    # The host's mirror has v1 only, so v2 must be fetched; its upload-pack
    # waits while the pause file "fetch" exists.
    mirror = s.state / "mirrors" / "app.git"
    mirror.parent.mkdir(parents=True)
    git("clone", "-q", "--mirror", str(repo.v1only), str(mirror), cwd=tmp_path)  # type: ignore
    git("remote", "set-url", "origin", str(repo.bare), cwd=mirror)
    wrapper = tmp_path / "slow-upload-pack"
    wrapper.write_text(f"#!/bin/sh\necho $$ > {p}/fetch.pid\n"
                       f"if [ -e {p}/fetch ]; then touch {p}/fetch.reached; sleep 300; fi\n"
                       f'exec git-upload-pack "$@"\n')
    wrapper.chmod(0o755)
    git("config", "remote.origin.uploadpack", str(wrapper), cwd=mirror)
    return s


def complete(site: Site, repo: Repo) -> str:
    """The release ``current`` resolves to, checked to be complete."""
    lay = site.layout()
    release = lay.current_release()
    assert release is not None and not release.endswith(".partial")
    commit = lay.info(release)["commit"]
    assert tree(lay.current) == repo.files(commit), f"current -> {release} is not complete"
    return release


class Gdb:
    """gdb attached to the agent, stopping it at rename(2) of .current.tmp-*."""

    def __init__(self, pid: int, marker: Path, *, after: bool) -> None:
        cmds = ["set pagination off", "set confirm off",
                r'break rename if $_regex((char*)$rdi, ".*/\\.current\\.tmp-")',
                f"shell touch {marker}.attached", "continue"]
        if after:
            cmds.append("finish")
        cmds += [f"shell touch {marker}", "shell sleep 600"]
        args = ["gdb", "-q", "-batch", "-p", str(pid)]
        for c in cmds:
            args += ["-ex", c]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        if not wait_until(lambda: Path(f"{marker}.attached").exists(), 60):
            raise AssertionError("gdb did not attach")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_step_leaves_a_complete_release_and_a_failed_report(
        point: str, site: Site, repo: Repo) -> None:
    p: Path = site.pause  # type: ignore[attr-defined]
    lay = site.layout()
    bus = connect(site.bus_url)
    events = Events(bus)
    agent = AgentProcess(site)
    gdb: Gdb | None = None
    try:
        first = site.send(bus, site.request("v1"))
        r1 = events.result(first)
        assert r1["status"] == "succeeded", (r1, agent.logs())
        assert complete(site, repo) == r1["release"]

        # -- stop the v2 deploy dead at the point ------------------------------------
        marker = p / f"{point}.reached"
        if point in SCRIPT_POINTS or point == "fetch":
            (p / point).touch()
        elif point in ("before-rename", "after-rename"):
            gdb = Gdb(agent.pid, marker, after=point == "after-rename")
        req = site.request("v2")
        rollout = site.send(bus, req)
        if point == "checkout":
            def half_checked_out() -> bool:
                partial = [x for x in lay.releases.glob("*.partial")]
                return (site.journal(rollout) or {}).get("step") == "checkout" and \
                    bool(partial) and len(os.listdir(partial[0])) > 10
            assert wait_until(half_checked_out, 60, 0.002), agent.logs()
        else:
            assert wait_until(marker.exists, 60), agent.logs()
        agent.kill9(wait=False)
        if gdb is not None:
            gdb.close()  # a traced process is reaped once its tracer is gone
        agent.daemon.proc.wait(30)
        for f in p.iterdir():
            if f.suffix not in (".pid", ".log", ".reached", ".attached"):
                f.unlink()  # no more pausing

        # -- at the kill ------------------------------------------------------------------
        entry = site.journal(rollout)
        assert entry is not None and entry["state"] == "running", entry
        step = STEP_OF.get(point, point)
        assert entry["step"] == step
        at_kill = complete(site, repo)
        if point in ("after-rename", "post_switch"):
            assert at_kill == entry["release"], "the switch had happened"
        else:
            assert at_kill == r1["release"]
        if point == "before-rename":
            assert list(lay.dir.glob(".current.tmp-*")), "killed between link and rename"
        if point == "checkout":
            assert list(lay.releases.glob("*.partial"))
            # git archive | tar outlive the agent; recovery stops them by this
            assert isinstance((entry.get("script") or {}).get("pgid"), int), entry

        # -- restart -----------------------------------------------------------------------
        agent = AgentProcess(site)
        result = events.result(rollout)
        assert result["status"] == "failed"
        assert result["reason"].startswith(f"interrupted: agent restarted during {step}"), \
            result
        assert result["failure"] == "interrupted"
        assert result["previous_release"] == r1["release"]
        if point in SCRIPT_POINTS:
            assert f"killed the {step} script it had left running" in result["reason"]
            pid = int((p / f"{point}.pid").read_text())
            assert wait_until(lambda: process_gone(pid), 10), "the orphaned script was killed"
        if point in ("after-rename", "post_switch"):
            assert result["reason"].endswith(f"switched back to {r1['release']}"), result
            assert (p / "post_switch.log").read_text().splitlines()[-1] == \
                f"rollback {r1['release']}", "post_switch ran again for the release back in"
        assert complete(site, repo) == r1["release"]
        assert not list(lay.releases.glob("*.partial"))
        assert not list(lay.dir.glob(".current.tmp-*"))
        if entry.get("release"):
            assert lay.info(entry["release"])["state"] == "failed"
        assert site.journal(rollout)["state"] == "done"

        # The same rollout again (a resend): answered from the journal, not run.
        before = sorted(os.listdir(lay.releases))
        site.send(bus, site.request("v2", rollout=rollout))
        dup = events.result(rollout, duplicate=True)
        assert dup["status"] == "failed" and dup["reason"] == result["reason"]
        assert sorted(os.listdir(lay.releases)) == before
        if point == "fetch":  # let the orphaned git fetch go (not the agent's child any more)
            os.kill(int((p / "fetch.pid").read_text()), signal.SIGKILL)

        # A new rollout goes through.
        again = events.result(site.send(bus, site.request("v2")), 120)
        assert again["status"] == "succeeded", (again, agent.logs())
        assert complete(site, repo) == again["release"]
        assert (lay.current / "VERSION").read_text() == "v2\n"
        assert agent.stop() == 0
    finally:
        if gdb is not None:
            gdb.close()
        agent.daemon.stop()
        bus.close()
