"""The walking skeleton, end to end, on every real broker path.

A bare repo with the post-receive hook; for each of three hosts (different
names, roots and state directories on this machine) a repo_fetcher and a
deploy_agent process; one orchestrator process. A pushed tag reaches the
hosts' mirrors through the hook, and ``deploybus deploy --wait`` lands it
on all three. Then the failure cases: a missing tag, a failing post script,
unsigned and unknown-key requests, and garbage on every topic.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deploybus import envelope, topics
from deploybus.bus import DEADLETTER_QUEUE, DEADLETTER_TOPIC, Delivery, connect
from deploybus.outbox import Outbox
from deploybus.signing import SigningKey
from tests.conftest import REAL_BROKERS, broker_url
from tests.e2e.cluster import Cluster, git, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

HOSTS = ["h1", "h2", "h3"]


@pytest.fixture(scope="module", params=REAL_BROKERS)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    url = broker_url(request.param, request, f"e{uuid.uuid4().hex[:10]}")
    c = Cluster(tmp_path_factory.mktemp(request.param), url, HOSTS)
    c.setup()
    # Dead letters go to a durable queue; make sure it exists before anything fails.
    with connect(url) as bus:
        bus.declare(DEADLETTER_TOPIC, DEADLETTER_QUEUE)
    c.start_all()
    yield c
    c.stop()


def targets(c: Cluster, project: str = "app") -> dict[str, str | None]:
    return {h: (os.readlink(c.current(h, project)) if c.current(h, project).is_symlink()
                else None) for h in HOSTS}


def mirror_has(c: Cluster, host: str, ref: str) -> bool:
    mirror = c.state(host) / "mirrors" / "app.git"
    r = subprocess.run(["git", "--git-dir", str(mirror), "rev-parse", "--verify", "-q",
                        f"{ref}^{{commit}}"], capture_output=True, text=True)
    return r.returncode == 0


def test_pushed_tag_reaches_mirrors_and_lands_on_every_host(cluster: Cluster) -> None:
    commit = cluster.commit_and_tag("v1.0")
    cluster.push("main", "v1.0")
    # The hook published git.push; every fetcher fetched its mirror.
    assert wait_for(lambda: all(mirror_has(cluster, h, "v1.0") for h in HOSTS), 30), \
        cluster.logs()
    r = cluster.deploy("app", "v1.0")
    assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()
    for h in HOSTS:
        assert f"[{h}] succeeded" in r.stdout
        cur = cluster.current(h)
        assert cur.is_symlink() and os.readlink(cur).startswith("releases/")
        assert (cur / "VERSION").read_text() == "v1.0\n"
        assert (cur / "file4.txt").exists()
        assert not (cur / ".git").exists()
        assert (cluster.root(h) / "app" / "app.pre.log").read_text() == f"pre v1.0 on {h}\n"
        info = json.loads((cluster.root(h) / "app" / ".deploybus" / "releases"
                           / f"{cur.resolve().name}.json").read_text())
        assert info["commit"] == commit and info["state"] == "ok"


def test_missing_tag_is_refused_and_leaves_current(cluster: Cluster) -> None:
    """The orchestrator resolves the ref on the git server before it asks any
    host: a tag that is not there refuses the rollout (exit 77)."""
    before = targets(cluster)
    r = cluster.deploy("app", "v9.9")
    assert r.returncode == 77, r.stdout + r.stderr
    rid = r.stdout.split()[1].rstrip(":")
    assert f"rollout {rid} refused: no tag or branch v9.9 in {cluster.bare}" in r.stdout
    assert targets(cluster) == before
    assert all(e["rollout"] != rid for h in HOSTS for e in cluster.audit(h)), "no host asked"


def test_failing_post_script_stops_rollout_and_keeps_old_release(cluster: Cluster) -> None:
    # "broken" passes its smoke test on v1.0 only.
    cluster.config.write_text(cluster.config.read_text().replace(
        'post: echo "smoke test failed" && exit 3',
        'post: grep -q v1.0 VERSION || { echo "smoke test failed"; exit 3; }'))
    for d in cluster.daemons:
        assert d.alive()
    # Agents read the config at start: restart them to pick up the new script.
    for d in [d for d in cluster.daemons if d.name.startswith("agent-")]:
        assert d.stop() == 0, "warm stop exits 0"
        cluster.daemons.remove(d)
    agents = [cluster.start(f"agent-{h}", "agent", "--host", h) for h in HOSTS]
    assert all(a.ready.wait(60) for a in agents), cluster.logs()

    ok = cluster.deploy("broken", "v1.0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    good = targets(cluster, "broken")
    cluster.commit_and_tag("v2.0")
    cluster.push("main", "v2.0")
    r = cluster.deploy("broken", "v2.0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "smoke test failed" in r.stdout
    assert "exit code 3" in r.stdout
    assert "[h1] failed" in r.stdout
    assert "[h2]" not in r.stdout and "[h3]" not in r.stdout, "rollout stops at the first failure"
    assert targets(cluster, "broken") == good
    for h in HOSTS:
        assert (cluster.current(h, "broken") / "VERSION").read_text() == "v1.0\n"
    hist = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(cluster.config),
                           "history", "--json"], capture_output=True, text=True, env=cluster.env)
    last = json.loads(hist.stdout)[0]
    assert last["state"] == "failed" and last["ref"] == "refs/tags/v2.0"
    assert last["commit"] == git("rev-parse", "v2.0^{commit}", cwd=cluster.work).strip()
    assert [s["state"] for s in last["hosts"]] == ["failed", "skipped", "skipped"]


def _request(key: SigningKey | None, ref: str = "v1.0") -> envelope.Envelope:
    rid = uuid.uuid4().hex[:16]
    env = envelope.new("deploy.request", {"rollout": rid, "project": "app", "environment": "prod",
                                          "ref": ref, "host": "h1", "user": "mallory"},
                       sender="attacker@nowhere", correlation=rid, ttl=300)
    return key.sign(env) if key else env


def test_requests_not_from_the_orchestrator_are_dead_lettered_not_answered(
        cluster: Cluster) -> None:
    """Unsigned, unknown-key, tampered and person-signed requests (a person may
    ask the orchestrator for a rollout, never an agent directly): each is
    dead-lettered with its reason, counted, not answered, not audited, and
    nothing moves."""
    before = targets(cluster)
    unsigned, stranger = _request(None), _request(SigningKey.generate("stranger"))
    tampered_src = SigningKey.load(cluster.key("orchestrator")).sign(_request(None))
    tampered = envelope.Envelope(**{**tampered_src.__dict__,
                                    "body": {**tampered_src.body, "ref": "v2.0"}})
    person = _request(SigningKey.load(cluster.key("deployer")))
    sent = {env.correlation: env for env in (unsigned, stranger, tampered, person)}
    letters: queue.Queue[dict] = queue.Queue()
    results: queue.Queue[dict] = queue.Queue()

    def on_letter(d: Delivery) -> None:
        letters.put(json.loads(d.body))
        d.ack()

    def on_event(d: Delivery) -> None:
        env = envelope.decode(d.body)
        if env.type == "deploy.result" and env.correlation in sent:
            results.put(env.body)
        d.ack()

    with connect(cluster.bus_url) as bus:
        bus.subscribe(topics.EVENTS, on_event)
        bus.subscribe(DEADLETTER_TOPIC, on_letter, queue=DEADLETTER_QUEUE)
        for env in sent.values():
            bus.publish(topics.requests_for("h1"), env.encode())
        reasons = {}
        while len(reasons) < len(sent):
            letter = letters.get(timeout=30)
            body = json.loads(letter["body"])
            if body.get("correlation") in sent and letter["daemon"] == "deploy_agent":
                reasons[body["correlation"]] = letter["reason"]
    assert reasons[unsigned.correlation] == "untrusted message: message is not signed"
    assert "signed by unknown key" in reasons[stranger.correlation]
    assert "bad signature" in reasons[tampered.correlation]
    assert reasons[person.correlation] == \
        "untrusted message: deployer (person) may not send deploy.request"
    assert results.empty(), "an untrusted request was answered"
    assert not [e for e in cluster.audit("h1") if e["rollout"] in sent], \
        "an untrusted request was audited under the name it gave"
    assert targets(cluster) == before


GARBAGE = [b"\xff\xfe\x00 definitely not json", b'{"v": 1}', b"[1, 2, 3]",
           b'{"v": 1, "id": "0123456789", "type": "git.push", "at": "yesterday", '
           b'"expires": null, "sender": "x", "correlation": null, "body": {}, "sig": null}']


def test_garbage_on_every_topic_is_dead_lettered_and_daemons_keep_running(
        cluster: Cluster) -> None:
    # topic -> the daemons consuming it
    consumers = {topics.GIT_COMMITS: [f"fetcher-{h}" for h in HOSTS] + [],
                 topics.ROLLOUTS: ["orchestrator"], topics.EVENTS: ["orchestrator"],
                 topics.PRESENCE: ["orchestrator"],
                 **{topics.requests_for(h): [f"agent-{h}"] for h in HOSTS}}
    letters: queue.Queue[dict] = queue.Queue()

    def on_letter(d: Delivery) -> None:
        letters.put(json.loads(d.body))
        d.ack()

    with connect(cluster.bus_url) as bus:
        for topic in consumers:
            for body in GARBAGE:
                bus.publish(topic, body)
        expected = sum(len(v) for v in consumers.values()) * len(GARBAGE)
        bus.subscribe(DEADLETTER_TOPIC, on_letter, queue=DEADLETTER_QUEUE)
        seen: dict[tuple[str, str], int] = {}
        assert wait_for(lambda: _drain(letters, seen) >= expected, 60), (seen, cluster.logs())
    for topic, daemons in consumers.items():
        for daemon_name in daemons:
            kind = daemon_name.split("-")[0]
            key = {"fetcher": "repo_fetcher", "agent": "deploy_agent"}.get(kind, kind)
            assert seen.get((topic, key), 0) >= len(GARBAGE), (topic, key, seen)
    for d in cluster.daemons:
        assert d.alive(), f"{d.name} died:\n{''.join(d.lines[-30:])}"
    # ... and they still work.
    r = cluster.deploy("app", "v2.0")
    assert r.returncode == 0, r.stdout + r.stderr + cluster.logs()
    for h in HOSTS:
        assert (cluster.current(h) / "VERSION").read_text() == "v2.0\n"


def _drain(q: queue.Queue[dict], seen: dict[tuple[str, str], int]) -> int:
    while True:
        try:
            letter = q.get_nowait()
        except queue.Empty:
            return sum(seen.values())
        if letter.get("reason", "").startswith("invalid message"):
            k = (letter["topic"], letter["daemon"])
            seen[k] = seen.get(k, 0) + 1


def test_mirror_hook_tolerates_a_dead_bus(cluster: Cluster, tmp_path: Path) -> None:
    """A push never fails or waits because of deploybus: with the bus dead the
    hook queues the push in the outbox, says so, and exits 0."""
    cfg = cluster.base / "dead.yaml"
    cfg.write_text(cluster.config.read_text().replace(
        cluster.bus_url, "amqp://guest:guest@127.0.0.1:1//"))
    bare = tmp_path / "other.git"
    git("init", "--bare", "-q", str(bare), cwd=tmp_path)
    env = {**cluster.env, "DEPLOYBUS_CONFIG": str(cfg)}
    r = subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(cfg), "hook",
                        "install", str(bare), "--project", "app", "--outbox",
                        str(tmp_path / "outbox.db")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cluster.commit_and_tag("v-dead")  # (a main to push when this test runs alone)
    started = time.monotonic()
    out = git("push", "-q", str(bare), "main", cwd=cluster.work)
    assert "1 push event for app queued for the bus" in out
    assert time.monotonic() - started < 5, "the hook does not wait for the bus"
    with Outbox(tmp_path / "outbox.db") as box:
        assert [r.body["ref"] for r in box.pending()] == ["refs/heads/main"]
