"""Auto-deploy: the orchestrator starts rollouts of green builds (or of
pushes) on the environments that ask for it.

An environment with ``auto_deploy: {refs: [...], on: ci_success}`` follows
those refs: on a ``ci.build`` that *finished* with SUCCESS for a matching
ref, signed by a CI key the policy allows for the project and environment,
the orchestrator starts a rollout of exactly the built commit, with the
environment's strategy, on the one path every rollout takes (locks and
deploy windows apply as to a person; no window override). It is recorded
as done by ``ci:<job>#<number>``. ``on: push`` does the same on a
``git.push`` (signed by a git or CI key) for environments without CI.

Never for a build that failed, was aborted, superseded, or is not
finished; nor for a commit the environment already runs or one older than
it (an ancestor of what runs: a late green build of an older commit must
not take an environment back). A skipped or refused auto-deploy is
audited with its reason, so a failed build shows in the audit trail.
Each build (or push) makes at most one rollout per environment: the
rollout's id is derived from it, so a repeated event finds it done.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from deploybus import gitutil, protocol
from deploybus.config import EnvironmentConfig
from deploybus.dispatch import Message
from deploybus.envelope import now
from deploybus.errors import DeployBusError
from deploybus.plan import plan
from deploybus.protocol import Action

if TYPE_CHECKING:
    from deploybus.daemons.orchestrator.service import Orchestrator

ZERO = "0" * 40


class AutoDeploy:
    """The orchestrator's auto-deploy; see the module docstring."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.cfg = orch.ctx.config
        self.log = orch.log.bind(part="auto-deploy")

    def environments(self, project: str, ref: str, on: str) -> list[EnvironmentConfig]:
        """The environments that auto-deploy ``project`` at ``ref`` on ``on``."""
        return [ec for ec in self.cfg.environments.values()
                if ec.auto_deploy is not None and ec.auto_deploy.on == on
                and ec.auto_deploy.follows(ref)
                and (ec.projects is None or project in ec.projects)]

    # -- handlers --------------------------------------------------------------------

    def on_ci_build(self, msg: Message) -> None:
        body = msg.body
        assert isinstance(body, protocol.CiBuild)
        envs = self.environments(body.project, body.ref, "ci_success")
        if not envs:
            return
        state, result = body.state, body.result
        if state is protocol.BuildState.FINISHED and result == "SUCCESS":
            for ec in envs:
                self.deploy(ec, project=body.project, ref=body.ref, commit=body.commit,
                            trigger=body.build, user=_ci_user(body), signer=msg,
                            build=body.build, build_url=body.url)
            return
        if state is protocol.BuildState.FINISHED or (
                state is protocol.BuildState.ERROR and not body.retrying) \
                or state is protocol.BuildState.SUPERSEDED:
            what = result if state is protocol.BuildState.FINISHED else state.value
            for ec in envs:
                self.skip(ec, body.project, f"build {body.build} of {body.commit[:12]} "
                                            f"({body.ref}) {what}: not deployed"
                                            + (f" ({body.reason})" if body.reason else ""),
                          actor=msg.signer.name, build=body.build, url=body.url)

    def on_push(self, msg: Message) -> None:
        body = msg.body
        if not isinstance(body, protocol.GitPush):
            return  # svn.commit shares git.commits; svn projects are not deployable (yet)
        if body.deleted or not body.new or body.new == ZERO:
            return
        for ec in self.environments(body.project, body.ref, "push"):
            self.deploy(ec, project=body.project, ref=body.ref, commit=body.new,
                        trigger=f"push/{msg.env.id}", user=f"push:{body.pusher or 'unknown'}",
                        signer=msg)

    # -- the decision ----------------------------------------------------------------

    def skip(self, ec: EnvironmentConfig, project: str, reason: str, *, actor: str,
             **detail: object) -> None:
        self.log.info("auto-deploy skipped", environment=ec.name, project=project,
                      reason=reason)
        self.orch.store.audit(actor=actor, action="auto-deploy-skipped", project=project,
                              environment=ec.name, reason=reason, **detail)

    def deploy(self, ec: EnvironmentConfig, *, project: str, ref: str, commit: str,
               trigger: str, user: str, signer: Message, **detail: object) -> None:
        """Start a rollout of ``commit`` to ``ec`` if everything allows it."""
        env = ec.name
        rollout = "auto-" + hashlib.sha256(f"{trigger}|{env}".encode()).hexdigest()[:16]
        actor = signer.signer.name
        if self.orch.store.rollout(rollout) is not None:
            return  # this build (or push) was already decided on for this environment
        if not self.orch.verifier.allowed(signer.signer, project, env):
            self.skip(ec, project, f"{actor} ({signer.signer.role}) may not deploy {project} "
                                   f"to {env}: not in keys.policy", actor=actor, **detail)
            return
        running = self.orch.store.running_commit(project, env)
        if running == commit:
            self.skip(ec, project, f"{env} already runs {commit[:12]}", actor=actor, **detail)
            return
        if running is not None:
            try:
                mirror = gitutil.update_mirror(self.cfg.state_dir, project,
                                               self.cfg.projects[project].git)
                older = gitutil.is_ancestor(mirror, commit, running)
            except DeployBusError as exc:
                self.skip(ec, project, f"cannot tell whether {commit[:12]} is older than what "
                                       f"{env} runs ({running[:12]}): {exc}", actor=actor,
                          **detail)
                return
            if older:
                self.skip(ec, project, f"{commit[:12]} is older than what {env} runs "
                                       f"({running[:12]})", actor=actor, **detail)
                return
        try:
            planned = plan(self.cfg, project=project, environment=env)
            outside = ec.windows.refusal(now()) if ec.windows else None
            if outside:
                raise DeployBusError(f"{env} is closed for deploys: {outside}; an "
                                     f"auto-deploy does not override windows")
        except DeployBusError as exc:
            self.orch.refuse(rollout, project=project, environment=env, ref=ref, user=user,
                             reason=str(exc), actor=actor)
            return
        self.orch.accept(rollout, project=project, environment=env, ref=ref, commit=commit,
                         hosts=planned.hosts, strategy=planned.strategy, action=Action.DEPLOY,
                         user=user, actor=actor, trigger=trigger, **detail)


def _ci_user(body: protocol.CiBuild) -> str:
    return f"ci:{body.job}#{body.number}" if body.number is not None else f"ci:{body.build}"
