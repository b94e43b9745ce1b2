"""The ``deploybus`` command line (click).

Daemons run as ``deploybus agent``, ``deploybus orchestrator`` and so on, one
subcommand each, so systemd units stay one line. Exit codes are the named
``EXIT_*`` constants of :mod:`deploybus.runner`.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import click

from deploybus import __version__, envelope, log, topics
from deploybus import config as configmod
from deploybus.errors import BusError, ConfigError, DeployBusError
from deploybus.runner import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    Context,
    Runner,
    Service,
)

DEFAULT_CONFIG = "/etc/deploybus/deploybus.yaml"

#: Seconds the post-receive hook tries to publish before giving up (never
#: hold a push hostage to the bus).
HOOK_PUBLISH_TIMEOUT = 5.0

#: How long a deploy.rollout may wait for the orchestrator before it expires.
ROLLOUT_TTL = 3600


class State:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._config: configmod.Config | None = None

    @property
    def config(self) -> configmod.Config:
        if self._config is None:
            try:
                self._config = configmod.load(self.config_path)
            except ConfigError as exc:
                click.echo(f"deploybus: config error: {exc}", err=True)
                sys.exit(EXIT_CONFIG)
        return self._config


pass_state = click.make_pass_decorator(State)


@click.group()
@click.version_option(__version__, prog_name="deploybus")
@click.option("--config", "-c", envvar="DEPLOYBUS_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="Config file (or DEPLOYBUS_CONFIG).")
@click.pass_context
def cli(ctx: click.Context, config: str) -> None:
    """deploybus: one-click, audited deploys from a git tag to your servers."""
    ctx.obj = State(config)


def main() -> None:
    cli(prog_name="deploybus")


def _context(state: State, host: str | None, *, daemon: str, need_key: bool = False) -> Context:
    from deploybus.bus import connect

    cfg = state.config
    key = None
    if cfg.signing_key is not None:
        try:
            key = cfg.load_signing_key()
        except ConfigError as exc:
            click.echo(f"deploybus: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    elif need_key:
        click.echo(f"deploybus: {cfg.path}: keys.signing is required for {daemon}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        bus = connect(cfg.bus_url, client_name=f"{daemon}@{host or socket.gethostname()}")
    except BusError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return Context(config=cfg, bus=bus, host=host or socket.gethostname(), signing_key=key)


def _run(name: str, ctx: Context, services: list[Service]) -> None:
    try:
        code = Runner(services, name=name).run()
    except ConfigError as exc:
        click.echo(f"deploybus {name}: config error: {exc}", err=True)
        code = EXIT_CONFIG
    except BusError as exc:
        click.echo(f"deploybus {name}: bus unavailable: {exc}", err=True)
        code = EXIT_UNAVAILABLE
    except DeployBusError as exc:
        click.echo(f"deploybus {name}: {exc}", err=True)
        code = EXIT_SOFTWARE
    finally:
        ctx.bus.close()
    sys.exit(code)


host_option = click.option("--host", default=None, help="This host's name (default: hostname).")


# -- daemons -----------------------------------------------------------------------

@cli.command()
@host_option
@pass_state
def agent(state: State, host: str | None) -> None:
    """Run the deploy agent for this host."""
    from deploybus.daemons.deploy_agent.agent import DeployAgent
    log.setup()
    ctx = _context(state, host, daemon="agent")
    _run("agent", ctx, [DeployAgent(ctx)])


@cli.command()
@host_option
@pass_state
def fetcher(state: State, host: str | None) -> None:
    """Run the repo fetcher (local git mirrors) for this host."""
    from deploybus.daemons.repo_fetcher.service import RepoFetcher
    log.setup()
    ctx = _context(state, host, daemon="fetcher")
    _run("fetcher", ctx, [RepoFetcher(ctx)])


@cli.command()
@host_option
@click.option("--interval", default=10.0, show_default=True, help="Seconds between heartbeats.")
@pass_state
def keepalive(state: State, host: str | None, interval: float) -> None:
    """Run the keepalive (heartbeats and presence) for this host."""
    from deploybus.daemons.keepalive.service import Keepalive
    log.setup()
    ctx = _context(state, host, daemon="keepalive")
    _run("keepalive", ctx, [Keepalive(ctx, interval=interval)])


@cli.command()
@pass_state
def orchestrator(state: State) -> None:
    """Run the orchestrator (rollouts)."""
    from deploybus.daemons.orchestrator.service import Orchestrator
    log.setup()
    ctx = _context(state, None, daemon="orchestrator", need_key=True)
    _run("orchestrator", ctx, [Orchestrator(ctx)])


@cli.command()
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@pass_state
def web(state: State, bind: str, port: int) -> None:
    """Run the web front end and JSON API."""
    from deploybus.frontend.server import WebServer
    log.setup()
    ctx = _context(state, None, daemon="web", need_key=True)
    _run("web", ctx, [WebServer(ctx, bind=bind, port=port)])


@cli.command()
@click.option("--port", default=8080, show_default=True, help="Web UI port (on 127.0.0.1).")
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--data", default="./deploybus-data", show_default=True, type=click.Path(),
              help="Where the sample project, keys, state and deploys live.")
def up(port: int, bind: str, data: str) -> None:
    """Everything in one process on the in-process bus, with a sample project."""
    from deploybus import allinone
    log.setup()
    sys.exit(allinone.run(Path(data), bind=bind, port=port))


# -- deploying ----------------------------------------------------------------------

def _print_event(env: envelope.Envelope) -> None:
    b = env.body
    host = b.get("host")
    if env.type == "deploy.progress":
        click.echo(f"[{host}] {b.get('step')}: {b.get('message')}")
        for line in b.get("lines") or []:
            click.echo(f"[{host}]   | {line}")
    elif env.type == "deploy.result":
        tail = f" release {b.get('release')}" if b.get("status") == "succeeded" \
            else f": {b.get('reason')}"
        click.echo(f"[{host}] {b.get('status')}{tail}")
    elif env.type == "deploy.rollout.status":
        if b.get("done"):
            click.echo(f"rollout: {b.get('done')}/{b.get('total')} hosts done")
        elif b.get("state") != "running":
            reason = f": {b.get('reason')}" if b.get("reason") else ""
            click.echo(f"rollout {b.get('rollout')} {b.get('state')}{reason}")


@cli.command()
@click.argument("project")
@click.argument("ref")
@click.option("--env", "environment", required=True, help="Environment to deploy to.")
@click.option("--hosts", default=None, help="Comma-separated subset of the environment's hosts.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Hosts deployed at once (default: the environment's 'parallel', 1).")
@click.option("--user", default=None, help="Who asks (default: your login name).")
@click.option("--wait/--no-wait", default=False, help="Follow progress until the rollout ends.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@pass_state
def deploy(state: State, project: str, ref: str, environment: str, hosts: str | None,
           parallel: int | None, user: str | None, wait: bool, timeout: float) -> None:
    """Ask the orchestrator to roll REF of PROJECT out to ENV.

    With --wait, prints per-host progress and exits 0 only when every host
    succeeded; 1 when the rollout failed, 77 when it was refused, 75 on timeout.
    """
    import getpass

    from deploybus.bus import connect
    from deploybus.refs import check_ref
    from deploybus.store import FINAL_STATES

    cfg = state.config
    try:
        check_ref(ref)
    except DeployBusError as exc:
        raise click.BadParameter(str(exc), param_hint="REF") from None
    if project not in cfg.projects:
        raise click.BadParameter(f"unknown project {project!r} (known: "
                                 f"{', '.join(cfg.projects) or 'none'})", param_hint="PROJECT")
    if environment not in cfg.environments:
        raise click.BadParameter(f"unknown environment {environment!r}", param_hint="--env")
    host_list = [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None
    key = cfg.load_signing_key()
    rollout = uuid.uuid4().hex[:16]
    verifier = cfg.verifier()
    finished = threading.Event()
    final: dict[str, Any] = {}

    def on_event(d: Any) -> None:
        try:
            env = envelope.decode(d.body)
        except DeployBusError:
            d.ack()
            return
        if env.correlation == rollout:
            if env.type == "deploy.rollout.status":
                try:
                    verifier.signer(env)
                except DeployBusError as exc:
                    click.echo(f"ignoring unverified status message: {exc}", err=True)
                    d.ack()
                    return
            _print_event(env)
            if env.type == "deploy.rollout.status" and env.body.get("state") in FINAL_STATES:
                final.update(env.body)
                finished.set()
        d.ack()

    bus = connect(cfg.bus_url, client_name=f"cli-{rollout}")
    try:
        sub = bus.subscribe(topics.EVENTS, on_event) if wait else None
        body = {"rollout": rollout, "project": project, "environment": environment, "ref": ref,
                "hosts": host_list, "parallel": parallel, "user": user or getpass.getuser()}
        env = envelope.new("deploy.rollout", body, sender=f"cli@{socket.gethostname()}",
                           correlation=rollout, ttl=ROLLOUT_TTL)
        bus.publish(topics.ROLLOUTS, key.sign(env).encode())
        click.echo(f"rollout {rollout}: {project} {ref} -> {environment}"
                   + (f" ({', '.join(host_list)})" if host_list else ""))
        if not wait:
            return
        if not finished.wait(timeout):
            click.echo(f"rollout {rollout}: still not finished after {timeout:.0f}s", err=True)
            sys.exit(EXIT_TEMPFAIL)
        if sub is not None:
            sub.cancel()
    except BusError as exc:
        click.echo(f"deploybus: bus unavailable: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    finally:
        bus.close()
    if final.get("state") == "succeeded":
        sys.exit(0)
    sys.exit(EXIT_REFUSED if final.get("state") == "refused" else EXIT_FAILURE)


@cli.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def history(state: State, limit: int, as_json: bool) -> None:
    """Recent rollouts from the state database."""
    from deploybus.store import Store
    rows = Store(state.config.state_url).rollouts(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        hosts = ", ".join(f"{h['host']}:{h['state']}" for h in r["hosts"])
        click.echo(f"{r['created_at'][:19]}  {r['id']}  {r['project']} {r['ref']} -> "
                   f"{r['environment']}  {r['state']}  by {r['user']}  [{hosts}]")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def hosts(state: State, as_json: bool) -> None:
    """Hosts seen by the orchestrator, and what runs where."""
    from deploybus.store import Store
    rows = Store(state.config.state_url).hosts()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for h in rows:
        projects = h["info"].get("projects", {})
        running = ", ".join(f"{p}={v.get('ref')}@{(v.get('commit') or '')[:8]}"
                            for p, v in projects.items()) or "-"
        click.echo(f"{h['name']:20} seen {h['age']:6.0f}s ago  {running}")


# -- keys, config, hooks -------------------------------------------------------------

@cli.group()
def keys() -> None:
    """Signing keys."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path())
def keys_generate(name: str, directory: str) -> None:
    """Create NAME.key (private, 0600) and NAME.pub in DIR."""
    from deploybus.refs import NAME_RE
    from deploybus.signing import SigningKey
    if not NAME_RE.fullmatch(name):
        raise click.BadParameter("letters, digits, '.', '_' and '-' only", param_hint="NAME")
    try:
        priv, pub = SigningKey.generate(name).save(directory)
    except FileExistsError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"private key: {priv}\npublic key:  {pub}\n{pub.read_text().strip()}")


@cli.group("config")
def config_group() -> None:
    """Configuration file."""


@config_group.command("check")
@click.argument("file", required=False)
@pass_state
def config_check(state: State, file: str | None) -> None:
    """Check FILE (default: --config) and say what it defines."""
    path = file or state.config_path
    try:
        cfg = configmod.load(path)
    except ConfigError as exc:
        click.echo(f"{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    from deploybus.bus import redact
    click.echo(f"{path}: ok: bus {redact(cfg.bus_url)}, {len(cfg.projects)} project(s), "
               f"{len(cfg.environments)} environment(s), "
               f"{len({h for e in cfg.environments.values() for h in e.hosts})} host(s), "
               f"{len(cfg.trusted)} trusted key(s)")


@cli.group()
def hook() -> None:
    """Git hooks."""


@hook.command("install")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--project", required=True, help="Project the repository belongs to.")
@click.option("--force", is_flag=True, help="Replace a post-receive hook not written by us.")
@pass_state
def hook_install(state: State, repo: str, project: str, force: bool) -> None:
    """Install the post-receive hook into bare repository REPO."""
    from deploybus.daemons.git_listener.hook import install
    cfg = state.config
    try:
        path = install(Path(repo), project=project, config=cfg.path, force=force)
    except DeployBusError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"installed {path}")


@cli.group()
def notify() -> None:
    """Publish events from scripts and hooks."""


@notify.command("push")
@click.option("--project", required=True)
@pass_state
def notify_push(state: State, project: str) -> None:
    """Read 'old new ref' lines (post-receive input) and publish git.push events."""
    from deploybus.bus import connect
    from deploybus.daemons.git_listener.hook import publish_pushes, pushes
    bodies = pushes(sys.stdin, project=project)
    try:
        cfg = state.config
        key = cfg.load_signing_key() if cfg.signing_key else None
        bus = connect(cfg.bus_url, client_name=f"hook-{project}",
                      publish_timeout=HOOK_PUBLISH_TIMEOUT)
        try:
            n = publish_pushes(bus, bodies, sender=f"hook@{socket.gethostname()}", signing_key=key)
        finally:
            bus.close()
        click.echo(f"deploybus: published {n} push event(s) for {project}", err=True)
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        # Never fail the push: the mirrors catch up on the next fetch.
        click.echo(f"deploybus: warning: push event not published: {exc}", err=True)


if __name__ == "__main__":
    main()
