"""An installation for the notifier's tests on the in-process bus: keys for
every role, a real git repository, the state database, a real webhook
receiver and a real SMTP server, the notifier, and (when asked) the real
orchestrator with scripted agents for h1 and h2."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, protocol, topics
from deploybus.bus import connect
from deploybus.config import parse
from deploybus.daemons.notifier.service import Notifier, Retry
from deploybus.daemons.orchestrator import service
from deploybus.protocol import RolloutState, RolloutStatus
from deploybus.runner import Context, Stats
from deploybus.signing import SigningKey
from deploybus.states import FINAL_STATES
from deploybus.store import Store
from deploybus.strategy import Strategy
from tests.notify.harness import Mailbox, Receiver, wait_for

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}

SECRET = b"webhook-shared-secret-4711"
HOSTS = ("h1", "h2")


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


class Agents:
    """Answers h1's and h2's deploy requests at once, as ``plan`` says:
    ``plan(project, host, ref) -> "ok" | "fail"``. Rollbacks always work."""

    def __init__(self, bus: Any, keys: dict[str, SigningKey]) -> None:
        self.bus, self.keys = bus, keys
        self.plan: Callable[[str, str, str | None], str] = lambda _p, _h, _r: "ok"
        self.current: dict[tuple[str, str], str] = {}
        self.lock = threading.Lock()
        for h in HOSTS:
            bus.subscribe(topics.requests_for(h), self.on_request, queue=f"agent-{h}")

    def on_request(self, d: Any) -> None:
        env = envelope.decode(d.body)
        d.ack()
        req = env.body
        host, project = req["host"], req["project"]
        with self.lock:
            previous = self.current.get((project, host))
            if req.get("action") == "rollback":
                outcome, release = "ok", req.get("release") or previous
            else:
                outcome = self.plan(project, host, req.get("ref"))
                release = f"rel-{req['rollout']}-{host}"
            if outcome == "ok" and release:
                self.current[(project, host)] = release
        body: dict[str, Any] = {
            "rollout": req["rollout"], "host": host, "request_id": env.id,
            "project": project, "action": req.get("action", "deploy"),
            "undo": req.get("undo", False)}
        if outcome == "ok":
            body |= {"status": "succeeded", "release": release}
            if previous:
                body["previous_release"] = previous
        else:
            body |= {"status": "failed", "failure": "script",
                     "reason": "post failed (exit 4): smoke test failed"}
        self.bus.publish(topics.EVENTS, self.keys[host].sign(envelope.new(
            "deploy.result", body, sender=f"agent@{host}", correlation=req["rollout"],
            ttl=60)).encode())


class Site:
    """See the module docstring. ``notify`` is YAML for the projects'
    ``notify:`` sections (``{R}`` is the receiver's base URL)."""

    def __init__(self, tmp_path: Path, *, notify: dict[str, str] | None = None,
                 smtp_login: tuple[str, str] | None = None) -> None:
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.keys = {n: SigningKey.generate(n)
                     for n in ("ops", "alice", "ci", "h1", "h2", "stranger")}
        for k in self.keys.values():
            k.save(tmp_path)
        (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
        self.receiver = Receiver()
        self.mail = Mailbox(login=smtp_login)
        repo, work = tmp_path / "app.git", tmp_path / "work"
        git("init", "-q", "--bare", str(repo), cwd=tmp_path)
        git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
        self.commits: dict[str, str] = {}
        for tag in ("v1", "v2"):
            git("commit", "-q", "--allow-empty", "-m", tag, cwd=work)
            git("tag", tag, cwd=work)
            self.commits[tag] = git("rev-parse", "HEAD", cwd=work)
        git("push", "-q", str(repo), "main", "v1", "v2", cwd=work)
        r = self.receiver.url("")
        notify = notify if notify is not None else {
            "app": f"""
      webhooks:
        - {{url: "{r}/app", format: json, secret: hook.secret}}
        - {{url: "{r}/app-slack", format: slack}}
      email: [ops@example.org]""",
            "other": f"""
      events: [failed, ci_failed]
      webhooks: [{{url: "{r}/other"}}]""",
        }
        projects = ""
        for name in ("app", "other", "quiet"):
            projects += f"  {name}:\n    git: {repo}\n"
            if notify.get(name):
                projects += "    notify:" + notify[name].replace("{R}", r) + "\n"
        credentials = ""
        if smtp_login is not None:
            (tmp_path / "smtp.cred").write_text(f"{smtp_login[0]}:{smtp_login[1]}\n")
            credentials = ", credentials: smtp.cred"
        self.cfg = parse(f"""
bus: {{url: "memory://notify-{uuid.uuid4().hex}"}}
keys:
  trusted:
    ops: {{key: ops.pub, role: orchestrator}}
    alice: {{key: alice.pub, role: person}}
    ci: {{key: ci.pub, role: ci}}
    h1: {{key: h1.pub, role: host, host: h1}}
    h2: {{key: h2.pub, role: host, host: h2}}
  policy: [{{signer: alice}}]
state: {{url: "sqlite:///{tmp_path / 'state.db'}", dir: {tmp_path / 'server'}}}
smtp: {{host: 127.0.0.1, port: {self.mail.port}, from: deploybus@example.org, timeout: 5{credentials}}}
projects:
{projects}environments:
  prod:
    hosts: [h1, h2]
    request_timeout: 30
""", tmp_path / "deploybus.yaml")
        self.bus = connect(self.cfg.bus_url)
        self.store = Store(self.cfg.state_url)
        self.orch: service.Orchestrator | None = None
        self.agents: Agents | None = None
        self.notifiers: list[Notifier] = []

    # -- the daemons -----------------------------------------------------------------

    def notifier(self, **kwargs: Any) -> Notifier:
        kwargs.setdefault("retry", Retry(first=0.05, cap=0.2, attempts=4))
        n = Notifier(Context(config=self.cfg, bus=self.bus, host="n", stats=Stats()), **kwargs)
        n.start()
        self.notifiers.append(n)
        return n

    def orchestrator(self) -> service.Orchestrator:
        self.agents = Agents(self.bus, self.keys)
        self.orch = service.Orchestrator(Context(config=self.cfg, bus=self.bus, host="o",
                                                 signing_key=self.keys["ops"]), self.store)
        self.orch.start()
        return self.orch

    # -- what people and the orchestrator send --------------------------------------

    def deploy(self, rollout: str, project: str = "app", ref: str = "v1", *,
               action: str = "deploy", **strategy: Any) -> None:
        body = protocol.RolloutRequest(
            rollout=rollout, project=project, environment="prod", user="alice",
            action=protocol.Action(action), ref=ref if action == "deploy" else None,
            strategy=protocol.StrategySpec(**strategy) if strategy else None)
        self.bus.publish(topics.ROLLOUTS, protocol.seal(body, key=self.keys["alice"],
                                                        sender="cli@t"))

    def control(self, rollout: str, action: str) -> None:
        self.bus.publish(topics.CONTROL, protocol.seal(protocol.Control(
            rollout=rollout, action=protocol.ControlAction(action), user="alice"),
            key=self.keys["alice"], sender="cli@t"))

    def state(self, rollout: str) -> str | None:
        r = self.store.rollout(rollout)
        return r["state"] if r else None

    def wait_final(self, rollout: str, timeout: float = 30) -> str:
        assert wait_for(lambda: self.state(rollout) in FINAL_STATES, timeout), \
            f"{rollout} is {self.state(rollout)}"
        state = self.state(rollout)
        assert state is not None
        return state

    def record(self, rollout: str, project: str = "app", *, state: str = "failed",
               steps: dict[str, str] | None = None, **strategy: Any) -> None:
        """A rollout in the state database as the orchestrator leaves it."""
        steps = steps if steps is not None else {"h1": "succeeded", "h2": "failed"}
        self.store.create_rollout(id=rollout, project=project, environment="prod",
                                  ref="refs/tags/v2", user="alice", hosts=list(steps),
                                  commit=self.commits["v2"],
                                  strategy=Strategy.parse(strategy).to_dict())
        for host, st in steps.items():
            self.store.set_step(rollout, host, state=st,
                                message="post failed (exit 4)" if st == "failed" else None)
        self.store.set_rollout(rollout, state=state)

    def status_bytes(self, rollout: str, *, key: str | None = "ops", **fields: Any) -> bytes:
        """A ``deploy.rollout.status`` as the orchestrator sends it (signed by
        ``key``; None: unsigned)."""
        fields.setdefault("state", RolloutState.FAILED)
        body = RolloutStatus(rollout=rollout, **fields)
        if key is None:
            return envelope.new("deploy.rollout.status", protocol.to_dict(body),
                                sender="o", correlation=rollout, ttl=3600).encode()
        return protocol.seal(body, key=self.keys[key], sender="orchestrator@o",
                             correlation=rollout)

    def final_status(self, rollout: str, **fields: Any) -> bytes:
        defaults: dict[str, Any] = {
            "state": RolloutState.FAILED, "succeeded": 1, "failed": 1, "total": 2,
            "failed_host": "h2", "hosts": list(HOSTS),
            "reason": "halted: 1 host(s) failed (max_failures 0): h2; h2: failed: post "
                      "failed (exit 4)"}
        return self.status_bytes(rollout, **(defaults | fields))

    def publish_status(self, raw: bytes) -> None:
        self.bus.publish(topics.STATUS, raw)

    def build(self, project: str, result: str | None, state: str = "finished", *,
              key: str = "ci", build: str | None = None) -> None:
        body = protocol.CiBuild(
            project=project, ref="refs/heads/main", commit=self.commits["v2"],
            state=protocol.BuildState(state), backend="jenkins", job=f"{project}-build",
            build=build or f"jenkins/{project}-build#{uuid.uuid4().hex[:6]}",
            result=result, number=7, url="http://ci.example.org/job/7/")
        self.bus.publish(topics.CI_EVENTS, protocol.seal(body, key=self.keys[key],
                                                         sender="ci-bridge@ci"))

    def close(self) -> None:
        for n in self.notifiers:
            n.stop(5)
        if self.orch is not None:
            self.orch.stop(5)
        self.bus.close()
        self.receiver.close()
        self.mail.close()


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    made: list[Site] = []

    def make(**kwargs: Any) -> Site:
        site = Site(tmp_path / f"site{len(made)}", **kwargs)
        made.append(site)
        return site

    yield make
    for s in made:
        s.close()


@pytest.fixture
def site(make_site: Callable[..., Site]) -> Site:
    return make_site()
