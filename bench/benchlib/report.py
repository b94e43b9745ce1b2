"""The table's rows (one :class:`Method` per way of deploying) and the report
printed at the end: the table, the headline ratios against the issues'
targets, notes, and as the last line one JSON object (docs/performance.md)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .baselines import ANSIBLE_FORKS, Ansible
from .cluster import Deploybus
from .common import POST_SCRIPT, revision
from .measure import Timed


def paired_ratios(methods: list[Any], head: Any) -> list[float]:
    """The headline's time over the floor's, round by round (runs are interleaved)."""
    floor = next((m for m in methods if m.key == "floor"), None)
    if head is None or floor is None:
        return []
    return [a / b for a, b in zip(head.walls, floor.walls, strict=False) if b > 0]


class Method:
    """One row of the table: a runner and how it is asked to deploy."""

    def __init__(self, key: str, label: str, runner: Any, window: int | None = None,
                 strategy: list[str] | None = None) -> None:
        self.key, self.label, self.runner, self.window = key, label, runner, window
        self.strategy = strategy
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.broker: list[float] = []
        self.other: list[float] = []
        self.bystander: list[float] = []
        self.extra: dict[str, list[float]] = {}

    def deploy(self, tag: str, bystanders: list[int]) -> Timed:
        """One timed deploy of ``tag`` the way this row says."""
        if isinstance(self.runner, Deploybus):
            return self.runner.deploy(tag, window=self.window, strategy=self.strategy)
        return self.runner.deploy(tag, bystanders=bystanders)

    def record(self, t: Timed) -> None:
        """Keep one timed run's figures."""
        self.walls.append(t.wall)
        self.cpus.append(t.cpu)
        self.broker.append(t.broker_cpu)
        self.other.append(t.other_cpu / t.wall if t.wall else 0.0)
        if t.bystanders:
            self.bystander.append(t.bystander_cpu / t.wall if t.wall else 0.0)
        for k, v in t.extra.items():
            if v is not None:
                self.extra.setdefault(k, []).append(v)

    def result(self) -> dict[str, Any]:
        """Medians over the runs (the worst run for other load), for the report."""
        r: dict[str, Any] = {"median_s": statistics.median(self.walls), "runs_s": self.walls,
                             "cpu_s": statistics.median(self.cpus),
                             "broker_cpu_s": statistics.median(self.broker),
                             "other_cores": max(self.other)}
        if self.bystander:
            r["idle_deploybus_cores"] = max(self.bystander)
        for k, v in self.extra.items():
            r[k] = statistics.median(v)
        return r


def fmt(x: float | None, unit: str = "s") -> str:
    """A figure with two decimals and its unit; "-" if there is none."""
    return "-" if x is None else f"{x:.2f}{unit}"


def r3(v: Any) -> Any:
    """``v`` with every float rounded to 3 decimals (for the JSON line)."""
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return [r3(x) for x in v]
    if isinstance(v, dict):
        return {k: r3(x) for k, x in v.items()}
    return v



def runners_version(runners: list[Any]) -> str:
    """Ansible's version line, for the notes."""
    return next((r.version for r in runners if isinstance(r, Ansible)), "?")


def report(methods: list[Method], runners: list[Any], *, hosts: int, runs: int, files: int,
           size: int, broker: str, floor_procs: int, load: float, started: float,
           json_out: str | None) -> None:
    """Print the table, the headline ratios and the notes, and as the last
    line the JSON object (also written to ``json_out`` if given)."""
    n = hosts
    results = {m.key: m.result() for m in methods}
    # The headline is the last --windows entry (all at once by default), not
    # the canary row: the issues' targets are for all at once.
    dbm = [m for m in methods if isinstance(m.runner, Deploybus) and m.strategy is None]
    head = dbm[-1] if dbm else None
    dbs = results[head.key]["median_s"] if head else None
    an = results.get("ansible", {}).get("median_s")
    fl = results.get("floor", {}).get("median_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    print(f"\nfan-out of one deploy to N={n} hosts ({files} files, {size / 1e6:.1f} MB), "
          f"median of {runs} run(s), {os.cpu_count()} CPU(s)\n")
    print(f"{'method':48} {'median':>8} {'per host':>9} {'CPU':>8} {'vs ansible':>10} "
          f"{'vs floor':>9}  runs")
    for m in methods:
        res = results[m.key]
        print(f"{m.label:48} {fmt(res['median_s']):>8} {fmt(res['median_s'] / n):>9} "
              f"{fmt(res['cpu_s']):>8} {fmt(ratio(res['median_s'], an), ''):>10} "
              f"{fmt(ratio(res['median_s'], fl), ''):>9}  "
              f"{' '.join(f'{x:.2f}' for x in res['runs_s'])}")
    print()
    vs_ansible, vs_floor = ratio(dbs, an), ratio(dbs, fl)
    paired = paired_ratios(methods, head)
    if head is not None:
        print(f"headline: {head.label}")
    def verdict(value: float, *limits: tuple[str, float]) -> str:
        return ", ".join(f"{name} <= {limit:.2f}: {'met' if value <= limit else 'NOT met'}"
                         for name, limit in limits)

    # The targets are for N=50 (issue 2, then the stricter issue 3).
    if vs_ansible is not None:
        print(f"  deploybus / ansible = {vs_ansible:.2f}  (targets at N=50: "
              f"{verdict(vs_ansible, ('issue 2', 0.2), ('issue 3', 0.125))})")
    if vs_floor is not None:
        print(f"  deploybus / floor   = {vs_floor:.2f}  (targets at N=50: "
              f"{verdict(vs_floor, ('issue 2', 1.5), ('issue 3', 1.3))})")
        if head is not None and "cpu_s" in results.get("floor", {}):
            cpu_ratio = results[head.key]["cpu_s"] / max(results["floor"]["cpu_s"], 1e-9)
            print(f"  deploybus CPU / floor CPU = {cpu_ratio:.2f}  (target at N=50: "
                  f"{verdict(cpu_ratio, ('issue 3', 1.5))})")
        if head is not None and paired:
            # The machine's speed drifts between rounds; a round's two runs
            # were back to back, so their ratio drifts less than the medians'.
            print(f"  paired: deploybus / floor of the same round = "
                  f"{statistics.median(paired):.2f} median "
                  f"({' '.join(f'{x:.2f}' for x in paired)})")
            added = (results[head.key]["cpu_s"] - results["floor"]["cpu_s"]) / n
            span = results[head.key].get("orchestrator_s")
            print(f"  deploybus adds {1000 * added:.1f} ms of CPU per host (its CLI "
                  f"included) to the floor's {1000 * results['floor']['cpu_s'] / n:.1f} ms"
                  + (f"; the rollout alone (orchestrator, accepted -> final) is "
                     f"{span / fl:.2f}x the floor" if span else ""))
    print("\nnotes:")
    print("  - each method first did one untimed deploy that cloned the per-host mirrors; "
          "each timed run deployed a new tag on a new commit (every host fetches); runs "
          "of the methods were interleaved.")
    print("  - per host: fetch into the mirror, git archive into a new release dir, post "
          f"script ({POST_SCRIPT}), atomic switch of 'current'; no old-release cleanup.")
    for m in dbm:
        res = results[m.key]
        span, mean = res.get("orchestrator_s"), res.get("agent_mean_s")
        if span is not None and mean is not None:
            print(f"  - {m.label}: the orchestrator's rollout took {span:.2f}s (accepted -> "
                  f"final state, from its store) of the {res['median_s']:.2f}s; the CLI "
                  f"needed {res.get('cli_start_s', 0):.2f}s to publish the rollout and "
                  f"{res.get('cli_exit_s', 0):.2f}s to exit after printing the final "
                  f"status. One agent's deploy: {mean:.3f}s mean.")
        if "cpu_agents_python_s" in res:
            print(f"    CPU: agents {res['cpu_agents_python_s']:.2f}s in Python + "
                  f"{res['cpu_agents_children_s']:.2f}s in git/sh children, orchestrator "
                  f"{res['cpu_orchestrator_s']:.2f}s, CLI {res['cpu_cli_s']:.2f}s.")
    if dbm:
        if not any(m.window != 1 for m in dbm):
            print("  - deploybus: the orchestrator deployed hosts ONE AFTER ANOTHER "
                  "(sequential); parallel strategies will lower this figure.")
        print("  - deploybus CPU = CLI + orchestrator + agents (with their git/sh children); "
              "the broker's is not in it (median "
              f"{results[dbm[-1].key]['broker_cpu_s']:.2f}s per run).")
    if "ansible" in results:
        print(f"  - ansible: {runners_version(runners)}, gather_facts off, pipelining on.")
    idle = {k: v["idle_deploybus_cores"] for k, v in results.items()
            if "idle_deploybus_cores" in v}
    if idle:
        print("  - the idle deploybus daemons used, while the baselines ran (cores): "
              + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()))
    other = {k: res["other_cores"] for k, res in results.items()}
    busy_machine = max(other.values(), default=0.0) > 0.25
    print("  - other work on the machine during timed runs (cores, worst run): "
          + ", ".join(f"{k} {v:.2f}" for k, v in other.items())
          + (" -- WARNING: not an idle machine; figures are pessimistic"
             if busy_machine else "") + f"; load average at start {load:.2f}")
    print(f"  - deploybus revision {revision()}; total bench time "
          f"{time.perf_counter() - started:.0f}s")

    out = {"hosts": n, "runs": runs, "cpus": os.cpu_count(), "files": files, "bytes": size,
           "broker": broker.split("@")[-1], "headline": head.key if head else None,
           "deploybus_s": dbs, "ansible_s": an, "floor_s": fl,
           "vs_ansible": vs_ansible, "vs_floor": vs_floor,
           "floor_procs": floor_procs, "ansible_forks": ANSIBLE_FORKS,
           "busy_machine": busy_machine, "loadavg_start": load, "revision": revision(),
           "detail": r3(results)}
    if paired:
        out["vs_floor_paired"] = round(statistics.median(paired), 3)
    for m in dbm:
        out["detail"][m.key]["vs_ansible"] = ratio(results[m.key]["median_s"], an)
        out["detail"][m.key]["vs_floor"] = ratio(results[m.key]["median_s"], fl)
    line = json.dumps(out, sort_keys=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
    print(line, flush=True)
