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
from typing import TYPE_CHECKING

import click

from deploybus import __version__
from deploybus import config as configmod
from deploybus.errors import BusError, ConfigError, DeployBusError
from deploybus.exits import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE

if TYPE_CHECKING:
    from deploybus.runner import Context, Service

DEFAULT_CONFIG = "/etc/deploybus/deploybus.yaml"


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
    from deploybus.runner import Context

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
    from deploybus.runner import Runner
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
