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
- ``StateDirectory=``/``LogsDirectory=`` (and their modes): made under
  /var/lib and /var/log, owned by ``User=``;
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
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"),
             Path("/usr/lib/systemd/system"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fail(message: str) -> None:
    print(f"unitctl: {message}", file=sys.stderr)
    sys.exit(1)


def read_unit(unit: str) -> dict[str, list[str]]:
    """The unit's settings: key -> every value given (in order), all sections."""
    for d in UNIT_DIRS:
        path = d / f"{unit}.service"
        if path.is_file():
            break
    else:
        fail(f"{unit}.service not found in {', '.join(map(str, UNIT_DIRS))}")
    settings: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def specifiers(text: str, unit: str) -> str:
    table = {"H": socket.gethostname(), "n": f"{unit}.service", "N": unit, "%": "%"}
    return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), text)


def environment_file_value(raw: str) -> str:
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        return " ".join(shlex.split(raw))
    return raw


def unit_environment(unit: str, s: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in s.get("Environment", []):
        for assignment in shlex.split(specifiers(value, unit)):
            k, _, v = assignment.partition("=")
            env[k] = v
    for value in s.get("EnvironmentFile", []):
        optional = value.startswith("-")
        path = Path(specifiers(value.lstrip("-"), unit))
        if not path.is_file():
            if optional:
                continue
            fail(f"{unit}: EnvironmentFile {path} missing")
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            k, _, v = line.partition("=")
            env[k.strip()] = environment_file_value(v)
    return env


def exec_start(unit: str, s: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    (line,) = s["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(specifiers(line.lstrip("@-:+!"), unit)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:   # $VAR: split on whitespace, as systemd does
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                           lambda m: env.get(m.group(1), ""), word))
    return argv


def make_dirs(s: dict[str, list[str]], key: str, base: Path, uid: int, gid: int,
              env: dict[str, str], var: str) -> None:
    mode = int((s.get(f"{key}Mode") or ["0755"])[-1], 8)
    made = []
    for value in s.get(key, []):
        for rel in value.split():
            d = base / rel
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
            if uid != 0:
                os.chown(d, uid, gid)
            made.append(str(d))
    if made:
        env[var] = ":".join(made)


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
    s = read_unit(unit)
    for cond in s.get("ConditionPathExists", []):
        negate = cond.startswith("!")
        if Path(cond.lstrip("!")).exists() == negate:
            print(f"unitctl: {unit}: condition ConditionPathExists={cond} not met; not started")
            return
    user = (s.get("User") or ["root"])[-1]
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(s["Group"][-1]).gr_gid if "Group" in s else pw.pw_gid
    env = {"PATH": PATH, "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": pw.pw_dir,
           "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell}
    env.update(unit_environment(unit, s))
    make_dirs(s, "StateDirectory", Path("/var/lib"), pw.pw_uid, gid, env, "STATE_DIRECTORY")
    make_dirs(s, "LogsDirectory", Path("/var/log"), pw.pw_uid, gid, env, "LOGS_DIRECTORY")
    argv = exec_start(unit, s, env)
    cwd = None
    if "WorkingDirectory" in s:
        wd = s["WorkingDirectory"][-1].lstrip("-")
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
        umask=int((s.get("UMask") or ["0022"])[-1], 8), start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    timeout = float((s.get("TimeoutStartSec") or ["90"])[-1].rstrip("s"))
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
    s = read_unit(unit)
    timeout = float((s.get("TimeoutStopSec") or ["90"])[-1].rstrip("s"))
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
