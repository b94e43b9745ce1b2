#!/usr/bin/python3
"""A stand-in for systemd on a machine where systemd is not PID 1 (this CI
machine, a container): start, stop and report an installed unit, as the
start/stop/status/restart commands of Puppet's ``base`` service provider.

    unitctl.py --run-dir DIR start|stop|status|restart UNIT

It reads the unit file the package installed (/lib/systemd/system/UNIT.service)
and does what systemd would with the parts that decide what runs and as whom:

- ``ConditionPathExists=``: not met, nothing is started and ``start``
  succeeds (as systemd's does);
- ``Environment=``, ``EnvironmentFile=`` (``-`` for optional), ``%H``
  (``hostname``), ``%n``, ``%%``; ``${VAR}`` (one word) and ``$VAR`` (split
  on whitespace) in ``ExecStart=``; systemd's minimal environment (PATH,
  LANG, HOME/USER/LOGNAME/SHELL of ``User=``, ``STATE_DIRECTORY``,
  ``LOGS_DIRECTORY``);
- ``User=``, ``Group=`` (default: the user's primary group, supplementary
  groups from /etc/group), ``UMask=``, ``WorkingDirectory=``;
- ``StateDirectory=``/``LogsDirectory=``/``ConfigurationDirectory=`` (and
  their modes): made under /var/lib, /var/log and /etc, the first two owned
  by ``User=``;
- ``TimeoutStartSec=``: ``start`` waits for the daemon's ``ready`` log line
  (what its ``READY=1`` means; no ``NOTIFY_SOCKET`` is given, so it sends no
  sd_notify at all) and fails if it exits first or takes longer;
- ``KillMode=mixed``/``TimeoutStopSec=``: ``stop`` sends SIGTERM to the main
  process, waits, then SIGKILL to its whole process group.

What it does NOT do, and systemd would: the sandbox (``ProtectSystem=``,
``CapabilityBoundingSet=``, ``PrivateTmp=``, ``NoNewPrivileges=``, ...), the
watchdog, ``Restart=`` (a daemon that dies stays dead), cgroups (a process a
daemon double-forks escapes ``stop``), the journal (output goes to
``DIR/UNIT.log``), and enabling at boot. Standard library only: Puppet runs
it with Debian's python3.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

# The unit file is read by the packaging tests' reader (standard library
# only, like this script); Puppet runs this file directly, not as a module.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.packaging.units import Unit  # noqa: E402

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"),
             Path("/usr/lib/systemd/system"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fail(message: str) -> None:
    print(f"unitctl: {message}", file=sys.stderr)
    sys.exit(1)


def read_unit(unit: str) -> Unit:
    """The installed unit file, where systemd would look for it."""
    for d in UNIT_DIRS:
        path = d / f"{unit}.service"
        if path.is_file():
            return Unit.load(path)
    fail(f"{unit}.service not found in {', '.join(map(str, UNIT_DIRS))}")
    raise AssertionError("unreachable")


def paths(run_dir: Path, unit: str) -> tuple[Path, Path]:
    return run_dir / f"{unit}.pid", run_dir / f"{unit}.log"


def running_pid(run_dir: Path, unit: str) -> int | None:
    pidfile, _ = paths(run_dir, unit)
    try:
        pid = int(pidfile.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # a zombie (nobody reaped it: PID 1 here may not) is not running
    return None if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") else pid


def start(run_dir: Path, unit: str) -> None:
    if running_pid(run_dir, unit):
        return
    u = read_unit(unit)
    for cond in u.all("ConditionPathExists", section="[Unit]"):
        negate = cond.startswith("!")
        if Path(cond.lstrip("!")).exists() == negate:
            print(f"unitctl: {unit}: condition ConditionPathExists={cond} not met; not started")
            return
    user = u.get("User") or "root"
    pw = pwd.getpwnam(user)
    group = u.get("Group")
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    env = {"PATH": PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": pw.pw_dir,
           "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell}
    try:
        env.update(u.environment())
    except FileNotFoundError as exc:
        fail(str(exc))
    env.update(u.make_directories(pw.pw_uid, gid))
    argv = u.argv(env)
    cwd = None
    wd = (u.get("WorkingDirectory") or "").lstrip("-")
    if wd:
        cwd = pw.pw_dir if wd == "~" else wd
    pidfile, logfile = paths(run_dir, unit)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = logfile.open("ab")
    start_at = logfile.stat().st_size
    log.write(f"--- unitctl start {time.strftime('%F %T')}: {shlex.join(argv)} as {user}\n"
              .encode())
    log.flush()
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        user=pw.pw_uid, group=gid,
        extra_groups=os.getgrouplist(user, gid) if pw.pw_uid != 0 else None,
        umask=int(u.get("UMask") or "0022", 8), start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    timeout = float((u.get("TimeoutStartSec") or "90").rstrip("s"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with logfile.open("rb") as f:
            f.seek(start_at)
            if b'"event": "ready"' in f.read():
                return
        if proc.poll() is not None:
            fail(f"{unit} exited with status {proc.returncode} before it was ready; "
                 f"see {logfile}")
        time.sleep(0.1)
    fail(f"{unit} not ready within {timeout:g} s; see {logfile}")


def stop(run_dir: Path, unit: str) -> None:
    pid = running_pid(run_dir, unit)
    if pid is None:
        return
    timeout = float((read_unit(unit).get("TimeoutStopSec") or "90").rstrip("s"))
    os.kill(pid, signal.SIGTERM)   # KillMode=mixed: the main process first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(run_dir, unit):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)   # then whatever is left of it
    except ProcessLookupError:
        pass
    paths(run_dir, unit)[0].unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path,
                    help="where pid files and each unit's log go")
    ap.add_argument("action", choices=("start", "stop", "status", "restart"))
    ap.add_argument("unit")
    a = ap.parse_args()
    if a.action == "status":
        pid = running_pid(a.run_dir, a.unit)
        print(f"{a.unit}: {'running, pid ' + str(pid) if pid else 'stopped'}")
        sys.exit(0 if pid else 3)
    if a.action in ("stop", "restart"):
        stop(a.run_dir, a.unit)
    if a.action in ("start", "restart"):
        start(a.run_dir, a.unit)


if __name__ == "__main__":
    main()
