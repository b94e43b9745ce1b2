"""Topic and queue names: the wiring diagram of docs/architecture.md in code."""

#: ``git.push`` from hooks and webhooks.
GIT_COMMITS = "git.commits"
#: ``ci.build`` queued/started/finished from the CI bridge (and ``notify build``).
CI_EVENTS = "ci.events"
#: ``deploy.rollout`` asked for by the CLI, the API and the web.
ROLLOUTS = "deploy.rollouts"
#: ``deploy.control``: pause, resume, promote, abort a running rollout.
CONTROL = "deploy.control"
#: ``deploy.progress`` and ``deploy.result`` from the agents.
EVENTS = "deploy.events"
#: ``deploy.rollout.status`` from the orchestrator: one per state change and
#: one per host settled, so a watcher of a whole rollout (``deploy --wait``)
#: need not read every host's progress.
STATUS = "deploy.status"
#: ``presence`` heartbeats.
PRESENCE = "presence"
#: Nobody reads it: the web's /healthz publishes here to check the bus takes
#: a message.
PING = "deploybus.ping"
#: ``package.update`` for the fetcher's apt-get update.
PACKAGES = "packages"
#: ``package.updated``: what each host's fetcher ran for a burst of updates
#: (a topic of its own, so that no fetcher's queue on ``packages`` gets every
#: other host's report).
PACKAGES_UPDATED = "packages.updated"


def requests_for(host: str) -> str:
    """Topic of ``deploy.request`` messages for one host."""
    return f"deploy.requests.{host}"


def agent_queue(host: str) -> str:
    return f"agent-{host}"


def fetcher_queue(host: str) -> str:
    return f"fetcher-{host}"


def fetcher_packages_queue(host: str) -> str:
    """The fetcher's durable queue on :data:`PACKAGES` (only on hosts that
    watch packages). Not ``fetcher-packages-<host>``: that is the git queue
    of a host named ``packages-<host>``."""
    return f"packages-{host}"


#: Durable queues of the orchestrator.
ORCHESTRATOR_ROLLOUTS = "orchestrator-rollouts"
ORCHESTRATOR_EVENTS = "orchestrator-events"
ORCHESTRATOR_PRESENCE = "orchestrator-presence"
ORCHESTRATOR_CONTROL = "orchestrator-control"
#: ... for auto-deploy: CI results, and pushes (environments on: push).
ORCHESTRATOR_CI = "orchestrator-ci"
ORCHESTRATOR_PUSHES = "orchestrator-pushes"
#: Durable queue of the CI bridge on git.commits.
CI_BRIDGE = "ci-bridge"
#: Durable queues of the notifier: rollout statuses, and CI builds.
NOTIFIER_STATUS = "notifier-status"
NOTIFIER_CI = "notifier-ci"
