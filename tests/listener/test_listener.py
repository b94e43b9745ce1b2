"""``deploybus listener`` in this process, over real HTTP (waitress on
loopback) and the in-process bus: what each kind of delivery is answered,
that only a 202 writes anything, that a delivery is published once however
often and however concurrently it is sent, and that the answer does not wait
for the broker. The end-to-end run on RabbitMQ with fetchers is
tests/e2e/test_webhooks.py; the broker stopped and the listener killed,
tests/faults/test_outbox.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus import config, envelope, protocol, topics
from deploybus.bus import Delivery, connect
from deploybus.daemons.git_listener.listener import Listener
from deploybus.outbox import Outbox
from deploybus.runner import Context
from deploybus.signing import SigningKey

pytestmark = pytest.mark.unit

PAYLOADS = Path(__file__).parent / "payloads"
SECRET = b"It's a Secret to Everybody"


def payload(name: str) -> bytes:
    return (PAYLOADS / f"{name}.json").read_bytes()


def github_headers(body: bytes, *, event: str = "push", delivery: str | None = None,
                   secret: bytes = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body,
                                                        hashlib.sha256).hexdigest()}


class Site:
    """A listener with two projects (one on GitHub, one on Gitea) and a
    subscriber on git.commits."""

    def __init__(self, tmp: Path, bus_url: str) -> None:
        self.key = SigningKey.generate("git")
        self.key.save(tmp)
        (tmp / "hook.secret").write_bytes(SECRET + b"\n")
        self.cfg = config.parse(f"""
bus: {{url: "{bus_url}"}}
keys:
  trusted:
    git: {{key: git.pub, role: git}}
state: {{url: "sqlite:///state.db"}}
listener: {{max_body: 65536}}
projects:
  hello:
    git: https://github.com/Codertocat/Hello-World.git
    webhook: {{secret: hook.secret}}
  hooks:
    git: git@gitea.example.com:gitea/webhooks.git
    webhook: {{secret: hook.secret, repository: gitea/webhooks}}
""", tmp / "deploybus.yaml")
        self.bus = connect(bus_url, publish_timeout=1.0)
        self.events: queue.Queue[envelope.Envelope] = queue.Queue()
        if bus_url.startswith("memory://"):
            self.bus.subscribe(topics.GIT_COMMITS, self._on, queue="watch")
        self.ctx = Context(config=self.cfg, bus=self.bus, host="git1", signing_key=self.key)
        self.listener = Listener(self.ctx, bind="127.0.0.1:0")
        self.url = f"http://127.0.0.1:{self.listener.port}"
        self.listener.start()

    def _on(self, d: Delivery) -> None:
        self.events.put(envelope.decode(d.body))
        d.ack()

    def post(self, body: bytes, headers: dict[str, str], path: str = "/hooks",
             method: str = "POST") -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + path, data=body if method == "POST" else None,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text or b"{}")
            except ValueError:  # waitress's own answer (413 before the body is read)
                return e.code, {"text": text.decode(errors="replace")}

    def pending(self) -> int:
        with Outbox(self.cfg.outbox_path()) as box:
            return int(box.status()["pending"])

    def stop(self) -> None:
        self.listener.stop(5)
        self.bus.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path, f"memory://listener-{uuid.uuid4().hex}")
    yield s
    s.stop()


def test_a_signed_github_push_is_queued_and_published(site: Site) -> None:
    body = payload("github-push")
    status, answer = site.post(body, github_headers(body))
    assert (status, answer) == (202, {"queued": 1})
    env = site.events.get(timeout=5)
    assert env.type == "git.push" and env.sender == site.ctx.sender
    push = protocol.parse(env.type, env.body)
    assert push.project == "hello" and push.ref == "refs/heads/master"  # type: ignore[attr-defined]
    assert push.new == "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"  # type: ignore[attr-defined]
    assert len(push.commits) == 2  # type: ignore[attr-defined]
    assert site.cfg.verifier().signer(env).name == "git"


def test_a_signed_gitea_push_is_queued_for_the_project_named_by_repository(site: Site) -> None:
    body = payload("gitea-push")
    sig = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    status, answer = site.post(body, {"Content-Type": "application/json",
                                      "X-Gitea-Event": "push", "X-Gitea-Delivery": "d-1",
                                      "X-Gitea-Signature": sig})
    assert (status, answer) == (202, {"queued": 1})
    env = site.events.get(timeout=5)
    assert env.body["project"] == "hooks" and env.body["ref"] == "refs/heads/develop"


@pytest.mark.parametrize("mangle", ["missing", "wrong secret", "other body"])
def test_a_bad_or_missing_signature_is_401_and_writes_nothing(site: Site, mangle: str,
                                                              capsys: Any) -> None:
    body = payload("github-push")
    headers = github_headers(body, secret=b"guess" if mangle == "wrong secret" else SECRET)
    if mangle == "missing":
        del headers["X-Hub-Signature-256"]
    if mangle == "other body":
        body = body.replace(b"Codertocat", b"Codertocax", 1)
    status, answer = site.post(body, headers)
    assert status in (401, 404)
    if mangle != "other body":
        assert status == 401 and "signature" in answer["error"]
    assert site.pending() == 0 and site.events.empty()
    logged = capsys.readouterr()
    assert "Secret to Everybody" not in logged.out + logged.err
    assert '"commits"' not in logged.out + logged.err  # nor the body


def test_the_same_delivery_twice_and_at_once_yields_one_event(site: Site) -> None:
    body = payload("github-push")
    headers = github_headers(body, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    barrier = threading.Barrier(8)
    answers: list[int] = []

    def send() -> None:
        barrier.wait()
        answers.append(site.post(body, headers)[0])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [200] * 7 + [202]
    assert site.post(body, headers) == (200, {"ok": True, "duplicate": True})
    site.events.get(timeout=5)
    time.sleep(1)
    assert site.events.empty()


def test_a_ping_is_answered_and_publishes_nothing(site: Site) -> None:
    body = payload("github-ping").replace(b"Octocoders/Hello-World", b"Codertocat/Hello-World")
    status, answer = site.post(body, github_headers(body, event="ping"))
    assert status == 200 and answer["ping"] is True
    assert site.pending() == 0 and site.events.empty()


def test_an_event_no_project_acts_on_is_202_and_ignored(site: Site) -> None:
    body = json.dumps({"action": "opened", "issue": {"number": 1},
                       "repository": {"full_name": "Codertocat/Hello-World",
                                      "clone_url": "https://github.com/Codertocat/"
                                                   "Hello-World.git"}}).encode()
    status, answer = site.post(body, github_headers(body, event="issues"))
    assert (status, answer) == (202, {"ignored": "issues"})
    assert site.pending() == 0


def test_what_is_not_a_signed_json_push_is_refused_with_its_status(site: Site) -> None:
    body = payload("github-push")
    big = b'{"pad": "' + b"x" * 70000 + b'"}'
    assert site.post(big, github_headers(big))[0] == 413
    form = github_headers(body)
    form["Content-Type"] = "application/x-www-form-urlencoded"
    assert site.post(body, form)[0] == 415
    assert site.post(b"{not json", github_headers(b"{not json"))[0] == 400
    assert site.post(body, {"Content-Type": "application/json"})[0] == 400  # no event header
    other = body.replace(b"Codertocat/Hello-World", b"someone/else").replace(
        b"Codertocat/Hello-World", b"someone/else")
    other = other.replace(b"github.com/Codertocat/Hello-World", b"github.com/someone/else")
    assert site.post(other, github_headers(other))[0] == 404
    assert site.post(b"", {}, method="GET")[0] == 405
    assert site.pending() == 0 and site.events.empty()
    assert site.listener.healthy()


def test_healthz_shows_the_outbox_and_the_counters(site: Site) -> None:
    body = payload("github-push")
    site.post(body, github_headers(body))
    site.events.get(timeout=5)
    req = urllib.request.urlopen(site.url + "/healthz", timeout=5)
    data = json.loads(req.read())
    assert data["ok"] is True and data["outbox"]["pending"] == 0
    assert data["stats"]["accepted"] == 1 and data["stats"]["published"] == 1


def test_the_answer_does_not_wait_for_a_dead_broker(tmp_path: Path) -> None:
    s = Site(tmp_path, "amqp://guest:guest@127.0.0.1:1//")
    try:
        body = payload("github-push")
        started = time.monotonic()
        assert s.post(body, github_headers(body))[0] == 202
        assert time.monotonic() - started < 1.0
        assert s.pending() == 1
    finally:
        s.stop()
