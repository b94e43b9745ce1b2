"""What every bench module shares: paths, names, the error and running commands."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

#: bench/, where the benches and their venvs live.
BENCH = Path(__file__).resolve().parent.parent
#: The deploybus checkout measured.
REPO_ROOT = BENCH.parent
#: The project's package directories (setup.cfg maps them into ``deploybus``).
PACKAGE_DIRS = ("deploybus", "daemons", "frontend")
#: The bus the benches use unless told otherwise (``--broker``).
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"

#: The post script every method runs in the new release, on every host.
POST_SCRIPT = "test -f file0001.txt"
#: The deployed project's name and the environment of the N hosts.
PROJECT = "bench"
ENVIRONMENT = "bench"

#: git's identity and dates for the generated commits (the same every time).
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@invalid",
           "GIT_AUTHOR_DATE": "2024-06-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-06-01T00:00:00Z"}


class BenchError(Exception):
    """The bench cannot go on (a command failed, a host is not on the tag, ...)."""


def say(msg: str) -> None:
    """Progress on stderr: stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (output appended to ``log`` if given); BenchError with the
    output's tail if it fails."""
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n[exit {p.returncode}]\n")
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-25:])
        raise BenchError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return p


def git(*args: str, cwd: Path) -> str:
    """``git ARGS`` in ``cwd`` with the bench's identity; its output, stripped."""
    return run(["git", *args], cwd=cwd, env=GIT_ENV).stdout.strip()


def revision() -> str:
    """The deploybus checkout measured: commit, and '+dirty' with local changes."""
    try:
        head = run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"],
                    cwd=REPO_ROOT).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (BenchError, OSError):
        return "unknown"


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def rabbit_vhost() -> str:
    """A new RabbitMQ vhost for one bench, guest allowed everything in it."""
    name = f"deploybus-bench-{uuid.uuid4().hex[:8]}"
    for cmd in (["rabbitmqctl", "-q", "add_vhost", name],
                ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*",
                 ".*"]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return name
