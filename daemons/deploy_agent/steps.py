"""One deploy on one host: fetch, pre script, checkout, post script, switch.

Any failure before the switch leaves ``current`` where it was; the new
release is marked failed. Scripts run with ``/bin/sh -c`` in their own
process group, get the ``DEPLOYBUS_*`` variables, and are killed (the whole
group) when they pass the project's ``script_timeout``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploybus import gitutil
from deploybus.config import ProjectConfig
from deploybus.errors import DeployError, RefError
from deploybus.layout import Layout

#: Bytes of script output kept and reported per step.
MAX_OUTPUT = 64 * 1024

Progress = Callable[[str, str, list[str] | None], None]


@dataclass
class Request:
    rollout: str
    project: str
    environment: str
    ref: str
    user: str


def run_script(step: str, script: str, *, cwd: Path, env: dict[str, str], timeout: float,
               progress: Progress) -> None:
    """Run one hook script; raise DeployError if it fails or times out."""
    progress(step, f"running {step} script", None)
    proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        lines = _tail(out)
        progress(step, f"{step} script timed out after {timeout:.0f}s", lines)
        raise DeployError(f"{step} script timed out after {timeout:.0f}s") from None
    lines = _tail(out)
    if proc.returncode != 0:
        progress(step, f"{step} script failed with exit code {proc.returncode}", lines)
        last = lines[-1] if lines else ""
        raise DeployError(f"{step} script failed with exit code {proc.returncode}"
                          + (f": {last}" if last else ""))
    progress(step, f"{step} script ok", lines)


def _tail(out: bytes) -> list[str]:
    text = out[-MAX_OUTPUT:].decode("utf-8", "replace")
    return text.splitlines()


def deploy(req: Request, project: ProjectConfig, *, root: Path, state_dir: Path, host: str,
           progress: Progress) -> dict[str, Any]:
    """Run the deploy; return the result body (status succeeded or failed)."""
    started = time.monotonic()
    layout = Layout(root, req.project)
    result: dict[str, Any] = {"status": "failed", "commit": None, "release": None}
    with layout.lock():
        previous = layout.current_release()
        prev_info = layout.info(previous) if previous else {}
        result.update(previous_release=previous, previous_commit=prev_info.get("commit"))
        release = None
        try:
            progress("fetch", f"resolving {req.ref}", None)
            mirror = gitutil.mirror_path(state_dir, req.project)
            try:
                commit = gitutil.resolve(mirror, req.ref)
            except RefError:
                progress("fetch", f"{req.ref} not in local mirror; fetching {project.git}", None)
                gitutil.update_mirror(state_dir, req.project, project.git)
                commit = gitutil.resolve(mirror, req.ref)
            result["commit"] = commit
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            release = f"{stamp}-{commit[:8]}-{req.rollout[:8]}"
            release_dir = layout.releases / release
            env = {
                **os.environ,
                "DEPLOYBUS_PROJECT": req.project, "DEPLOYBUS_ENV": req.environment,
                "DEPLOYBUS_REF": req.ref, "DEPLOYBUS_COMMIT": commit,
                "DEPLOYBUS_PREVIOUS_COMMIT": prev_info.get("commit") or "",
                "DEPLOYBUS_RELEASE": release, "DEPLOYBUS_RELEASE_DIR": str(release_dir),
                "DEPLOYBUS_USER": req.user, "DEPLOYBUS_ROLLOUT_ID": req.rollout,
                "DEPLOYBUS_HOST": host,
            }
            info = {"commit": commit, "ref": req.ref, "rollout": req.rollout, "user": req.user,
                    "environment": req.environment, "state": "checking-out",
                    "created": datetime.now(UTC).isoformat()}
            layout.write_info(release, info)
            if "pre" in project.scripts:
                run_script("pre", project.scripts["pre"], cwd=layout.dir, env=env,
                           timeout=project.script_timeout, progress=progress)
            progress("checkout", f"checking out {commit[:12]} into releases/{release}", None)
            partial = layout.releases / f"{release}.partial"
            files = gitutil.export(mirror, commit, partial)
            os.replace(partial, release_dir)
            progress("checkout", f"{files} entries checked out", None)
            if "post" in project.scripts:
                run_script("post", project.scripts["post"], cwd=release_dir, env=env,
                           timeout=project.script_timeout, progress=progress)
            layout.switch(release)
            layout.write_info(release, info | {"state": "ok"})
            progress("switch", f"current -> releases/{release}", None)
            removed = layout.cleanup(project.keep)
            if removed:
                progress("cleanup", f"removed {len(removed)} old release(s)", None)
            result.update(status="succeeded", release=release)
        except (DeployError, RefError, OSError) as exc:
            reason = str(exc)
            result.update(reason=reason, release=release)
            if release is not None:
                layout.write_info(release, layout.info(release) | {"state": "failed",
                                                                   "reason": reason})
                shutil.rmtree(layout.releases / f"{release}.partial", ignore_errors=True)
            progress("failed", reason, None)
    result["duration"] = round(time.monotonic() - started, 3)
    return result
