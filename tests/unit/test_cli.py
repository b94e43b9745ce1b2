"""deploybus.cli through click's CliRunner: keys and config commands."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from deploybus.cli import cli
from deploybus.runner import EXIT_CONFIG, EXIT_FAILURE
from deploybus.signing import SigningKey, key_id, parse_public


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_keys_generate(runner, tmp_path):
    d = tmp_path / "keys"
    result = runner.invoke(cli, ["keys", "generate", "ci", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    priv, pub = d / "ci.key", d / "ci.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    line = pub.read_text().strip()
    assert line.startswith("ed25519 ") and line.endswith(" ci")
    assert f"private key: {priv}" in result.output
    assert f"public key:  {pub}" in result.output
    assert line in result.output
    assert key_id(parse_public(line)) == SigningKey.load(priv).id


def test_keys_generate_refuses_to_overwrite(runner, tmp_path):
    assert runner.invoke(cli, ["keys", "generate", "ci", "--dir", str(tmp_path)]).exit_code == 0
    before = (tmp_path / "ci.key").read_bytes()
    result = runner.invoke(cli, ["keys", "generate", "ci", "--dir", str(tmp_path)])
    assert result.exit_code == EXIT_FAILURE
    assert "exists; not overwriting a key" in result.output
    assert (tmp_path / "ci.key").read_bytes() == before


@pytest.mark.parametrize("name", ["../evil", "a b", "-x"])
def test_keys_generate_refuses_bad_names(runner, tmp_path, name):
    result = runner.invoke(cli, ["keys", "generate", "--dir", str(tmp_path), "--", name])
    assert result.exit_code == 2, result.output
    assert "letters, digits" in result.output
    assert list(tmp_path.iterdir()) == []


def write_config(tmp_path, text):
    p = tmp_path / "deploybus.yaml"
    p.write_text(text)
    return p


def test_config_check_ok(runner, tmp_path):
    SigningKey.generate("ci").save(tmp_path)
    p = write_config(tmp_path, (
        "bus: {url: 'amqp://guest:s3cret@broker/'}\n"
        "keys: {trusted: {ci: ci.pub}}\n"
        "projects: {shop: {git: /g/shop}, blog: {git: /g/blog}}\n"
        "environments:\n"
        "  staging: {hosts: [web1, web2]}\n"
        "  prod: {hosts: [web2, web3], projects: [shop]}\n"))
    result = runner.invoke(cli, ["config", "check", str(p)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"{p}: ok: bus amqp://guest:***@broker/, 2 project(s), 2 environment(s), "
        f"3 host(s), 1 trusted key(s)")


def test_config_check_uses_the_config_option(runner, tmp_path):
    p = write_config(tmp_path, "bus: {url: 'memory://'}\n")
    result = runner.invoke(cli, ["--config", str(p), "config", "check"])
    assert result.exit_code == 0, result.output
    assert f"{p}: ok: bus memory://" in result.output
    result = runner.invoke(cli, ["config", "check"], env={"DEPLOYBUS_CONFIG": str(p)})
    assert result.exit_code == 0, result.output


def test_config_check_error_names_file_and_line(runner, tmp_path):
    p = write_config(tmp_path, (
        "bus:\n"
        "  url: memory://\n"
        "projects:\n"
        "  shop:\n"
        "    git: /g/shop\n"
        "    keeep: 3\n"))
    result = runner.invoke(cli, ["config", "check", str(p)])
    assert result.exit_code == EXIT_CONFIG == 78
    assert f"{p}:6: projects.shop.keeep: unknown key (did you mean 'keep'?)" in result.output


def test_config_check_yaml_error_exit_code(runner, tmp_path):
    p = write_config(tmp_path, "bus:\n  url: [memory\n")
    result = runner.invoke(cli, ["config", "check", str(p)])
    assert result.exit_code == EXIT_CONFIG
    assert f"{p}:3: not valid YAML" in result.output


def test_config_check_missing_file(runner, tmp_path):
    result = runner.invoke(cli, ["config", "check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_CONFIG
    assert f"{tmp_path / 'nope.yaml'}: cannot read config" in result.output


def test_commands_needing_config_exit_78_on_a_bad_one(runner, tmp_path):
    p = write_config(tmp_path, "bus: {url: 'redis://x'}\n")
    result = runner.invoke(cli, ["--config", str(p), "history"])
    assert result.exit_code == EXIT_CONFIG
    assert f"config error: {p}:1: bus.url: unsupported bus URL" in result.output
