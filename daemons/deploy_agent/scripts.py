"""Hook scripts: run as the configured user, bounded in time, output streamed.

A script runs under ``/bin/sh -c`` in a session (and process group) of its
own, so a timeout kills everything it started: SIGTERM to the group, then
SIGKILL after :data:`KILL_GRACE`. Its stdout and stderr are read as they
come and sent back as ``deploy.progress`` batches (see
:class:`OutputBatcher`); a script that prints nothing for
:data:`SILENT_PING` seconds still produces a "still running" line, so a
watcher can tell a slow script from a dead agent.

The process group id and its start time are handed to ``on_start`` before
anything else happens, so the agent can write them to its journal: after a
crash, a restarted agent kills a script the dead agent left behind instead
of letting it run beside the next deploy (:func:`kill_orphan_group`).
"""

from __future__ import annotations

import grp
import os
import pwd
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deploybus.config import OutputConfig
from deploybus.errors import DeployError
from deploybus.procgroup import kill_group

#: Seconds between SIGTERM and SIGKILL to a timed-out script's process group.
KILL_GRACE = 2.0
#: After the script exits, seconds to keep reading output its background
#: children may still write to the pipe; then the agent stops listening.
DRAIN_AFTER_EXIT = 1.0
#: A script silent this long gets a "still running" progress line.
SILENT_PING = 15.0

#: ``progress(step, message, lines)``: what the agent publishes as deploy.progress.
Progress = Callable[[str, str, "list[str] | None"], None]
#: ``on_start(pgid, start_time)`` and ``on_exit()``: journal the running script.
OnStart = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class RunAs:
    """The account scripts run as."""

    user: str
    uid: int
    gid: int
    home: str

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user}

    def popen_kwargs(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}  # already this account (checked by run_as)
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def run_as(user: str | None, group: str | None) -> RunAs | None:
    """The account of a project's ``user``/``group``; None for the agent's own.

    Raises DeployError when the account does not exist here or the agent,
    not being root, cannot become it."""
    if user is None and group is None:
        return None
    try:
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise DeployError(f"user {user!r} does not exist on this host") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DeployError(f"group {group!r} does not exist on this host") from None
    if os.geteuid() != 0 and (pw.pw_uid != os.geteuid() or gid != os.getegid()):
        raise DeployError(f"scripts are to run as {pw.pw_name}:{gid}, which needs the agent "
                          f"to run as root")
    return RunAs(pw.pw_name, pw.pw_uid, gid, pw.pw_dir)


# -- output -------------------------------------------------------------------------------

class OutputBatcher:
    """Turns a script's bytes into lines and sends them in bounded batches.

    A batch goes out when it has ``cfg.lines`` lines or its first line has
    waited ``cfg.interval`` seconds, whichever comes first. A line longer
    than ``cfg.line_chars`` is cut (``... [line cut]``); once ``cfg.max_bytes``
    of a step's output has been queued, one ``... output truncated`` line is
    sent and the rest is only counted. The reader thread calls :meth:`feed`;
    the thread running the script calls :meth:`flush` (it owns publishing).
    """

    def __init__(self, step: str, progress: Progress, cfg: OutputConfig) -> None:
        self.step, self.progress, self.cfg = step, progress, cfg
        self.cond = threading.Condition()
        self.pending: list[str] = []
        self.first_at: float | None = None
        self.buf = b""
        self.cutting = False      # inside a line that was already cut
        self.queued_bytes = 0
        self.truncated = False
        self.dropped = 0          # bytes not sent after truncation
        self.total = 0
        self.tail = b""           # last bytes, for the failure reason
        self.last_output = time.monotonic()

    # reader side ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        with self.cond:
            self.total += len(data)
            self.last_output = time.monotonic()
            self.tail = (self.tail + data)[-4096:]
            self.buf += data
            while True:
                nl = self.buf.find(b"\n")
                if nl < 0:
                    break
                raw, self.buf = self.buf[:nl], self.buf[nl + 1:]
                if self.cutting:
                    self.cutting = False  # the rest of a line already sent cut
                    continue
                self._line(raw)
            # A line without an end yet that is already too long: send it cut,
            # drop the rest of it, and keep memory bounded.
            limit = self.cfg.line_chars * 4
            if len(self.buf) > limit:
                if not self.cutting:
                    self._line(self.buf)
                    self.cutting = True
                self.buf = b""
            if len(self.pending) >= self.cfg.lines:
                self.cond.notify_all()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if len(text) > self.cfg.line_chars:
            text = text[:self.cfg.line_chars] + " ... [line cut]"
        if self.truncated:
            self.dropped += len(raw) + 1
            return
        size = len(text.encode("utf-8", "replace")) + 1
        if self.queued_bytes + size > self.cfg.max_bytes:
            self.truncated = True
            self.dropped += len(raw) + 1
            text = f"... output truncated after {self.queued_bytes} bytes"
            size = 0
        self.queued_bytes += size
        if not self.pending:
            self.first_at = time.monotonic()
        self.pending.append(text)

    def close(self) -> None:
        """The output ended: a last line without a newline counts too."""
        with self.cond:
            if self.buf and not self.cutting:
                self._line(self.buf)
            self.buf = b""

    # script side ----------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout``, less if a batch becomes due."""
        with self.cond:
            if self.first_at is not None:
                timeout = min(timeout, max(0.0, self.first_at + self.cfg.interval
                                           - time.monotonic()))
            if len(self.pending) < self.cfg.lines and timeout > 0:
                self.cond.wait(timeout)

    def flush(self, *, force: bool = False) -> None:
        """Send what is due (everything with ``force``), in batches of ``cfg.lines``."""
        while True:
            with self.cond:
                if not self.pending:
                    return
                full = len(self.pending) >= self.cfg.lines
                old = self.first_at is not None and \
                    time.monotonic() - self.first_at >= self.cfg.interval
                if not (force or full or old):
                    return
                batch = self.pending[:self.cfg.lines]
                del self.pending[:self.cfg.lines]
                self.first_at = time.monotonic() if self.pending else None
            self.progress(self.step, f"{self.step} output", batch)

    def last_line(self) -> str:
        with self.cond:
            lines = [x for x in self.tail.decode("utf-8", "replace").splitlines() if x.strip()]
        return lines[-1].strip()[:200] if lines else ""


def _read(stream: IO[bytes], batcher: OutputBatcher, stop: threading.Event) -> None:
    fd = stream.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while not stop.is_set():
        if not poller.poll(200):
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        batcher.feed(data)
    batcher.close()


# -- processes ------------------------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _group_alive(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def kill_orphan_group(pgid: int, start: int | None) -> bool:
    """Kill the process group a dead agent's script left behind, if it is
    still that group. The leader's start time tells a reused pid apart; when
    the leader is gone but members remain, the id is still the group's
    (Linux does not hand out a pid that is in use as a process group id)."""
    leader = proc_start_time(pgid)
    if leader is not None and start is not None and leader != start:
        return False
    if leader is None and not _group_alive(pgid):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_script(step: str, script: str, *, cwd: Path, env: dict[str, str], timeout: float,
               progress: Progress, output: OutputConfig | None = None,
               runas: RunAs | None = None, on_start: OnStart | None = None,
               what: str | None = None) -> None:
    """Run one hook script; raise DeployError if it fails or times out."""
    what = what or f"{step} script"
    cfg = output or OutputConfig()
    progress(step, f"running {what}", None)
    full_env = {**env, **(runas.env() if runas else {})}
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=cwd, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                **(runas.popen_kwargs() if runas else {}))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the environment or cwd
        raise DeployError(f"{what} could not start: {exc}") from None
    assert proc.stdout is not None
    if on_start is not None:
        on_start(proc.pid, proc_start_time(proc.pid))
    batcher = OutputBatcher(step, progress, cfg)
    stop = threading.Event()
    reader = threading.Thread(target=_read, args=(proc.stdout, batcher, stop), daemon=True,
                              name=f"script-output-{step}")
    reader.start()
    started = time.monotonic()
    deadline = started + timeout
    next_ping = started + SILENT_PING
    timed_out = False
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                kill_group(proc, grace=KILL_GRACE)
                break
            batcher.wait(min(0.1, deadline - now))
            batcher.flush()
            now = time.monotonic()
            if now >= next_ping:
                if now - batcher.last_output >= SILENT_PING:
                    progress(step, f"{what} still running ({now - started:.0f}s)", None)
                next_ping = now + SILENT_PING
    except BaseException:
        kill_group(proc, grace=KILL_GRACE)
        raise
    finally:
        reader.join(DRAIN_AFTER_EXIT)
        stop.set()
        reader.join(1.0)
        proc.stdout.close()
        batcher.flush(force=True)
    elapsed = time.monotonic() - started
    note = f" ({batcher.dropped} bytes of output not shown)" if batcher.dropped else ""
    if timed_out:
        progress(step, f"{what} timed out after {timeout:g}s; killed{note}", None)
        raise DeployError(f"{what} timed out after {timeout:g}s")
    if proc.returncode != 0:
        code = proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
        progress(step, f"{what} {how}{note}", None)
        last = batcher.last_line()
        raise DeployError(f"{what} {how}" + (f": {last}" if last else ""))
    progress(step, f"{what} ok ({elapsed:.1f}s){note}", None)
