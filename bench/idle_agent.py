#!/usr/bin/env python3
"""An idle agent: resident memory and CPU over an idle period, against a bare
Python interpreter doing nothing (the floor), side by side.

    .venv/bin/python bench/idle_agent.py [--seconds 600] [--broker URL]

Issue 3 asks for an idle agent under 40 MB resident with no busy polling (CPU
over 10 idle minutes near zero). The agent is connected to the broker and
subscribed; nothing is sent to it. Last line: one JSON object. The config
is the other benches' (bench/benchlib/config.py): the agent signs with its
host's own key and obeys only the orchestrator's.

The agent runs from ``bench/.venv-agent``, made on first use with
``pip install .`` (the runtime dependencies only, as on a server) and
refreshed when the project's files are newer: the project's own ``.venv``
also holds the test tools, and some of them are picked up at import
(structlog loads greenlet, which Playwright brings, when it is installed).
``--exe`` measures another ``deploybus`` instead (e.g. ``.venv/bin/deploybus``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from benchlib.common import DEFAULT_BROKER, BenchError  # noqa: E402 - the shared bench helpers
from benchlib.config import bus_yaml, hosts_yaml, keys_yaml, make_keys, with_prefix  # noqa: E402
from benchlib.runtime import RUNTIME_VENV, runtime_deploybus  # noqa: E402

#: Clock ticks per second: the unit of /proc's CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Where the agent measured by default is installed (bench/.venv-agent).
AGENT_VENV = RUNTIME_VENV
#: The one host, its agent's ``--host``.
HOST = "h1"


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` used itself (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--broker", default=DEFAULT_BROKER)
    ap.add_argument("--exe", default=None, help="deploybus to measure "
                    "(default: bench/.venv-agent, runtime dependencies only)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deploybus-idle-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        exe = [args.exe] if args.exe else runtime_deploybus()
        make_keys(work / "keys", [HOST])
        prefix = f"idle{uuid.uuid4().hex[:8]}."
        cfg = work / "deploybus.yaml"
        cfg.write_text(
            bus_yaml(with_prefix(args.broker, prefix))
            + keys_yaml([HOST])
            + hosts_yaml([HOST])
            + "projects:\n  app:\n    git: /nonexistent.git\n"
            f"environments:\n  prod:\n    hosts: [{HOST}]\n")
        log = work / "agent.log"
        with open(log, "wb") as out:
            agent = subprocess.Popen([*exe, "-c", str(cfg), "agent", "--host", HOST],
                                     stdout=out, stderr=subprocess.STDOUT)
        procs.append(agent)
        python = Path(exe[0]).parent / "python"
        floor = subprocess.Popen([str(python) if python.exists() else sys.executable, "-c",
                                  "import time; time.sleep(1e9)"])
        procs.append(floor)
        deadline = time.monotonic() + 60
        while '"event": "ready"' not in log.read_text(errors="replace"):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise BenchError("agent did not start:\n" + log.read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(2)  # settle after start-up
        start = {p.pid: cpu_s(p.pid) for p in procs}
        peak = {p.pid: rss_mb(p.pid) for p in procs}
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(min(5, args.seconds))
            for p in procs:
                peak[p.pid] = max(peak[p.pid], rss_mb(p.pid))
        elapsed = time.monotonic() - t0
        used = {p.pid: cpu_s(p.pid) - start[p.pid] for p in procs}
        a, f = agent.pid, floor.pid
        print(f"\nIdle for {elapsed:.0f} s, broker {args.broker}")
        print(f"  {'':20} {'RSS MB (peak)':>14} {'CPU s':>8} {'CPU %':>7}")
        for name, pid in (("deploybus agent", a), ("floor: bare python", f)):
            print(f"  {name:20} {peak[pid]:14.1f} {used[pid]:8.2f} "
                  f"{100 * used[pid] / elapsed:7.3f}")
        print(f"  agent RSS {peak[a]:.1f} MB (target < 40), "
              f"{peak[a] / max(peak[f], 0.1):.1f}x the bare interpreter")
        print(json.dumps({"seconds": round(elapsed), "agent_rss_mb": round(peak[a], 1),
                          "agent_cpu_s": round(used[a], 3),
                          "agent_cpu_pct": round(100 * used[a] / elapsed, 4),
                          "floor_rss_mb": round(peak[f], 1),
                          "rss_vs_floor": round(peak[a] / max(peak[f], 0.1), 2)}))
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
