#!/usr/bin/env python3
"""Fan-out benchmark: one deploy to N hosts, done three ways, side by side.

    .venv/bin/python bench/fanout.py --hosts N [--runs R]
        [--broker amqp://guest:guest@127.0.0.1:5672//]

1. deploybus, installed as on a server (``bench/.venv-agent``: ``pip install
   .`` of this checkout, runtime dependencies only, made or refreshed on
   first use; ``--exe`` benches another command): one orchestrator and N
   agent processes (``deploybus agent --host hI``) on the broker, every
   message signed as in production (``benchlib/config.py``: a person key
   for the CLI, the orchestrator's key, one host key per host), timed
   ``deploybus deploy ... --wait``, once per
   rollout window in ``--windows`` (default ``1,0``: one host after another,
   then all at once), and with ``--canary`` (default ``1:25%``: one canary
   host, then batches of 25%).
2. Ansible: ansible-core (its own venv, ``bench/.venv-ansible``, made on first
   use) with N ``ansible_connection=local`` hosts and forks=5.
3. The floor: the same per-host shell steps run with ``xargs -P``.

Each per-host deploy is the same work in all three: fetch the new tag into
the host's bare mirror, export the tagged tree into a new release directory,
run the post script (``test -f file0001.txt``), switch ``current`` atomically.
Each method gets one untimed deploy first (it clones the mirrors and, for
deploybus, makes sure every agent is subscribed); then the timed runs of the
methods are interleaved, each deploying a fresh tag on a fresh commit, so
every run fetches. See docs/performance.md.

It prints a table and, as its last line, one JSON object with the medians and
the ratios ``vs_ansible`` and ``vs_floor`` (deploybus median / baseline
median), and ``vs_floor_paired``: the median of the rounds' own ratios (each
round runs the methods back to back, so it drifts less with the machine).
Everything lives in a temporary directory that is removed at the end
(``--keep`` keeps it); the generated source repository is cached under
``$TMPDIR/deploybus-bench-cache``. Every process it starts is stopped at the
end, and the broker queues of its unique prefix are deleted.

This file is the command line and the run; the parts (also used by
bench/dispatch.py and bench/idle_agent.py) are in ``bench/benchlib/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import runtime
from benchlib.baselines import ANSIBLE_FORKS, Ansible, Floor
from benchlib.cluster import Deploybus
from benchlib.common import DEFAULT_BROKER, BenchError, say
from benchlib.measure import loadavg
from benchlib.report import Method, report
from benchlib.source import Source, check_hosts, make_cached_repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, required=True, help="number of hosts N")
    ap.add_argument("--runs", type=int, default=None,
                    help="timed runs per method (default 3 for N<=10, else 2)")
    ap.add_argument("--broker", default=DEFAULT_BROKER, help="bus URL for deploybus")
    ap.add_argument("--methods", default="deploybus,ansible,floor",
                    help="comma-separated subset of deploybus,ansible,floor")
    ap.add_argument("--windows", default="1,0",
                    help="deploybus rollout windows to measure, comma-separated (1: one host "
                         "after another, 0: all hosts at once); the last is the headline")
    ap.add_argument("--canary", default="1:25%", metavar="N:BATCH",
                    help="also measure canary-then-batches (default 1:25%%; '' to skip)")
    ap.add_argument("--exe", default=None,
                    help="the deploybus command to bench (default: bench/.venv-agent, "
                         "installed from this checkout with the runtime dependencies "
                         "only); e.g. .venv/bin/deploybus, or a wrapper that profiles it")
    ap.add_argument("--floor-procs", type=int, default=os.cpu_count() or 2,
                    help="xargs -P for the floor (default: nproc)")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, hosts)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    if args.exe:
        runtime.EXE_OVERRIDE[:] = [args.exe]
    n = args.hosts
    if n < 1:
        ap.error("--hosts must be >= 1")
    runs = args.runs or (3 if n <= 10 else 2)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in wanted:
        if m not in ("deploybus", "ansible", "floor"):
            ap.error(f"unknown method {m!r}")
    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
    except ValueError:
        ap.error("--windows: whole numbers, comma-separated")
    hosts = [f"h{i}" for i in range(1, n + 1)]

    # A SIGTERM must still run the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cache = Path(args.workdir or tempfile.gettempdir()) / "deploybus-bench-cache"
    work = Path(tempfile.mkdtemp(prefix="deploybus-bench-", dir=args.workdir))
    runners: list[Any] = []
    methods: list[Method] = []
    started = time.perf_counter()
    load = loadavg()
    failed = False
    try:
        say(f"fanout bench: {n} host(s), {runs} timed run(s) per method, work dir {work}")
        source = Source(make_cached_repo(cache), work)
        files, size = source.files(), source.size()
        say(f"  project: {files} files, {size / 1e6:.2f} MB (cached in {cache})")
        db: Deploybus | None = None
        for m in wanted:
            say(f"[{m}] setting up")
            if m == "deploybus":
                db = Deploybus(work / "deploybus", source, hosts, args.broker)
                runners.append(db)
                db.setup()
                if not db.has_window:
                    say("  this deploybus has no rollout strategies: one host after another")
                    windows = [1]
                for w in windows:
                    shape = ("one host after another" if w == 1 else
                             "all hosts at once" if w == 0 or w >= n else f"{w} at a time")
                    methods.append(Method(f"deploybus_w{w}", f"deploybus --window {w} "
                                          f"({shape})", db, window=w))
                if args.canary and db.has_window:
                    count, _, batch = args.canary.partition(":")
                    methods.append(Method(
                        "deploybus_canary", f"deploybus --canary {count} --batch {batch} "
                        "--window 0 (canary, then batches)", db,
                        strategy=["--canary", count, "--batch", batch or "25%",
                                  "--window", "0"]))
            elif m == "ansible":
                r: Any = Ansible(work / "ansible", source, hosts)
                runners.append(r)
                r.setup()
                methods.append(Method("ansible", f"ansible-playbook, forks={ANSIBLE_FORKS}, "
                                      "local", r))
            else:
                r = Floor(work / "floor", source, hosts, args.floor_procs)
                runners.append(r)
                r.setup()
                methods.append(Method("floor", f"shell, xargs -P {args.floor_procs}", r))
        # Warm-up: one untimed deploy per runner clones every host's mirror (and, for
        # deploybus, proves every agent is subscribed).
        for r in runners:
            tag = source.new_tag(f"{r.name}-warm")
            t = r.deploy(tag)
            check_hosts(r.roots(), tag)
            say(f"[{r.name}] warm-up deploy (clones the mirrors; untimed): {t.wall:.2f}s")
        # Timed runs, interleaved, so that other load on the machine hits all alike.
        bystanders = db.pids() if db else []
        for i in range(runs):
            for m in methods:
                tag = source.new_tag(m.key)
                # Write back what the previous run left dirty (about 2 MB per
                # host) before timing this one, so that no method pays for
                # another's disk writes.
                os.sync()
                t = m.deploy(tag, bystanders)
                check_hosts(m.runner.roots(), tag)
                m.record(t)
                say(f"[{m.key}] run {i + 1}/{runs}: {t.wall:.2f}s wall, {t.cpu:.2f}s CPU"
                    + (f", other load {t.other_cpu / t.wall:.2f} cores" if t.wall else "")
                    + "".join(f", {k} {v:.2f}s" for k, v in t.extra.items()
                              if k in ("orchestrator_s", "cli_start_s", "cli_exit_s")
                              and v is not None))
    except BenchError as exc:
        say(f"fanout bench failed: {exc}")
        say(f"(work dir kept for inspection: {work})")
        failed = True
    finally:
        for r in runners:
            try:
                r.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                say(f"  cleanup of {r.name} failed: {exc}")
        if not args.keep and not failed:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        return 1

    report(methods, runners, hosts=n, runs=runs, files=files, size=size, broker=args.broker,
           floor_procs=args.floor_procs, load=load, started=started, json_out=args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
