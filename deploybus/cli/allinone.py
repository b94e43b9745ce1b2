"""``deploybus up``: every daemon, the hosts' agents and the web in one process.

It runs on the in-process bus (``memory://``) with a sample project, so a
newcomer can deploy something a minute after installing. Every host the
config's environments name gets its fetcher, agent and keepalive here
(the sample config has one, ``local``; each host needs a ``root`` and
``state_dir`` of its own). The data directory
holds everything (created on first run, reused after)::

    <data>/deploybus.yaml   the config it runs with (edit it, restart)
    <data>/keys/            the web's, the orchestrator's and host local's keys
    <data>/git/sample.git   the sample project's repository (tags v1.0.0, v1.1.0)
    <data>/deploy/          deploy root of host "local": sample/current, releases/
    <data>/state/ state.db  mirrors, agent journal, rollout store
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import structlog

from deploybus import config as configmod
from deploybus.bus import connect
from deploybus.runner import EXIT_CONFIG, Context, Runner, Service
from deploybus.signing import SigningKey

log = structlog.get_logger("deploybus.up")

HOST = "local"

#: Keys made in <data>/keys on first run: the web's, the orchestrator's, host local's.
KEYS = ("web", "orchestrator", HOST)

CONFIG = """\
# deploybus up: the all-in-one config. Everything runs in one process on the
# in-process bus; see docs/configuration.md for every key.
bus:
  url: memory://deploybus-up
keys:
  # every message is signed; each key has a role (docs/security.md)
  trusted:
    web: {key: keys/web.pub, role: web}
    orchestrator: {key: keys/orchestrator.pub, role: orchestrator}
    local: {key: keys/local.pub, role: host}
  policy:
    - signer: web
      projects: ["*"]
      environments: ["*"]
state:
  url: sqlite:///state/state.db
hosts:
  local:
    root: deploy
    state_dir: state/local
    heartbeat: 3
    signing: keys/local.key
projects:
  sample:
    git: git/sample.git
    keep: 5
    script_timeout: 60
    scripts:
      pre: echo "preparing $DEPLOYBUS_PROJECT $DEPLOYBUS_REF for $DEPLOYBUS_USER"
      post: test -f index.html && echo "release $DEPLOYBUS_RELEASE looks complete"
environments:
  demo:
    hosts: [local]
"""


def _git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "deploybus", "GIT_AUTHOR_EMAIL": "up@deploybus.invalid",
           "GIT_COMMITTER_NAME": "deploybus", "GIT_COMMITTER_EMAIL": "up@deploybus.invalid"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_sample_repo(bare: Path) -> None:
    """A small repository with two tagged releases."""
    bare.parent.mkdir(parents=True, exist_ok=True)
    _git("init", "--bare", "-q", str(bare), cwd=bare.parent)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _git("init", "-q", "-b", "main", cwd=work)
        for version in ("1.0.0", "1.1.0"):
            (work / "index.html").write_text(
                f"<!doctype html><title>sample {version}</title><h1>sample {version}</h1>\n")
            (work / "VERSION").write_text(version + "\n")
            _git("add", "-A", cwd=work)
            _git("commit", "-q", "-m", f"sample {version}", cwd=work)
            _git("tag", f"v{version}", cwd=work)
        _git("push", "-q", str(bare), "main", "--tags", cwd=work)


def prepare(data: Path) -> Path:
    """Create the data directory on first run; return the config path."""
    data.mkdir(parents=True, exist_ok=True)
    cfg = data / "deploybus.yaml"
    for name in KEYS:
        if not (data / "keys" / f"{name}.key").exists():
            SigningKey.generate(name).save(data / "keys")
    if not (data / "git" / "sample.git").exists():
        make_sample_repo(data / "git" / "sample.git")
    (data / "state").mkdir(exist_ok=True)
    if not cfg.exists():
        cfg.write_text(CONFIG)
    return cfg


def run(data: Path, *, bind: str = "127.0.0.1", port: int = 8080) -> int:
    from deploybus.daemons.deploy_agent.agent import DeployAgent
    from deploybus.daemons.keepalive.service import Keepalive
    from deploybus.daemons.orchestrator.service import Orchestrator
    from deploybus.daemons.repo_fetcher.service import RepoFetcher
    from deploybus.frontend.server import WebServer
    from deploybus.store import Store

    data = data.resolve()
    if (data / "keys" / "deploybus.key").exists() and not (data / "keys" / "web.key").exists():
        log.error("config error", error=f"{data} was made by an older deploybus (one key for "
                                        f"everything); move it away or delete it, and "
                                        f"`deploybus up` makes a new one")
        return EXIT_CONFIG
    try:
        cfg = configmod.load(prepare(data))
        web_key = cfg.load_signing_key(path=data / "keys" / "web.key")
        orchestrator_key = cfg.load_signing_key(path=data / "keys" / "orchestrator.key")
        host_keys = {h: cfg.load_signing_key(h) for h in dict.fromkeys(
            h for e in cfg.environments.values() for h in e.hosts)}
    except configmod.ConfigError as exc:
        log.error("config error", error=str(exc))
        return EXIT_CONFIG
    hosts = list(dict.fromkeys(h for e in cfg.environments.values() for h in e.hosts))
    places: dict[Path, str] = {}
    for host in hosts:
        hc = cfg.host(host)
        for place in (hc.root, hc.state_dir):
            if place in places:
                log.error("config error", error=f"{cfg.path}: hosts {places[place]} and {host} "
                                                f"share {place}: give each host its own root "
                                                f"and state_dir under hosts:")
                return EXIT_CONFIG
            places[place] = host
    bus = connect(cfg.bus_url, client_name="up")
    ctx = Context(config=cfg, bus=bus, host=hosts[0] if hosts else HOST,
                  signing_key=orchestrator_key)
    store = Store(cfg.state_url)
    services: list[Service] = [Orchestrator(ctx, store)]
    for host in hosts:
        hctx = Context(config=cfg, bus=bus, host=host, signing_key=host_keys[host],
                       stats=ctx.stats)
        services += [RepoFetcher(hctx), DeployAgent(hctx), Keepalive(hctx)]
    daemons = list(services)
    wctx = Context(config=cfg, bus=bus, host=ctx.host, signing_key=web_key, stats=ctx.stats)
    web = WebServer(wctx, bind=bind, port=port, store=store,
                    healthy=lambda: all(s.healthy() for s in daemons))
    services.append(web)
    print(f"deploybus is up: open http://{bind}:{web.port}/ and deploy 'sample' "
          f"(tags v1.0.0, v1.1.0) to 'demo'.\n  data: {data}\n  deploys land in "
          f"{data / 'deploy' / 'sample'}\n  Ctrl-C stops.", flush=True)
    try:
        return Runner(services, name="up").run()
    finally:
        bus.close()
