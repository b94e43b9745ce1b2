"""A real `puppet apply` of deploybus::agent on this machine: Debian's
Puppet installs the built deploybus-agent package (the packaging tests'
`built_debs`), writes the config, the project's conf.d file, agent.env and
the host's key, and starts the three daemons; then a real deploy through
them succeeds over this machine's RabbitMQ, a second apply changes nothing,
and an apply with a bad parameter fails and leaves the running config and
daemons alone (a deploy after it still succeeds). Everything the apply
installed is purged afterwards.

What stands in for systemd: this machine has no systemd as PID 1, so the
services use Puppet's `base` provider with tests/puppet/unitctl.py as their
start/stop/status/restart commands. It reads the unit file the package
installed and runs its ExecStart in the background as the unit's User=,
with its Environment=/EnvironmentFile= (%H), StateDirectory=,
LogsDirectory=, UMask=, waits for the daemon's `ready` log line the way
systemd waits for READY=1 (no sd_notify socket is given), and stops it
with SIGTERM then SIGKILL (KillMode=mixed). It does not apply the units'
sandboxing or capability bounds, the watchdog, Restart=, or cgroups: those
are systemd's, and are checked (if at all) by the packaging tests, not here.
On a real server the module's default is Puppet's own service provider
(systemd)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploybus.signing import SigningKey, public_line
from tests.conftest import broker_url
from tests.e2e.cluster import GIT_ENV, Daemon, git, wait_for
from tests.puppet.conftest import Puppet, output

pytestmark = [pytest.mark.e2e, pytest.mark.broker, pytest.mark.slow]

UNITCTL = Path(__file__).with_name("unitctl.py")
PACKAGE = "deploybus-agent"
UNITS = ("deploybus-agent", "deploybus-fetcher", "deploybus-keepalive")
ETC = Path("/etc/deploybus")
#: The name this machine goes by in deploybus (agent.env's DEPLOYBUS_HOST),
#: whatever its hostname is.
HOST = "puppet-host-1"


def installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                       text=True)
    return r.stdout.strip() == "install ok installed"


def pq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def unitctl(run: Path, action: str, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", str(UNITCTL), "--run-dir", str(run), action,
                           unit], capture_output=True, text=True, timeout=180)


def pid(run: Path, unit: str) -> int | None:
    p = run / f"{unit}.pid"
    return int(p.read_text()) if p.exists() and unitctl(run, "status", unit).returncode == 0 \
        else None


@pytest.fixture
def machine() -> Iterator[dict[str, Path]]:
    """This machine, as the apply finds it and as it is left: no deploybus
    package or config before; afterwards the daemons stopped, the package
    purged and every file the apply wrote removed."""
    for package in (PACKAGE, "deploybus-server"):
        if installed(package):
            pytest.fail(f"{package} is installed on this machine already; this test installs "
                        f"and purges it (dpkg --purge {package} if it is a leftover)",
                        pytrace=False)
    if (ETC / "deploybus.yaml").exists():
        pytest.fail(f"{ETC}/deploybus.yaml exists already; this test writes and removes it",
                    pytrace=False)
    had = {p: p.exists() for p in (ETC, Path("/var/lib/deploybus"), Path("/var/log/deploybus"))}
    top = Path(tempfile.mkdtemp(prefix="deploybus-puppet-"))
    top.chmod(0o755)   # the project's user (nobody) runs its scripts below it
    run = top / "run"
    try:
        yield {"top": top, "root": top / "srv", "run": run}
    finally:
        for unit in UNITS:
            unitctl(run, "stop", unit)
        if installed(PACKAGE) or subprocess.run(["dpkg-query", "-W", PACKAGE],
                                                capture_output=True).returncode == 0:
            r = subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            assert r.returncode == 0, f"dpkg --purge {PACKAGE}: {r.stdout}{r.stderr}"
        for f in (ETC / "deploybus.yaml", ETC / "agent.env", ETC / "keys" / f"{HOST}.key"):
            f.unlink(missing_ok=True)
        shutil.rmtree(ETC / "conf.d", ignore_errors=True)
        for path, existed in had.items():
            if not existed and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def manifest(path: Path, *, deb: Path, bus: str, key: Path, orchestrator: SigningKey,
             bare: Path, root: Path, run: Path, strategy: str = "") -> Path:
    commands = ",\n".join(
        f"    '{u}' => {{\n" + ",\n".join(
            f"      '{a}' => {pq(f'/usr/bin/python3 {UNITCTL} --run-dir {run} {a} {u}')}"
            for a in ("start", "stop", "status", "restart")) + "\n    }"
        for u in UNITS)
    path.write_text(f"""\
class {{ 'deploybus::agent':
  package_source   => {pq(str(deb))},
  bus_url          => {pq(bus)},
  host             => '{HOST}',
  host_key_content => Sensitive(file({pq(str(key))})),
  trusted_keys     => {{
    'orchestrator' => {{ 'key' => {pq(public_line(orchestrator.public, 'orchestrator'))},
                        'role' => 'orchestrator' }},
  }},
  environments     => {{ 'prod' => {{ 'hosts' => ['{HOST}'], 'request_timeout' => 120{strategy} }} }},
  root             => {pq(str(root))},
  heartbeat        => 2,
  # no systemd as PID 1 here: the base provider with unitctl.py (module docstring)
  service_provider => 'base',
  service_enable   => 'unmanaged',
  service_commands => {{
{commands}
  }},
}}

deploybus::project {{ 'app':
  git     => {pq(str(bare))},
  scripts => {{
    'pre'  => 'echo "pre $DEPLOYBUS_REF as $(id -un)" > "$DEPLOYBUS_PROJECT.pre.log"',
    'post' => 'test -f VERSION',
  }},
  keep    => 3,
  user    => 'nobody',
}}
""")
    return path


@pytest.mark.timeout(1800)
def test_puppet_installs_configures_and_starts_an_agent_that_deploys(
        built_debs: dict[str, Path], puppet_apply: Puppet, machine: dict[str, Path], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    deb = built_debs["agent"]   # tests/packaging/conftest.py: {"agent": Path, "server": Path}
    run, root = machine["run"], machine["root"]
    bus = broker_url("rabbitmq-amqp", request, f"t{uuid.uuid4().hex[:10]}")

    # the server side, run from this tree: keys, a repository, the orchestrator's config
    keys = tmp_path / "keys"
    signing = {n: SigningKey.generate(n) for n in ("deployer", "orchestrator", HOST)}
    for k in signing.values():
        k.save(keys)
    bare, work = tmp_path / "app.git", tmp_path / "work"
    git("init", "-q", "--bare", str(bare), cwd=tmp_path)
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    for tag in ("v1", "v2"):
        (work / "VERSION").write_text(tag + "\n")
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", tag, cwd=work)
        git("tag", tag, cwd=work)
    git("push", "-q", str(bare), "main", "v1", "v2", cwd=work)
    server = tmp_path / "server.yaml"
    server.write_text(json.dumps({
        "bus": {"url": bus},
        "keys": {"signing": str(keys / "deployer.key"),
                 "trusted": {"deployer": {"key": str(keys / "deployer.pub"), "role": "person"},
                             "orchestrator": {"key": str(keys / "orchestrator.pub"),
                                              "role": "orchestrator"},
                             HOST: {"key": str(keys / f"{HOST}.pub"), "role": "host"}},
                 "policy": [{"signer": "deployer"}]},
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "projects": {"app": {"git": str(bare)}},
        "environments": {"prod": {"hosts": [HOST], "request_timeout": 120}},
    }))
    env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info", **GIT_ENV}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(server), *args],
                              capture_output=True, text=True, env=env, timeout=200)

    def logs() -> str:
        return "\n".join(f"--- {p.name} ---\n" + "".join(p.read_text().splitlines(True)[-30:])
                         for p in sorted(run.glob("*.log")))

    site = manifest(tmp_path / "site.pp", deb=deb, bus=bus, key=keys / f"{HOST}.key",
                    orchestrator=signing["orchestrator"], bare=bare, root=root, run=run)

    # 1. the first apply installs, writes and starts everything
    r = puppet_apply.apply(site)
    assert r.returncode == 2, output(r) + logs()
    assert installed(PACKAGE)
    pids = {u: pid(run, u) for u in UNITS}
    assert all(pids.values()), (pids, logs())
    config = ETC / "deploybus.yaml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640 and config.group() == "deploybus"
    assert (ETC / "keys" / f"{HOST}.key").read_bytes() == (keys / f"{HOST}.key").read_bytes()
    check = subprocess.run(["/usr/bin/deploybus", "config", "check", str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "1 included file(s)" in check.stdout, check
    # the keepalive runs as the unit's user, deploybus (it reads the key as group deploybus)
    assert Path(f"/proc/{pids['deploybus-keepalive']}").stat().st_uid == \
        int(subprocess.check_output(["id", "-u", "deploybus"]))

    # 2. a real deploy through the daemons Puppet started
    orchestrator = Daemon("orchestrator", ["-c", str(server), "--key",
                                           str(keys / "orchestrator.key"), "orchestrator"], env)
    try:
        assert orchestrator.ready.wait(60), "".join(orchestrator.lines[-30:])

        def verdict() -> str | None:
            r = cli("hosts", "--json")
            rows = {h["name"]: h for h in json.loads(r.stdout)} if r.returncode == 0 else {}
            return rows.get(HOST, {}).get("verdict")
        assert wait_for(lambda: verdict() == "up", 60), (verdict(), logs())

        d = cli("deploy", "app", "v1", "--env", "prod", "--wait", "--timeout", "150")
        assert d.returncode == 0, d.stdout + d.stderr + logs()
        current = root / "app" / "current"
        assert (current / "VERSION").read_text() == "v1\n"
        pre_log = root / "app" / "app.pre.log"   # the pre script ran as the project's user,
        assert pre_log.read_text() == "pre v1 as nobody\n"   # in the dir Puppet gave it
        assert pre_log.owner() == "nobody"

        # 3. a second apply changes nothing (and restarts nothing)
        r = puppet_apply.apply(site)
        assert r.returncode == 0, output(r)
        assert {u: pid(run, u) for u in UNITS} == pids

        # 4. a bad parameter: the run fails at the check, the config and the
        # running daemons are untouched, and they still deploy
        before = (config.read_bytes(), config.stat().st_mtime_ns)
        bad = manifest(tmp_path / "bad.pp", deb=deb, bus=bus, key=keys / f"{HOST}.key",
                       orchestrator=signing["orchestrator"], bare=bare, root=root, run=run,
                       strategy=", 'strategy' => { 'batchh' => 2 }")
        r = puppet_apply.apply(bad)
        said = output(r)
        assert r.returncode in (4, 6), said
        assert (f"{config}:" in said
                and "environments.prod.strategy.batchh: unknown key (did you mean 'batch'?)"
                in said), said
        assert (config.read_bytes(), config.stat().st_mtime_ns) == before
        assert {u: pid(run, u) for u in UNITS} == pids
        d = cli("deploy", "app", "v2", "--env", "prod", "--wait", "--timeout", "150")
        assert d.returncode == 0, d.stdout + d.stderr + logs()
        assert (current / "VERSION").read_text() == "v2\n"
    finally:
        orchestrator.stop()
