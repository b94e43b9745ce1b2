"""A real Buildbot master and worker on loopback, for the CI bridge's tests.

:class:`Buildbot` writes a master directory and a worker directory under
``base_dir``, starts each as a ``twistd --nodaemon`` process of this
interpreter (no daemonizing, no pid files, no systemd), and returns once the
master's REST API answers, its force schedulers are loaded and the worker is
connected. The master keeps an SQLite database in its directory, so
:meth:`Buildbot.stop` then :meth:`Buildbot.start` brings the same master back
(same ports, same builds), as a restarted CI server would.

What the master runs: one worker, and per job a builder and a force
scheduler both named after the job (so a backend triggers job ``app`` with a
POST to ``/api/v2/forceschedulers/app``). A build

1. clones the repository (the build's ``repository`` if the force gave one,
   else the job's) into ``build/src`` and checks out the forced ``revision``
   (``HEAD`` if none);
2. runs the job's command in the checkout with ``sh -c``: by default
   ``sh ./ci.sh``, so each commit's own ``ci.sh`` decides whether its build
   passes; a force may override it with the ``ci_command`` parameter (a
   declared string parameter of every force scheduler).

With ``auth=("user", "password")`` the www needs a login (``/auth/login``,
basic auth) for every REST endpoint: an anonymous or wrongly authenticated
call gets 403, a wrong password at the login 401.

Start-up takes about 1.7 s on the 2-core test machine (0.8 s to start a
stopped one again): ``create-master`` makes the database (about 1 s, once)
while the worker imports, and the worker waits for the master's PB port
before it connects, so it never sits in a reconnect back-off. Share one
instance per module::

    @pytest.fixture(scope="module")
    def buildbot(tmp_path_factory):
        repo = make_repo(tmp_path_factory.mktemp("repo"))
        commit(repo, {"ci.sh": "exit 0"})
        with Buildbot(tmp_path_factory.mktemp("bb"), jobs=["app"], repo=repo) as bb:
            yield bb  # bb.url: the www; backend_for("bb", bb.settings()): a backend

If a start fails, the exception carries the tail of the master's and the
worker's logs (``master/twistd.log``, ``worker/twistd.log`` under
``base_dir``).
"""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.conftest import free_port

__all__ = ["Buildbot", "BuildbotError", "GIT_ENV", "commit", "free_port", "git", "make_repo"]

#: An identity for the commits the tests make (no global git config needed).
GIT_ENV = {"GIT_AUTHOR_NAME": "tester", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "tester", "GIT_COMMITTER_EMAIL": "t@example.invalid"}

#: The command a build runs in its checkout unless the force says otherwise.
DEFAULT_COMMAND = "sh ./ci.sh"

#: The worker's name in the master's config.
WORKER = "worker"

#: Runs twistd with this interpreter, as ``buildbot start`` itself does
#: (buildbot/scripts/start.py): no reliance on PATH or on the venv's scripts.
_TWISTD = "from twisted.scripts.twistd import run; run()"

#: ``buildbot create-master`` with this interpreter.
_BUILDBOT = "from buildbot.scripts.runner import run; run()"

# The master's configuration: static Python that reads its settings from
# harness.json beside it, so no value is ever pasted into code.
_MASTER_CFG = '''\
# Written by tests/ci/buildbot_harness.py; settings in harness.json.
import json
import os

from buildbot.plugins import schedulers, steps, util, worker

P = json.load(open(os.path.join(basedir, "harness.json")))

# clone into src and check out the revision; $1 repository, $2 revision
CHECKOUT = (
    'rm -rf src && git clone -q --no-checkout "$1" src && cd src && '
    'git -c advice.detachedHead=false checkout -q --detach "$2" && '
    'git log -1 --format="checked out %H %s"'
)

c = BuildmasterConfig = {}
c["title"] = "deploybus tests"
c["buildbotURL"] = P["url"]
c["buildbotNetUsageData"] = None
c["db"] = {"db_url": "sqlite:///state.sqlite"}
c["protocols"] = {"pb": {"port": "tcp:%d:interface=127.0.0.1" % P["pb_port"]}}
c["workers"] = [worker.Worker(P["worker"], P["worker_password"], max_builds=P["max_builds"])]
c["change_source"] = []
c["schedulers"] = []
c["builders"] = []
for job, repo in P["jobs"].items():
    f = util.BuildFactory()
    f.addStep(steps.ShellCommand(
        name="checkout", haltOnFailure=True, logEnviron=False,
        command=["sh", "-ec", CHECKOUT, "checkout",
                 util.Property("repository", default=repo),
                 util.Property("revision", default="HEAD")]))
    f.addStep(steps.ShellCommand(
        name="test", workdir="build/src", logEnviron=False,
        command=["sh", "-c", util.Property("ci_command", default=P["command"])]))
    c["builders"].append(util.BuilderConfig(name=job, workernames=[P["worker"]], factory=f))
    c["schedulers"].append(schedulers.ForceScheduler(
        name=job, builderNames=[job],
        properties=[util.StringParameter(name="ci_command", default="")]))
c["www"] = {"port": "tcp:%d:interface=127.0.0.1" % P["www_port"], "plugins": {}}
if P["auth"]:
    user, password = P["auth"]
    c["www"]["auth"] = util.UserPasswordAuth({user: password})
    c["www"]["authz"] = util.Authz(
        allowRules=[util.AnyEndpointMatcher(role="admins")],
        roleMatchers=[util.RolesFromUsername(roles=["admins"], usernames=[user])])
'''

# The worker's tac: waits for the master's PB port before it makes the
# Worker, so the worker (whose imports run while the master starts) connects
# at its first attempt instead of after a back-off of 1-2 s.
_WORKER_TAC = '''\
# Written by tests/ci/buildbot_harness.py.
import json
import os
import socket
import time

from twisted.application import service
from twisted.python.log import FileLogObserver, ILogObserver
from twisted.python.logfile import LogFile

from buildbot_worker.bot import Worker

basedir = os.path.dirname(os.path.abspath(__file__))
P = json.load(open(os.path.join(basedir, "harness.json")))
application = service.Application("buildbot-worker")
application.setComponent(ILogObserver, FileLogObserver(
    LogFile.fromFullPath(os.path.join(basedir, "twistd.log"))).emit)
deadline = time.monotonic() + P["wait"]
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", P["pb_port"]), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
Worker("127.0.0.1", P["pb_port"], P["worker"], P["worker_password"], basedir,
       keepalive=600, maxdelay=2).setServiceParent(application)
'''


class BuildbotError(RuntimeError):
    """The master or the worker did not start (the message has their logs' tails)."""


def git(*args: str, cwd: Path) -> str:
    """Run git in ``cwd`` with a test identity; its output, or AssertionError."""
    r = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def make_repo(path: Path, branch: str = "main") -> Path:
    """An empty git repository at ``path`` on ``branch``."""
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", branch, cwd=path)
    return path


def commit(repo: Path, files: Mapping[str, str], message: str = "change") -> str:
    """Write ``files`` (path -> text) in ``repo``, commit them; the commit's sha."""
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git("add", "--", *files, cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo).strip()


class Buildbot:
    """A Buildbot master and worker as processes on 127.0.0.1.

    ``jobs``: job names (one builder and one force scheduler each), all
    building ``repo``; or a mapping job -> repository path or URL.
    ``command``: what a build runs in its checkout (``sh -c``) unless the
    force's ``ci_command`` says otherwise. ``auth``: ``(user, password)`` to
    require a login. ``max_builds``: builds the worker runs at once (one per
    builder at most, as Buildbot does).
    """

    def __init__(self, base_dir: Path, *, jobs: Iterable[str] | Mapping[str, Path | str] = ("app",),
                 repo: Path | str | None = None, command: str = DEFAULT_COMMAND,
                 auth: tuple[str, str] | None = None, max_builds: int = 2) -> None:
        if isinstance(jobs, Mapping):
            self.jobs = {j: str(r) for j, r in jobs.items()}
        else:
            if repo is None:
                raise ValueError("repo is needed unless jobs maps each job to its repository")
            self.jobs = {j: str(repo) for j in jobs}
        self.base_dir = Path(base_dir)
        self.master_dir = self.base_dir / "master"
        self.worker_dir = self.base_dir / "worker"
        self.command, self.auth, self.max_builds = command, auth, max_builds
        self.www_port = free_port()
        self.pb_port = free_port()
        while self.pb_port == self.www_port:
            self.pb_port = free_port()
        #: The www base URL (what the backend's ``url`` setting takes).
        self.url = f"http://127.0.0.1:{self.www_port}"
        #: Seconds the last :meth:`start` took.
        self.start_seconds: float | None = None
        self._password = secrets.token_hex(8)
        self._master: subprocess.Popen[bytes] | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        # the harness's own HTTP session: Buildbot keeps a login in a cookie
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    # -- life cycle -------------------------------------------------------

    def start(self, timeout: float = 60) -> Buildbot:
        """Start the master and the worker (again, after :meth:`stop`); return
        when the API answers, every job's force scheduler is loaded and the
        worker is connected. Raises :class:`BuildbotError` (and stops what it
        started) if that does not happen within ``timeout`` seconds."""
        if self.running():
            return self
        t0 = time.monotonic()
        settings = {"url": self.url + "/", "www_port": self.www_port, "pb_port": self.pb_port,
                    "worker": WORKER, "worker_password": self._password, "jobs": self.jobs,
                    "command": self.command, "auth": list(self.auth) if self.auth else None,
                    "max_builds": self.max_builds, "wait": timeout}
        fresh = not (self.master_dir / "state.sqlite").exists()
        for d in (self.master_dir, self.worker_dir):
            d.mkdir(parents=True, exist_ok=True)
            (d / "harness.json").write_text(json.dumps(settings, indent=1))
        (self.worker_dir / "buildbot.tac").write_text(_WORKER_TAC)
        # the worker imports while create-master makes the database
        self._worker = self._twistd(self.worker_dir)
        try:
            if fresh:
                r = subprocess.run([sys.executable, "-c", _BUILDBOT, "create-master", "-q",
                                    str(self.master_dir)], capture_output=True, text=True,
                                   timeout=timeout)
                if r.returncode != 0:
                    raise BuildbotError(f"buildbot create-master failed: {r.stdout}{r.stderr}")
                (self.master_dir / "master.cfg.sample").unlink(missing_ok=True)
            (self.master_dir / "master.cfg").write_text(_MASTER_CFG)
            self._master = self._twistd(self.master_dir)
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20) -> None:
        """Stop the worker (so no build holds the master up), then the
        master: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; then
        kill what is left in each one's process group (a build's command).
        Safe to call twice."""
        for attr in ("_worker", "_master"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(OSError):  # each was started in a session of its own
                os.killpg(proc.pid, signal.SIGKILL)
            setattr(self, attr, None)

    def running(self) -> bool:
        """Whether both processes are alive."""
        return all(p is not None and p.poll() is None for p in (self._master, self._worker))

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Settings for the backend (``backend_for(name, bb.settings())``),
        as the bridge passes a ``ci.<name>`` entry of the config; ``extra``
        adds or replaces (``credentials=path``, ``timeout=...``)."""
        return {"type": "buildbot", "url": self.url, "timeout": 5.0, "poll": 0.2, **extra}

    def write_credentials(self, path: Path) -> Path:
        """Write ``auth`` as the ``user:password`` file the backend reads."""
        assert self.auth is not None, "this master has no auth"
        path.write_text(":".join(self.auth) + "\n")
        path.chmod(0o600)
        return path

    def __enter__(self) -> Buildbot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the REST API, for tests ----------------------------------------

    def api(self, path: str) -> Any:
        """GET ``/api/v2/<path>`` as JSON (logged in as ``auth`` if it is set)."""
        with self._opener.open(f"{self.url}/api/v2/{path}", timeout=10) as r:
            return json.load(r)

    def control(self, path: str, method: str, **params: Any) -> Any:
        """A data API control call (JSON-RPC POST to ``/api/v2/<path>``):
        ``control("buildrequests/3", "cancel", reason="...")``,
        ``control("builds/7", "stop")``; the ``result``."""
        body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1,
                           "params": params}).encode()
        req = urllib.request.Request(f"{self.url}/api/v2/{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with self._opener.open(req, timeout=10) as r:
            return json.load(r).get("result")

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` of the master's and the worker's logs."""
        out = []
        for d in (self.master_dir, self.worker_dir):
            for name in ("twistd.log", "stdout.log"):
                f = d / name
                if f.exists():
                    tail = f.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- internals --------------------------------------------------------

    def _twistd(self, d: Path) -> subprocess.Popen[bytes]:
        with open(d / "stdout.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-c", _TWISTD, "--nodaemon", "--no_save", "--pidfile=",
                 "--python=buildbot.tac"],
                cwd=d, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def _wait_ready(self, deadline: float) -> None:
        why = "not started"
        while time.monotonic() < deadline:
            for name, proc in (("master", self._master), ("worker", self._worker)):
                if proc is None or proc.poll() is not None:
                    raise BuildbotError(f"the Buildbot {name} exited at start-up\n{self.logs()}")
            why = self._not_ready()
            if not why:
                return
            time.sleep(0.1)
        raise BuildbotError(f"Buildbot not ready in time ({why})\n{self.logs()}")

    def _not_ready(self) -> str:
        """Why the master is not ready yet ("" once it is)."""
        try:
            if self.auth:
                self._login()
            scheds = {s["name"] for s in self.api("forceschedulers")["forceschedulers"]}
            workers = self.api("workers")["workers"]
        except (OSError, ValueError, KeyError) as e:
            return f"www: {e}"
        if not set(self.jobs) <= scheds:
            return f"force schedulers {sorted(scheds)}"
        if not any(w["name"] == WORKER and w["connected_to"] for w in workers):
            return "worker not connected"
        return ""

    def _login(self) -> None:
        """Log the harness's own session in (``auth`` masters only)."""
        assert self.auth is not None
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        req = urllib.request.Request(f"{self.url}/auth/login",
                                     headers={"Authorization": f"Basic {token}"})
        self._opener.open(req, timeout=10).close()
