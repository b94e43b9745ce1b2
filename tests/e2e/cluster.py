"""A deploybus installation on this machine: a bare repo with the hook, a
config, keys, and daemons as separate processes for several hosts, each with
its own deploy root and state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from deploybus.signing import SigningKey

GIT_ENV = {"GIT_AUTHOR_NAME": "tester", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "tester", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {r.stderr}")
    return r.stdout + r.stderr


class Daemon:
    """One daemon process; its log lines are kept and searched."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "deploybus.cli", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"event": "ready"' in line:
                self.ready.set()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Cluster:
    def __init__(self, base: Path, bus_url: str, hosts: list[str], *,
                 env_extra: str = "", app_scripts: dict[str, str] | None = None,
                 request_timeout: float = 60, heartbeat: float | None = None,
                 top_extra: str = "", app_extra: str = "") -> None:
        self.base, self.bus_url, self.hosts = base, bus_url, hosts
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self.env_extra = env_extra
        #: YAML appended at the top level (a ci: section) and under projects.app
        self.top_extra, self.app_extra = top_extra, app_extra
        self.app_scripts = app_scripts or {
            "pre": 'echo "pre $DEPLOYBUS_REF on $DEPLOYBUS_HOST" > "$DEPLOYBUS_PROJECT.pre.log"',
            "post": 'test -f VERSION && echo "post $DEPLOYBUS_COMMIT"'}
        self.daemons: list[Daemon] = []
        self.env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info", **GIT_ENV}
        self.bare = base / "git" / "app.git"
        self.work = base / "work"
        self.keys = base / "keys"
        self.config = base / "deploybus.yaml"

    def root(self, host: str) -> Path:
        return self.base / "hosts" / host / "srv"

    def state(self, host: str) -> Path:
        return self.base / "hosts" / host / "state"

    def current(self, host: str, project: str = "app") -> Path:
        return self.root(host) / project / "current"

    def key(self, name: str) -> Path:
        """The private key file of ``name`` (deployer, orchestrator, git or a host)."""
        return self.keys / f"{name}.key"

    def setup(self) -> None:
        # one key per role holder, as on real servers: a person (the CLI),
        # the orchestrator, the git server's hook, and each host
        for name in ("deployer", "orchestrator", "git", "ci", *self.hosts):
            SigningKey.generate(name).save(self.keys)
        self.bare.parent.mkdir(parents=True)
        git("init", "--bare", "-q", str(self.bare), cwd=self.base)
        self.work.mkdir()
        git("init", "-q", "-b", "main", cwd=self.work)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)
        scripts_yaml = "".join(f"      {k}: {json.dumps(v)}\n" for k, v in self.app_scripts.items())
        beat = f"    heartbeat: {self.heartbeat}\n" if self.heartbeat else ""
        hosts_yaml = "".join(f"  {h}:\n    root: {self.root(h)}\n    state_dir: {self.state(h)}\n"
                             f"    signing: keys/{h}.key\n{beat}" for h in self.hosts)
        trusted = "".join(f"    {h}: {{key: keys/{h}.pub, role: host}}\n" for h in self.hosts)
        self.config.write_text(f"""\
bus:
  url: "{self.bus_url}"
keys:
  signing: keys/deployer.key
  trusted:
    deployer: {{key: keys/deployer.pub, role: person}}
    orchestrator: {{key: keys/orchestrator.pub, role: orchestrator}}
    git: {{key: keys/git.pub, role: git}}
    ci: {{key: keys/ci.pub, role: ci}}
{trusted}  policy:
    - signer: deployer
      projects: ["*"]
      environments: ["*"]
    - signer: ci
      projects: ["*"]
      environments: ["*"]
state:
  url: sqlite:///state.db
{self.top_extra}hosts:
{hosts_yaml}projects:
  app:
    git: {self.bare}
{self.app_extra}    scripts:
{scripts_yaml}  broken:
    git: {self.bare}
    scripts:
      post: echo "smoke test failed" && exit 3
environments:
  prod:
    hosts: [{", ".join(self.hosts)}]
    request_timeout: {self.request_timeout}
{self.env_extra}""")
        out = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(self.config),
                              "--key", str(self.key("git")),
                              "hook", "install", str(self.bare), "--project", "app"],
                             env=self.env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

    def commit_and_tag(self, tag: str) -> str:
        (self.work / "VERSION").write_text(tag + "\n")
        for i in range(5):
            (self.work / f"file{i}.txt").write_text(f"{tag} {i}\n" * 50)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", f"release {tag}", cwd=self.work)
        git("tag", tag, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work).strip()

    def push(self, *refs: str) -> str:
        return git("push", "-q", "origin", *refs, cwd=self.work)

    def start(self, name: str, *args: str) -> Daemon:
        d = Daemon(name, ["-c", str(self.config), *args], self.env)
        self.daemons.append(d)
        return d

    def start_ci_bridge(self, *args: str) -> Daemon:
        return self.start("ci-bridge", "--key", str(self.key("ci")), "ci-bridge", *args)

    def start_orchestrator(self) -> Daemon:
        return self.start("orchestrator", "--key", str(self.key("orchestrator")), "orchestrator")

    def start_all(self, *, fetchers: bool = True) -> None:
        started = [self.start_orchestrator()]
        for h in self.hosts:
            if fetchers:
                started.append(self.start(f"fetcher-{h}", "fetcher", "--host", h))
            started.append(self.start(f"agent-{h}", "agent", "--host", h))
        for d in started:
            if not d.ready.wait(60):
                raise AssertionError(f"{d.name} not ready:\n{''.join(d.lines[-30:])}")

    def deploy(self, project: str, ref: str, *extra: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cli("deploy", project, ref, "--env", "prod", "--wait",
                        "--timeout", str(timeout), *extra, timeout=timeout + 30)

    def deploy_async(self, project: str, ref: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "deploybus.cli", "-c", str(self.config),
                                 "deploy", project, ref, "--env", "prod", "--wait",
                                 "--timeout", "120", *extra], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(self.config),
                               *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def daemon(self, name: str) -> Daemon:
        return next(d for d in self.daemons if d.name == name)

    def host_rows(self) -> dict[str, dict]:
        """``deploybus hosts --json`` by host name."""
        r = self.cli("hosts", "--json")
        assert r.returncode == 0, r.stderr
        return {h["name"]: h for h in json.loads(r.stdout)}

    def history(self) -> list[dict]:
        r = self.cli("history", "--json", "--limit", "100")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def version(self, host: str, project: str = "app") -> str | None:
        v = self.current(host, project) / "VERSION"
        return v.read_text().strip() if v.exists() else None

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()

    def logs(self, *names: str, tail: int = 40) -> str:
        """The last ``tail`` lines of each daemon's log (only ``names`` if given)."""
        return "\n".join(f"--- {d.name} ---\n{''.join(d.lines[-tail:])}" for d in self.daemons
                         if not names or d.name in names)

    def save_logs(self) -> None:
        """Every daemon's whole log under the cluster's directory (``logs/<name>.log``),
        to read after a failure."""
        out = self.base / "logs"
        out.mkdir(exist_ok=True)
        for d in self.daemons:
            (out / f"{d.name}.log").write_text("".join(d.lines))

    def audit(self, host: str) -> list[dict]:
        path = self.state(host) / "audit.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
