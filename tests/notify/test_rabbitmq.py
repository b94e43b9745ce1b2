"""On real RabbitMQ, with real processes: the orchestrator, two agents
running real scripts, and ``deploybus notifier``. A rollout fails on a
host; the failed notification arrives at a webhook (signed) and in a
mailbox, naming that rollout and host."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import broker_url
from tests.e2e.cluster import Cluster
from tests.notify.harness import Mailbox, Receiver, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

SECRET = b"e2e-notify-secret"
SCRIPTS = {"post": 'if [ -e "../../fail-$DEPLOYBUS_REF" ]; then echo "marker says fail"; '
                   'exit 4; fi'}


def test_a_real_failed_rollout_is_notified(request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    receiver, mail = Receiver(), Mailbox()
    (tmp_path / "hook.secret").write_bytes(SECRET)
    url = broker_url("rabbitmq-amqp", request, f"n{uuid.uuid4().hex[:10]}")
    c = Cluster(tmp_path / "c", url, ["h1", "h2"], app_scripts=SCRIPTS,
                top_extra=f"smtp: {{host: 127.0.0.1, port: {mail.port}, "
                          f"from: deploybus@example.org}}\n",
                app_extra=f"""\
    notify:
      events: [started, failed]
      webhooks:
        - {{url: "{receiver.url('/hook')}", format: json, secret: {tmp_path / 'hook.secret'}}}
      email: [ops@example.org]
""")
    c.base.mkdir()
    try:
        c.setup()
        c.commit_and_tag("v1.0")
        c.push("main", "v1.0")
        c.start_all(fetchers=False)
        notifier = c.start("notifier", "notifier")
        assert notifier.ready.wait(60), "".join(notifier.lines[-30:])
        fail = c.root("h1") / "app"
        fail.mkdir(parents=True)
        (fail / "fail-v1.0").write_text("")

        r = c.deploy("app", "v1.0")
        assert r.returncode == 1, r.stdout + c.logs()
        rollout = c.history()[0]["id"]

        hits = receiver.wait("/hook", 2, timeout=30)
        assert [h.json()["event"] for h in hits] == ["started", "failed"], \
            c.logs("notifier")
        failed = hits[1].json()
        assert failed["rollout"] == rollout and failed["project"] == "app"
        assert failed["environment"] == "prod" and failed["ref"] == "refs/tags/v1.0"
        assert failed["hosts"] == {"total": 2, "succeeded": 0, "failed": 1}
        assert [h["host"] for h in failed["failed_hosts"]] == ["h1"]
        assert "marker says fail" in failed["failed_hosts"][0]["message"]
        assert failed["halted"] is True and failed["user"] == "deployer"
        assert all(h.signed_by(SECRET) for h in hits)
        assert hits[1].headers["X-Deploybus-Event"] == "failed"

        assert wait_for(lambda: len(mail.messages) >= 2, 30)
        subjects = sorted(str(m["Subject"]) for m in mail.to("ops@example.org"))
        assert f"[deploybus] app v1.0 to prod: halted, failed on 1 of 2 hosts (h1) " \
               f"(rollout {rollout})" in subjects, subjects
        assert wait_for(lambda: sum('"notification sent"' in ln for ln in notifier.lines)
                        >= 4, 10), c.logs("notifier")
        assert notifier.stop() == 0
        assert not any('"level": "error"' in ln for ln in notifier.lines), c.logs("notifier")
    finally:
        c.stop()
        receiver.close()
        mail.close()
