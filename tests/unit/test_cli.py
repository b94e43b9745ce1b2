"""deploybus.cli through click's CliRunner: keys and config commands."""

from __future__ import annotations

import os
import stat
import time

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
        "keys: {trusted: {ci: {key: ci.pub, role: ci}}}\n"
        "projects: {shop: {git: /g/shop}, blog: {git: /g/blog}}\n"
        "environments:\n"
        "  staging: {hosts: [web1, web2], projects: [blog]}\n"
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
    # the unclosed bracket is on line 2, the last; the parser notices at the end
    assert f"{p}:2: not valid YAML" in result.output, result.output
    assert "flow sequence" in result.output


def test_config_check_missing_file(runner, tmp_path):
    result = runner.invoke(cli, ["config", "check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_CONFIG
    assert f"{tmp_path / 'nope.yaml'}: cannot read config" in result.output


def test_commands_needing_config_exit_78_on_a_bad_one(runner, tmp_path):
    p = write_config(tmp_path, "bus: {url: 'redis://x'}\n")
    result = runner.invoke(cli, ["--config", str(p), "history"])
    assert result.exit_code == EXIT_CONFIG
    assert f"config error: {p}:1: bus.url: unsupported bus URL" in result.output


# -- what the CLI refuses before anything is sent, and errors a person can act on ------------

def site(tmp_path, *, signing: str = "ops.key"):  # noqa: ANN201
    """A config on a memory bus of its own (the CLI runs in this process, so the
    test sees what it publishes) with key ``ops``; returns (config path, bus url)."""
    import uuid
    SigningKey.generate("ops").save(tmp_path)
    url = f"memory://cli-{uuid.uuid4().hex}"
    p = write_config(tmp_path, (
        f"bus: {{url: '{url}'}}\n"
        f"keys:\n  signing: {signing}\n  trusted: {{ops: {{key: ops.pub, role: person}}}}\n"
        "  policy: [{signer: ops}]\n"
        "projects: {app: {git: /g/app}}\n"
        "environments: {prod: {hosts: [h1, h2, h3]}}\n"))
    return p, url


def published(url: str) -> list:
    from deploybus import topics
    from deploybus.bus import connect
    bus = connect(url)
    got: list = []
    bus.subscribe(topics.ROLLOUTS, lambda d: (got.append(d.body), d.ack()), queue="spy")
    bus.declare(topics.CONTROL, "spy-control")
    return got


@pytest.mark.parametrize("args, option, message", [
    (["--batch", "150%"], "--batch", "batch percentage must be in (0, 100]"),
    (["--batch", "many"], "--batch", "must be a count or a percentage"),
    (["--canary", "web9"], "--canary", "canary host 'web9' is not in this rollout"),
    (["--pause", "soon"], "--pause", "seconds or 'promote'"),
    (["--hosts", "h1,h9"], "--hosts", "h9 is not in prod (its hosts: h1, h2, h3)"),
])
def test_invalid_strategy_or_hosts_are_refused_before_the_rollout_is_sent(
        runner, tmp_path, args, option, message):  # noqa: ANN001
    p, url = site(tmp_path)
    got = published(url)
    result = runner.invoke(cli, ["-c", str(p), "deploy", "app", "v1", "--env", "prod", *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}" in result.output and message in result.output
    assert got == [], "nothing goes out before the strategy is checked"
    ok = runner.invoke(cli, ["-c", str(p), "deploy", "app", "v1", "--env", "prod"])
    assert ok.exit_code == 0, ok.output
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(got) == 1, "the spy sees a rollout that is sent"


@pytest.mark.parametrize("command", [
    ["deploy", "app", "v1", "--env", "prod"],
    ["rollback", "app", "--env", "prod"],
    ["promote", "deadbeef"],
    ["abort", "deadbeef"],
])
def test_a_missing_signing_key_is_a_clear_error_not_a_traceback(runner, tmp_path,
                                                                command):  # noqa: ANN001
    p, _url = site(tmp_path, signing="keys/deployer.key")
    result = runner.invoke(cli, ["-c", str(p), *command])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    assert "Traceback" not in result.output
    key = tmp_path / "keys" / "deployer.key"
    assert f"{p}:3: keys.signing: cannot read private key {key}: No such file" in result.output
    assert f"deploybus keys generate deployer --dir {key.parent}" in result.output


def test_config_check_checks_the_key_files_it_names(runner, tmp_path):
    p, _url = site(tmp_path, signing="keys")  # a directory, not a key
    (tmp_path / "keys").mkdir()
    result = runner.invoke(cli, ["config", "check", str(p)])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert f"{p}:3: keys.signing: cannot read private key {tmp_path / 'keys'}: Is a directory" \
        in result.output
    (tmp_path / "junk.key").write_text("not a key\n")
    p2, _ = site(tmp_path / "2", signing=str(tmp_path / "junk.key")) \
        if (tmp_path / "2").mkdir() is None else (None, None)
    result = runner.invoke(cli, ["config", "check", str(p2)])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "junk.key is not a usable private key" in result.output


def test_config_check_warns_when_the_signing_key_is_not_trusted_here(runner, tmp_path):
    p, _url = site(tmp_path)
    SigningKey.generate("other").save(tmp_path / "o")
    p.write_text(p.read_text().replace("signing: ops.key", f"signing: {tmp_path}/o/other.key"))
    result = runner.invoke(cli, ["config", "check", str(p)])
    assert result.exit_code == 0, result.output
    assert "warning: the public key of keys.signing" in result.output


def test_control_without_an_orchestrator_says_so_and_expires_unread(runner, tmp_path):
    p, url = site(tmp_path)
    published(url)  # the control queue exists, nobody reads it
    result = runner.invoke(cli, ["-c", str(p), "promote", "deadbeef", "--timeout", "1"])
    assert result.exit_code == 75, result.output
    assert "no answer to promote from the orchestrator within 1s" in result.output
    assert "expires unread and will not be applied" in result.output
    assert f"running on {url}" in result.output
