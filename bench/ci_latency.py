"""What the bus adds on the way from a push to a rollout, around the CI.

Real processes on the machine's RabbitMQ (the post-receive hook, the CI
bridge, the orchestrator, three agents) and, for the CI, the fake Jenkins
of tests/ci/fake_jenkins.py in this process, so that the CI's own time is
left out and the two moments that matter are timestamped where they
happen:

* **push -> trigger**: from the moment the post-receive hook stamps the push
  event (its envelope's ``at``) to the bridge's ``buildWithParameters``
  arriving at Jenkins. (``git push`` itself returns only after the hook has
  exited, which is after the trigger: the hook's own start-up is measured
  separately, in docs/performance.md);
* **result -> rollout**: from the build being marked finished in Jenkins to
  the orchestrator's "running" status of the auto-deploy it starts (as a
  watcher on ``deploy.status`` sees it). This one includes the bridge's
  poll of Jenkins (``poll``, 0.05 s here): with Jenkins's Notification
  plugin pointed at ``ci-bridge --listen`` there is no poll.

Usage: ``.venv/bin/python bench/ci_latency.py --pushes 50`` (about two
minutes). Prints median and p99 of each, in milliseconds, and a JSON line.
The targets (docs/performance.md): each under 100 ms at p99.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib.common import percentile, rabbit_vhost  # noqa: E402

from deploybus import envelope, topics  # noqa: E402
from deploybus.bus import connect  # noqa: E402
from tests.ci.fake_jenkins import FakeJenkins  # noqa: E402
from tests.e2e.cluster import Cluster, git  # noqa: E402

HOSTS = ["h1", "h2", "h3"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=50)
    ap.add_argument("--poll", type=float, default=0.05,
                    help="seconds between the bridge's polls of Jenkins")
    args = ap.parse_args()
    vh = rabbit_vhost()
    url = f"amqp://guest:guest@127.0.0.1:5672/{vh}?prefix=b."
    fake = FakeJenkins()
    fake.add_job("app-build", {"COMMIT": ""})
    fake.start_server()
    base = Path(tempfile.mkdtemp(prefix="ci-latency-"))
    c = Cluster(base / "c", url, HOSTS,
                top_extra=f'ci:\n  ci1: {{type: jenkins, url: "{fake.url}", '
                          f'credentials: jenkins.cred, poll: {args.poll}}}\n',
                app_extra=("    ci:\n      server: ci1\n      job: app-build\n"
                           "      refs: [\"refs/heads/main\"]\n"
                           "      parameters: {COMMIT: \"{commit}\"}\n      settle: 0\n"),
                env_extra=("    auto_deploy:\n      refs: [\"refs/heads/main\"]\n"
                           "      on: ci_success\n    strategy: {batch: 100%, window: 0}\n"),
                app_scripts={"post": "true"})
    c.base.mkdir(parents=True)
    (c.base / "jenkins.cred").write_text(f"{fake.user}:{fake.token}\n")
    c.setup()
    running: queue.Queue[tuple[str, float]] = queue.Queue()
    pushed_at: dict[str, float] = {}
    finished: queue.Queue[str] = queue.Queue()
    watcher = connect(url)

    def on_status(d: object) -> None:
        env = envelope.decode(d.body)  # type: ignore[attr-defined]
        b = env.body
        if b.get("state") == "running" and b.get("phases") and b.get("commit"):
            running.put((b["commit"], time.time()))
        if b.get("state") in ("succeeded", "failed", "partial", "refused") and not b.get("host"):
            finished.put(b["rollout"])
        d.ack()  # type: ignore[attr-defined]

    def on_commit(d: object) -> None:
        env = envelope.decode(d.body)  # type: ignore[attr-defined]
        if env.body.get("new"):
            pushed_at[env.body["new"]] = envelope.parse_time(env.at, "at").timestamp()
        d.ack()  # type: ignore[attr-defined]

    watcher.subscribe(topics.STATUS, on_status)
    watcher.subscribe(topics.GIT_COMMITS, on_commit)
    push_to_trigger: list[float] = []
    result_to_rollout: list[float] = []
    try:
        c.start_all(fetchers=False)
        assert c.start_ci_bridge().ready.wait(60), c.logs()
        for i in range(args.pushes + 1):  # the first is a warm-up
            (c.work / "VERSION").write_text(f"{i}\n")
            git("add", "-A", cwd=c.work)
            git("commit", "-q", "-m", f"{i}", cwd=c.work)
            commit = git("rev-parse", "HEAD", cwd=c.work).strip()
            n = len(fake.triggers)
            c.push("main")
            deadline = time.monotonic() + 30
            while len(fake.triggers) == n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no trigger for push {i}:\n{c.logs()}")
                time.sleep(0.002)
            trigger = fake.triggers[-1]
            deadline = time.monotonic() + 10
            while commit not in pushed_at and time.monotonic() < deadline:
                time.sleep(0.002)
            pushed = pushed_at[commit]
            with fake.lock:
                item = max(fake.queue)
            done_at = time.time()
            fake.finish(item, "SUCCESS", duration=0.1)
            seen_commit, at = running.get(timeout=30)
            assert seen_commit == commit, (seen_commit, commit)
            finished.get(timeout=60)
            if i:
                push_to_trigger.append((trigger["at"] - pushed) * 1000)
                result_to_rollout.append((at - done_at) * 1000)
            print(f"push {i}: trigger +{(trigger['at'] - pushed) * 1000:.1f} ms, "
                  f"rollout +{(at - done_at) * 1000:.1f} ms", file=sys.stderr)
    finally:
        watcher.close()
        c.stop()
        fake.stop()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vh], capture_output=True)
    rows = [("push -> CI trigger", push_to_trigger),
            ("build result -> rollout start", result_to_rollout)]
    print(f"{args.pushes} pushes, RabbitMQ AMQP, bridge poll {args.poll}s")
    for name, values in rows:
        print(f"  {name:30} median {statistics.median(values):7.1f} ms   "
              f"p99 {percentile(values, 99):7.1f} ms   max {max(values):7.1f} ms")
    print(json.dumps({name: {"median_ms": round(statistics.median(v), 1),
                             "p99_ms": round(percentile(v, 99), 1)} for name, v in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
