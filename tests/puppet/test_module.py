"""puppet/deploybus: it parses, lints clean, its examples compile and plan
(`--noop`), and applied for real to a scratch directory (no package: the
config directory, the deploybus command and the services are pointed
elsewhere) it writes the YAML the daemons read, checks every file before
it writes it, restarts the services only after a change that passed the
check, and a second run changes nothing.

The real install (the built package, real daemons, a deploy over RabbitMQ)
is tests/puppet/test_apply.py."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploybus import config
from deploybus.signing import SigningKey, public_line
from tests.puppet.conftest import DEPLOYBUS, MODULE, Puppet, output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PUPPET_FILES = sorted(p for d in ("manifests", "functions", "types", "examples")
                      for p in (MODULE / d).glob("*.pp"))


def test_the_module_parses(puppet: str) -> None:
    r = subprocess.run([puppet, "parser", "validate", "--color=false", *map(str, PUPPET_FILES)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, output(r)
    templates = sorted(map(str, (MODULE / "templates").glob("*.epp")))
    assert templates
    r = subprocess.run([puppet, "epp", "validate", "--color=false", *templates],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, output(r)


def test_puppet_lint_is_clean(puppet_lint: str) -> None:
    r = subprocess.run([puppet_lint, "--fail-on-warnings", str(MODULE)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("example, resources", [
    ("agent.pp", ["package[deploybus-agent]", "file[/etc/deploybus/deploybus.yaml]",
                  "file[/etc/deploybus/conf.d/app.yaml]", "file[/etc/deploybus/agent.env]",
                  "service[deploybus-agent]", "service[deploybus-fetcher]",
                  "service[deploybus-keepalive]", "exec[deploybus-config-check]"]),
    ("server.pp", ["package[deploybus-server]", "file[/etc/deploybus/deploybus.yaml]",
                   "file[/etc/deploybus/conf.d/app.yaml]", "file[/etc/deploybus/server.env]",
                   "service[deploybus-orchestrator]", "service[deploybus-web]",
                   "service[deploybus-notifier]", "service[deploybus-listener]",
                   "exec[deploybus-config-check]"]),
])
def test_each_example_compiles_and_plans(puppet_apply: Puppet, example: str,
                                         resources: list[str]) -> None:
    """`puppet apply --noop`: the catalog compiles and is evaluated against
    this machine without an error (what it would change depends on the
    machine: the packaging tests may have a package installed)."""
    r = puppet_apply.apply(MODULE / "examples" / example, "--noop", "--write-catalog-summary")
    said = output(r)
    assert r.returncode in (0, 2), said   # 2: changes it would make
    assert "Error" not in said and "Applied catalog" in said, said
    catalog = (puppet_apply.dirs["vardir"] / "state" / "resources.txt").read_text().split()
    for resource in resources:
        assert resource in catalog, (resource, catalog)


# --- applied to a scratch directory -------------------------------------------------

def pp(value: Any) -> str:
    """A Python value as a Puppet literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{pp(k)} => {pp(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(pp(v) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    raise TypeError(value)


def attrs(params: dict[str, Any]) -> str:
    """Resource attributes: bare names."""
    return ", ".join(f"{k} => {pp(v)}" for k, v in params.items())


class Raw:
    def __init__(self, text: str) -> None:
        self.text = text


#: A script with everything YAML could misread: quotes, backslashes, '$', ': ', '#'.
TRICKY = 'echo "pre $DEPLOYBUS_REF: ok" # \\ not a comment\ntrue'


class Scratch:
    """The module applied to BASE/etc, with stub services that count restarts."""

    def __init__(self, base: Path, puppet: Puppet) -> None:
        self.base, self.puppet = base, puppet
        self.etc = base / "etc"
        self.services = base / "services"
        self.services.mkdir(parents=True)
        self.keys = {n: SigningKey.generate(n) for n in ("web1", "orchestrator")}
        self.keys["web1"].save(base / "keys")
        self.manifest = base / "site.pp"

    @property
    def config(self) -> Path:
        return self.etc / "deploybus.yaml"

    def write(self, *, strategy: dict | None = None, projects: dict[str, dict] | None = None,
              env_projects: list[str] | None = None, key: Raw | None = None) -> Path:
        units = ("deploybus-agent", "deploybus-fetcher", "deploybus-keepalive")
        s = self.services
        commands = {u: {"start": f"/usr/bin/touch {s}/{u}.on",
                        "stop": f"/bin/rm -f {s}/{u}.on",
                        "status": f"/usr/bin/test -e {s}/{u}.on",
                        "restart": f"/bin/sh -c 'echo restarted >> {s}/{u}.restarts'"}
                    for u in units}
        env: dict[str, Any] = {"hosts": ["web1", "web2"],
                               "strategy": strategy or {"batch": "50%", "window": 0}}
        if env_projects is not None:
            env["projects"] = env_projects
        if projects is None:
            projects = {"app": {"git": "/srv/git/app.git", "scripts": {"pre": TRICKY},
                                "keep": 3, "user": "nobody"}}
        agent = {
            "manage_package": False,
            "bus_url": "amqp://u:p@mq.example.com:5672/deploy?prefix=t1.&heartbeat=10",
            "host": "web1",
            "host_key_content": key or Raw(f"Sensitive(file({pp(str(self.base / 'keys/web1.key'))}))"),
            "trusted_keys": {"orchestrator": {
                "key": public_line(self.keys["orchestrator"].public, "orchestrator"),
                "role": "orchestrator"}},
            "environments": {"prod": env},
            "root": str(self.base / "srv"),
            "heartbeat": 2.5,
            "service_provider": "base",
            "service_enable": "unmanaged",
            "service_commands": commands,
        }
        lines = [f"class {{ 'deploybus': config_dir => {pp(str(self.etc))}, "
                 f"deploybus_bin => {pp(str(DEPLOYBUS))}, group => 'root' }}",
                 f"class {{ 'deploybus::agent': {attrs(agent)} }}"]
        lines += [f"deploybus::project {{ {pp(name)}: {attrs(p)} }}"
                  for name, p in projects.items()]
        self.manifest.write_text("\n".join(lines) + "\n")
        return self.manifest

    def apply(self, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.puppet.apply(self.write(**kw))

    def restarts(self) -> dict[str, int]:
        return {p.name.removesuffix(".restarts"): len(p.read_text().splitlines())
                for p in self.services.glob("*.restarts")}

    def running(self) -> list[str]:
        return sorted(p.name.removesuffix(".on") for p in self.services.glob("*.on"))

    def files(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.etc)): p.read_bytes()
                for p in sorted(self.etc.rglob("*")) if p.is_file()}


@pytest.fixture
def scratch(tmp_path: Path, puppet_apply: Puppet) -> Scratch:
    return Scratch(tmp_path, puppet_apply)


ALL = ["deploybus-agent", "deploybus-fetcher", "deploybus-keepalive"]


def test_writes_what_the_daemons_read_and_a_second_run_changes_nothing(scratch: Scratch) -> None:
    r = scratch.apply()
    assert r.returncode == 2, output(r)
    cfg = config.load(scratch.config)
    assert cfg.bus_url == "amqp://u:p@mq.example.com:5672/deploy?prefix=t1.&heartbeat=10"
    assert cfg.trusted["orchestrator"].role.value == "orchestrator"
    assert cfg.environments["prod"].hosts == ["web1", "web2"]
    assert cfg.environments["prod"].strategy == {"batch": "50%", "window": 0}
    assert cfg.default_root == scratch.base / "srv" and cfg.default_heartbeat == 2.5
    app = cfg.projects["app"]
    assert (app.git, app.keep, app.user) == ("/srv/git/app.git", 3, "nobody")
    assert app.scripts == {"pre": TRICKY}
    assert cfg.included == [scratch.etc / "conf.d" / "app.yaml"]
    assert [p.name for p in cfg.projects_for_host("web1")] == ["app"]
    # the key, the environment file, the modes
    key = scratch.etc / "keys" / "web1.key"
    assert key.read_bytes() == (scratch.base / "keys" / "web1.key").read_bytes()
    assert "BEGIN PRIVATE KEY" not in output(r)   # never shown
    for path, mode in ((key, 0o640), (scratch.config, 0o640),
                       (scratch.etc / "conf.d" / "app.yaml", 0o640),
                       (scratch.etc / "keys", 0o750), (scratch.etc / "conf.d", 0o750)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert (scratch.etc / "agent.env").read_text().splitlines()[-2:] == [
        'DEPLOYBUS_HOST="web1"', f'DEPLOYBUS_HOST_KEY="{key}"']
    # the project's directory belongs to its user (its pre script runs there)
    assert (scratch.base / "srv" / "app").owner() == "nobody"
    # started once, not restarted on top (a start invalidates the refresh)
    assert scratch.running() == ALL and scratch.restarts() == {}
    assert re.search(r"Exec\[deploybus-config-check\]/returns: .*: ok: bus amqp://u:\*\*\*@", output(r))

    r = scratch.apply()
    assert r.returncode == 0, output(r)
    assert scratch.restarts() == {}


def test_a_bad_parameter_fails_the_run_and_leaves_every_file_and_daemon_alone(
        scratch: Scratch) -> None:
    assert scratch.apply().returncode == 2
    before = scratch.files()

    # an unknown strategy key: the config's check refuses it, naming the
    # config (not Puppet's temporary file), its line and the key
    r = scratch.apply(strategy={"batchh": 2})
    said = output(r)
    assert r.returncode in (4, 6), said
    assert re.search(rf"{re.escape(str(scratch.config))}:\d+: environments\.prod\.strategy\."
                     rf"batchh: unknown key \(did you mean 'batch'\?\)", said), said
    assert "Skipping because of failed dependencies" in said
    assert scratch.files() == before and scratch.restarts() == {}

    # a bad project parameter: the conf.d file is checked in place, named
    r = scratch.apply(projects={"app": {"git": "/srv/git/app.git", "keep": 3, "user": "nobody",
                                        "scripts": {"pre": TRICKY},
                                        "extra_config": {"kep": 2}}})
    said = output(r)
    assert r.returncode in (4, 6), said
    assert re.search(rf"{re.escape(str(scratch.etc / 'conf.d' / 'app.yaml'))}:\d+: "
                     rf"projects\.app\.kep: unknown key \(did you mean 'keep'\?\)", said), said
    assert scratch.files() == before and scratch.restarts() == {}

    # a private key that is not one
    r = scratch.apply(key=Raw("Sensitive('not a key')"))
    said = output(r)
    assert r.returncode in (4, 6), said
    assert "keys check" in said and "not a usable private key" in said
    assert scratch.files() == before and scratch.restarts() == {}

    # Puppet's own types catch what they can before anything runs
    r = scratch.apply(strategy={"batch": "50%"}, projects={"app": {"git": "/g", "keep": 0}})
    assert r.returncode == 1 and "expects a value of type Undef or Integer[1]" in output(r)
    assert scratch.files() == before and scratch.restarts() == {}

    assert scratch.apply().returncode == 0   # and nothing was left half-done


def test_changes_restart_the_daemons_once_removed_projects_are_purged(scratch: Scratch) -> None:
    two = {"app": {"git": "/srv/git/app.git", "keep": 3},
           "api": {"git": "git@git.example.com:team/api.git", "scripts": {"post": "make smoke"}}}
    assert scratch.apply(projects=two, env_projects=["app", "api"]).returncode == 2
    assert sorted(p.name for p in (scratch.etc / "conf.d").iterdir()) == ["api.yaml", "app.yaml"]

    two["app"]["keep"] = 4
    r = scratch.apply(projects=two, env_projects=["app", "api"])
    assert r.returncode == 2, output(r)
    assert config.load(scratch.config).projects["app"].keep == 4
    assert scratch.restarts() == dict.fromkeys(ALL, 1)

    # a file nobody declares in conf.d is purged (and counts as a change)
    (scratch.etc / "conf.d" / "stray.yaml").write_text("projects: {stray: {git: /x}}\n")
    r = scratch.apply(projects=two, env_projects=["app", "api"])
    assert r.returncode == 2 and not (scratch.etc / "conf.d" / "stray.yaml").exists()
    assert scratch.restarts() == dict.fromkeys(ALL, 2)

    # A project dropped while the environment still names it: its file is
    # purged before anything is checked (Puppet removes it first), and the
    # check of the assembled config is what stops the restart.
    r = scratch.apply(projects={"app": two["app"]}, env_projects=["app", "api"])
    said = output(r)
    assert r.returncode in (4, 6), said
    assert "environments.prod.projects.1: unknown project 'api'" in said
    assert "Exec[deploybus-config-check]" in said
    assert scratch.restarts() == dict.fromkeys(ALL, 2)

    # dropped from the environment too: fine, and one restart
    r = scratch.apply(projects={"app": two["app"]}, env_projects=["app"])
    assert r.returncode == 2, output(r)
    assert list(config.load(scratch.config).projects) == ["app"]
    assert scratch.restarts() == dict.fromkeys(ALL, 3)
    assert scratch.apply(projects={"app": two["app"]}, env_projects=["app"]).returncode == 0


def test_the_host_must_be_in_an_environment(scratch: Scratch) -> None:
    m = scratch.write()
    m.write_text(m.read_text().replace("'hosts' => ['web1', 'web2']", "'hosts' => ['web2']"))
    r = scratch.puppet.apply(m)
    assert r.returncode == 1
    assert "host 'web1' is in no environment's hosts (environments: prod)" in output(r)
    assert not scratch.etc.exists()


def test_the_module_needs_nothing_but_puppet() -> None:
    """No Forge modules (none can be fetched here): no stdlib or concat."""
    assert '"dependencies": []' in (MODULE / "metadata.json").read_text()
    text = "\n".join(p.read_text() for p in MODULE.rglob("*.p*"))
    for stdlib in ("stdlib::", "concat", "assert_private", "deep_merge", "to_json", "pick(",
                   "validate_legacy", "ensure_packages"):
        assert stdlib not in text, stdlib
    assert re.findall(r"(?<![:\w])to_yaml\(", text) == []   # only deploybus::to_yaml


def test_without_a_key_for_its_host_the_run_fails_before_the_daemons_start(
        scratch: Scratch) -> None:
    """No host_key_*: the key the package generated (named after `hostname`)
    is used, if it is there under the host's name; if not, the run fails."""
    r = scratch.apply(key=Raw("undef"))
    said = output(r)
    assert r.returncode in (4, 6), said
    key = scratch.etc / "keys" / "web1.key"
    assert f"no private key {key}: give host_key_content or host_key_source" in said
    assert scratch.running() == []
    key.write_bytes((scratch.base / "keys" / "web1.key").read_bytes())   # as the package would
    r = scratch.apply(key=Raw("undef"))
    assert r.returncode == 2 and scratch.running() == ALL, output(r)
    assert scratch.apply(key=Raw("undef")).returncode == 0


def test_the_server_class_writes_its_config_and_runs_only_its_services(
        tmp_path: Path, puppet_apply: Puppet) -> None:
    orch = SigningKey.generate("orchestrator")
    orch.save(tmp_path / "keys")
    _, host_pub = SigningKey.generate("web1").save(tmp_path / "keys")
    etc, services = tmp_path / "etc", tmp_path / "services"
    services.mkdir()
    units = ["deploybus-orchestrator", "deploybus-web", "deploybus-listener",
             "deploybus-ci-bridge", "deploybus-notifier"]
    commands = {u: {"start": f"/usr/bin/touch {services}/{u}.on",
                    "stop": f"/bin/rm -f {services}/{u}.on",
                    "status": f"/usr/bin/test -e {services}/{u}.on"} for u in units}
    (services / "deploybus-listener.on").touch()   # running, and not wanted
    server = {
        "manage_package": False,
        "bus_url": "stomp://u:p@mq:61613/?vhost=deploy",
        "state_url": f"sqlite:///{tmp_path / 'state.db'}",
        "web_allowed_hosts": ["deploy.example.com"],
        "private_keys": {"orchestrator": {
            "content": Raw(f"Sensitive(file({pp(str(tmp_path / 'keys/orchestrator.key'))}))")}},
        "trusted_keys": {"orchestrator": {"key": public_line(orch.public, "orchestrator"),
                                          "role": "orchestrator"},
                         "web1": {"key": str(host_pub), "role": "host"}},
        "policy": [{"role": "person", "projects": ["*"], "environments": ["prod"]}],
        "environments": {"prod": {"hosts": ["web1"], "strategy": {"canary": 1}}},
        "extra_config": {"smtp": {"host": "mail.example.com", "from": "deploy@example.com"}},
        "web_port": 8099,
        "service_provider": "base",
        "service_enable": "unmanaged",
        "service_commands": commands,
    }
    site = tmp_path / "server.pp"
    site.write_text(
        f"class {{ 'deploybus': config_dir => {pp(str(etc))}, "
        f"deploybus_bin => {pp(str(DEPLOYBUS))}, group => 'root' }}\n"
        f"class {{ 'deploybus::server': {attrs(server)} }}\n"
        f"deploybus::project {{ 'app': git => '/srv/git/app.git' }}\n")
    r = puppet_apply.apply(site)
    assert r.returncode == 2, output(r)
    cfg = config.load(etc / "deploybus.yaml")
    assert cfg.bus_url == "stomp://u:p@mq:61613/?vhost=deploy"
    assert cfg.state_url == f"sqlite:///{tmp_path / 'state.db'}"
    assert cfg.web_allowed_hosts == ["deploy.example.com"]
    assert cfg.smtp is not None and cfg.smtp.host == "mail.example.com"
    assert cfg.trusted["web1"].host == "web1" and list(cfg.projects) == ["app"]
    assert cfg.policy[0].environments == ["prod"]
    assert (etc / "keys" / "orchestrator.key").read_bytes() == \
        (tmp_path / "keys" / "orchestrator.key").read_bytes()
    assert 'DEPLOYBUS_WEB_PORT="8099"' in (etc / "server.env").read_text()
    assert sorted(p.name for p in services.glob("*.on")) == [
        "deploybus-orchestrator.on", "deploybus-web.on"]
    assert puppet_apply.apply(site).returncode == 0
