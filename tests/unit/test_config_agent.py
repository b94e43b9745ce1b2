"""deploybus.config: the agent's project keys (shared, health, user, group,
output, post_switch), with errors that name file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deploybus import config
from deploybus.errors import ConfigError


def load(tmp_path: Path, project: str) -> config.Config:
    p = tmp_path / "deploybus.yaml"
    p.write_text("projects:\n  app:\n    git: /srv/git/app.git\n"
                 + textwrap.indent(textwrap.dedent(project).strip("\n"), "    ") + "\n")
    return config.load(p)


def error(tmp_path: Path, project: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, project)
    return str(info.value)


def test_agent_keys_parse(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        shared: [log, .env, storage/uploads/]
        user: deploy
        group: www-data
        scripts:
          pre: echo pre
          post: make
          post_switch: systemctl reload app
        health:
          url: http://127.0.0.1:8000/healthz
          retries: 5
          interval: 1.5
          timeout: 3
        output:
          interval: 1
          lines: 20
          line_chars: 500
          max_bytes: 65536
    """)
    pc = cfg.projects["app"]
    assert pc.shared == ["log", ".env", "storage/uploads"]
    assert (pc.user, pc.group) == ("deploy", "www-data")
    assert pc.scripts["post_switch"] == "systemctl reload app"
    assert pc.health == config.HealthConfig(url="http://127.0.0.1:8000/healthz", retries=5,
                                            interval=1.5, timeout=3)
    assert pc.output == config.OutputConfig(interval=1, lines=20, line_chars=500,
                                            max_bytes=65536)


def test_defaults(tmp_path: Path) -> None:
    pc = load(tmp_path, "keep: 2").projects["app"]
    assert pc.shared == [] and pc.health is None and pc.user is None and pc.group is None
    assert pc.output == config.OutputConfig(interval=0.5, lines=50, line_chars=2000,
                                            max_bytes=1024 * 1024)
    hc = load(tmp_path, "health: {command: ./check}").projects["app"].health
    assert hc == config.HealthConfig(command="./check", retries=3, interval=2.0, timeout=10.0)


@pytest.mark.parametrize("entry, message", [
    ("/etc/passwd", "'/etc/passwd' is absolute; shared paths are relative to the release"),
    ("../../etc", "'../../etc' must not contain '..', '.' or empty parts"),
    ("log/../..", "'log/../..' must not contain '..', '.' or empty parts"),
    ("./log", "'./log' must not contain '..', '.' or empty parts"),
    ("a//b", "'a//b' must not contain '..', '.' or empty parts"),
    (".deploybus", "'.deploybus' is reserved"),
])
def test_shared_entries_that_could_leave_the_release_are_refused(tmp_path: Path, entry: str,
                                                                   message: str) -> None:
    err = error(tmp_path, f"shared:\n  - log\n  - {entry!r}")
    assert err == f"{tmp_path / 'deploybus.yaml'}:6: projects.app.shared.1: {message}"


def test_overlapping_shared_entries_are_refused(tmp_path: Path) -> None:
    err = error(tmp_path, "shared: [storage, storage/uploads]")
    assert err.endswith("projects.app.shared.1: 'storage/uploads' overlaps the shared entry "
                        "'storage'")


def test_shared_must_be_a_list_of_strings(tmp_path: Path) -> None:
    assert error(tmp_path, "shared: log").endswith("projects.app.shared: expected a list, got str")


@pytest.mark.parametrize("health, message", [
    ("{}", "projects.app.health: give exactly one of 'command' or 'url'"),
    ("{command: x, url: 'http://a/'}", "projects.app.health: give exactly one of 'command' or "
                                       "'url'"),
    ("{url: 'ftp://a/'}", "projects.app.health.url: 'ftp://a/' is not an http:// or https:// "
                          "URL"),
    ("{command: x, retries: 0}", "projects.app.health.retries: expected a number >= 1, got 0"),
    ("{command: x, timout: 3}", "projects.app.health.timout: unknown key (did you mean "
                                "'timeout'?)"),
])
def test_health_errors(tmp_path: Path, health: str, message: str) -> None:
    assert error(tmp_path, f"health: {health}").endswith(message)


def test_user_and_output_errors(tmp_path: Path) -> None:
    assert error(tmp_path, "user: 'root; rm -rf /'").endswith(
        "projects.app.user: 'root; rm -rf /' is not a valid user or group name")
    assert error(tmp_path, "output: {lines: 0}").endswith(
        "projects.app.output.lines: expected a number >= 1, got 0")
    assert error(tmp_path, "scripts: {post-switch: x}").endswith(
        "projects.app.scripts.post-switch: unknown key (did you mean 'post_switch'?)")
