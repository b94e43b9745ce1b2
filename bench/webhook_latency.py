#!/usr/bin/env python3
"""Webhook latency: how long a forge waits for ``deploybus listener``'s answer.

    .venv/bin/python bench/webhook_latency.py [--requests 1000]

Posts N signed GitHub push webhooks (the documented payload, about 7 KB,
each its own delivery id, one new TCP connection each, as a forge does) on
loopback to a real ``deploybus listener`` process, one after another, and
times each from connect to the last byte of the answer. Three runs, side by
side:

* **floor**: the same requests to a WSGI app on the same server (waitress)
  that reads the body and answers 202: HTTP on loopback and nothing else;
* **broker up**: the listener on RabbitMQ (AMQP), its drainer publishing
  while the requests come;
* **broker down**: the listener with its broker unreachable (a closed
  port): every event stays in the outbox.

Target (issue 11): p99 under 50 ms with the broker up and down. The listener
answers once the events are fsynced in the outbox: most of its time over the
floor is that fsync. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib.common import percentile, rabbit_vhost  # noqa: E402

from deploybus.signing import SigningKey  # noqa: E402

SECRET = b"bench secret"
PAYLOAD = ROOT / "tests" / "listener" / "payloads" / "github-push.json"

FLOOR_APP = textwrap.dedent("""
    import sys
    from waitress import serve
    def app(environ, start_response):
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("202 Accepted", [("Content-Type", "application/json")])
        return [b'{"queued": 1}']
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=8, _quiet=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def run(port: int, n: int) -> list[float]:
    template = json.loads(PAYLOAD.read_text())
    template["repository"]["full_name"] = "team/app"
    times = []
    for i in range(n + 20):  # the first 20 warm up
        template.update(before=f"{i:040x}", after=f"{i + 1:040x}")
        body = json.dumps(template).encode()
        headers = {"Content-Type": "application/json", "X-GitHub-Event": "push",
                   "X-GitHub-Delivery": str(uuid.uuid4()),
                   "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, body,
                                                               hashlib.sha256).hexdigest()}
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/hooks", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        elapsed = time.perf_counter() - start
        if r.status != 202:
            raise SystemExit(f"request {i}: HTTP {r.status}")
        if i >= 20:
            times.append(elapsed * 1000)
    return times


def listener(base: Path, bus_url: str, port: int) -> subprocess.Popen:
    base.mkdir(parents=True)
    SigningKey.generate("git").save(base)
    (base / "hook.secret").write_bytes(SECRET)
    (base / "deploybus.yaml").write_text(f"""\
bus: {{url: "{bus_url}"}}
keys:
  signing: git.key
  trusted:
    git: {{key: git.pub, role: git}}
state: {{url: "sqlite:///state.db"}}
projects:
  app:
    git: https://github.com/team/app.git
    webhook: {{secret: hook.secret, repository: team/app}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "deploybus.cli", "-c",
                             str(base / "deploybus.yaml"), "listener", "--bind",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(base / "listener.log", "w"),
                            env={**os.environ, "DEPLOYBUS_LOG_LEVEL": "warning"})
    wait_port(port, proc)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    results: dict[str, list[float]] = {}

    port = free_port()
    floor = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)])
    try:
        wait_port(port, floor)
        results["floor"] = run(port, args.requests)
    finally:
        floor.terminate()
        floor.wait()

    vh = rabbit_vhost()
    try:
        for name, url in (("broker up", f"amqp://guest:guest@127.0.0.1:5672/{vh}"),
                          ("broker down", "amqp://guest:guest@127.0.0.1:1//")):
            port = free_port()
            proc = listener(base / name.replace(" ", "-"), url, port)
            try:
                results[name] = run(port, args.requests)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vh], capture_output=True)

    f50, f99 = statistics.median(results["floor"]), percentile(results["floor"], 99)
    print(f"{args.requests} signed GitHub pushes, one connection each, loopback")
    print(f"  {'':12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50/floor':>10} "
          f"{'p99/floor':>10}")
    out = {}
    for name, v in results.items():
        p50, p99 = statistics.median(v), percentile(v, 99)
        print(f"  {name:12} {p50:8.2f} {p99:8.2f} {max(v):8.2f} {p50 / f50:10.2f} "
              f"{p99 / f99:10.2f}")
        out[name] = {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
