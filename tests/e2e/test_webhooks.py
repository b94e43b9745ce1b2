"""Forge webhooks end to end: a signed GitHub push and a signed Gitea push
posted to a running ``deploybus listener`` process on RabbitMQ (AMQP) reach
every host's fetcher, whose mirror then has the pushed commit. The bare
repository has no post-receive hook here: only the webhooks can have told
the fetchers. The payloads are the forges' documented ones
(tests/listener/payloads/) with this repository's commits put in."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import broker_url, free_port
from tests.e2e.cluster import Cluster, git, wait_for

pytestmark = [pytest.mark.broker]

HOSTS = ["h1", "h2"]
SECRET = b"webhook secret"
PAYLOADS = Path(__file__).parents[1] / "listener" / "payloads"


def mirror_has(c: Cluster, host: str, commit: str) -> bool:
    mirror = c.state(host) / "mirrors" / "app.git"
    return subprocess.run(["git", "--git-dir", str(mirror), "cat-file", "-e",
                           f"{commit}^{{commit}}"], capture_output=True).returncode == 0


def new_commit(c: Cluster, text: str) -> tuple[str, str]:
    old = git("rev-parse", "HEAD", cwd=c.work).strip()
    (c.work / "VERSION").write_text(text + "\n")
    git("add", "-A", cwd=c.work)
    git("commit", "-q", "-m", text, cwd=c.work)
    new = git("rev-parse", "HEAD", cwd=c.work).strip()
    c.push("main")
    return old, new


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Cluster:
    url = broker_url("rabbitmq-amqp", request, f"wh{uuid.uuid4().hex[:8]}")
    c = Cluster(tmp_path / "c", url, HOSTS,
                app_extra="    webhook: {secret: webhook.secret, repository: team/app}\n")
    c.base.mkdir()
    (c.base / "webhook.secret").write_bytes(SECRET)
    c.setup()
    (c.bare / "hooks" / "post-receive").unlink()
    git("commit", "-q", "--allow-empty", "-m", "root", cwd=c.work)
    c.push("main")
    yield c
    c.stop()
    c.save_logs()


def test_signed_github_and_gitea_pushes_reach_the_fetchers(cluster: Cluster) -> None:
    port = free_port()
    listener = cluster.start("listener", "--key", str(cluster.key("git")), "listener",
                             "--bind", f"127.0.0.1:{port}")
    assert listener.ready.wait(60), cluster.logs("listener")
    for h in HOSTS:
        fetcher = cluster.start(f"fetcher-{h}", "fetcher", "--host", h)
        assert fetcher.ready.wait(60), cluster.logs(f"fetcher-{h}")
    url = f"http://127.0.0.1:{port}/hooks"

    old, new = new_commit(cluster, "from github")
    gh = json.loads((PAYLOADS / "github-push.json").read_text())
    gh.update(ref="refs/heads/main", before=old, after=new)
    gh["repository"]["full_name"] = "team/app"
    gh["head_commit"] = gh["commits"][-1] | {"id": new}
    gh["commits"] = [gh["commits"][-1] | {"id": new}]
    body = json.dumps(gh).encode()
    status, answer = post(url, body, {
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()})
    assert (status, answer) == (202, {"queued": 1})
    assert wait_for(lambda: all(mirror_has(cluster, h, new) for h in HOSTS), 30), \
        cluster.logs()

    old, new = new_commit(cluster, "from gitea")
    gt = json.loads((PAYLOADS / "gitea-push.json").read_text())
    gt.update(ref="refs/heads/main", before=old, after=new)
    gt["repository"]["full_name"] = "team/app"
    gt["commits"] = [gt["commits"][0] | {"id": new}]
    body = json.dumps(gt).encode()
    status, answer = post(url, body, {
        "Content-Type": "application/json", "X-Gitea-Event": "push",
        "X-Gitea-Delivery": str(uuid.uuid4()),
        "X-Gitea-Signature": hmac.new(SECRET, body, hashlib.sha256).hexdigest()})
    assert (status, answer) == (202, {"queued": 1})
    assert wait_for(lambda: all(mirror_has(cluster, h, new) for h in HOSTS), 30), \
        cluster.logs()
    for h in HOSTS:
        log = "".join(cluster.daemon(f"fetcher-{h}").lines)
        assert log.count('"mirror updated"') >= 3  # the start, then each webhook
