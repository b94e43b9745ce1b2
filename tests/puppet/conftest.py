"""The Puppet module (puppet/deploybus) under Debian's own Puppet 7.

Every test here needs `puppet` (Debian package puppet-agent) and
`puppet-lint`; without them it fails, saying how to install them (they are
in scripts/setup-brokers.sh's PACKAGES, which `make test` installs): never a
silent skip. `puppet apply` runs with a confdir, vardir and codedir of the
test's own, so the machine's Puppet state is not touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# The packaging tests' build of the .debs, once per session (cached in the
# process: importing the fixture here does not build twice).
from tests.packaging.conftest import built_debs  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
MODULEPATH = ROOT / "puppet"
MODULE = MODULEPATH / "deploybus"
DEPLOYBUS = ROOT / ".venv" / "bin" / "deploybus"

INSTALL = ("apt-get install puppet-agent puppet-lint (scripts/setup-brokers.sh installs "
           "them: `make brokers` as root)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def puppet() -> str:
    return tool("puppet")


@pytest.fixture(scope="session")
def puppet_lint() -> str:
    return tool("puppet-lint")


class Puppet:
    """`puppet apply` with --modulepath puppet/ and directories of its own."""

    def __init__(self, binary: str, base: Path) -> None:
        self.binary = binary
        self.dirs = {d: base / d for d in ("confdir", "vardir", "codedir", "logdir", "rundir")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)

    def apply(self, manifest: Path, *args: str,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run it with --detailed-exitcodes: 0 nothing changed, 2 changes,
        4 failures, 6 both (1: the catalog did not compile)."""
        cmd = [self.binary, "apply", "--detailed-exitcodes", "--color=false",
               "--modulepath", str(MODULEPATH),
               *(f"--{k}={v}" for k, v in self.dirs.items()), *args, str(manifest)]
        env = {**os.environ, "LANG": "C.UTF-8"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def output(r: subprocess.CompletedProcess[str]) -> str:
    """What Puppet said, without facter's complaints about this sandbox."""
    return "\n".join(line for line in (r.stdout + r.stderr).splitlines()
                     if "Facter:" not in line)


@pytest.fixture
def puppet_apply(puppet: str, tmp_path: Path) -> Puppet:
    return Puppet(puppet, tmp_path / "puppet")
