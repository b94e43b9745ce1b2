"""One deploy, rollback or crash recovery of one project on one host.

A deploy, under the project's lock::

    fetch        find the request's commit in the local mirror (fetch if missing)
    pre          pre script, cwd = the project directory
    checkout     git archive of the commit into releases/<id>.partial
    shared       shared/ entries linked into it; then renamed to releases/<id>
    post         post script, cwd = the new release
    health       health check of the new release (command or URL)
    switch       current -> releases/<id> (atomic rename)
    post_switch  post-switch script; if it fails, current goes back
    cleanup      keep the newest releases (never current or its rollback target)

Anything failing before the switch leaves ``current`` where it was and
marks the new release failed. A failing post-switch script switches back to
the previous release (running the post-switch script once more, for it),
so a deploy either fully happens or not at all. That holds for any
exception, not only a failing step: a bug, a full disk, a value a script's
environment cannot hold; it ends the run as a failed result (``agent error:
...``) with ``current`` back where it was. A rollback is the switch and
post-switch steps alone, towards an earlier release.

The request names the commit the rollout resolved (the orchestrator, with
:func:`deploybus.gitutil.resolve_remote`) and signed: that commit is
deployed, and the ref is never looked up in the mirror, where git's loose
rules could find something else under its name.

Before each step the agent's journal is told where the run is (and which
process group a script runs in; a step that starts a process at once is
recorded with it), so :func:`recover` can finish the story after the agent
was killed: kill the orphaned script, remove the partial checkout, switch
back if the switch had happened, mark the release failed. A release that
is ``ok`` and ``current`` was a complete deploy, whatever step the journal
names.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deploybus import gitutil
from deploybus.config import ProjectConfig
from deploybus.daemons.deploy_agent import health, scripts
from deploybus.daemons.deploy_agent.journal import check_entry
from deploybus.daemons.deploy_agent.scripts import Progress, RunAs
from deploybus.errors import DeployBusError, DeployError, RefError
from deploybus.gitutil import redact_text
from deploybus.layout import Layout, check_release
from deploybus.refs import check_commit, check_ref, check_user, short_ref_name

#: Steps of a deploy, in order.
STEPS = ("fetch", "pre", "checkout", "shared", "post", "health", "switch", "post_switch",
         "cleanup")

#: Release ids start with this UTC time stamp (microseconds: ids sort by age).
STAMP_FORMAT = "%Y%m%dT%H%M%S.%f"

#: Environment variables passed on to scripts that run as another user.
_PASSED_ON = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass
class Request:
    """One request, as the agent accepted it (and journaled it)."""

    rollout: str
    project: str
    environment: str
    #: Deploy: the full refname the rollout resolved (``refs/tags/v1.0``), or
    #: with no ``commit``, a ref to look up in the mirror (older senders).
    ref: str
    user: str
    action: str = "deploy"
    #: Rollback: the release to go to (None: the newest earlier good one).
    release: str | None = None
    #: Deploy: the full commit id ``ref`` resolved to, as signed; deployed
    #: exactly. None only from senders that predate it: ``ref`` is then
    #: resolved in the mirror as before.
    commit: str | None = None
    #: The ref as the person typed it (``v1.0``), for ``DEPLOYBUS_REF`` and
    #: the release record; None: ``ref`` without ``refs/tags/`` or ``refs/heads/``.
    ref_name: str | None = None


class Tracker:
    """Where a run is; the agent's journal implements it. This one forgets."""

    def step(self, step: str, *, lazy: bool = False, **fields: Any) -> None:
        """The run enters ``step``; ``fields`` (release, previous_release) are kept.

        ``lazy``: the step need not be on disk before it starts, because the
        next record carries it: a script about to be started (its process
        group is recorded) or the run's end. Recovery decides the same for
        the step before, so a record is saved."""

    def script(self, pgid: int | None, start: int | None) -> None:
        """A script runs in process group ``pgid`` (None: no script runs now)."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _reason(exc: BaseException) -> str:
    """The failure reason for ``exc``, credentials in URLs redacted. A failed
    step says what failed; anything else is a bug or the host's trouble and
    says so (``agent error: ValueError: ...``)."""
    if isinstance(exc, DeployBusError | OSError):
        text = str(exc)
    else:
        text = f"agent error: {type(exc).__name__}: {exc}"
    return redact_text(text)


def _stamp(layout: Layout) -> str:
    """A UTC time stamp for a new release id, later than every existing one:
    release ids sort in the order they were made (rollback and cleanup rely
    on it), even for deploys within a microsecond or a clock that went back."""
    t = datetime.now(UTC)
    newest = max((r.split("-", 1)[0] for r in layout.complete_releases()), default="")
    for name in os.listdir(layout.meta / "releases"):
        if name.endswith(".json"):
            newest = max(newest, name.split("-", 1)[0])
    stamp = t.strftime(STAMP_FORMAT)
    if stamp <= newest:
        try:
            t = datetime.strptime(newest, STAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError:  # an older, shorter format: append to it
            return newest + ".000001"
        stamp = (t + timedelta(microseconds=1)).strftime(STAMP_FORMAT)
    return stamp


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


class _Run:
    """Shared by deploy, rollback and recovery: the script environment, the
    scripts themselves, and switching back."""

    def __init__(self, req: Request, pc: ProjectConfig | None, *, root: Path, state_dir: Path,
                 host: str, progress: Progress, tracker: Tracker | None) -> None:
        self.req, self.pc, self.host, self.state_dir = req, pc, host, state_dir
        self.layout = Layout(root, req.project)
        self.progress = progress
        self.tracker = tracker or Tracker()
        self.runas: RunAs | None = None

    def env(self, *, release: str | None, commit: str | None, ref: str | None,
            previous_release: str | None, action: str) -> dict[str, str]:
        prev_info = self.layout.info(previous_release) if previous_release else {}
        if self.runas is None:
            base = dict(os.environ)
        else:
            base = {k: os.environ[k] for k in _PASSED_ON if k in os.environ}
        return base | {
            "DEPLOYBUS_PROJECT": self.req.project, "DEPLOYBUS_ENV": self.req.environment,
            "DEPLOYBUS_REF": ref or "", "DEPLOYBUS_COMMIT": commit or "",
            "DEPLOYBUS_PREVIOUS_COMMIT": prev_info.get("commit") or "",
            "DEPLOYBUS_RELEASE": release or "",
            "DEPLOYBUS_RELEASE_DIR": str(self.layout.releases / release) if release else "",
            "DEPLOYBUS_PREVIOUS_RELEASE": previous_release or "",
            "DEPLOYBUS_SHARED_DIR": str(self.layout.shared),
            "DEPLOYBUS_USER": self.req.user, "DEPLOYBUS_ROLLOUT_ID": self.req.rollout,
            "DEPLOYBUS_HOST": self.host, "DEPLOYBUS_ACTION": action,
        }

    def script(self, step: str, cwd: Path, env: dict[str, str], **kw: Any) -> None:
        assert self.pc is not None
        try:
            scripts.run_script(step, self.pc.scripts[step], cwd=cwd, env=env,
                               timeout=self.pc.script_timeout, progress=self.progress,
                               output=self.pc.output, runas=self.runas,
                               on_start=self.tracker.script, **kw)
        finally:
            self.tracker.script(None, None)

    def switch_back(self, away_from: str, previous: str | None) -> str:
        """``current`` points at ``away_from``; put it back on ``previous`` (or
        remove it if nothing was deployed before) and run the post-switch
        script for it. Returns what happened, for the failure reason."""
        if self.layout.current_release() != away_from or away_from == previous:
            return ""
        self.layout.restore(previous)
        if previous is None:
            self.progress("switch", "current removed again (there was no earlier release)", None)
            return "; current removed again (first deploy)"
        self.progress("switch", f"current -> releases/{previous} (switched back)", None)
        note = f"; switched back to {previous}"
        if self.pc is not None and "post_switch" in self.pc.scripts:
            info = self.layout.info(previous)
            env = self.env(release=previous, commit=info.get("commit"), ref=info.get("ref"),
                           previous_release=away_from, action="rollback")
            try:
                self.script("post_switch", self.layout.releases / previous, env,
                            what="post_switch script (after switching back)")
            except Exception as exc:  # current is back already; say what else happened
                note += f"; {_reason(exc)}"
        return note

    def undo(self, release: str, previous: str | None, reason: str) -> str:
        """After a deploy of ``release`` failed (``reason``), whatever the
        cause: ``current`` back on ``previous``, the partial checkout gone,
        the release marked failed. Returns what to add to the reason; never
        raises, so the caller always gets to report the failure."""
        note = ""
        try:
            note = self.switch_back(release, previous)
        except Exception as exc:
            note = f"; could not switch back: {_reason(exc)}"
        try:
            self.layout.set_state(release, "failed", reason=reason + note)
        except Exception as exc:
            note += f"; could not mark {release} failed: {_reason(exc)}"
        shutil.rmtree(self.layout.releases / f"{release}.partial", ignore_errors=True)
        return note

    def find_commit(self, mirror: Path, commit: str) -> str:
        """``commit`` in the project's mirror, fetched if it is not there yet.

        Only the commit id is looked up (and must be a commit, not a tag
        object); the ref's name in the mirror plays no part. A fetch that
        fails but still brought the commit (another ref was refused) is
        reported and the deploy goes on."""
        assert self.pc is not None
        self.progress("fetch", f"looking for {commit[:12]} ({self.req.ref}) in the local "
                               f"mirror", None)
        if gitutil.has_commit(mirror, commit):
            return commit
        self.progress("fetch", f"{commit[:12]} not in local mirror; fetching "
                               f"{redact_text(self.pc.git)}", None)
        failure: DeployError | None = None
        try:
            gitutil.update_mirror(self.state_dir, self.req.project, self.pc.git)
        except DeployError as exc:
            failure = exc
        if not gitutil.has_commit(mirror, commit):
            if failure is not None:
                raise DeployError(f"commit {commit} ({self.req.ref}) is not in the local "
                                  f"mirror and fetching failed: {failure}")
            raise DeployError(redact_text(
                f"commit {commit} ({self.req.ref}) is not in {self.pc.git}, even after "
                f"fetching (deleted, or pushed elsewhere?)"))
        if failure is not None:
            self.progress("fetch", f"fetched {commit[:12]}, though git reported: {failure}",
                          None)
        return commit

    def resolve_in_mirror(self, mirror: Path) -> str:
        """The commit ``ref`` names in the mirror, fetched if missing: for
        requests without a commit (senders that predate it)."""
        assert self.pc is not None
        self.progress("fetch", f"resolving {self.req.ref}", None)
        try:
            return gitutil.resolve(mirror, self.req.ref)
        except RefError:
            self.progress("fetch", f"{self.req.ref} not in local mirror; fetching "
                                   f"{redact_text(self.pc.git)}", None)
            gitutil.update_mirror(self.state_dir, self.req.project, self.pc.git)
            return gitutil.resolve(mirror, self.req.ref)


@contextmanager
def _opened(run: _Run, action: str,
            first_step: str) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The opening of a deploy and of a rollback: under the project's lock,
    with the leftovers of a killed run gone, the result so far (failed until
    said otherwise, naming the release ``current`` points at now) and that
    release, which the journal learns together with ``first_step``. The
    result gets its ``duration`` when the block ends."""
    started = time.monotonic()
    layout = run.layout
    with layout.lock():
        layout.remove_leftovers()
        previous = layout.current_release()
        prev_info = layout.info(previous) if previous else {}
        result: dict[str, Any] = {"status": "failed", "action": action, "commit": None,
                                  "release": None, "previous_release": previous,
                                  "previous_commit": prev_info.get("commit")}
        run.tracker.step(first_step, previous_release=previous)
        yield result, previous
    result["duration"] = round(time.monotonic() - started, 3)


def deploy(req: Request, pc: ProjectConfig, *, root: Path, state_dir: Path, host: str,
           progress: Progress, tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the deploy; return the result body (status succeeded or failed).

    Whatever happens, it returns with ``current`` on a release that passed
    every step: the new one, or the one it was on before (an exception that
    is not an ``Exception``, such as KeyboardInterrupt, is raised again after
    ``current`` was put back)."""
    run = _Run(req, pc, root=root, state_dir=state_dir, host=host, progress=progress,
               tracker=tracker)
    layout = run.layout
    with _opened(run, "deploy", "fetch") as (result, previous):
        release: str | None = None
        try:
            check_user(req.user)
            check_ref(req.ref)
            ref_name = check_ref(req.ref_name) if req.ref_name is not None \
                else short_ref_name(req.ref)
            run.runas = scripts.run_as(pc.user, pc.group)
            mirror = gitutil.mirror_path(state_dir, req.project)
            if req.commit is not None:
                commit = run.find_commit(mirror, check_commit(req.commit))
            else:
                commit = run.resolve_in_mirror(mirror)
            result["commit"] = commit
            release = f"{_stamp(layout)}-{commit[:8]}-{req.rollout[:8]}"
            release_dir = layout.releases / release
            # In the journal before anything of the release is written: the
            # pre step's record, or the checkout's when there is no pre script.
            run.tracker.step("pre" if "pre" in pc.scripts else "checkout", release=release)
            layout.write_info(release, {
                "commit": commit, "ref": ref_name, "rollout": req.rollout, "user": req.user,
                "environment": req.environment, "state": "pending", "created": _now()}
                | ({"refname": req.ref} if req.commit is not None else {}))
            env = run.env(release=release, commit=commit, ref=ref_name,
                          previous_release=previous, action="deploy")
            if "pre" in pc.scripts:
                run.script("pre", layout.dir, env)
                run.tracker.step("checkout", lazy=True)  # recorded with git archive's group
            progress("checkout", f"checking out {commit[:12]} into releases/{release}", None)
            partial = layout.releases / f"{release}.partial"
            try:
                files = gitutil.export(mirror, commit, partial, on_start=lambda pgid: (
                    run.tracker.script(pgid, scripts.proc_start_time(pgid))))
            finally:
                run.tracker.script(None, None)
            owner = (run.runas.uid, run.runas.gid) if run.runas and os.geteuid() == 0 else None
            if owner is not None:
                _chown_tree(partial, *owner)
            progress("checkout", f"{files} entries checked out", None)
            if pc.shared:
                run.tracker.step("shared")
                linked = layout.link_shared(partial, pc.shared, owner=owner)
                progress("shared", f"linked {', '.join(linked)} to shared/", None)
            os.replace(partial, release_dir)
            gitutil.fsync_dir(layout.releases)

            if "post" in pc.scripts:
                run.tracker.step("post", lazy=True)  # recorded with the script's group
                run.script("post", release_dir, env)
            if pc.health is not None:
                run.tracker.step("health")
                health.check(pc.health, cwd=release_dir, env=env, progress=progress,
                             output=pc.output, runas=run.runas, on_start=run.tracker.script)
                run.tracker.script(None, None)

            run.tracker.step("switch")
            layout.switch(release)
            progress("switch", f"current -> releases/{release}", None)
            if "post_switch" in pc.scripts:
                run.tracker.step("post_switch", lazy=True)  # recorded with the script's group
                run.script("post_switch", release_dir, env)
            # From here the deploy is complete, whatever the journal says:
            # recovery goes by this state and ``current``.
            layout.set_state(release, "ok", switched=_now())
            result.update(status="succeeded", release=release)
        except BaseException as exc:  # any failure: current back where it was
            reason = _reason(exc)
            if release is not None:
                reason += run.undo(release, previous, reason)
            result.update(status="failed", reason=reason, release=release)
            progress("failed", reason, None)
            if not isinstance(exc, Exception):
                raise
        if result["status"] == "succeeded":
            try:
                run.tracker.step("cleanup", lazy=True)  # the release's "ok" already tells
                # The release this deploy replaced stays too: the orchestrator
                # may ask to roll back to it by name.
                removed = layout.cleanup(pc.keep, protect=[previous] if previous else [])
            except Exception as exc:  # the deploy itself is done; say so, do not fail it
                progress("cleanup", f"cleanup failed: {_reason(exc)}", None)
            else:
                if removed:
                    progress("cleanup", f"removed {len(removed)} old release(s)", None)
    return result


def rollback(req: Request, pc: ProjectConfig, *, root: Path, state_dir: Path, host: str,
             progress: Progress, tracker: Tracker | None = None) -> dict[str, Any]:
    """Switch ``current`` to ``req.release`` (default: the newest earlier
    release that is ok) and run the post-switch script."""
    run = _Run(req, pc, root=root, state_dir=state_dir, host=host, progress=progress,
               tracker=tracker)
    layout = run.layout
    with _opened(run, "rollback", "switch") as (result, current):
        target: str | None = None
        try:
            check_user(req.user)
            run.runas = scripts.run_as(pc.user, pc.group)
            if current is None:
                raise DeployError("nothing is deployed here to roll back from")
            if req.release is None:
                target = layout.rollback_target(current)
                if target is None:
                    raise DeployError(f"no good release older than {current} to roll back to")
            else:
                target = check_release(req.release)
                if target not in layout.complete_releases():
                    raise DeployError(f"release {target} does not exist here")
                if layout.info(target).get("state") == "failed":
                    raise DeployError(f"release {target} is marked failed; not rolling back "
                                      f"to it")
            info = layout.info(target)
            result.update(release=target, commit=info.get("commit"), ref=info.get("ref"))
            if target == current:
                progress("switch", f"current is already releases/{target}", None)
            else:
                run.tracker.step("switch", release=target)
                layout.switch(target)
                progress("switch", f"current -> releases/{target} (rollback)", None)
                if "post_switch" in pc.scripts:
                    run.tracker.step("post_switch", lazy=True)
                    env = run.env(release=target, commit=info.get("commit"),
                                  ref=info.get("ref"), previous_release=current,
                                  action="rollback")
                    run.script("post_switch", layout.releases / target, env)
                layout.set_state(target, info.get("state") or "ok", rolled_back_to=_now())
            run.tracker.step("cleanup")
            result["status"] = "succeeded"
        except BaseException as exc:  # any failure: current back where it was
            reason = _reason(exc)
            if target is not None and current is not None:
                try:
                    reason += run.switch_back(target, current)
                except Exception as exc2:
                    reason += f"; could not switch back: {_reason(exc2)}"
            result.update(status="failed", reason=reason)
            progress("failed", reason, None)
            if not isinstance(exc, Exception):
                raise
    return result


def recover(entry: dict[str, Any], pc: ProjectConfig | None, *, root: Path, state_dir: Path,
            host: str, progress: Progress,
            kill: Callable[[int, int | None], bool] = scripts.kill_orphan_group
            ) -> dict[str, Any]:
    """The result for a journal entry a killed agent left unfinished.

    The script it was running (if any) is killed; the partial checkout and
    temporary links removed; if ``current`` had already been switched, it is
    switched back unless the run had got past its post-switch script (then
    it was complete and is reported so); the new release is marked failed.

    Every field is checked first, as a request's are
    (:func:`.journal.check_entry`): an entry that fails is reported failed
    ("journal entry unusable") and nothing is done for it, so a damaged or
    planted entry never moves ``current``, kills a process or runs a script.
    """
    action = str(entry.get("action") or "deploy")
    result: dict[str, Any] = {"status": "failed", "action": action[:32], "release": None,
                              "previous_release": None, "recovered": True}
    try:
        check_entry(entry, steps=STEPS)
    except RefError as exc:
        result["reason"] = (f"interrupted: agent restarted; journal entry unusable "
                            f"({exc}); nothing was changed")
        progress("failed", result["reason"], None)
        return result
    req_d = entry["request"]
    req = Request(rollout=entry["rollout"], project=req_d["project"],
                  environment=req_d["environment"], ref=str(req_d.get("ref") or ""),
                  user=req_d.get("user") or "unknown", action=action,
                  release=req_d.get("release"), commit=req_d.get("commit"),
                  ref_name=req_d.get("ref_name"))
    step = entry.get("step")
    release, previous = entry.get("release"), entry.get("previous_release")
    result.update(release=release, previous_release=previous)
    if entry.get("state") != "running" or step is None:
        result["reason"] = "interrupted: agent restarted before the deploy started"
        progress("failed", result["reason"], None)
        return result
    reason = f"interrupted: agent restarted during {step}"
    script = entry.get("script") or {}
    if isinstance(script.get("pgid"), int) and kill(script["pgid"], script.get("start")):
        what = "git archive | tar" if step == "checkout" else f"{step} script"
        reason += f"; killed the {what} it had left running"
    run = _Run(req, pc, root=root, state_dir=state_dir, host=host, progress=progress,
               tracker=None)
    layout = run.layout
    with layout.lock():
        layout.remove_leftovers()
        info = layout.info(release) if release else {}
        result["commit"] = info.get("commit")
        current = layout.current_release()
        # A deploy is complete once its release is "ok" and current (the
        # journal may still name an earlier step: later steps are recorded
        # lazily); a rollback once it reached cleanup with current on it.
        finished = current == release and (
            info.get("state") == "ok" if req.action == "deploy" else step == "cleanup")
        if finished:
            result.update(status="succeeded",
                          reason=f"agent restarted after the {req.action} was complete "
                                 f"(its journal was at {step})")
            progress("recovered", result["reason"], None)
            return result
        if pc is not None:
            try:
                run.runas = scripts.run_as(pc.user, pc.group)
            except DeployError as exc:
                run.pc = None  # never run its scripts as anyone else
                reason += f"; post_switch not run: {exc}"
        if release is not None:
            try:
                reason += run.switch_back(release, previous)
            except Exception as exc:
                reason += f"; could not switch back: {_reason(exc)}"
            if req.action == "deploy" and (info or (layout.releases / release).exists()):
                try:
                    layout.set_state(release, "failed", reason=reason)
                except Exception as exc:
                    reason += f"; could not mark {release} failed: {_reason(exc)}"
    result["reason"] = reason
    progress("failed", reason, None)
    return result
