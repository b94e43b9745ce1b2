"""The ``deploybus`` command group and what its subcommands share (click).

Daemons run as ``deploybus agent``, ``deploybus orchestrator`` and so on, one
subcommand each, so systemd units stay one line. Exit codes are the named
``EXIT_*`` constants of :mod:`deploybus.exits`. The runner (and with it
structlog) is imported only by the daemon subcommands, so that ``deploy``,
``history`` and the rest start quickly.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any

import click

from deploybus import __version__
from deploybus import config as configmod
from deploybus.errors import BusError, ConfigError, DeployBusError
from deploybus.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_SOFTWARE, EXIT_UNAVAILABLE

if TYPE_CHECKING:
    from deploybus.runner import Context, Service

DEFAULT_CONFIG = "/etc/deploybus/deploybus.yaml"


class State:
    def __init__(self, config_path: str, key_path: str | None = None) -> None:
        self.config_path = config_path
        #: --key: the private key to sign with, over the config's choice.
        self.key_path = key_path
        self._config: configmod.Config | None = None

    def signing_key(self, host: str | None = None) -> Any:
        """The key this command signs with: --key, else the host's own key
        (hosts.<host>.signing), else keys.signing."""
        from pathlib import Path
        return self.config.load_signing_key(
            host, path=Path(self.key_path).resolve() if self.key_path else None)

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


def explain(exc: DeployBusError, config_path: str | None = None) -> tuple[str, int]:
    """What to tell a person about ``exc``, and the exit code: the CLI's one
    boundary for deploybus errors, so no command prints a traceback for a
    user error (a wrong key path, a refused password, a broker that is down)."""
    from deploybus.errors import BusAuthError
    if isinstance(exc, ConfigError):
        return f"deploybus: config error: {exc}", EXIT_CONFIG
    if isinstance(exc, BusAuthError):
        where = f" (config: {config_path})" if config_path else ""
        return f"deploybus: {exc}{where}", EXIT_CONFIG
    if isinstance(exc, BusError):
        return f"deploybus: bus unavailable: {exc}", EXIT_UNAVAILABLE
    from deploybus.store import StoreError  # SQLAlchemy: only when it was raised
    if isinstance(exc, StoreError):
        return f"deploybus: {exc}", EXIT_UNAVAILABLE
    return f"deploybus: {exc}", EXIT_FAILURE


class Group(click.Group):
    """The ``deploybus`` group: a deploybus error any subcommand lets through
    becomes a message and a named exit code (:func:`explain`)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DeployBusError as exc:
            state = ctx.obj if isinstance(ctx.obj, State) else None
            message, code = explain(exc, state.config_path if state else None)
            click.echo(message, err=True)
            ctx.exit(code)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="deploybus")
@click.option("--config", "-c", envvar="DEPLOYBUS_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="Config file (or DEPLOYBUS_CONFIG).")
@click.option("--key", "key_path", envvar="DEPLOYBUS_KEY", default=None, metavar="FILE",
              help="Private key to sign with (or DEPLOYBUS_KEY; default: keys.signing, and "
                   "for a host's daemons hosts.<host>.signing).")
@click.pass_context
def cli(ctx: click.Context, config: str, key_path: str | None) -> None:
    """deploybus: one-click, audited deploys from a git tag to your servers."""
    ctx.obj = State(config, key_path)


def main() -> None:
    cli(prog_name="deploybus")


def _context(state: State, host: str | None, *, daemon: str,
             publish_timeout: float = 30.0) -> Context:
    """What a daemon runs with: the config, its host name, the bus and the key
    it signs with (every message on the bus is signed: a daemon without a
    key does not start)."""
    from deploybus.bus import connect
    from deploybus.runner import Context

    cfg = state.config
    name = host or socket.gethostname()
    try:
        key = state.signing_key(name if host is not None or daemon in HOST_DAEMONS else None)
    except ConfigError as exc:
        click.echo(f"deploybus {daemon}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        bus = connect(cfg.bus_url, client_name=f"{daemon}@{name}",
                      publish_timeout=publish_timeout)
    except BusError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return Context(config=cfg, bus=bus, host=name, signing_key=key)


#: Daemons that act for one host (and sign with its key).
HOST_DAEMONS = frozenset({"agent", "fetcher", "keepalive"})


def _run(name: str, ctx: Context, services: list[Service]) -> None:
    from deploybus.runner import Runner
    try:
        code = Runner(services, name=name).run()
    except DeployBusError as exc:
        message, code = explain(exc, str(ctx.config.path))
        if code == EXIT_FAILURE:
            code = EXIT_SOFTWARE  # a daemon that cannot start is not a failed deploy
        click.echo(f"deploybus {name}: {message.removeprefix('deploybus: ')}", err=True)
    finally:
        ctx.bus.close()
    sys.exit(code)


host_option = click.option("--host", default=None, help="This host's name (default: hostname).")
