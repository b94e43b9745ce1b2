"""The Python package builds cleanly: the front end's templates and static
files are in it, and setuptools has nothing to warn about (it used to print a
screenful about ``frontend/static`` and ``templates`` on every ``make demo``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_has_the_front_end_files_and_setuptools_does_not_warn(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "Warning" not in out and "absent from the `packages`" not in out, out
    (wheel,) = tmp_path.glob("deploybus-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("deploybus/frontend/templates/base.html", "deploybus/frontend/static/style.css",
                 "deploybus/py.typed", "deploybus/daemons/deploy_agent/agent.py"):
        assert path in names, f"{path} missing from {wheel.name}"
