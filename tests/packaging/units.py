"""Start a daemon the way its installed systemd unit would, on a machine
without systemd as PID 1: the unit's ``ExecStart`` (with its specifiers and
``${VAR}``s expanded), ``User``/``Group``, ``Environment``/``EnvironmentFile``,
``WorkingDirectory``, the ``StateDirectory``/``LogsDirectory`` systemd would
make, and ``NOTIFY_SOCKET``/``WATCHDOG_USEC`` pointing at a datagram socket
the test reads (:class:`NotifySocket`).

What it cannot reproduce: the sandbox (``ProtectSystem``, capabilities...),
cgroups and ``KillMode``; ``systemd-analyze verify`` checks those lines.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The environment systemd gives every system service before the unit's own.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Unit:
    """The [Service] settings of a unit file that starting it depends on."""

    path: Path
    settings: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Unit:
        unit = cls(path)
        section = None
        for raw in path.read_text().replace("\\\n", " ").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            key, _, value = line.partition("=")
            unit.settings.setdefault(f"{section}{key.strip()}", []).append(value.strip())
        return unit

    def get(self, key: str, section: str = "[Service]") -> str | None:
        values = self.settings.get(f"{section}{key}")
        return values[-1] if values else None

    def all(self, key: str, section: str = "[Service]") -> list[str]:
        return self.settings.get(f"{section}{key}", [])

    def specifiers(self, text: str) -> str:
        """%H (host name), %n and %N (the unit's name, with and without
        ``.service``) and %%; others are left as they are."""
        table = {"H": socket.gethostname(), "n": self.path.name, "N": self.path.stem, "%": "%"}
        return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), text)

    def environment(self) -> dict[str, str]:
        """Environment= then EnvironmentFile= (which overrides it), as systemd does."""
        env: dict[str, str] = {}
        for value in self.all("Environment"):
            for word in shlex.split(self.specifiers(value)):
                k, _, v = word.partition("=")
                env[k] = v
        for value in self.all("EnvironmentFile"):
            optional = value.startswith("-")
            path = Path(self.specifiers(value.lstrip("-")))
            if not path.exists():
                if optional:
                    continue
                raise FileNotFoundError(f"{self.path}: EnvironmentFile {path} is missing")
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith(("#", ";")) or "=" not in line:
                    continue
                k, _, v = line.partition("=")
                v = v.strip()
                env[k.strip()] = " ".join(shlex.split(v)) if v[:1] in ("'", '"') else v
        return env

    def make_directories(self, uid: int, gid: int) -> dict[str, str]:
        """Make the unit's StateDirectory, LogsDirectory and
        ConfigurationDirectory (with their modes; the first two owned by
        ``uid``:``gid``) as systemd does before it starts the unit; the
        variables that name them (STATE_DIRECTORY, ...)."""
        env: dict[str, str] = {}
        for kind, base in (("StateDirectory", "/var/lib"), ("LogsDirectory", "/var/log"),
                           ("ConfigurationDirectory", "/etc")):
            value = self.get(kind)
            if not value:
                continue
            mode = int(self.get(f"{kind}Mode") or "0755", 8)
            paths = [Path(base) / v for v in value.split()]
            for path in paths:
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(mode)
                if kind != "ConfigurationDirectory":
                    os.chown(path, uid, gid)
            env[kind.upper().replace("DIRECTORY", "_DIRECTORY")] = ":".join(map(str, paths))
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        """ExecStart split into words: ${VAR} replaced in place, a bare $VAR
        word split at whitespace into zero or more words (systemd.service(5))."""
        # (the prefixes @ - : + ! change how systemd runs it, not what)
        command = self.specifiers((self.get("ExecStart") or "").lstrip("@-:+!"))
        words: list[str] = []
        for word in shlex.split(command):
            bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if bare:
                words.extend(env.get(bare.group(1), "").split())
                continue
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                lambda m: env.get(m.group(1), ""), word))
        return words


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify(); every message
    is kept with the time it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # a daemon running as another user must reach it
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.cond:
                for line in data.decode(errors="replace").splitlines():
                    self.messages.append((time.monotonic(), line))
                self.cond.notify_all()

    def times(self, message: str, since: float = 0.0) -> list[float]:
        with self.cond:
            return [t for t, m in self.messages if m == message and t >= since]

    def wait_for(self, message: str, timeout: float, since: float = 0.0,
                 count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len([1 for t, m in self.messages if m == message and t >= since]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class UnitProcess:
    """A daemon started from its unit; ``stop()`` is systemd's warm stop with
    KillMode=mixed: SIGTERM to the main process only."""

    def __init__(self, unit_path: Path, workdir: Path, *, watchdog_usec: int,
                 extra_env: dict[str, str] | None = None) -> None:
        self.unit = Unit.load(unit_path)
        self.notify = NotifySocket(workdir / f"notify-{unit_path.stem}-{time.time_ns()}")
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
        user = self.unit.get("User") or "root"
        pw = pwd.getpwnam(user)
        group = self.unit.get("Group")
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
        env.update({"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                    "SHELL": pw.pw_shell})
        env.update(self.unit.make_directories(pw.pw_uid, gid))
        env.update(self.unit.environment())
        env.update({"NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": str(watchdog_usec),
                    "INVOCATION_ID": os.urandom(16).hex()})
        env.update(extra_env or {})
        self.env = env
        self.argv = self.unit.argv(env)
        self.log_path = workdir / f"{unit_path.stem}-{time.time_ns()}.log"
        self.log = self.log_path.open("w")
        umask = int(self.unit.get("UMask") or "0022", 8)
        kwargs: dict[str, object] = {}
        if pw.pw_uid != 0:
            kwargs = {"user": pw.pw_uid, "group": gid, "extra_groups": []}
        self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.unit.get("WorkingDirectory") or "/",
                                     umask=umask, start_new_session=True,
                                     **kwargs)  # type: ignore[call-overload]
        # WATCHDOG_PID names the main process; the runner does not read it.
        self.started = time.monotonic()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM to the main process; SIGKILL to its session after ``timeout``
        (TimeoutStopSec). Returns the exit status, None if it had to be killed."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None
        finally:
            self.notify.close()
            self.log.close()
