#!/usr/bin/env python3
"""Dispatch latency: how fast a signed request reaches N agents and is answered.

    .venv/bin/python bench/dispatch.py --hosts 50 [--rounds 5]

Starts one orchestrator and N agents on the broker (the set-up of
bench/fanout.py, every message signed), deploys once (untimed) so every
agent has the rollout in its journal, then sends every agent, at once, a
``deploy.request`` for that rollout again, signed with the orchestrator's
key (the only role agents take requests from) and naming the refname and
commit the rollout resolved. Each agent verifies it and answers from its
journal: the whole dispatch path (sign, publish, broker, verify, journal
look-up, publish the answer) with no deploy work. Latency is
publish-to-answer per host.

The baseline, measured in the same run: one host's deploy done by the shell
floor of bench/fanout.py (fetch, export, post script, switch). Targets from
issue 3: median at most 0.3x and p99 at most 1x that floor. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from benchlib.baselines import Floor  # noqa: E402 - the shared bench set-up
from benchlib.cluster import Deploybus  # noqa: E402
from benchlib.common import (  # noqa: E402
    DEFAULT_BROKER,
    ENVIRONMENT,
    PROJECT,
    BenchError,
    percentile,
)
from benchlib.config import ORCHESTRATOR, key_file  # noqa: E402
from benchlib.source import Source, make_cached_repo  # noqa: E402

from deploybus import config as configmod  # noqa: E402
from deploybus import envelope, gitutil, topics  # noqa: E402
from deploybus.bus import Delivery, connect  # noqa: E402
from deploybus.signing import SigningKey  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--broker", default=DEFAULT_BROKER)
    args = ap.parse_args()
    hosts = [f"h{i}" for i in range(1, args.hosts + 1)]
    work = Path(tempfile.mkdtemp(prefix="deploybus-dispatch-"))
    cache = Path(tempfile.gettempdir()) / "deploybus-bench-cache"
    db = None
    try:
        source = Source(make_cached_repo(cache), work)
        db = Deploybus(work / "deploybus", source, hosts, args.broker)
        db.work.mkdir(parents=True)
        db.setup()
        tag = source.new_tag("warm")
        db.deploy(tag, window=0)
        cfg = configmod.load(db.cfg)
        # as the orchestrator asks an agent: its key, and the refname and
        # commit the rollout resolved (the agent deploys exactly that commit)
        key = SigningKey.load(key_file(db.keys, ORCHESTRATOR))
        refname, commit = gitutil.resolve_remote(str(source.origin), tag)
        journal = next((db.work / "hosts" / hosts[0] / "state" / "journal").glob("*.json"))
        rollout = journal.stem

        floor = Floor(work / "floor", source, ["f1"], 1)
        floor.setup()
        floor_times = []
        for i in range(max(3, args.rounds)):
            t = floor.deploy(source.new_tag(f"floor{i}"))
            floor_times.append(t.wall)
        floor_s = statistics.median(floor_times)

        latencies: list[float] = []
        sent: dict[str, float] = {}
        got: dict[str, float] = {}
        lock = threading.Lock()
        all_in = threading.Event()

        def on_event(d: Delivery) -> None:
            env = envelope.decode(d.body)
            b = env.body
            if env.type == "deploy.result" and env.correlation == rollout and b.get("duplicate"):
                with lock:
                    got.setdefault(b["host"], time.perf_counter())
                    if len(got) == len(hosts):
                        all_in.set()
            d.ack()

        bus = connect(cfg.bus_url, client_name="bench-dispatch")
        try:
            bus.subscribe(topics.EVENTS, on_event, prefetch=200)
            for _ in range(args.rounds):
                sent.clear()
                got.clear()
                all_in.clear()
                msgs = {}
                for h in hosts:
                    env = envelope.new("deploy.request", {
                        "rollout": rollout, "project": PROJECT, "environment": ENVIRONMENT,
                        "ref": refname, "commit": commit, "host": h, "user": "bench"},
                        sender="bench",
                        correlation=rollout, ttl=300)
                    msgs[h] = key.sign(env).encode()
                for h in hosts:
                    sent[h] = time.perf_counter()
                    bus.publish(topics.requests_for(h), msgs[h])
                if not all_in.wait(60):
                    raise BenchError(f"only {len(got)}/{len(hosts)} agents answered")
                latencies += [got[h] - sent[h] for h in hosts]
                time.sleep(0.5)
        finally:
            bus.close()
        med, p99 = statistics.median(latencies), percentile(latencies, 99)
        rows = [("dispatch median", med), ("dispatch p99", p99),
                ("one host's deploy (floor)", floor_s)]
        print(f"\nDispatch to {len(hosts)} agents, {args.rounds} rounds "
              f"({len(latencies)} samples), broker {args.broker}")
        for name, v in rows:
            print(f"  {name:28} {v * 1000:8.1f} ms")
        print(f"  median / floor = {med / floor_s:.2f} (target <= 0.3)"
              f"   p99 / floor = {p99 / floor_s:.2f} (target <= 1.0)")
        print(json.dumps({"hosts": len(hosts), "rounds": args.rounds,
                          "median_s": round(med, 4), "p99_s": round(p99, 4),
                          "floor_one_host_s": round(floor_s, 4),
                          "median_vs_floor": round(med / floor_s, 3),
                          "p99_vs_floor": round(p99 / floor_s, 3)}))
        return 0
    finally:
        if db is not None:
            db.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
