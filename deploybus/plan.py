"""What a rollout will do, checked against the config: written once, used by
the CLI and the web (to refuse a bad request before sending it, naming the
option or the form field) and by the orchestrator (which decides).

The orchestrator checks more (the signer's policy, the deploy windows, the
ref on the git server, the lock); this is what every front end can know
from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploybus.config import Config, EnvironmentConfig
from deploybus.errors import DeployBusError, RolloutError
from deploybus.strategy import Strategy


@dataclass(frozen=True)
class Plan:
    """A rollout the config allows: its environment, hosts (in order) and
    strategy (the environment's, with the rollout's overrides)."""

    environment: EnvironmentConfig
    hosts: list[str]
    strategy: Strategy

    def phases(self) -> list[list[str]]:
        return self.strategy.phases(self.hosts)


def plan(cfg: Config, *, project: str, environment: str, hosts: list[str] | None = None,
         strategy: dict[str, Any] | None = None) -> Plan:
    """The plan of a rollout of ``project`` to ``environment`` (all its hosts,
    or ``hosts``), with ``strategy`` over the environment's; RolloutError
    naming the field that is wrong."""
    if project not in cfg.projects:
        raise RolloutError("project", f"there is no project {project!r:.80} (known: "
                                      f"{', '.join(cfg.projects) or 'none'})")
    if cfg.projects[project].vcs != "git":
        raise RolloutError("project", f"{project} is a Subversion project: its hosts' fetchers "
                                      "export its revisions (<state_dir>/svn/"
                                      f"{project}/r<REV>), but rollouts deploy git projects "
                                      "only; svn projects are not yet deployable by rollouts "
                                      "(docs/subversion.md)")
    ec = cfg.environments.get(environment)
    if ec is None:
        raise RolloutError("environment", f"there is no environment {environment!r:.80} "
                                          f"(known: {', '.join(cfg.environments) or 'none'})")
    if ec.projects is not None and project not in ec.projects:
        raise RolloutError("project", f"{project} is not deployed to {environment} "
                                      f"({environment} takes {', '.join(ec.projects)})")
    chosen = list(dict.fromkeys(hosts or ec.hosts))
    unknown = [h for h in chosen if h not in ec.hosts]
    if unknown:
        raise RolloutError("hosts", f"{', '.join(unknown)[:200]} "
                                    f"{'is' if len(unknown) == 1 else 'are'} not in "
                                    f"{environment} (its hosts: {', '.join(ec.hosts)})")
    overrides = {k: v for k, v in (strategy or {}).items() if v is not None}
    for key, value in overrides.items():  # one at a time first, to name the culprit
        try:
            Strategy.parse(ec.strategy, {key: value}).phases(chosen)
        except DeployBusError as exc:
            raise RolloutError(f"strategy.{key}", str(exc)) from None
    try:
        merged = Strategy.parse(ec.strategy, overrides)
        merged.phases(chosen)
    except DeployBusError as exc:
        raise RolloutError("strategy", str(exc)) from None
    return Plan(ec, chosen, merged)
