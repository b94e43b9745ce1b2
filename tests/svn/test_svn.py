"""Subversion: the post-commit hook, the svn.commit event and the fetcher's
export cache, with real parts.

A real repository (``svnadmin create``), a working copy (``svn checkout
file://...``) and real commits (``svn commit``), so the hook runs the way
svn runs it: as a child of the commit, with an empty environment. The
events go through a real RabbitMQ (AMQP) to a real ``deploybus fetcher``
process, which exports each revision into ``<state_dir>/svn/<project>/``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploybus import envelope, protocol, topics
from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, connect
from deploybus.config import load, parse
from deploybus.daemons.git_listener import svn as svnhook
from deploybus.daemons.repo_fetcher import svn as svnfetch
from deploybus.errors import RolloutError
from deploybus.outbox import Outbox
from deploybus.plan import plan
from deploybus.signing import SigningKey
from tests.conftest import broker_url
from tests.e2e.cluster import Daemon, wait_for

pytestmark = pytest.mark.e2e

USER = "alice"


def run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


class Repo:
    """A Subversion repository (trunk, branches, tags) and a working copy of it."""

    def __init__(self, base: Path) -> None:
        self.path = base / "repo"
        self.url = f"file://{self.path}"
        self.wc = base / "wc"
        run("svnadmin", "create", str(self.path))
        run("svn", "checkout", "-q", "--non-interactive", self.url, str(self.wc))

    def write(self, rel: str, text: str) -> None:
        p = self.wc / rel
        new = not p.exists()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        if new:
            run("svn", "add", "-q", "--parents", "--force", str(p), cwd=self.wc)

    def commit(self, message: str, user: str = USER) -> subprocess.CompletedProcess[str]:
        """``svn commit`` (which runs the post-commit hook); its output."""
        return run("svn", "commit", "--non-interactive", "--username", user, "-m", message,
                   cwd=self.wc, timeout=120)

    def layout(self) -> None:
        """r1: trunk (index.html v1), branches, tags."""
        for d in ("trunk", "branches", "tags"):
            (self.wc / d).mkdir()
        run("svn", "add", "-q", "trunk", "branches", "tags", cwd=self.wc)
        self.write("trunk/index.html", "v1\n")
        self.commit("initial layout\n\nwith trunk, branches and tags")

    def copy(self, src: str, dest: str, message: str) -> None:
        run("svn", "copy", "-q", "--non-interactive", "--username", USER, "-m", message,
            f"{self.url}/{src}", f"{self.url}/{dest}")
        run("svn", "update", "-q", cwd=self.wc)

    def youngest(self) -> int:
        return int(run("svnlook", "youngest", str(self.path)).stdout)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


class Site:
    """Keys and a config: project ``site`` from the repository's trunk
    (``svn:``), served by host h1 (keep 2); and a git key for the hook."""

    def __init__(self, base: Path, repo: Repo, bus_url: str) -> None:
        self.base, self.repo, self.bus_url = base, repo, bus_url
        self.keys = base / "keys"
        for name in ("deployer", "git", "h1"):
            SigningKey.generate(name).save(self.keys)
        self.state = base / "h1" / "state"
        self.config = base / "deploybus.yaml"
        self.write_config(bus_url)
        self.env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info"}

    def write_config(self, bus_url: str, path: Path | None = None) -> Path:
        path = path or self.config
        path.write_text(f"""\
bus:
  url: "{bus_url}"
keys:
  signing: keys/deployer.key
  trusted:
    deployer: {{key: keys/deployer.pub, role: person}}
    git: {{key: keys/git.pub, role: git}}
    h1: {{key: keys/h1.pub, role: host}}
  policy:
    - signer: deployer
state:
  url: sqlite:///state.db
hosts:
  h1:
    root: {self.base / "h1" / "srv"}
    state_dir: {self.state}
    signing: keys/h1.key
projects:
  site:
    svn: {self.repo.path}/trunk
    keep: 2
environments:
  prod:
    hosts: [h1]
""")
        return path

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def cli(self, *args: str, config: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploybus.cli", "-c",
                               str(config or self.config), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def install_hook(self, config: Path | None = None) -> None:
        r = self.cli("hook", "install-svn", str(self.repo.path), "--project", "site",
                     "--key", str(self.key("git")), config=config)
        assert r.returncode == 0, r.stderr

    def exports(self) -> list[int]:
        return svnfetch.exports(self.state, "site")

    def export(self, rev: int) -> Path:
        return self.state / "svn" / "site" / f"r{rev}"


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    return broker_url("rabbitmq-amqp", request, f"svn{uuid.uuid4().hex[:10]}")


@pytest.fixture
def site(tmp_path: Path, repo: Repo, amqp_url: str) -> Site:
    return Site(tmp_path, repo, amqp_url)


@contextmanager
def fetcher(site: Site) -> Iterator[Daemon]:
    """``deploybus fetcher --host h1``, a process of its own, ready."""
    with connect(site.bus_url) as bus:  # letters are kept from the start
        bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
    d = Daemon("fetcher-h1", ["-c", str(site.config), "fetcher", "--host", "h1"], site.env)
    try:
        assert d.ready.wait(60), "".join(d.lines[-30:])
        yield d
    finally:
        d.stop()


# -- installing the hook ------------------------------------------------------------------

def test_install_writes_an_executable_hook_with_absolute_paths(tmp_path: Path, repo: Repo,
                                                               ) -> None:
    s = Site(tmp_path, repo, "memory://x")
    s.install_hook()
    hook = repo.path / "hooks" / "post-commit"
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert svnhook.MARKER in text
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    # svn gives the hook no environment: everything by absolute path
    for path in (sys.executable, str(s.config.resolve()), str(s.key("git").resolve())):
        assert f" {path} " in exec_line, (path, exec_line)
    svnlook = exec_line.split("--svnlook ")[1].split()[0]
    assert Path(svnlook).is_absolute() and os.access(svnlook, os.X_OK)
    assert "notify svn-commit --project site" in exec_line
    assert exec_line.endswith(' -- "$1" "$2"')
    mode = hook.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXGRP and mode & stat.S_IXOTH
    # ours: installing again replaces it
    s.install_hook()
    assert hook.read_text() == text
    assert not list(hook.parent.glob(".*tmp")), "no temporary file left"


def test_install_refuses_a_non_repository_and_a_foreign_hook(tmp_path: Path,
                                                             repo: Repo) -> None:
    s = Site(tmp_path, repo, "memory://x")
    for not_repo in (tmp_path / "plain", repo.wc):  # a directory, a working copy
        not_repo.mkdir(exist_ok=True)
        r = s.cli("hook", "install-svn", str(not_repo), "--project", "site")
        assert r.returncode == 1, r.stderr
        assert "is not a Subversion repository" in r.stderr
        assert not (not_repo / "hooks" / "post-commit").exists()
    hook = repo.path / "hooks" / "post-commit"
    hook.write_text("#!/bin/sh\n/usr/local/bin/mail-the-team \"$@\"\n")
    r = s.cli("hook", "install-svn", str(repo.path), "--project", "site")
    assert r.returncode == 1
    assert "was not written by deploybus" in r.stderr and "--force" in r.stderr
    assert "mail-the-team" in hook.read_text()
    r = s.cli("hook", "install-svn", str(repo.path), "--project", "site", "--force")
    assert r.returncode == 0, r.stderr
    assert svnhook.MARKER in hook.read_text()
    # a project the config does not have as svn: installed, with a warning
    r = s.cli("hook", "install-svn", str(repo.path), "--project", "other")
    assert r.returncode == 0 and "no svn project 'other'" in r.stderr


# -- the event body -----------------------------------------------------------------------

def test_commit_body_reads_the_revision_with_svnlook(repo: Repo) -> None:
    repo.layout()
    body = svnhook.commit_body(repo.path, 1, "site")
    assert body["revision"] == 1 and body["author"] == USER
    assert body["subject"] == "initial layout"
    assert body["branch"] == "trunk"
    assert body["paths_changed"] == 4  # trunk/, trunk/index.html, branches/, tags/
    assert body["date"].endswith("+00:00")
    assert isinstance(protocol.parse("svn.commit", body), protocol.SvnCommit)

    repo.copy("trunk", "branches/fix-1", "branch for the fix")
    assert svnhook.commit_body(repo.path, 2, "site")["branch"] == "branches/fix-1"
    repo.copy("trunk", "tags/v1.0", "release 1.0")
    assert svnhook.commit_body(repo.path, 3, "site")["branch"] == "tags/v1.0"
    repo.write("branches/fix-1/index.html", "fixed\n")
    repo.commit("Ünïcödé fix ✓\nsecond line")
    body = svnhook.commit_body(repo.path, 4, "site")
    assert body["branch"] == "branches/fix-1" and body["subject"] == "Ünïcödé fix ✓"
    repo.write("README", "outside the layout\n")
    repo.commit("x" * 500)
    body = svnhook.commit_body(repo.path, 5, "site")
    assert "branch" not in body
    assert len(body["subject"]) == protocol.SVN_SUBJECT_CAP
    protocol.parse("svn.commit", body)


def test_svn_commit_bodies_are_checked() -> None:
    from deploybus.errors import EnvelopeError
    base = {"project": "site", "revision": 3}
    assert protocol.parse("svn.commit", base).paths_changed == 0
    for bad in ({"revision": 0}, {"revision": "3"}, {"project": "../x"},
                {"subject": "x" * 201}, {"branch": ""}, {"paths_changed": -1},
                {"extra": 1}):
        with pytest.raises(EnvelopeError):
            protocol.parse("svn.commit", base | bad)
    assert protocol.SENDERS["svn.commit"] == protocol.SENDERS["git.push"]
    assert protocol.TTL["svn.commit"] == protocol.TTL["git.push"]
    assert "svn.commit" in envelope.TYPES


# -- the hook on the bus ------------------------------------------------------------------

def test_a_commit_publishes_a_signed_svn_commit(site: Site) -> None:
    site.install_hook()
    got: queue.Queue[envelope.Envelope] = queue.Queue()

    def on_msg(d: Delivery) -> None:
        got.put(envelope.decode(d.body))
        d.ack()

    with connect(site.bus_url) as bus:
        bus.subscribe(topics.GIT_COMMITS, on_msg)
        time.sleep(0.5)  # the subscription is bound before the commit
        site.repo.layout()
        env = got.get(timeout=30)
        site.repo.copy("trunk", "branches/b2", "Branch b2\nfor the next release")
        env2 = got.get(timeout=30)
    cfg = load(site.config)
    for e in (env, env2):
        assert e.type == "svn.commit" and e.sender.startswith("svn-hook@")
        signer = cfg.verifier().identify(e, protocol.parse(e.type, e.body))
        assert (signer.name, signer.role) == ("git", protocol.Role.GIT)
    assert env.body["revision"] == 1 and env.body["author"] == USER
    assert env.body["subject"] == "initial layout" and env.body["branch"] == "trunk"
    assert env.body["project"] == "site"
    assert env2.body["revision"] == 2 and env2.body["subject"] == "Branch b2"
    assert env2.body["branch"] == "branches/b2"


def test_the_hook_never_fails_or_holds_a_commit_when_the_bus_is_down(site: Site) -> None:
    dead = site.write_config("amqp://guest:guest@127.0.0.1:1/", site.base / "dead.yaml")
    site.install_hook(config=dead)
    started = time.monotonic()
    site.repo.layout()  # a commit, which runs the hook
    assert site.repo.youngest() == 1
    assert time.monotonic() - started < 15, "the hook gives up within seconds"
    # What the committer's svn ran, as svn runs it: an empty environment.
    started = time.monotonic()
    r = subprocess.run([str(site.repo.path / "hooks" / "post-commit"), str(site.repo.path),
                        "1", "1-1"], env={}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert time.monotonic() - started < 15
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("deploybus: svn.commit r1 of site queued for the bus (")
    # queued once, though the hook ran twice for r1
    with Outbox(load(dead).outbox_path()) as box:
        assert [(r.type, r.body["revision"]) for r in box.pending()] == [("svn.commit", 1)]
    # a revision svnlook cannot read: the same one line, exit 0
    r = subprocess.run([str(site.repo.path / "hooks" / "post-commit"), str(site.repo.path),
                        "99"], env={}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "svn.commit r99 of site not published" in r.stderr


# -- the fetcher ----------------------------------------------------------------------------

def test_the_fetcher_exports_each_commit_and_keeps_the_newest(site: Site) -> None:
    repo = site.repo
    site.install_hook()
    repo.layout()  # r1, before the fetcher runs: exported at its start (youngest)
    with fetcher(site) as d:
        assert site.exports() == [1]
        assert (site.export(1) / "index.html").read_text() == "v1\n"
        repo.write("trunk/index.html", "v2\n")
        repo.commit("v2")
        assert wait_for(lambda: 2 in site.exports(), 30), "".join(d.lines[-30:])
        repo.write("trunk/index.html", "v3\n")
        repo.write("trunk/lib/new.txt", "new in r3\n")
        repo.commit("v3")
        assert wait_for(lambda: site.exports() == [2, 3], 30), (site.exports(),
                                                                 "".join(d.lines[-30:]))
        assert (site.export(2) / "index.html").read_text() == "v2\n"
        assert (site.export(3) / "index.html").read_text() == "v3\n"
        assert (site.export(3) / "lib" / "new.txt").read_text() == "new in r3\n"
        assert not (site.export(3) / ".svn").exists(), "an export, not a working copy"
        assert sorted(p.name for p in (site.state / "svn" / "site").iterdir()
                      if not p.name.endswith(".lock")) == ["r2", "r3"]
        assert not (site.state / "mirrors" / "site.git").exists(), "no git mirror for svn"
        assert d.alive()
        assert not [line for line in d.lines if "fetch failed" in line or
                    "svn export failed" in line], "".join(d.lines)


def test_forged_svn_commits_are_dead_lettered(site: Site) -> None:
    """Unsigned, unknown-key, wrong-role and malformed svn.commit messages are
    dead-lettered by the fetcher with their reason and export nothing; a
    body made by commit_body and signed by the git key is exported."""
    site.repo.layout()
    with fetcher(site) as d:
        forgeries(site, d)


def forgeries(site: Site, d: Daemon) -> None:
    assert site.exports() == [1]
    for rev in (2, 3, 4):  # no hook installed: nobody announces them
        site.repo.write("trunk/index.html", f"v{rev}\n")
        site.repo.commit(f"v{rev}")
    letters: queue.Queue[dict] = queue.Queue()

    def forged(rev: int, key: SigningKey | None, **body: object) -> bytes:
        env = envelope.new("svn.commit", {"project": "site", "revision": rev, **body},
                           sender="svn-hook@nowhere", correlation=f"forged-{rev}", ttl=300)
        return (key.sign(env) if key else env).encode()

    git_key = SigningKey.load(site.key("git"))
    sent = {"forged-2": forged(2, None),
            "forged-3": forged(3, SigningKey.generate("stranger")),
            "forged-4": forged(4, SigningKey.load(site.key("h1"))),
            "forged-0": forged(0, git_key)}
    with connect(site.bus_url) as bus:
        bus.subscribe(DEADLETTER_TOPIC, lambda d: (letters.put(json.loads(d.body)), d.ack()),
                      queue=DEADLETTER_QUEUE)
        for body in sent.values():
            bus.publish(topics.GIT_COMMITS, body)
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(reasons) < len(sent) and time.monotonic() < deadline:
            letter = letters.get(timeout=30)
            corr = json.loads(letter["body"]).get("correlation")
            if corr in sent and letter["daemon"] == "repo_fetcher":
                reasons[corr] = letter["reason"]
        assert reasons.get("forged-2") == "untrusted message: message is not signed", reasons
        assert "signed by unknown key" in reasons["forged-3"]
        assert reasons["forged-4"] == "untrusted message: h1 (host) may not send svn.commit"
        assert reasons["forged-0"].startswith("invalid message: svn.commit:")
        assert "revision" in reasons["forged-0"]
        assert site.exports() == [1], "a forged svn.commit was acted on"
        # ... and the real thing, built as the hook builds it, is taken
        body = svnhook.commit_body(site.repo.path, 4, "site")
        svnhook.publish_commit(bus, body, sender="test", signing_key=git_key)
        assert wait_for(lambda: site.exports() == [1, 4], 30), "".join(d.lines[-20:])
    assert (site.export(4) / "index.html").read_text() == "v4\n"
    assert d.alive()


# -- rollouts: refused, clearly ---------------------------------------------------------------

def test_rollouts_of_an_svn_project_are_refused_up_front(tmp_path: Path, repo: Repo) -> None:
    s = Site(tmp_path, repo, "memory://x")
    cfg = load(s.config)
    assert cfg.projects["site"].vcs == "svn"
    with pytest.raises(RolloutError) as err:
        plan(cfg, project="site", environment="prod")
    assert err.value.field == "project"
    assert "not yet deployable by rollouts" in str(err.value)
    r = s.cli("deploy", "site", "v1", "--env", "prod")
    assert r.returncode == 2 and "not yet deployable by rollouts" in r.stderr, r.stderr


def test_the_orchestrator_refuses_an_svn_rollout_naming_why(tmp_path: Path,
                                                           repo: Repo) -> None:
    """A signed deploy.rollout that bypasses the CLI: refused before any ref
    is resolved or any host is asked."""
    from deploybus.daemons.orchestrator import service
    from deploybus.runner import Context
    from deploybus.store import Store
    keys = {n: SigningKey.generate(n) for n in ("ops", "alice")}
    for k in keys.values():
        k.save(tmp_path)
    cfg = parse(f"""
bus: {{url: "memory://svn-{uuid.uuid4().hex}"}}
keys:
  signing: ops.key
  trusted:
    ops: {{key: ops.pub, role: orchestrator}}
    alice: {{key: alice.pub, role: person}}
  policy: [{{signer: alice}}]
projects: {{site: {{svn: {repo.path}}}}}
environments: {{prod: {{hosts: [h1]}}}}
""", tmp_path / "c.yaml")
    bus = connect(cfg.bus_url)
    statuses: queue.Queue[dict] = queue.Queue()
    requests: list[bytes] = []
    bus.subscribe(topics.STATUS, lambda d: (statuses.put(envelope.decode(d.body).body),
                                            d.ack()))
    bus.subscribe(topics.requests_for("h1"), lambda d: (requests.append(d.body), d.ack()))
    orch = service.Orchestrator(Context(config=cfg, bus=bus, host="o", signing_key=keys["ops"]),
                                Store(f"sqlite:///{tmp_path / 's.db'}"))
    orch.start()
    try:
        env = envelope.new("deploy.rollout", {"rollout": "r1", "project": "site",
                                              "environment": "prod", "ref": "trunk",
                                              "user": "alice"},
                           sender="t", correlation="r1", ttl=60)
        bus.publish(topics.ROLLOUTS, keys["alice"].sign(env).encode())
        status = statuses.get(timeout=20)
        assert status["state"] == "refused"
        assert "Subversion project" in status["reason"]
        assert "not yet deployable by rollouts" in status["reason"]
        assert not requests
    finally:
        orch.stop()
        bus.close()


def test_the_hook_gives_up_on_a_broker_that_never_answers(site: Site) -> None:
    """A broker that takes the connection and then says nothing: the
    publish limit (5 s) ends it, with the one warning, exit 0."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mute = site.write_config(f"amqp://guest:guest@127.0.0.1:{port}/",
                                 site.base / "mute.yaml")
        site.install_hook(config=mute)
        site.repo.layout()
        started = time.monotonic()
        r = subprocess.run([str(site.repo.path / "hooks" / "post-commit"),
                            str(site.repo.path), "1"], env={}, capture_output=True,
                           text=True, timeout=60)
        took = time.monotonic() - started
    assert r.returncode == 0
    assert took < svnhook.HOOK_DEADLINE + 5, took
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "svn.commit r1 of site queued for the bus" in lines[0], \
        r.stderr


def test_the_hook_ends_at_its_deadline_whatever_hangs(site: Site) -> None:
    """Whatever is slow (here svnlook: each call just under its own
    timeout), the command ends at HOOK_DEADLINE with the one warning and
    exit 0."""
    site.repo.layout()
    slow = site.base / "slow-svnlook"
    slow.write_text(f"#!/bin/sh\nsleep {svnhook.SVNLOOK_TIMEOUT - 1}\n"
                    f"exec {shutil.which('svnlook')} \"$@\"\n")
    slow.chmod(0o755)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(site.config),
                        "notify", "svn-commit", "--project", "site", "--svnlook", str(slow),
                        "--", str(site.repo.path), "1"], env={}, capture_output=True,
                       text=True, timeout=60)
    took = time.monotonic() - started
    assert r.returncode == 0
    assert svnhook.HOOK_DEADLINE - 1 < took < svnhook.HOOK_DEADLINE + 5, took
    assert r.stderr.strip() == ("deploybus: warning: svn.commit r1 of site not published: "
                                f"no answer within {svnhook.HOOK_DEADLINE:.0f}s"), r.stderr
