"""Build the Debian packages once per test session, for every test that
needs them (tests/packaging here, the Puppet module's tests too).

``build()`` runs ``packaging/build-deb.sh`` (what ``make deb`` runs) into a
directory of the session and caches the result in the process, so a
fixture defined in two conftest files still builds once. A missing tool is
a failure naming what to install, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "packaging" / "build-deb.sh"
#: The version of the older agent package the upgrade test starts from.
OLD_SUFFIX = "-0~pkgtest1"

#: tool -> the Debian package that has it (scripts/setup-brokers.sh installs them all)
TOOLS = {"dpkg": "dpkg", "dpkg-deb": "dpkg", "dpkg-buildpackage": "dpkg-dev",
         "dh": "debhelper", "dh_virtualenv": "dh-virtualenv", "fakeroot": "fakeroot",
         "chrpath": "chrpath", "lintian": "lintian", "systemd-analyze": "systemd",
         "git": "git"}

_lock = threading.Lock()
_built: dict[tuple[str, ...], dict[str, Path]] = {}
#: seconds each build took, for the report
build_seconds: dict[str, float] = {}


def require_tools(*tools: str) -> None:
    """Fail (not skip) unless we are root and every tool is installed."""
    if os.geteuid() != 0:
        pytest.fail("the packaging tests install packages with dpkg: run them as root",
                    pytrace=False)
    missing = [t for t in (tools or TOOLS) if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOLS.get(t, t) for t in missing})
        pytest.fail(f"missing {', '.join(missing)}: apt-get install {' '.join(pkgs)} "
                    f"(`make brokers` installs them: scripts/setup-brokers.sh)", pytrace=False)
    if not any((ROOT / "packaging" / "wheelhouse").glob("*.whl")):
        pytest.fail("packaging/wheelhouse/ has no wheels: run `make wheelhouse` (make test "
                    "does)", pytrace=False)


def version() -> str:
    for line in (ROOT / "deploybus" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split('"')[1]
    raise AssertionError("no __version__ in deploybus/__init__.py")


def build(out: Path, *, deb_version: str | None = None, agent_only: bool = False) -> dict[str, Path]:
    """Build the packages into ``out`` (once per process for each set of
    arguments); return {"agent": path, "server": path} (no "server" with
    ``agent_only``)."""
    key = (str(deb_version), str(agent_only))
    with _lock:
        if key in _built:
            return _built[key]
        require_tools("dpkg-buildpackage", "dh", "dh_virtualenv", "fakeroot", "chrpath", "git")
        env = dict(os.environ)
        env.pop("DEB_VERSION", None)
        if deb_version:
            env["DEB_VERSION"] = deb_version
        args = [str(BUILD_SCRIPT), "--out", str(out)] + (["--agent-only"] if agent_only else [])
        started = time.monotonic()
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        build_seconds[" ".join(key)] = time.monotonic() - started
        if r.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-6000:]}",
                        pytrace=False)
        debs = {}
        for line in r.stdout.split():
            path = Path(line)
            if path.suffix == ".deb":
                debs[path.name.split("_")[0].removeprefix("deploybus-")] = path
        expected = {"agent"} if agent_only else {"agent", "server"}
        assert set(debs) == expected, f"build made {sorted(debs)}: {r.stdout}"
        _built[key] = debs
        return debs
