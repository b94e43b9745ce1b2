"""deploybus.config: a full config parses; errors name file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deploybus import config
from deploybus.errors import ConfigError
from deploybus.protocol import Role
from deploybus.signing import PolicyRule, SigningKey, key_id, public_line


def write(tmp_path: Path, text: str, name: str = "deploybus.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def error(tmp_path: Path, text: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    return info.value


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, SigningKey]:
    ci, ops = SigningKey.generate("ci"), SigningKey.generate("ops")
    ci.save(tmp_path / "keys")
    return {"ci": ci, "ops": ops}


def test_full_config(tmp_path, keys):
    ops_line = public_line(keys["ops"].public, "ops")
    p = write(tmp_path, f"""
        bus:
          url: stomp://guest:guest@broker:61613/
          prefetch: 4
        keys:
          signing: keys/ci.key
          trusted:
            ci: {{key: keys/ci.pub, role: ci}}
            ops: {{key: "{ops_line}", role: person}}
          policy:
            - signer: ci
              projects: [shop, "api-*"]
              environments: [staging]
            - role: person
        state:
          url: sqlite:///state/deploybus.db
        defaults:
          root: srv
          state_dir: /var/lib/db
        hosts:
          web1:
            root: /srv/web1
          web2:
            state_dir: st/web2
        projects:
          shop:
            git: git@example.com:shop.git
            scripts: {{pre: ./pre.sh, post: make restart}}
            script_timeout: 30
            keep: 3
          api-v2:
            git: repos/api.git
        environments:
          staging:
            hosts: [web1, web2]
            projects: [shop]
            request_timeout: 60
            strategy:
              canary: 1
              batch: 50%
              auto_rollback: true
            windows:
              timezone: Europe/Berlin
              allow: ["Mon-Fri 09:00-17:00"]
          prod:
            hosts: [web3]
        """)
    cfg = config.load(p)
    assert cfg.path == p
    assert cfg.bus_url == "stomp://guest:guest@broker:61613/"
    assert cfg.prefetch == 4
    assert cfg.signing_key == tmp_path / "keys" / "ci.key"
    assert cfg.load_signing_key().id == keys["ci"].id
    assert {n: (key_id(k.public), k.role) for n, k in cfg.trusted.items()} == {
        "ci": (keys["ci"].id, "ci"), "ops": (keys["ops"].id, "person")}
    assert cfg.policy == [PolicyRule(signer="ci", projects=["shop", "api-*"],
                                     environments=["staging"]),
                          PolicyRule(role=Role.PERSON, projects=["*"], environments=["*"])]
    assert cfg.state_url == f"sqlite:///{tmp_path / 'state' / 'deploybus.db'}"
    assert cfg.default_root == tmp_path / "srv"
    assert cfg.default_state_dir == Path("/var/lib/db")
    # A listed host without state_dir gets the same default as an unlisted one:
    # listing a host must not move its journal and replay cache.
    assert cfg.host("web1") == config.HostConfig("web1", Path("/srv/web1"),
                                                 Path("/var/lib/db"))
    assert cfg.host("web2") == config.HostConfig("web2", tmp_path / "srv",
                                                 tmp_path / "st" / "web2")
    assert cfg.host("web9") == config.HostConfig("web9", tmp_path / "srv", Path("/var/lib/db"))
    shop = cfg.projects["shop"]
    assert shop == config.ProjectConfig("shop", "git@example.com:shop.git",
                                        {"pre": "./pre.sh", "post": "make restart"}, 30, 3)
    api = cfg.projects["api-v2"]
    assert api.git == str(tmp_path / "repos" / "api.git")
    assert (api.scripts, api.script_timeout, api.keep) == ({}, 600, 5)
    staging = cfg.environments["staging"]
    assert (staging.name, staging.hosts, staging.projects, staging.request_timeout) == (
        "staging", ["web1", "web2"], ["shop"], 60)
    assert staging.strategy == {"canary": 1, "batch": "50%", "auto_rollback": True}
    assert staging.windows.timezone == "Europe/Berlin"
    assert [r.text for r in staging.windows.allow] == ["Mon-Fri 09:00-17:00"]
    prod = cfg.environments["prod"]
    assert (prod.hosts, prod.projects, prod.request_timeout, prod.strategy) == (
        ["web3"], None, 900, {})
    assert prod.windows.allow == () and prod.windows.deny == ()
    assert [pc.name for pc in cfg.projects_for_host("web1")] == ["shop"]
    assert [pc.name for pc in cfg.projects_for_host("web3")] == ["api-v2", "shop"]
    assert cfg.projects_for_host("nowhere") == []


def test_verifier_from_config_uses_trusted_keys_and_policy(tmp_path, keys):
    p = write(tmp_path, """
        keys:
          trusted: {ci: {key: keys/ci.pub, role: ci}}
          policy: [{signer: ci, projects: [shop], environments: [prod]}]
        """)
    from deploybus.envelope import new
    v = config.load(p).verifier()
    env = keys["ci"].sign(new("deploy.rollout", {}, sender="s", ttl=60))
    assert v.verify(env, project="shop", environment="prod").name == "ci"


def test_empty_file_gives_defaults(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg.bus_url == "memory://" and cfg.projects == {} and cfg.policy == []
    assert cfg.state_url == "sqlite:///deploybus.db"


def test_absolute_sqlite_and_other_urls_are_kept(tmp_path):
    assert config.load(write(tmp_path, "state: {url: 'sqlite:////abs/x.db'}\n")).state_url \
        == "sqlite:////abs/x.db"
    assert config.load(write(tmp_path, "state: {url: 'postgresql://u@h/db'}\n")).state_url \
        == "postgresql://u@h/db"


def test_home_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = config.load(write(tmp_path, "defaults: {root: ~/deploys}\n"))
    assert cfg.default_root == tmp_path / "home" / "deploys"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config: No such file") as info:
        config.load(tmp_path / "nope.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: ")


# -- errors: file, line, key -----------------------------------------------------------

def check(exc: ConfigError, path: Path, line: int, key: str | None, text: str) -> None:
    assert exc.path == str(path)
    assert exc.line == line, str(exc)
    assert exc.key == key, str(exc)
    prefix = f"{path}:{line}: " + (f"{key}: " if key else "")
    assert str(exc).startswith(prefix), str(exc)
    assert text in str(exc), str(exc)


def test_unknown_top_level_key_suggests(tmp_path):
    exc = error(tmp_path, """
        bus:
          url: memory://
        project:
          shop: {git: /x}
        """)
    check(exc, tmp_path / "deploybus.yaml", 3, "project",
          "unknown key (did you mean 'projects'?)")


def test_unknown_nested_key_suggests(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop:
            git: /srv/git/shop.git
            script_timout: 30
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "projects.shop.script_timout",
          "did you mean 'script_timeout'?")


def test_unknown_key_without_a_close_match_lists_known(tmp_path):
    exc = error(tmp_path, """
        bus:
          zzzz: 1
        """)
    check(exc, tmp_path / "deploybus.yaml", 2, "bus.zzzz", "known: url, prefetch")


def test_unknown_script_step(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop:
            git: /x
            scripts:
              pre: a
              postt: b
        """)
    check(exc, tmp_path / "deploybus.yaml", 6, "projects.shop.scripts.postt",
          "did you mean 'post'?")


def test_duplicate_key(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop:
            git: /a
          blog:
            git: /b
          shop:
            git: /c
        """)
    check(exc, tmp_path / "deploybus.yaml", 6, "projects.shop", "duplicate key")


def test_duplicate_top_level_key(tmp_path):
    exc = error(tmp_path, """
        bus: {url: memory://}
        state: {url: sqlite://}
        bus: {url: memory://x}
        """)
    check(exc, tmp_path / "deploybus.yaml", 3, "bus", "duplicate key")


@pytest.mark.parametrize("text, line, key, message", [
    ("bus:\n  prefetch: ten\n", 2, "bus.prefetch", "expected a number >= 1, got 'ten'"),
    ("bus:\n  prefetch: 0\n", 2, "bus.prefetch", "expected a number >= 1, got 0"),
    ("bus:\n  prefetch: true\n", 2, "bus.prefetch", "expected a number >= 1, got True"),
    ("bus:\n  url: 5\n", 2, "bus.url", "expected a non-empty string, got 5"),
    ("bus: [memory]\n", 1, "bus", "expected a mapping, got list"),
    ("- a\n- b\n", 1, None, "expected a mapping, got list"),
    ("projects:\n  shop: /srv/git\n", 2, "projects.shop", "expected a mapping, got str"),
    ("projects:\n  shop:\n    git: /x\n    keep: -1\n", 4, "projects.shop.keep",
     "expected a number >= 1"),
    ("projects:\n  shop:\n    git: ''\n", 3, "projects.shop.git", "non-empty string"),
    ("projects:\n  bad name:\n    git: /x\n", 2, "projects.bad name", "is not a valid name"),
    ("environments:\n  prod:\n    hosts: web1\n", 3, "environments.prod.hosts",
     "expected a list, got str"),
    ("environments:\n  prod:\n    hosts:\n      - web1\n      - 7\n", 5,
     "environments.prod.hosts.1", "expected a non-empty string, got 7"),
    ("environments:\n  prod:\n    hosts: [web1]\n    request_timeout: soon\n", 4,
     "environments.prod.request_timeout", "expected a number"),
    ("environments:\n  prod:\n    hosts: [a]\n    strategy: {batch: 0}\n", 4,
     "environments.prod.strategy", "batch must be at least 1 host"),
    ("environments:\n  prod:\n    hosts: [a]\n    strategy: {canray: 1}\n", 4,
     "environments.prod.strategy.canray", "unknown key (did you mean 'canary'?)"),
    ("environments:\n  prod:\n    hosts: [a]\n    windows: {allow: [\"Mon-Fry 09:00-17:00\"]}\n", 4,
     "environments.prod.windows", "unknown day"),
    ("environments:\n  prod: {}\n", 2, "environments.prod", "missing key 'hosts'"),
    ("keys:\n  policy: {signer: ci}\n", 2, "keys.policy", "expected a list of rules"),
    ("keys:\n  trusted:\n    ci: {key: 'ed25519 AAAA ci', role: ci}\n", 3,
     "keys.trusted.ci.key", "not an ed25519 public key"),
    ("keys:\n  trusted:\n    ci: {key: missing.pub, role: ci}\n", 3, "keys.trusted.ci.key",
     "cannot read public key"),
    ("keys:\n  trusted:\n    ci: missing.pub\n", 3, "keys.trusted.ci",
     "give the key and its role"),
    ("keys:\n  trusted:\n    ci: {key: missing.pub, role: boss}\n", 3, "keys.trusted.ci.role",
     "unknown role 'boss'"),
    ("keys:\n  trusted:\n    ci: {key: missing.pub}\n", 3, "keys.trusted.ci",
     "missing key 'role'"),
])
def test_wrong_types_and_values(tmp_path, text, line, key, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    check(info.value, p, line, key, message)


def test_missing_git(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop:
            git: /a
          blog:
            keep: 2
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "projects.blog", "missing key 'git'")


def test_unknown_project_in_environment(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop: {git: /a}
        environments:
          prod:
            hosts: [web1]
            projects:
              - shop
              - blgo
        """)
    check(exc, tmp_path / "deploybus.yaml", 8, "environments.prod.projects.1",
          "unknown project 'blgo'")


def test_policy_signer_not_trusted(tmp_path, keys):
    exc = error(tmp_path, """
        keys:
          trusted:
            ci: {key: keys/ci.pub, role: ci}
          policy:
            - signer: ci
            - projects: [shop]
              signer: ops
        """)
    check(exc, tmp_path / "deploybus.yaml", 7, "keys.policy.1.signer",
          "signer 'ops' is not in keys.trusted")


def test_policy_rule_without_signer(tmp_path, keys):
    exc = error(tmp_path, """
        keys:
          trusted: {ci: {key: keys/ci.pub, role: ci}}
          policy:
            - projects: [shop]
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "keys.policy.0",
          "give exactly one of 'signer' (a key's name) or 'role'")


def test_policy_rules_are_for_keys_that_ask_for_rollouts(tmp_path, keys):
    """An orchestrator or host key is bound by its role, not by the policy:
    a rule naming one is a mistake, said at once."""
    exc = error(tmp_path, """
        keys:
          trusted:
            ci: {key: keys/ci.pub, role: host}
          policy:
            - signer: ci
        """)
    check(exc, tmp_path / "deploybus.yaml", 5, "keys.policy.0.signer",
          "'ci' is a host key; the policy is for keys that ask for rollouts")


def test_one_key_has_one_role(tmp_path, keys):
    exc = error(tmp_path, """
        keys:
          trusted:
            ci: {key: keys/ci.pub, role: ci}
            also: {key: keys/ci.pub, role: orchestrator}
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "keys.trusted.also",
          "the same key as 'ci': one key, one role")


@pytest.mark.parametrize("text, line, context", [
    # an unclosed bracket or quote is noticed at the end of the file, a line
    # past the last one: the line where it was opened is the one to fix
    ("bus:\n  url: memory://\nprojects:\n  shop: {git: /a\n", 4, "flow mapping"),
    ("bus:\n  url: [memory\n", 2, "flow sequence"),
    ("a: 'unterminated\n", 1, "quoted scalar"),
    ("a: 'unterminated", 1, "quoted scalar"),
    # noticed on the line that is wrong; where the mapping began is named too
    ("projects:\n  shop:\n    git: /a\n   keep: 3\n", 4, "block mapping that begins on line 2"),
    ("env:\n  hosts: [h1, h2\n  projects: [app]\n", 3, "flow sequence that begins on line 2"),
])
def test_bad_yaml_syntax(tmp_path, text, line, context):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        config.load(p)
    assert info.value.line == line, str(info.value)
    assert str(info.value).startswith(f"{p}:{line}: not valid YAML: ")
    assert context in str(info.value)


def test_tab_indentation_names_the_line(tmp_path):
    p = write(tmp_path, "bus:\n  url: memory://\nprojects:\n\tshop: {}\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        config.load(p)
    assert info.value.line == 4


@pytest.mark.parametrize("url", ["redis://localhost", "memory", "http://x", "stomps://h"])
def test_bad_bus_url_scheme(tmp_path, url):
    exc = error(tmp_path, f"""
        # comment
        bus:
          prefetch: 2
          url: "{url}"
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "bus.url", "unsupported bus URL; use one of")
    assert "amqp://" in str(exc) and "stomp+ssl://" in str(exc)


@pytest.mark.parametrize("url", ["memory://", "memory://x", "stomp+ssl://h:61614/",
                                 "amqps://u:p@h/vh"])
def test_good_bus_url_schemes(tmp_path, url):
    assert config.load(write(tmp_path, f"bus: {{url: '{url}'}}\n")).bus_url == url


def test_no_signing_key_configured(tmp_path):
    cfg = config.load(write(tmp_path, "bus: {url: memory://}\n"))
    with pytest.raises(ConfigError, match="no signing key configured") as info:
        cfg.load_signing_key()
    assert info.value.key == "keys.signing"


# -- web: the host names the front end answers to ----------------------------------------

def test_web_allowed_hosts_default_to_the_loopback_names(tmp_path):
    assert config.load(write(tmp_path, "bus: {url: memory://}\n")).web_allowed_hosts == \
        ["127.0.0.1", "localhost"]


def test_web_allowed_hosts_replace_the_defaults(tmp_path):
    cfg = config.load(write(tmp_path, """
        web:
          allowed_hosts:
            - deploy.example.com
            - Deploy.Internal
            - 10.0.0.5
            - xn--bcher-kva.example
        """))
    assert cfg.web_allowed_hosts == ["deploy.example.com", "deploy.internal", "10.0.0.5",
                                     "xn--bcher-kva.example"]


@pytest.mark.parametrize("entry, says", [
    ("'*.example.com'", "is not a host name"),
    ("deploy.example.com:8080", "is not a host name (letters, digits, '-' and '.', no port"),
    ("'https://deploy.example.com'", "no scheme"),
    ("bücher.example", "is not a host name"),
    ("-deploy.example", "is not a host name"),
    ("a..b", "is not a host name"),
    ("1.2.3", "is not a host name"),
    ("300.1.1.1", "is not a host name"),
    ("'::1'", "IPv6 addresses cannot be matched against the Host header"),
    ("'[::1]'", "IPv6 addresses cannot be matched"),
    ("0.0.0.0", "is the wildcard bind address, not a name a browser asks for"),
    ("5", "expected a non-empty string, got 5"),
    ("''", "expected a non-empty string"),
])
def test_web_allowed_hosts_entries_are_checked(tmp_path, entry, says):
    exc = error(tmp_path, f"""
        bus: {{url: memory://}}
        web:
          allowed_hosts:
            - localhost
            - {entry}
        """)
    check(exc, tmp_path / "deploybus.yaml", 5, "web.allowed_hosts.1", says)


@pytest.mark.parametrize("text, line, key, says", [
    ("web:\n  allowed_hosts: []\n", 2, "web.allowed_hosts", "expected at least one host name"),
    ("web:\n  allowed_hosts: localhost\n", 2, "web.allowed_hosts", "expected a list, got str"),
    ("web:\n  allowed_host: [localhost]\n", 2, "web.allowed_host", "did you mean 'allowed_hosts'?"),
    ("web: [localhost]\n", 1, "web", "expected a mapping, got list"),
])
def test_web_section_errors_name_file_line_and_key(tmp_path, text, line, key, says):
    exc = error(tmp_path, text)
    check(exc, tmp_path / "deploybus.yaml", line, key, says)


def test_windows_timezone_must_be_a_name(tmp_path):
    exc = error(tmp_path, """
        environments:
          prod:
            hosts: [h1]
            windows: {timezone: 5}
        """)
    check(exc, tmp_path / "deploybus.yaml", 4, "environments.prod.windows",
          "timezone must be a name like Europe/Berlin, not 5")


# -- environments sharing a host -----------------------------------------------------------

def test_a_project_deployed_to_a_host_by_two_environments_is_refused(tmp_path):
    # A key allowed only staging could otherwise move production's current.
    exc = error(tmp_path, """
        projects:
          shop: {git: /a}
          blog: {git: /b}
        environments:
          staging:
            hosts: [web1, web2]
          production:
            hosts:
              - web3
              - web2
            projects: [shop]
        """)
    check(exc, tmp_path / "deploybus.yaml", 10, "environments.production.hosts.1",
          "host 'web2' gets project 'shop' from both 'staging' and 'production'")


def test_an_environment_without_projects_deploys_every_project(tmp_path):
    exc = error(tmp_path, """
        projects:
          shop: {git: /a}
          blog: {git: /b}
        environments:
          lab: {hosts: [web1], projects: [blog]}
          all: {hosts: [web1]}
        """)
    check(exc, tmp_path / "deploybus.yaml", 6, "environments.all.hosts.0",
          "host 'web1' gets project 'blog' from both 'lab' and 'all'")


def test_environments_may_share_a_host_for_different_projects(tmp_path):
    cfg = config.load(write(tmp_path, """
        projects:
          shop: {git: /a}
          blog: {git: /b}
        environments:
          staging: {hosts: [web1, web2], projects: [blog]}
          production: {hosts: [web2, web3], projects: [shop]}
        """))
    assert [pc.name for pc in cfg.projects_for_host("web2")] == ["blog", "shop"]


def test_ci_servers_project_ci_and_auto_deploy(tmp_path):
    (tmp_path / "jenkins.cred").write_text("deploybus:api-token\n")
    cfg = config.load(write(tmp_path, """
        ci:
          jenkins: {type: jenkins, url: "https://ci.example.com/", credentials: jenkins.cred}
        projects:
          app:
            git: /a
            ci:
              server: jenkins
              job: app-build
              refs: ["refs/heads/main", "refs/tags/v*"]
              parameters: {COMMIT: "{commit}", BRANCH: "{short_ref}", LANE: fast}
        environments:
          dev:
            hosts: [h1]
            auto_deploy:
              refs: ["refs/heads/main"]
              on: ci_success
        """))
    js = cfg.ci_servers["jenkins"]
    assert (js.type, js.url, js.credentials) == ("jenkins", "https://ci.example.com",
                                                 tmp_path / "jenkins.cred")
    ci = cfg.projects["app"].ci
    assert ci is not None and ci.builds("refs/tags/v1.2") and not ci.builds("refs/heads/x")
    assert ci.parameters == {"COMMIT": "{commit}", "BRANCH": "{short_ref}", "LANE": "fast"}
    ad = cfg.environments["dev"].auto_deploy
    assert ad is not None and ad.on == "ci_success" and ad.follows("refs/heads/main")


@pytest.mark.parametrize("text, line, key, message", [
    ("ci:\n  j: {type: gitlab, url: 'http://x'}\n", 2, "ci.j.type", "unknown CI server type"),
    ("ci:\n  j: {type: jenkins, url: 'http://u:p@x'}\n", 2, "ci.j.url",
     "put credentials in a file"),
    ("ci:\n  j: {type: jenkins, url: 'http://x', credentials: nope}\n", 2, "ci.j.credentials",
     "cannot read"),
    ("projects:\n  app:\n    git: /a\n    ci: {server: jenkins, job: b}\n", 4,
     "projects.app.ci.server", "no CI server 'jenkins'"),
    ("ci:\n  j: {type: jenkins, url: 'http://x'}\nprojects:\n  app:\n    git: /a\n"
     "    ci: {server: j, job: b, parameters: {X: '{sha}'}}\n", 6,
     "projects.app.ci.parameters.X", "unknown placeholder"),
    ("environments:\n  dev:\n    hosts: [h]\n    auto_deploy: {refs: [main]}\n", 4,
     "environments.dev.auto_deploy.refs.0", "not a full refname pattern"),
    ("environments:\n  dev:\n    hosts: [h]\n    auto_deploy:\n      refs: [refs/heads/*]\n"
     "      on: merge\n", 6, "environments.dev.auto_deploy.on", "one of ci_success, push"),
])
def test_ci_config_errors(tmp_path, text, line, key, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    check(info.value, p, line, key, message)
