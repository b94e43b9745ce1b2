"""Wall time and CPU of one run, from /proc: the bench's waited children, the
long-lived daemons, the broker, idle bystanders and the rest of the machine."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

#: Clock ticks per second: the unit of /proc's CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK")

def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(own, children) CPU seconds of ``pid``: its utime+stime, and that of its
    children, both those it has waited for (cutime+cstime) and those still
    running (an agent keeps a ``git cat-file`` per mirror: its CPU must count
    before the agent reaps it). (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    f = [int(x) for x in text[text.rindex(")") + 2:].split()[11:15]]
    live = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        live += sum(proc_cpu(int(k)) for k in kids)
    return (f[0] + f[1]) / CLK_TCK, (f[2] + f[3]) / CLK_TCK + live


def proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (:func:`proc_cpu_split`)."""
    return sum(proc_cpu_split(pid))


def loadavg() -> float:
    """The 1-minute load average (-1 if unknown), printed in the notes."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def system_busy() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of the children this process has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def broker_pids() -> list[int]:
    """The broker's processes (RabbitMQ's Erlang VM): its CPU is counted apart."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.joinpath("comm").read_text().strip() == "beam.smp":
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


class Timed:
    """Wall time and CPU (waited children + given long-lived pids + broker)."""

    def __init__(self, pids: list[int] | None = None, bystanders: list[int] | None = None
                 ) -> None:
        self.pids = pids or []
        self.bystanders = bystanders or []
        self.broker = broker_pids()
        self.extra: dict[str, Any] = {}

    def __enter__(self) -> Timed:
        self.c0 = children_cpu()
        self.p0 = sum(proc_cpu(p) for p in self.pids)
        self.b0 = {p: proc_cpu(p) for p in self.broker}
        self.s0 = system_busy()
        self.y0 = sum(proc_cpu(p) for p in self.bystanders)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = (children_cpu() - self.c0) + (sum(proc_cpu(p) for p in self.pids) - self.p0)
        # a broker restarted meanwhile (other tests on this machine do that) counts 0
        b1 = {p: proc_cpu(p) for p in broker_pids()}
        self.broker_cpu = sum(max(0.0, b1[p] - v) for p, v in self.b0.items() if p in b1)
        # idle deploybus daemons while a baseline runs
        self.bystander_cpu = sum(proc_cpu(p) for p in self.bystanders) - self.y0
        # CPU that none of the above used: other work on the machine
        self.other_cpu = max(0.0, system_busy() - self.s0 - self.cpu - self.broker_cpu
                             - self.bystander_cpu)

