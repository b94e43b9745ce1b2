"""Nothing lost, nothing sent twice, nothing blocking, nothing believed that
the orchestrator did not sign: retries with backoff, a receiver that is
down or hangs, a restart with notifications pending, a message delivered
twice, forged statuses; and no secret in the logs."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
import structlog

from deploybus import envelope
from deploybus.daemons.notifier.queue import Queue
from deploybus.daemons.notifier.service import Notifier, Retry
from deploybus.protocol import RolloutState
from deploybus.runner import Context, Stats
from tests.conftest import free_port
from tests.notify.conftest import SECRET, Site
from tests.notify.harness import wait_for

pytestmark = pytest.mark.unit


def only_json(r: str, extra: str = "") -> dict[str, str]:
    return {"app": f"""
      webhooks:
        - {{url: "{r}/app", format: json, secret: hook.secret}}{extra}"""}


def test_a_receiver_that_fails_twice_gets_it_on_the_third_try(make_site) -> None:  # noqa: ANN001
    site: Site = make_site(notify=only_json("{R}"))
    site.receiver.script["/app"] = [500, 500]
    notifier = site.notifier(retry=Retry(first=0.2, cap=1.0, attempts=5))
    site.record("r-1")
    site.publish_status(site.final_status("r-1"))
    hits = site.receiver.wait("/app", 1, timeout=15)
    assert len(hits) == 1
    tries = site.receiver.got("/app", status=None)
    assert [h.status for h in tries] == [500, 500, 200]
    # one notification: the same id and the same signed bytes on every try
    assert len({h.headers["X-Deploybus-Delivery"] for h in tries}) == 1
    assert len({h.body for h in tries}) == 1 and tries[-1].signed_by(SECRET)
    # backed off: ~0.1-0.2 s, then ~0.2-0.4 s
    assert tries[1].at - tries[0].at >= 0.09 and tries[2].at - tries[1].at >= 0.19
    assert wait_for(lambda: notifier.report()["notify_sent"] == 1)
    stats = notifier.report()
    assert (stats["notify_failed"], stats["notify_gave_up"]) == (2, 0)
    row, = notifier.queue.rows()  # type: ignore[union-attr]
    assert (row.state, row.attempts, row.last_error) == ("sent", 3, "HTTP 500 Internal Server Error")


def test_a_receiver_that_is_down_is_counted_and_blocks_nothing(make_site) -> None:  # noqa: ANN001
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    site: Site = make_site(notify={"app": f"""
      webhooks:
        - {{url: "{down}"}}
        - {{url: "{{R}}/app", format: json, secret: hook.secret}}
      email: [ops@example.org]"""})
    with structlog.testing.capture_logs() as logs:
        notifier = site.notifier(retry=Retry(first=0.05, cap=0.1, attempts=3))
        for i in range(3):
            site.record(f"r-{i}")
            site.publish_status(site.final_status(f"r-{i}"))
        assert len(site.receiver.wait("/app", 3)) == 3
        assert len(site.mail.wait(3)) == 3
        assert wait_for(lambda: notifier.report()["notify_gave_up"] == 3)
    stats = notifier.report()
    assert stats["notify_sent"] == 6
    assert stats["notify_failed"] == 9  # three tries each
    assert stats["table_gave_up"] == 3 and stats["table_pending"] == 0
    warnings = [e for e in logs if e["event"] == "notification failed; will retry"]
    errors = [e for e in logs if e["event"] == "notification given up"]
    assert len(warnings) == 6 and len(errors) == 3
    port = down.split(":")[2].split("/")[0]
    assert errors[0]["target"] == f"http://127.0.0.1:{port}/…"
    assert errors[0]["log_level"] == "error" and "refused" in errors[0]["error"].lower()
    assert errors[-1]["gave_up"] == 3


def test_a_receiver_that_hangs_holds_up_no_other_target(make_site) -> None:  # noqa: ANN001
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # takes connections, never answers
    try:
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
        site: Site = make_site(notify={"app": f"""
      webhooks:
        - {{url: "{url}"}}
        - {{url: "{{R}}/app"}}
      email: [ops@example.org]"""})
        with structlog.testing.capture_logs() as logs:
            notifier = site.notifier(retry=Retry(first=0.05, cap=0.1, attempts=1),
                                     webhook_timeout=4.0)
            for i in range(2):
                site.record(f"r-{i}")
                site.publish_status(site.final_status(f"r-{i}"))
            assert len(site.receiver.wait("/app", 2)) == 2
            assert len(site.mail.wait(2)) == 2
            # all delivered before the hanging receiver's first try even timed out
            assert not [e for e in logs if e["event"] == "notification given up"]
            assert wait_for(lambda: notifier.report()["notify_gave_up"] == 2, timeout=30)
        assert "timed out" in [e for e in logs if e["event"] == "notification given up"][0][
            "error"]
        assert notifier.report()["notify_sent"] == 4
    finally:
        hang.close()


def test_a_restart_sends_what_was_pending(make_site) -> None:  # noqa: ANN001
    site: Site = make_site(notify=only_json("{R}"))
    table = site.cfg.state_dir / "notifier.db"
    # recorded and acked, never tried: a notifier without workers stops
    first = site.notifier(workers=0)
    site.record("r-1")
    site.publish_status(site.final_status("r-1"))
    assert wait_for(lambda: first.report()["notify_queued"] == 1)
    first.stop(5)
    assert [(r.state, r.attempts) for r in Queue(table).rows()] == [("pending", 0)]
    # tried once, failed, waiting for its next try when the notifier stops
    site.receiver.script["/app"] = [503]
    second = site.notifier(retry=Retry(first=1.0, cap=1.0, attempts=5))
    assert len(site.receiver.wait("/app", 1, status=503)) == 1
    second.stop(5)
    assert [(r.state, r.attempts) for r in Queue(table).rows()] == [("pending", 1)]
    site.record("r-2")
    site.publish_status(site.final_status("r-2"))  # while no notifier runs: waits on the bus
    third = site.notifier()
    hits = site.receiver.wait("/app", 2, timeout=15)
    assert sorted(h.json()["rollout"] for h in hits) == ["r-1", "r-2"]
    failed = site.receiver.got("/app", status=503)[0]
    assert failed.headers["X-Deploybus-Delivery"] in {h.headers["X-Deploybus-Delivery"]
                                                      for h in hits}
    assert wait_for(lambda: third.report()["table_sent"] == 2)
    time.sleep(0.3)
    assert len(site.receiver.got("/app")) == 2


def test_a_message_delivered_twice_sends_once(site: Site) -> None:
    notifier = site.notifier()
    site.record("r-1")
    raw = site.final_status("r-1")
    site.publish_status(raw)
    site.publish_status(raw)  # the broker delivers it again: same envelope id
    # the orchestrator says it again (resumed after a restart): another envelope
    site.publish_status(site.final_status("r-1"))
    site.record("r-2")
    site.publish_status(site.final_status("r-2"))  # a marker: the ones before were handled
    assert len(site.receiver.wait("/app", 2)) == 2
    assert wait_for(lambda: notifier.report()["notify_sent"] == 6)
    time.sleep(0.3)
    assert [h.json()["rollout"] for h in site.receiver.got("/app")] == ["r-1", "r-2"]
    assert len(site.receiver.got("/app-slack")) == 2 and len(site.mail.messages) == 2
    assert notifier.report()["notify_duplicate"] == 6  # 2 repeats x 3 targets


def test_a_status_the_orchestrator_did_not_sign_causes_nothing(site: Site) -> None:
    notifier = site.notifier()
    site.record("r-1")
    forged = [
        site.final_status("r-1", key=None),          # unsigned
        site.final_status("r-1", key="alice"),       # a person may not send statuses
        site.final_status("r-1", key="stranger"),    # a key nobody trusts
    ]
    signed = envelope.decode(site.final_status("r-1", succeeded=0, failed=2))
    tampered = dataclasses.replace(signed, body={**signed.body, "failed": 1})
    forged.append(tampered.encode())
    # ci.build is the CI's to sign, not the orchestrator's
    for raw in forged:
        site.publish_status(raw)
    site.build("app", "FAILURE", key="ops")
    # a control answer naming a final state, and a host settling: no notification
    site.publish_status(site.status_bytes("r-1", state=RolloutState.FAILED, control="abort",
                                          control_id="c" * 32, control_refused="finished"))
    site.publish_status(site.status_bytes("r-1", state=RolloutState.RUNNING, host="h2",
                                          host_state="failed", done=2, total=2))
    site.record("r-2")
    site.publish_status(site.final_status("r-2"))  # the real one, after all of them
    hits = site.receiver.wait("/app", 1)
    assert wait_for(lambda: notifier.report()["notify_sent"] == 3)
    time.sleep(0.3)
    assert [h.json()["rollout"] for h in site.receiver.got("/app")] == ["r-2"]
    assert hits[0].json()["hosts"] == {"total": 2, "succeeded": 1, "failed": 1}
    assert len(site.mail.messages) == 1
    stats = notifier.ctx.stats
    assert stats["untrusted"] == 5 and stats["rejected"] == 5
    assert [r.source for r in notifier.queue.rows()] == ["rollout:r-2:finished"] * 3  # type: ignore[union-attr]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_no_secret_in_the_logs(make_site) -> None:  # noqa: ANN001
    token = "XoXb9SlackPathToken77"
    site: Site = make_site(smtp_login=("notify", "smtp-pass-w0rd"), notify={"app": f"""
      webhooks:
        - {{url: "{{R}}/services/T01/B02/{token}", format: slack, secret: hook.secret}}
        - {{url: "http://user:basic-pass-99@127.0.0.1:{free_port()}/x"}}
        - {{url: "{{R}}/app", format: json, secret: hook.secret}}
      email: [ops@example.org]"""})
    site.receiver.script[f"/services/T01/B02/{token}"] = [500]
    with structlog.testing.capture_logs() as logs:
        notifier = site.notifier(retry=Retry(first=0.05, cap=0.1, attempts=2))
        site.record("r-1")
        site.publish_status(site.final_status("r-1"))
        assert len(site.receiver.wait(f"/services/T01/B02/{token}", 1)) == 1
        mails = site.mail.wait(1)
        assert wait_for(lambda: notifier.report()["notify_gave_up"] == 1)
    assert site.mail.logins == ["notify"]  # logged in with the credentials file
    assert mails[0][2]["Subject"].startswith("[deploybus] app v2 to prod: halted")
    slack = site.receiver.got(f"/services/T01/B02/{token}")[0]
    assert slack.signed_by(SECRET)  # a slack webhook with a secret is signed too
    text = "\n".join(str(e) for e in logs)
    assert "notification failed; will retry" in text and "notification given up" in text
    for secret in (token, SECRET.decode(), "smtp-pass-w0rd", "basic-pass-99"):
        assert secret not in text, secret
    rows = notifier.queue.rows()  # type: ignore[union-attr]
    assert all(SECRET.decode() not in str(r) for r in rows)  # the table holds the path only


def test_a_state_database_that_is_away_loses_no_status(site: Site) -> None:
    # a notifier whose state database cannot be opened (its directory is missing)
    away = dataclasses.replace(site.cfg, state_url=f"sqlite:///{site.tmp / 'gone' / 's.db'}")
    with structlog.testing.capture_logs() as logs:
        blind = Notifier(Context(config=away, bus=site.bus, host="n", stats=Stats()),
                         retry=Retry(first=0.05))
        blind.start()
        site.record("r-1")
        site.publish_status(site.final_status("r-1"))
        assert wait_for(lambda: blind.report()["notify_store_errors"] >= 2)
        blind.stop(5)  # the status goes back to the broker, unacked
    assert any(e["event"].startswith("cannot read the rollout from the state database")
               and e["log_level"] == "warning" for e in logs)
    assert blind.ctx.stats["rejected"] == 0 and blind.report()["notify_queued"] == 0
    notifier = site.notifier()
    assert len(site.receiver.wait("/app", 1)) == 1
    assert site.receiver.got("/app")[0].json()["rollout"] == "r-1"
    assert wait_for(lambda: notifier.report()["notify_sent"] == 3)


def test_a_rollout_the_state_database_does_not_know_is_a_warning(site: Site) -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = site.notifier()
        site.publish_status(site.final_status("r-unknown"))
        assert wait_for(lambda: notifier.report()["notify_unknown_rollout"] == 1)
    assert any("does not know" in e["event"] and e["rollout"] == "r-unknown" for e in logs)
    assert notifier.report()["notify_queued"] == 0
