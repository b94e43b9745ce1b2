"""The ``deploybus`` command line (click).

Daemons run as ``deploybus agent``, ``deploybus orchestrator`` and so on, one
subcommand each, so systemd units stay one line. Exit codes are the named
``EXIT_*`` constants of :mod:`deploybus.exits`.
"""

from deploybus.cli import admin, daemons, deploying  # noqa: F401 - they register commands
from deploybus.cli.base import cli, main

__all__ = ["cli", "main"]
