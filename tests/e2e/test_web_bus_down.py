"""`deploybus web` with its broker down: a deploy answers 503 within a few
seconds saying nothing was sent (it hung 12 s and answered 400), and
/healthz says the bus is down. Real `deploybus web` processes; the broker
is a port nothing listens on."""

from __future__ import annotations

import http.cookiejar
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploybus.signing import SigningKey
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def call(opener: urllib.request.OpenerDirector, url: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None
                                 else None, headers={"Content-Type": "application/json",
                                                     **(headers or {})})
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("scheme", ["amqp", "stomp"])
def test_a_deploy_with_the_broker_down_answers_503_fast(tmp_path: Path, scheme: str) -> None:
    dead = free_port()  # nothing listens here
    SigningKey.generate("web").save(tmp_path)
    cfg = tmp_path / "deploybus.yaml"
    cfg.write_text(f"""
bus: {{url: "{scheme}://guest:s3cret@127.0.0.1:{dead}/"}}
keys: {{signing: web.key, trusted: {{web: {{key: web.pub, role: web}}}}, policy: [{{signer: web}}]}}
state: {{url: "sqlite:///{tmp_path / 'state.db'}"}}
projects: {{app: {{git: /nonexistent.git}}}}
environments: {{prod: {{hosts: [h1]}}}}
""")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deploybus.cli", "-c", str(cfg), "web",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = call(opener, base + "/healthz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        assert status == 503 and health["bus"].startswith("down: "), health
        assert "s3cret" not in json.dumps(health)
        _, token = call(opener, base + "/api/csrf")
        started = time.monotonic()
        status, body = call(opener, base + "/api/rollouts",
                            {"project": "app", "environment": "prod", "ref": "v1"},
                            {"X-CSRF-Token": token["csrf"]})
        took = time.monotonic() - started
        assert status == 503, body
        assert took < 6, f"the deploy hung {took:.1f}s before answering"
        assert "cannot be reached, so nothing was sent" in body["error"], body
        assert f"127.0.0.1:{dead}" in body["error"] and "s3cret" not in body["error"], body
    finally:
        proc.terminate()
        proc.wait(30)
