"""Load-balancer drain with a real HAProxy: each host's server leaves the
rotation before its deploy and comes back after it succeeded, and clients
going through HAProxy during the rollout never see an error."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploybus.haproxy import HAProxy
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.broker]


@pytest.fixture
def haproxy(tmp_path: Path):
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is missing: `make test` installs Debian's haproxy", pytrace=False)
    ports = {h: free_port() for h in ("h1", "h2", "h3")}
    front = free_port()
    sock = tmp_path / "admin.sock"
    cfg = tmp_path / "haproxy.cfg"
    servers = "".join(f"    server {h} 127.0.0.1:{p}\n" for h, p in ports.items())
    cfg.write_text(f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 0
frontend www
    bind 127.0.0.1:{front}
    default_backend app
backend app
    balance roundrobin
{servers}""")
    proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "haproxy did not create its admin socket"
        time.sleep(0.05)
    yield {"socket": sock, "ports": ports, "front": front}
    proc.terminate()
    proc.wait(10)


def test_hosts_are_drained_during_their_deploy(make, haproxy) -> None:  # noqa: ANN001
    extra = (f"    haproxy:\n      socket: {haproxy['socket']}\n      backend: app\n"
             f"      drain_timeout: 5\n")
    c = make(n=3, env_extra=extra, sleep=1.0)
    assert c.deploy("app", "v1.0", "--batch", "100%", "--window", "0").returncode == 0
    web = [subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(c.current(h))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
           for h, port in haproxy["ports"].items()]
    api = HAProxy(socket=str(haproxy["socket"]), backend="app")
    seen_maint: set[str] = set()
    answers: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        url = f"http://127.0.0.1:{haproxy['front']}/VERSION"
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    answers.append(r.read().decode().strip())
            except (urllib.error.URLError, OSError) as exc:
                errors.append(str(exc))
            time.sleep(0.02)

    def watch() -> None:
        while not stop.is_set():
            for h in ("h1", "h2", "h3"):
                if int(api.state(h)["srv_admin_state"]) & 1:  # forced maintenance
                    seen_maint.add(h)
            time.sleep(0.05)

    try:
        time.sleep(0.5)  # the web servers are up
        threads = [threading.Thread(target=client), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        r = c.deploy("app", "v2.0")
        stop.set()
        for t in threads:
            t.join(10)
        assert r.returncode == 0, r.stdout + c.logs()
    finally:
        stop.set()
        for w in web:
            w.terminate()
    assert seen_maint == {"h1", "h2", "h3"}, "every host left the rotation for its deploy"
    for h in ("h1", "h2", "h3"):
        assert int(api.state(h)["srv_admin_state"]) & 1 == 0, f"{h} not back in rotation"
    assert not errors, errors[:5]
    assert set(answers) <= {"v1.0", "v2.0"} and "v2.0" in answers and len(answers) > 20
