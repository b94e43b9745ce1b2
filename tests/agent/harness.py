"""A host for agent tests: a git repository, a config, keys, and the deploy
agent either in this process (``memory://`` bus) or as a real process (any
bus), with helpers to send signed requests and wait for what comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from deploybus import config as configmod
from deploybus import envelope, topics
from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, connect
from deploybus.daemons.deploy_agent.agent import DeployAgent
from deploybus.layout import Layout
from deploybus.runner import Context
from deploybus.signing import SigningKey
from tests.e2e.cluster import GIT_ENV, Daemon, git


class Repo:
    """A work tree and the bare repository the agent deploys from."""

    def __init__(self, base: Path) -> None:
        self.work, self.bare = base / "work", base / "origin.git"
        self.work.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=self.work)
        git("init", "--bare", "-q", str(self.bare), cwd=base)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def commit(self, tag: str, files: dict[str, str] | None = None, *,
               remove: tuple[str, ...] = (), push: bool = True) -> str:
        for name, text in (files or {}).items():
            p = self.work / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        for name in remove:
            git("rm", "-q", "-r", name, cwd=self.work)
        (self.work / "VERSION").write_text(tag + "\n")
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", tag, cwd=self.work)
        git("tag", tag, cwd=self.work)
        if push:
            git("push", "-q", "origin", "main", tag, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work).strip()

    def commit_of(self, ref: str) -> str | None:
        """The commit ``ref`` names in the bare repository (None if it names none)."""
        r = subprocess.run(["git", "rev-parse", "--verify", "-q", "--end-of-options",
                            f"{ref}^{{commit}}"], cwd=self.bare, capture_output=True, text=True)
        return r.stdout.strip() or None

    def files(self, commit: str) -> set[str]:
        """Every file path (and the directories above them) of ``commit``."""
        out = git("ls-tree", "-r", "-t", "--name-only", commit, cwd=self.work)
        return set(out.split())


def tree(path: Path) -> set[str]:
    """Paths under ``path`` as git lists them (files and directories), found
    through one open directory, so a switch midway cannot mix two releases."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = set()
        for top, dirs, files, _ in os.fwalk(".", dir_fd=fd):
            rel = top[2:]
            for name in dirs + files:
                found.add(f"{rel}/{name}" if rel else name)
        return found
    finally:
        os.close(fd)


class Events:
    """Everything published on deploy.events (and dead letters), kept and searchable."""

    def __init__(self, bus: Any) -> None:
        self.items: list[envelope.Envelope] = []
        self.times: list[float] = []  # time.monotonic() each item arrived
        self.letters: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        bus.subscribe(topics.EVENTS, self._on_event)
        bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
        bus.subscribe(DEADLETTER_TOPIC, self._on_letter)

    def _on_event(self, d: Delivery) -> None:
        env = envelope.decode(d.body)
        with self.cond:
            self.items.append(env)
            self.times.append(time.monotonic())
            self.cond.notify_all()
        d.ack()

    def _on_letter(self, d: Delivery) -> None:
        import json
        with self.cond:
            self.letters.append(json.loads(d.body))
            self.cond.notify_all()
        d.ack()

    def wait(self, pred: Any, timeout: float = 30.0) -> Any:
        with self.cond:
            found: list[Any] = []

            def check() -> bool:
                found[:] = [e for e in self.items + self.letters if pred(e)]
                return bool(found)
            if not self.cond.wait_for(check, timeout):
                raise AssertionError(f"no matching event within {timeout}s; last events: "
                                     f"{[_short(e) for e in self.items[-8:]]}")
            return found[0]

    def result(self, rollout: str, timeout: float = 60.0, *,
               duplicate: bool | None = None) -> dict[str, Any]:
        env = self.wait(lambda e: isinstance(e, envelope.Envelope)
                        and e.type == "deploy.result" and e.body.get("rollout") == rollout
                        and (duplicate is None or bool(e.body.get("duplicate")) == duplicate),
                        timeout)
        return env.body

    def results(self, rollout: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e.body for e in self.items if e.type == "deploy.result"
                    and e.body.get("rollout") == rollout]

    def progress(self, rollout: str) -> list[dict[str, Any]]:
        """Every progress entry of ``rollout``, in order, with the message's
        common fields (host, project...) merged in; the last entries may
        ride on the result."""
        with self.cond:
            return [{k: v for k, v in e.body.items() if k != "entries"} | entry
                    for e in self.items if (e.type == "deploy.progress" or (
                        e.type == "deploy.result" and "entries" in e.body))
                    and e.body.get("rollout") == rollout
                    for entry in envelope.progress_entries(e.body)]


def _short(e: Any) -> Any:
    if isinstance(e, envelope.Envelope):
        entries = e.body.get("entries") or [{}]  # progress: show its last entry
        last = entries[-1] if isinstance(entries, list) and isinstance(entries[-1], dict) else {}
        return (e.type, last.get("step"), e.body.get("status"), last.get("message"),
                e.body.get("reason"))
    return e


class Site:
    """One host's worth of deploybus: config, keys, repo, root and state."""

    def __init__(self, base: Path, bus_url: str, projects: dict[str, dict[str, Any]], *,
                 host: str = "h1", repo: Repo | None = None) -> None:
        self.base, self.bus_url, self.host = base, bus_url, host
        self.repo = repo or Repo(base / "repo")
        self.root, self.state = base / "srv", base / "state"
        self.keys = base / "keys"
        # the orchestrator's key signs the test's requests; the host's, its results
        self.key = SigningKey.generate("orchestrator")
        self.key.save(self.keys)
        SigningKey.generate(host).save(self.keys)
        self.config_path = base / "deploybus.yaml"
        self.write_config(projects)

    def write_config(self, projects: dict[str, dict[str, Any]]) -> None:
        projects = {name: {"git": str(self.repo.bare), **p} for name, p in projects.items()}
        doc = {
            "bus": {"url": self.bus_url},
            "keys": {"trusted": {
                "orchestrator": {"key": str(self.keys / "orchestrator.pub"),
                                 "role": "orchestrator"},
                self.host: {"key": str(self.keys / f"{self.host}.pub"), "role": "host"}}},
            "hosts": {self.host: {"root": str(self.root), "state_dir": str(self.state),
                                  "signing": str(self.keys / f"{self.host}.key")}},
            "projects": projects,
            "environments": {"prod": {"hosts": [self.host]}},
        }
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def config(self) -> configmod.Config:
        return configmod.load(self.config_path)

    def layout(self, project: str = "app") -> Layout:
        return Layout(self.root, project)

    def request(self, ref: str | None = "v1", *, project: str = "app", action: str = "deploy",
                release: str | None = None, rollout: str | None = None, ttl: float = 300,
                key: SigningKey | None = None, **extra: Any) -> envelope.Envelope:
        rollout = rollout or uuid.uuid4().hex[:16]
        body: dict[str, Any] = {"rollout": rollout, "project": project, "environment": "prod",
                                "host": self.host, "user": "tester", "action": action}
        if ref is not None:
            body["ref"] = ref
            commit = self.repo.commit_of(ref) if action == "deploy" else None
            if commit is not None and "commit" not in extra:
                # as the orchestrator does: the ref resolved once, to a commit
                body["commit"] = commit
        if release is not None:
            body["release"] = release
        body.update(extra)
        env = envelope.new("deploy.request", body, sender="test", correlation=rollout, ttl=ttl)
        return (key or self.key).sign(env)

    def send(self, bus: Any, env: envelope.Envelope) -> str:
        bus.publish(topics.requests_for(self.host), env.encode())
        return str(env.body["rollout"])

    def journal(self, rollout: str) -> dict[str, Any] | None:
        import json
        p = self.state / "journal" / f"{rollout}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None


class InProcessAgent:
    """The agent service in this process, on the site's (memory) bus."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.bus = connect(site.bus_url)
        self.ctx = Context(config=site.config(), bus=self.bus, host=site.host,
                           signing_key=SigningKey.load(site.keys / f"{site.host}.key"))
        self.agent = DeployAgent(self.ctx)

    def start(self) -> InProcessAgent:
        self.agent.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.agent.stop(timeout)
        self.bus.close()


class AgentProcess:
    """``deploybus agent`` as a process of its own."""

    def __init__(self, site: Site) -> None:
        self.site = site
        env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info", **GIT_ENV}
        self.daemon = Daemon("agent", ["-c", str(site.config_path), "agent", "--host",
                                       site.host], env)
        if not self.daemon.ready.wait(60):
            raise AssertionError("agent not ready:\n" + self.logs())

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    def logs(self) -> str:
        return "".join(self.daemon.lines[-40:])

    def kill9(self, *, wait: bool = True) -> None:
        self.daemon.proc.send_signal(signal.SIGKILL)
        if wait:
            self.daemon.proc.wait(30)

    def stop(self) -> int | None:
        return self.daemon.stop()


def wait_until(pred: Any, timeout: float = 30.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def run_py(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

