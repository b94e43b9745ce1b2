"""The README's "Using it on real servers" section works as written.

The commands of its first shell block are read from README.md and run in
order, on RabbitMQ, with two hosts on this machine set up the way its
"Which host a daemon is" part says (each daemon with ``--host``, each host
with its own ``root`` and ``state_dir``). Only paths are changed: the
section's ``/etc/deploybus``, ``/srv`` and ``/var/lib`` live under the
test's directory, and the config is found through ``DEPLOYBUS_CONFIG``
instead of the default path. A command the README changes is run as it
now reads."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import broker_url, free_port
from tests.e2e.cluster import GIT_ENV, Daemon, git

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## Using it on real servers")
    return text[start:text.index("\n## ", start + 1)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_server_section_works_as_written(request: pytest.FixtureRequest,
                                             tmp_path: Path) -> None:
    text = section()
    commands = [ln.split("#", 1)[0].strip() for ln in blocks(text, "sh")[0].splitlines()]
    commands = [c for c in commands if c]
    keys_yaml = yaml.safe_load(blocks(text, "yaml")[0])["keys"]
    hosts_yaml = yaml.safe_load(blocks(text, "yaml")[1])["hosts"]
    assert set(hosts_yaml) == {"web1", "web2"}, hosts_yaml
    variables: dict[str, str] = {}

    def here(value: str) -> str:
        for name, v in variables.items():
            value = value.replace(f"${name}", v)
        for real in ("/etc/deploybus", "/srv", "/var/lib"):
            value = value.replace(real, str(tmp_path / real.strip("/")))
        return value

    etc = Path(here("/etc/deploybus"))
    config = etc / "deploybus.yaml"
    bare = Path(here("/srv/git/app.git"))
    bare.parent.mkdir(parents=True)
    git("init", "--bare", "-q", str(bare), cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "VERSION").write_text("1.4.2\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "1.4.2", cwd=work)
    git("tag", "v1.4.2", cwd=work)

    url = broker_url("rabbitmq-amqp", request, f"r{uuid.uuid4().hex[:10]}")
    hosts = {h: {k: here(v) for k, v in spec.items()} for h, spec in hosts_yaml.items()}
    etc.mkdir(parents=True)
    config.write_text(yaml.safe_dump({
        "bus": {"url": url},
        "keys": keys_yaml,  # as the README gives them
        "state": {"url": "sqlite:///state.db"},
        "hosts": hosts,
        "projects": {"app": {"git": str(bare), "scripts": {"post": "test -f VERSION"}}},
        "environments": {"production": {"hosts": sorted(hosts)}},
    }))
    env = {**os.environ, **GIT_ENV, "DEPLOYBUS_CONFIG": str(config),
           "DEPLOYBUS_LOG_LEVEL": "info"}
    daemons: list[Daemon] = []

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploybus.cli", *args], env=env,
                              capture_output=True, text=True, timeout=180)

    def start(name: str, args: list[str]) -> None:
        d = Daemon(name, args, env)
        daemons.append(d)
        assert d.ready.wait(60), f"{name} not ready:\n{''.join(d.lines[-30:])}"

    seen: list[str] = []
    try:
        for command in commands:
            if "|" in command or "ROLLOUT" in command:
                continue  # a placeholder line: deploybus pause|resume|promote|abort ROLLOUT
            if re.fullmatch(r"[A-Z]+=\S+", command):
                name, value = command.split("=", 1)
                variables[name] = value  # made local by here() where used
                continue
            for one in command.split(";"):
                words = [here(w) for w in shlex.split(one.replace("[--to RELEASE]", ""))]
                assert words[0] == "deploybus", one
                args = words[1:]
                sub = args[2] if args[0] == "--key" else args[0]
                seen.append(sub)
                if args[:2] == ["keys", "generate"] and "host" in args:
                    for h in sorted(hosts):  # "each host, named after it"
                        r = run(["keys", "generate", h, *args[3:]])
                        assert r.returncode == 0, r.stderr
                        assert f"{h}: {{key: " in r.stdout and "role: host}" in r.stdout
                    continue
                if sub == "orchestrator":
                    start("orchestrator", args)
                elif sub in ("agent", "fetcher", "keepalive"):
                    for h in sorted(hosts):  # as "Which host a daemon is" says
                        start(f"{sub}-{h}", [*args, "--host", h])
                elif sub == "web":
                    start("web", [a if a != "8080" else str(free_port()) for a in args])
                elif sub == "hook":
                    # the section pushes nothing; the hook must be in place
                    r = run(args)
                    assert r.returncode == 0, r.stderr
                    git("push", "-q", str(bare), "main", "v1.4.2", cwd=work)
                else:
                    r = run(args)
                    assert r.returncode == 0, f"{one}\n{r.stdout}{r.stderr}\n" + "\n".join(
                        "".join(d.lines[-15:]) for d in daemons)
                    if sub == "deploy" and "-v" in args:
                        assert "[web1] switch:" in r.stdout, r.stdout
                    if sub == "hosts":
                        rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[1:]}
                        assert rows == {"web1": "up", "web2": "up"}, r.stdout
        assert {"keys", "config", "hook", "orchestrator", "agent", "fetcher", "keepalive",
                "web", "deploy", "rollback", "lock", "history", "hosts", "locks",
                "audit"} <= set(seen), seen
        for h, spec in hosts.items():
            assert (Path(spec["root"]) / "app" / "current" / "VERSION").exists(), h
        trail = json.loads(run(["audit", "--json"]).stdout)
        assert {"accepted", "lock"} <= {a["action"] for a in trail}
    finally:
        for d in reversed(daemons):
            d.stop()
