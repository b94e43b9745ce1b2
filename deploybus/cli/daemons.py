"""One subcommand per daemon, so systemd units stay one line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deploybus.cli.base import State, _context, _run, cli, host_option, pass_state

#: Seconds the web front end tries to publish before it answers 503.
WEB_PUBLISH_TIMEOUT = 3.0


def _setup_logging() -> None:
    from deploybus import log  # structlog: only daemons pay for it
    log.setup()


@cli.command()
@host_option
@pass_state
def agent(state: State, host: str | None) -> None:
    """Run the deploy agent for this host."""
    from deploybus.daemons.deploy_agent.agent import DeployAgent
    _setup_logging()
    ctx = _context(state, host, daemon="agent")
    _run("agent", ctx, [DeployAgent(ctx)])


@cli.command()
@host_option
@pass_state
def fetcher(state: State, host: str | None) -> None:
    """Run the repo fetcher (local git mirrors) for this host."""
    from deploybus.daemons.repo_fetcher.service import RepoFetcher
    _setup_logging()
    ctx = _context(state, host, daemon="fetcher")
    _run("fetcher", ctx, [RepoFetcher(ctx)])


@cli.command()
@host_option
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between heartbeats (default: the host's heartbeat in the config, "
                   "10).")
@pass_state
def keepalive(state: State, host: str | None, interval: float | None) -> None:
    """Run the keepalive (heartbeats and presence) for this host."""
    from deploybus.daemons.keepalive.service import Keepalive
    _setup_logging()
    ctx = _context(state, host, daemon="keepalive")
    _run("keepalive", ctx, [Keepalive(ctx, interval=interval)])


@cli.command()
@pass_state
def orchestrator(state: State) -> None:
    """Run the orchestrator (rollouts)."""
    from deploybus.daemons.orchestrator.service import Orchestrator
    _setup_logging()
    ctx = _context(state, None, daemon="orchestrator")
    _run("orchestrator", ctx, [Orchestrator(ctx)])


@cli.command("ci-bridge")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Also take CI servers' own build notifications (Jenkins's Notification "
                   "plugin) on POST /ci/<server>/jenkins.")
@pass_state
def ci_bridge(state: State, listen: str | None) -> None:
    """Run the CI bridge: pushes -> CI builds -> signed ci.build events."""
    from deploybus.daemons.ci_bridge.service import CiBridge
    _setup_logging()
    ctx = _context(state, None, daemon="ci-bridge")
    services = [CiBridge(ctx)]
    if listen:
        from deploybus.daemons.ci_bridge.notify import NotifyServer
        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            raise click.BadParameter("HOST:PORT", param_hint="--listen")
        services.append(NotifyServer(ctx, host=host or "127.0.0.1", port=int(port)))
    _run("ci-bridge", ctx, services)  # type: ignore[arg-type]


@cli.command()
@click.option("--bind", default=None, metavar="HOST:PORT",
              help="Where to listen (default: listener.bind in the config, 127.0.0.1:8090).")
@pass_state
def listener(state: State, bind: str | None) -> None:
    """Run the webhook receiver: GitHub, GitLab, Gitea and Bitbucket pushes ->
    the outbox -> signed git.push events (and drain the git hook's outbox)."""
    from deploybus.daemons.git_listener.listener import Listener
    _setup_logging()
    if bind is not None and not bind.rpartition(":")[2].isdigit():
        raise click.BadParameter("HOST:PORT", param_hint="--bind")
    # the drainer waits on the broker, never a person: a short publish
    # timeout keeps a stop prompt while the broker is away
    ctx = _context(state, None, daemon="listener", publish_timeout=5.0)
    _run("listener", ctx, [Listener(ctx, bind=bind)])


@cli.command()
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@pass_state
def web(state: State, bind: str, port: int) -> None:
    """Run the web front end and JSON API."""
    from deploybus.frontend.server import WebServer
    _setup_logging()
    # A person waits on every publish: with the broker away, say so in
    # seconds (503) rather than after the daemons' 30 s of retries.
    ctx = _context(state, None, daemon="web", publish_timeout=WEB_PUBLISH_TIMEOUT)
    _run("web", ctx, [WebServer(ctx, bind=bind, port=port)])


@cli.command()
@click.option("--port", default=8080, show_default=True, help="Web UI port (on 127.0.0.1).")
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--data", default="./deploybus-data", show_default=True, type=click.Path(),
              help="Where the sample project, keys, state and deploys live.")
def up(port: int, bind: str, data: str) -> None:
    """Everything in one process on the in-process bus, with a sample project."""
    from deploybus.cli import allinone
    _setup_logging()
    sys.exit(allinone.run(Path(data), bind=bind, port=port))


@cli.command()
@pass_state
def notifier(state: State) -> None:
    """Run the notifier: rollout and CI outcomes -> webhooks and email (projects.<p>.notify)."""
    from deploybus.daemons.notifier.service import Notifier
    _setup_logging()
    ctx = _context(state, None, daemon="notifier")
    _run("notifier", ctx, [Notifier(ctx)])
