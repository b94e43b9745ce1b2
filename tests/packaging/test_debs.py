"""The Debian packages (packaging/README.md): built offline from this tree,
lintian clean, reproducible, units that systemd-analyze accepts, and the
agent package installed, run as its unit runs it, deploying over RabbitMQ,
upgraded under a running deploy, and purged without a trace.

These tests install packages on the machine they run on (root, dpkg), one
after another in this module's order; each later one needs the earlier.
They refuse to start on a machine where a deploybus package is already
installed: the file-system comparison after purge would not mean anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.cluster import GIT_ENV, Daemon, git
from tests.packaging import debs
from tests.packaging.units import Unit, UnitProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.broker,
              pytest.mark.usefixtures("packaging_tools")]

AGENT_UNITS = ("deploybus-agent", "deploybus-fetcher", "deploybus-keepalive")
SERVER_UNITS = ("deploybus-orchestrator", "deploybus-listener", "deploybus-ci-bridge",
                "deploybus-notifier", "deploybus-web")
UNIT_DIR = Path("/lib/systemd/system")
CONFIG = Path("/etc/deploybus/deploybus.yaml")
AGENT_ENV = Path("/etc/deploybus/agent.env")
STATE = Path("/var/lib/deploybus")

#: Where the snapshot looks, and what changes there without us (the package
#: database and the logs of dpkg's own tools, the brokers' files while other
#: tests run, shadow-utils' backups of passwd and group).
SNAPSHOT_ROOTS = ("/etc", "/var/lib", "/var/log", "/opt", "/usr")
VOLATILE = ("/var/lib/dpkg/", "/var/log/dpkg.log", "/var/log/alternatives.log",
            "/var/log/apt/", "/var/lib/apt/", "/var/cache/", "/var/lib/rabbitmq/",
            "/var/log/rabbitmq/", "/var/lib/activemq/", "/var/log/activemq/",
            "/var/log/journal/", "/var/lib/postgresql/", "/var/log/postgresql/",
            "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",
            "/var/log/deploybus-setup-brokers.log", "/etc/ld.so.cache")
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")

#: The watchdog interval the tests hand the daemons (the units say 60 s).
WATCHDOG_USEC = 2_000_000


def run(*args: str, timeout: float = 300, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                       **kwargs)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r  # type: ignore[no-any-return]


def installed(package: str) -> str:
    r = run("dpkg-query", "-W", "-f=${db:Status-Status}", package, check=False)
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def snapshot() -> dict[str, tuple[int, int, int] | str]:
    """Every path under SNAPSHOT_ROOTS with its type, mode and owner, and
    the account files' contents."""
    seen: dict[str, tuple[int, int, int] | str] = {}
    for top in SNAPSHOT_ROOTS:
        for dirpath, dirnames, filenames in os.walk(top):
            if (dirpath + "/").startswith(VOLATILE):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if path.startswith(VOLATILE):
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                seen[path] = (st.st_mode, st.st_uid, st.st_gid)
    for f in ACCOUNT_FILES:
        seen[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
    return seen


def assert_same(before: dict[str, tuple[int, int, int] | str],
                after: dict[str, tuple[int, int, int] | str]) -> None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    problems = []
    if added:
        problems.append("left behind:\n  " + "\n  ".join(added[:40]))
    if removed:
        problems.append("removed (was there before):\n  " + "\n  ".join(removed[:40]))
    if changed:
        problems.append("changed (mode, owner or accounts):\n  " + "\n  ".join(changed[:40]))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def clean_machine() -> Iterator[None]:
    """No deploybus package before; none left after, whatever failed."""
    present = [p for p in ("deploybus-agent", "deploybus-server")
               if installed(p) != "not-installed"]
    if present or CONFIG.exists():
        pytest.fail(f"this machine already has {', '.join(present) or CONFIG}: the packaging "
                    f"tests install and purge deploybus themselves; purge it first "
                    f"(dpkg --purge deploybus-agent deploybus-server)", pytrace=False)
    yield
    for p in ("deploybus-agent", "deploybus-server"):
        if installed(p) != "not-installed":
            run("dpkg", "--purge", p, check=False)


@pytest.fixture(scope="module", autouse=True)
def lintian(built_debs: dict[str, Path]) -> Iterator[subprocess.Popen[str]]:
    """lintian on both packages, started before this module's first test and
    read by its last: it takes about a minute of one core, which the
    install tests (mostly waiting on daemons) leave idle. Niced, so that
    it does not delay the daemons whose timing the tests check."""
    proc = subprocess.Popen(["nice", "-n", "19", "lintian", "--fail-on", "error,warning",
                             str(built_debs["agent"]), str(built_debs["server"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def contents(deb: Path) -> dict[str, str]:
    """path -> 'mode owner size target-or-md5' of every file a package installs."""
    listing = run("dpkg-deb", "-c", str(deb)).stdout.splitlines()
    md5 = {}
    with_md5 = run("sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xOf - ./md5sums").stdout
    for line in with_md5.splitlines():
        digest, path = line.split(None, 1)
        md5["./" + path] = digest
    out = {}
    for line in listing:
        mode, owner, size, _date, _time, path, *rest = line.split()
        out[path] = f"{mode} {owner} {size} {' '.join(rest) or md5.get(path, '')}"
    return out


def test_two_builds_of_one_tree_install_the_same_files(built_debs: dict[str, Path],
                                                        old_agent_deb: Path) -> None:
    """The two agent builds of this tree (another directory, another time,
    another version) install the same bytes, but for the changelog that
    carries the version."""
    a, b = contents(built_debs["agent"]), contents(old_agent_deb)
    changelog = "./usr/share/doc/deploybus-agent/changelog.Debian.gz"
    assert set(a) == set(b)
    differ = sorted(p for p in a if a[p] != b[p])
    assert differ == [changelog], differ
    assert len(a) > 1000  # the whole venv is in it


def test_units_pass_systemd_analyze_verify_installed_and_purged(
        built_debs: dict[str, Path], clean_machine: None) -> None:
    """Both packages installed side by side: every unit passes systemd-analyze
    verify, /usr/bin/deploybus is the server's, the server's keys exist; then
    purged, and the machine is as it was."""
    before = snapshot()
    r = run("dpkg", "-i", str(built_debs["agent"]), str(built_debs["server"]))
    units = [UNIT_DIR / f"{u}.service" for u in AGENT_UNITS + SERVER_UNITS]
    v = run("systemd-analyze", "verify", "--man=no", *map(str, units), check=False,
            env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert v.returncode == 0 and not v.stderr.strip() and not v.stdout.strip(), \
        f"systemd-analyze verify:\n{v.stdout}{v.stderr}"
    for u in units:
        unit = Unit.load(u)
        assert unit.get("Type") == "notify" and unit.get("KillMode") == "mixed"
        assert unit.get("Restart") == "on-failure"
        assert int(unit.get("TimeoutStopSec") or 0) > 30  # the runner's STOP_GRACE
        assert Path(unit.argv({**unit.environment(), "DEPLOYBUS_HOST": "h",
                               "DEPLOYBUS_HOST_KEY": "k"})[0]).exists()
    assert os.path.realpath("/usr/bin/deploybus") == "/opt/venvs/deploybus-server/bin/deploybus"
    for name in ("orchestrator", "web", "git", "ci", "notifier"):
        key = Path(f"/etc/deploybus/keys/{name}.key")
        st = key.stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, pwd.getpwnam("deploybus").pw_gid)
    assert Path(f"/etc/deploybus/keys/{socket.gethostname()}.key").exists()
    assert Path("/var/lib/deploybus/server").stat().st_uid == pwd.getpwnam("deploybus").pw_uid
    assert "no /etc/deploybus/deploybus.yaml yet" in r.stdout + r.stderr
    run("dpkg", "--purge", "deploybus-server", "deploybus-agent")
    assert_same(before, snapshot())


def test_server_package_runs_orchestrator_and_web_as_their_units_say(
        built_debs: dict[str, Path], clean_machine: None, rabbit_vhost: str) -> None:
    """The server package alone: its orchestrator and web, started the way
    their units say (as the deploybus user, in /var/lib/deploybus/server,
    with the keys postinst made), send READY=1 and pet the watchdog; the web
    answers /healthz with the bus up on the port the admin set in server.env
    (a conffile); a warm stop exits 0; purge leaves the machine as it was."""
    before = snapshot()
    run("dpkg", "-i", str(built_debs["server"]))
    base = Path(tempfile.mkdtemp(prefix="deploybus-pkgtest-server-"))
    base.chmod(0o755)
    procs: list[UnitProcess] = []
    try:
        url = (f"amqp://guest:guest@127.0.0.1:5672/{rabbit_vhost}"
               f"?prefix=ps{uuid.uuid4().hex[:8]}.")
        CONFIG.write_text(f"""\
bus:
  url: "{url}"
keys:
  trusted:
    orchestrator: {{key: /etc/deploybus/keys/orchestrator.pub, role: orchestrator}}
    web: {{key: /etc/deploybus/keys/web.pub, role: web}}
projects:
  app:
    git: {base}/app.git
environments:
  prod:
    hosts: [h1]
""")
        os.chown(CONFIG, 0, pwd.getpwnam("deploybus").pw_gid)
        CONFIG.chmod(0o640)
        port = free_port()
        server_env = Path("/etc/deploybus/server.env")
        server_env.write_text(server_env.read_text() + f"DEPLOYBUS_WEB_PORT={port}\n")
        for name in ("deploybus-orchestrator", "deploybus-web"):
            proc = UnitProcess(UNIT_DIR / f"{name}.service", base, watchdog_usec=WATCHDOG_USEC)
            procs.append(proc)
            assert proc.notify.wait_for("READY=1", 60), f"{name} {proc.argv}:\n{proc.output()}"
            assert proc.notify.wait_for("WATCHDOG=1", 5), proc.output()
            uid = os.stat(f"/proc/{proc.proc.pid}").st_uid
            assert pwd.getpwuid(uid).pw_name == "deploybus"
        orchestrator, web = procs
        assert "--port" in web.argv and web.argv[web.argv.index("--port") + 1] == str(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            health = json.loads(r.read())
        assert r.status == 200 and health["ok"] is True and health["bus"] == "up", health
        # the store is where the units' working directory puts it, the user's
        db = Path("/var/lib/deploybus/server/deploybus.db")
        assert db.exists() and db.stat().st_uid == pwd.getpwnam("deploybus").pw_uid
        for proc in procs:
            assert proc.stop(60) == 0, proc.output()
            assert '"level": "error"' not in proc.output(), proc.output()
    finally:
        for proc in procs:
            if proc.alive():
                proc.stop(10)
        CONFIG.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)
    run("dpkg", "--purge", "deploybus-server")
    assert_same(before, snapshot())


# -- the agent package, end to end --------------------------------------------------------

class Site:
    """What the admin set up around the installed agent: a git repository, a
    config, the orchestrator (from this tree's venv) and a deploy root."""

    def __init__(self, base: Path, bus_url: str) -> None:
        self.base = base
        self.host = socket.gethostname()
        self.root = Path(f"/srv/deploybus-pkgtest-{uuid.uuid4().hex[:8]}")
        self.keys = base / "keys"
        self.bare = base / "app.git"
        self.work = base / "work"
        self.bus_url = bus_url
        self.agent: UnitProcess | None = None
        self.others: list[UnitProcess] = []
        self.orchestrator: Daemon | None = None
        self.env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info", **GIT_ENV}

    def setup(self) -> None:
        from deploybus.signing import SigningKey
        for name in ("deployer", "orchestrator"):
            SigningKey.generate(name).save(self.keys)
        git("init", "--bare", "-q", str(self.bare), cwd=self.base)
        self.work.mkdir()
        git("init", "-q", "-b", "main", cwd=self.work)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)
        self.root.mkdir()
        CONFIG.write_text(f"""\
bus:
  url: "{self.bus_url}"
keys:
  signing: {self.keys}/deployer.key
  trusted:
    deployer: {{key: {self.keys}/deployer.pub, role: person}}
    orchestrator: {{key: {self.keys}/orchestrator.pub, role: orchestrator}}
    {self.host}: {{key: /etc/deploybus/keys/{self.host}.pub, role: host}}
  policy:
    - {{signer: deployer, projects: ["*"], environments: ["*"]}}
state:
  url: "sqlite:///{self.base}/state.db"
  dir: {self.base}/server
hosts:
  {self.host}: {{root: {self.root}}}
projects:
  app:
    git: {self.bare}
    user: nobody
    scripts:
      post: 'if [ -f SLOW ]; then sleep 10; fi; echo "post as $(id -un)"'
environments:
  prod:
    hosts: [{self.host}]
""")
        os.chown(CONFIG, 0, pwd.getpwnam("deploybus").pw_gid)
        CONFIG.chmod(0o640)

    def release(self, tag: str, *, slow: bool = False) -> None:
        (self.work / "VERSION").write_text(tag + "\n")
        slow_file = self.work / "SLOW"
        if slow:
            slow_file.write_text("10 s post script\n")
        elif slow_file.exists():
            slow_file.unlink()
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", f"release {tag}", cwd=self.work)
        git("tag", tag, cwd=self.work)
        git("push", "-q", "origin", "main", tag, cwd=self.work)

    def start_orchestrator(self) -> None:
        self.orchestrator = Daemon("orchestrator", [
            "-c", str(CONFIG), "--key", str(self.keys / "orchestrator.key"), "orchestrator"],
            self.env)
        assert self.orchestrator.ready.wait(60), "".join(self.orchestrator.lines[-30:])

    def start_agent(self) -> UnitProcess:
        self.agent = UnitProcess(UNIT_DIR / "deploybus-agent.service", self.base,
                                 watchdog_usec=WATCHDOG_USEC)
        if not self.agent.notify.wait_for("READY=1", 60):
            raise AssertionError(f"no READY=1 from {self.agent.argv}:\n{self.agent.output()}")
        return self.agent

    def deploy(self, tag: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "deploybus.cli", "-c", str(CONFIG), "deploy", "app", tag,
             "--env", "prod", "--wait", "--timeout", "120"], env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def current(self) -> Path:
        return (self.root / "app" / "current").resolve()

    def start_unit(self, name: str) -> UnitProcess:
        """Another of the package's units (keepalive, fetcher), READY or a failure."""
        proc = UnitProcess(UNIT_DIR / f"{name}.service", self.base, watchdog_usec=WATCHDOG_USEC)
        self.others.append(proc)
        if not proc.notify.wait_for("READY=1", 60):
            raise AssertionError(f"no READY=1 from {name} {proc.argv}:\n{proc.output()}")
        return proc

    def close(self) -> None:
        for proc in [self.agent, *self.others]:
            if proc is not None and proc.alive():
                proc.stop(60)
        if self.orchestrator is not None:
            self.orchestrator.stop()
        CONFIG.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def site(rabbit_vhost: str, clean_machine: None) -> Iterator[Site]:
    # not under pytest's 0700 directories: daemons running as the deploybus
    # user read the public keys the config names and reach the notify socket
    base = Path(tempfile.mkdtemp(prefix="deploybus-pkgtest-"))
    base.chmod(0o755)
    url = f"amqp://guest:guest@127.0.0.1:5672/{rabbit_vhost}?prefix=pk{uuid.uuid4().hex[:8]}."
    s = Site(base, url)
    yield s
    s.close()
    shutil.rmtree(base, ignore_errors=True)


#: What the module's tests found, for the ones after them.
state: dict[str, object] = {}


def needs(step: str) -> None:
    if step not in state:
        pytest.fail(f"needs {step}, which did not pass", pytrace=False)


def test_old_agent_installs_with_user_key_and_no_running_systemd(
        site: Site, old_agent_deb: Path) -> None:
    state["before"] = snapshot()
    r = run("dpkg", "-i", str(old_agent_deb))
    assert installed("deploybus-agent") == "installed", r.stdout
    assert debs.OLD_SUFFIX in run("dpkg-query", "-W", "-f=${Version}", "deploybus-agent").stdout
    pw = pwd.getpwnam("deploybus")
    assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_uid < 1000
    key = Path(f"/etc/deploybus/keys/{site.host}.key")
    st = key.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, pw.pw_gid, 0o640)
    assert os.path.realpath("/usr/bin/deploybus") == "/opt/venvs/deploybus-agent/bin/deploybus"
    assert "deploybus-agent.service" in os.listdir("/etc/systemd/system/multi-user.target.wants")
    # the command works for a person, and Python writes no bytecode under /opt
    out = run("/usr/bin/deploybus", "--version").stdout
    assert debs.version() in out
    strays = run("find", "/opt/venvs/deploybus-agent", "-newer", str(old_agent_deb),
                 "-name", "*.pyc").stdout
    assert not strays.strip(), f"bytecode written at run time:\n{strays}"
    state["installed"] = True


def test_agent_started_as_its_unit_says_ready_and_pets_the_watchdog(site: Site) -> None:
    needs("installed")
    site.setup()
    unit = Unit.load(UNIT_DIR / "deploybus-agent.service")
    assert unit.get("User") == "root" and unit.get("WatchdogSec") == "60"
    agent = site.start_agent()
    assert agent.argv[:3] == ["/opt/venvs/deploybus-agent/bin/deploybus", "--config",
                              str(CONFIG)]
    assert f"/etc/deploybus/keys/{site.host}.key" in agent.argv
    assert agent.argv[-2:] == ["--host", site.host]
    ready = agent.notify.times("READY=1")[0]
    assert agent.notify.wait_for("WATCHDOG=1", 10, since=ready, count=4), agent.output()
    pets = agent.notify.times("WATCHDOG=1", since=ready)
    gaps = [b - a for a, b in zip(pets, pets[1:], strict=False)]
    # the runner pets every WATCHDOG_USEC / 2
    assert all(0.7 < g < 1.5 for g in gaps), gaps
    assert STATE.is_dir() and Path("/var/log/deploybus/agent").is_dir()
    state["running"] = True


def test_installed_agent_deploys_over_rabbitmq(site: Site) -> None:
    needs("running")
    site.start_orchestrator()
    site.release("v1")
    p = site.deploy("v1")
    out, _ = p.communicate(timeout=150)
    assert p.returncode == 0, out + site.agent.output()  # type: ignore[union-attr]
    release = site.current()
    assert (release / "VERSION").read_text() == "v1\n"
    assert release.stat().st_uid == pwd.getpwnam("nobody").pw_uid  # checkout given to user:
    assert (STATE / "mirrors" / "app.git").is_dir()  # the agent's state is the package's
    assert list((STATE / "journal").glob("*.json"))
    # the fetcher (root) and the keepalive (the deploybus user, reading the
    # host key through its group and the layout the agent wrote) start too
    for name in ("deploybus-fetcher", "deploybus-keepalive"):
        proc = site.start_unit(name)
        assert proc.notify.wait_for("WATCHDOG=1", 5), proc.output()
    keepalive = site.others[-1]
    assert pwd.getpwuid(os.stat(f"/proc/{keepalive.proc.pid}").st_uid).pw_name == "deploybus"
    time.sleep(1)
    for proc in site.others:
        assert '"level": "error"' not in proc.output(), proc.output()
        proc.stop(60)
    site.others.clear()
    state["deployed"] = True


def test_upgrade_under_a_running_deploy_finishes_it_keeps_config_runs_new_agent(
        site: Site, built_debs: dict[str, Path]) -> None:
    needs("deployed")
    # the admin edits the conffile (same host, said out loud) and has a config
    edited = AGENT_ENV.read_text() + f"# edited by the admin\nDEPLOYBUS_HOST={site.host}\n"
    AGENT_ENV.write_text(edited)
    config = CONFIG.read_bytes()
    site.release("v2", slow=True)
    p = site.deploy("v2")
    # wait until the agent is in the 10 s post script
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any('"step": "post"' in f.read_text()
               for f in (STATE / "journal").glob("*.json")):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the deploy never reached its post script:\n"
                             + site.agent.output())  # type: ignore[union-attr]
    old = site.agent
    assert old is not None
    # dpkg -i of the new version. Here (no systemd) its prerm stops nothing,
    # so the test does what `deb-systemd-invoke stop` has systemd do
    # (KillMode=mixed: SIGTERM to the daemon alone), while dpkg replaces
    # the files under the stopping agent.
    started = time.monotonic()
    dpkg = subprocess.Popen(["dpkg", "-i", str(built_debs["agent"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code = old.stop(float(Unit.load(UNIT_DIR / "deploybus-agent.service")
                          .get("TimeoutStopSec") or 60))
    stopped = time.monotonic() - started
    dpkg_out, _ = dpkg.communicate(timeout=300)
    assert dpkg.returncode == 0, dpkg_out
    assert code == 0, f"old agent: exit {code} after {stopped:.1f} s:\n{old.output()}"
    out, _ = p.communicate(timeout=150)
    assert p.returncode == 0, f"the deploy under the upgrade:\n{out}\n{old.output()}"
    assert (site.current() / "VERSION").read_text() == "v2\n"
    assert "deploys still running at stop" not in old.output()
    # the admin's files are as they were
    assert AGENT_ENV.read_text() == edited
    assert CONFIG.read_bytes() == config
    assert run("dpkg-query", "-W", "-f=${Version}", "deploybus-agent").stdout == \
        debs.version() + "-1"
    # postinst would start it under systemd; here the test starts the new unit
    site.start_agent()
    site.release("v3")
    p = site.deploy("v3")
    out, _ = p.communicate(timeout=150)
    assert p.returncode == 0, out + site.agent.output()  # type: ignore[union-attr]
    assert (site.current() / "VERSION").read_text() == "v3\n"
    state["upgraded"] = True
    state["stop_seconds"] = stopped


def test_purge_removes_what_the_package_made_and_nothing_else(site: Site) -> None:
    needs("upgraded")
    assert site.agent is not None
    assert site.agent.stop(60) == 0, site.agent.output()
    releases = sorted(p.name for p in (site.root / "app" / "releases").iterdir())
    run("dpkg", "--purge", "deploybus-agent")
    # the admin's config and the projects' releases stay
    assert sorted(os.listdir("/etc/deploybus")) == ["deploybus.yaml"]
    assert sorted(p.name for p in (site.root / "app" / "releases").iterdir()) == releases
    assert (site.current() / "VERSION").read_text() == "v3\n"
    # what the test made goes; then the machine is as before the install
    site.close()
    os.rmdir("/etc/deploybus")
    before = state["before"]
    assert isinstance(before, dict)
    assert_same(before, snapshot())


def test_lintian_is_clean_on_both_packages(lintian: subprocess.Popen[str]) -> None:
    out, _ = lintian.communicate(timeout=600)
    assert lintian.returncode == 0, f"lintian:\n{out}"
    assert not [line for line in out.splitlines() if line[:2] in ("E:", "W:")], out
