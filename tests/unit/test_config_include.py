"""deploybus.config ``include:``: files (globs, in name order) that add
``projects:`` and ``environments:`` entries to the config; errors name the
included file, its line and the key; a name defined twice is refused; and
``deploybus config check --include-candidate`` checks a file before it is
written (what Puppet's ``validate_cmd`` runs for a conf.d file)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploybus import config
from deploybus.errors import ConfigError

MAIN = """
bus:
  url: memory://include-test
include: [conf.d/*.yaml]
projects:
  main-app:
    git: /srv/git/main-app.git
environments:
  prod:
    hosts: [web1, web2]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error(path: Path, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load(path, **kw)  # type: ignore[arg-type]
    return info.value


def test_included_files_add_projects_and_environments_in_name_order(tmp_path):
    main = write(tmp_path / "deploybus.yaml", MAIN)
    write(tmp_path / "conf.d" / "20-web.yaml", """
        projects:
          web:
            git: ../repos/web.git
            keep: 3
            scripts: {post: make smoke}
        environments:
          staging:
            hosts: [stage1]
            projects: [web, main-app]
        """)
    write(tmp_path / "conf.d" / "10-api.yaml", """
        projects:
          api: {git: "git@git.example.com:team/api.git", user: deploy}
        """)
    write(tmp_path / "conf.d" / "README", "not yaml: [ at all")   # not *.yaml: not read
    write(tmp_path / "conf.d" / "empty.yaml", "")                  # nothing to add: fine
    cfg = config.load(main)
    assert list(cfg.projects) == ["main-app", "api", "web"]
    # a relative path in an included file is relative to that file's directory
    assert cfg.projects["web"].git == str(tmp_path / "repos" / "web.git")
    assert cfg.projects["web"].keep == 3 and cfg.projects["web"].scripts == {"post": "make smoke"}
    assert cfg.projects["api"].user == "deploy"
    assert cfg.environments["staging"].projects == ["web", "main-app"]
    assert cfg.environments["prod"].hosts == ["web1", "web2"]
    # the main file's environments see the included projects
    assert [p.name for p in cfg.projects_for_host("web1")] == ["api", "main-app", "web"]
    assert cfg.included == [tmp_path / "conf.d" / n for n in
                            ("10-api.yaml", "20-web.yaml", "empty.yaml")]


def test_a_pattern_matching_nothing_is_fine_a_missing_file_name_is_not(tmp_path):
    main = write(tmp_path / "deploybus.yaml", MAIN)
    assert list(config.load(main).projects) == ["main-app"]    # no conf.d at all
    main = write(tmp_path / "deploybus.yaml", MAIN.replace("[conf.d/*.yaml]",
                                                           "[conf.d/*.yaml, extra.yaml]"))
    e = error(main)
    assert (e.path, e.line, e.key) == (str(main), 3, "include.1")
    assert f"cannot read {tmp_path / 'extra.yaml'}: no such file" in str(e)


def test_include_takes_one_string_and_absolute_patterns(tmp_path):
    write(tmp_path / "elsewhere" / "p.yaml", "projects: {p: {git: /srv/p.git}}\n")
    main = write(tmp_path / "deploybus.yaml", MAIN.replace(
        "[conf.d/*.yaml]", str(tmp_path / "elsewhere" / "*.yaml")))
    assert list(config.load(main).projects) == ["main-app", "p"]


@pytest.mark.parametrize("fragment, line, key, says", [
    # errors inside an included file name that file, its line and the full key
    ("projects:\n  web:\n    git: /g\n    scirpts: {post: x}\n", 4, "projects.web.scirpts",
     "unknown key (did you mean 'scripts'?)"),
    ("projects:\n  web:\n    git: /g\n    keep: 0\n", 4, "projects.web.keep",
     "expected a number >= 1"),
    ("environments:\n  qa:\n    hosts: [q1]\n    strategy: {batchh: 2}\n", 4,
     "environments.qa.strategy.batchh", "unknown key (did you mean 'batch'?)"),
    ("environments:\n  qa:\n    hosts: [q1]\n    projects: [nope]\n", 4,
     "environments.qa.projects.0", "unknown project 'nope'"),
    ("projects:\n  web:\n    git: /g\n  web:\n    git: /h\n", 4, "projects.web", "duplicate key"),
    ("keys:\n  signing: x.key\n", 1, "keys", "unknown key (known: projects, environments)"),
    ("include: [other/*.yaml]\n", 1, "include", "unknown key"),
    ("projects: [web]\n", 1, "projects", "expected a mapping, got list"),
    ("- just\n- a list\n", 1, None, "expected a mapping, got list"),
    ("projects:\n  web: {git: /g\n", 2, None, "not valid YAML"),
])
def test_errors_name_the_included_file_line_and_key(tmp_path, fragment, line, key, says):
    main = write(tmp_path / "deploybus.yaml", MAIN)
    frag = tmp_path / "conf.d" / "web.yaml"
    frag.parent.mkdir()
    frag.write_text(fragment)
    e = error(main)
    assert e.path == str(frag), str(e)
    assert e.line == line, str(e)
    assert e.key == key, str(e)
    assert says in str(e)


def test_an_environment_in_the_main_file_is_checked_against_included_projects(tmp_path):
    """A host that gets one project from two environments, one of them
    included: the error names the included file."""
    main = write(tmp_path / "deploybus.yaml", MAIN)
    frag = write(tmp_path / "conf.d" / "qa.yaml", """
        environments:
          qa:
            hosts: [web1]
        """)
    e = error(main)
    assert (e.path, e.line, e.key) == (str(frag), 3, "environments.qa.hosts.0")
    assert "gets project 'main-app' from both 'prod' and 'qa'" in str(e)


def test_a_name_defined_twice_is_refused_naming_both_places(tmp_path):
    main = write(tmp_path / "deploybus.yaml", MAIN)
    a = write(tmp_path / "conf.d" / "a.yaml", "projects:\n  web: {git: /a}\n")
    b = write(tmp_path / "conf.d" / "b.yaml", "# b\nprojects:\n  web: {git: /b}\n")
    e = error(main)
    assert (e.path, e.line, e.key) == (str(b), 3, "projects.web")
    assert f"already defined in {a}:2" in str(e)
    b.write_text("environments:\n  prod:\n    hosts: [x]\n")     # in the main file
    a.unlink()
    e = error(main)
    assert (e.path, e.line, e.key) == (str(b), 2, "environments.prod")
    assert f"already defined in {main}:8" in str(e)


def test_a_file_is_read_once_and_never_includes_itself(tmp_path):
    write(tmp_path / "conf.d" / "a.yaml", "projects:\n  web: {git: /a}\n")
    main = write(tmp_path / "deploybus.yaml", MAIN.replace(
        "[conf.d/*.yaml]", "[conf.d/*.yaml, conf.d/a.yaml]"))
    assert list(config.load(main).projects) == ["main-app", "web"]
    main = write(tmp_path / "deploybus.yaml", MAIN.replace("[conf.d/*.yaml]", "['*.yaml']"))
    e = error(main)
    assert (e.path, e.line, e.key) == (str(main), 3, "include.0")
    assert "is this file itself" in str(e)


def test_include_must_be_strings(tmp_path):
    main = write(tmp_path / "deploybus.yaml", MAIN.replace("[conf.d/*.yaml]", "[conf.d, 3]"))
    e = error(main)
    assert (e.line, e.key) == (3, "include.1")


def test_an_unreadable_included_file_names_the_include_line(tmp_path, monkeypatch):
    frag = write(tmp_path / "conf.d" / "a.yaml", "projects: {}\n")
    main = write(tmp_path / "deploybus.yaml", MAIN)
    real = Path.read_text

    def read_text(self: Path, *a: object, **kw: object) -> str:
        if self == frag:   # as root every file is readable: fail it here instead
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    e = error(main)
    assert (e.path, e.line, e.key) == (str(main), 3, "include.0")
    assert f"cannot read {frag}: Permission denied" in str(e)


def test_overrides_stand_in_for_a_file_before_it_is_written(tmp_path):
    main = write(tmp_path / "deploybus.yaml", MAIN)
    target = tmp_path / "conf.d" / "web.yaml"
    # not there yet: included anyway, because the pattern would find it
    cfg = config.load(main, overrides={target: "projects:\n  web: {git: /w}\n"})
    assert list(cfg.projects) == ["main-app", "web"]
    # there: the override wins, and its errors name the target, not a temp file
    write(target, "projects:\n  web: {git: /w}\n")
    e = error(main, overrides={target: "projects:\n  web:\n    git: /w\n    kep: 2\n"})
    assert (e.path, e.line, e.key) == (str(target), 4, "projects.web.kep")
    # a file no pattern would read is refused: writing it would change nothing
    e = error(main, overrides={tmp_path / "other" / "web.yaml": "projects: {}\n"})
    assert (e.path, e.key) == (str(main), "include")
    assert "is not matched by any include: pattern" in str(e)
    e = error(write(tmp_path / "plain.yaml", "bus: {url: 'memory://x'}\n"),
              overrides={target: "projects: {}\n"})
    assert "has no include: key" in str(e)


def test_check_included_alone(tmp_path):
    target = tmp_path / "conf.d" / "web.yaml"
    cfg = config.check_included(target, "projects:\n  web: {git: ../web.git}\n")
    assert cfg.projects["web"].git == str(tmp_path / "web.git")
    with pytest.raises(ConfigError) as info:
        config.check_included(target, "projects:\n  web: {git: /w, keep: -1}\n")
    assert (info.value.path, info.value.line, info.value.key) == (str(target), 2,
                                                                  "projects.web.keep")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploybus.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_config_check_include_candidate(tmp_path):
    """What Puppet's validate_cmd for a conf.d file runs: the candidate (a
    temporary file) checked in place of the file it will become."""
    main = write(tmp_path / "deploybus.yaml", MAIN)
    target = tmp_path / "conf.d" / "web.yaml"
    good = write(tmp_path / "good.tmp", "projects:\n  web: {git: /w}\n")
    bad = write(tmp_path / "bad.tmp", "projects:\n  web:\n    git: /w\n    keep: none\n")
    r = cli("config", "check", str(main), "--include-candidate", str(target), str(good))
    assert r.returncode == 0, r.stderr
    assert "2 project(s)" in r.stdout and "1 included file(s)" in r.stdout
    r = cli("config", "check", str(main), "--include-candidate", str(target), str(bad))
    assert r.returncode == 78
    assert r.stderr.strip() == (f"{target}:4: projects.web.keep: expected a number >= 1, "
                                f"got 'none'")
    # the file that will include it is not there yet (a first Puppet run
    # writes conf.d before the main file): the candidate is checked alone
    missing = tmp_path / "new" / "deploybus.yaml"
    r = cli("config", "check", str(missing), "--include-candidate", str(target), str(good))
    assert r.returncode == 0, r.stderr
    assert "ok on its own" in r.stdout
    r = cli("config", "check", str(missing), "--include-candidate", str(target), str(bad))
    assert r.returncode == 78 and f"{target}:4: projects.web.keep" in r.stderr
    r = cli("config", "check", str(main), "--include-candidate", str(target),
            str(tmp_path / "nope.tmp"))
    assert r.returncode == 78 and "cannot read" in r.stderr


def test_keys_check(tmp_path):
    """What Puppet's validate_cmd for a private key runs before writing it."""
    from deploybus.signing import SigningKey
    priv, pub = SigningKey.generate("web1").save(tmp_path)
    r = cli("keys", "check", str(priv))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{priv}: ok: ed25519 private key ")
    for bad in (pub, tmp_path / "missing.key", write(tmp_path / "junk.key", "not a key\n")):
        r = cli("keys", "check", str(bad))
        assert r.returncode == 78, (bad, r.stdout)
        assert str(bad) in r.stderr


def test_config_check_as(tmp_path):
    """What Puppet's validate_cmd for the config file runs: the candidate (a
    temporary file beside it) checked as the file it will replace: its
    include: and relative paths from there, errors naming it."""
    main = tmp_path / "etc" / "deploybus.yaml"
    write(tmp_path / "etc" / "conf.d" / "web.yaml", "projects:\n  web: {git: ../web.git}\n")
    cand = write(tmp_path / "candidate.tmp", MAIN.replace("[conf.d/*.yaml]", "conf.d/*.yaml"))
    r = cli("config", "check", str(cand), "--as", str(main))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{main}: ok:") and "2 project(s)" in r.stdout
    cand.write_text(cand.read_text().replace("hosts: [web1, web2]",
                                             "hosts: [web1]\n    strategy: {batchh: 2}"))
    r = cli("config", "check", str(cand), "--as", str(main))
    assert r.returncode == 78
    assert r.stderr.strip() == (f"{main}:10: environments.prod.strategy.batchh: unknown key "
                                f"(did you mean 'batch'?)")
    r = cli("config", "check", str(cand), "--as", str(main), "--include-candidate", "a", "b")
    assert r.returncode == 2 and "not both" in r.stderr
