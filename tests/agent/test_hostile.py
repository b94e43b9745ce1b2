"""Property-based: malformed envelopes and hostile requests thrown at a running
agent (in this process, on the memory bus) never crash it, never reach git
or a script, and each one comes back as a dead letter (malformed, unsigned,
or not signed by an orchestrator key) or, for a request the orchestrator's
key signed, a refused result with a reason. Afterwards the same agent still
deploys."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploybus import envelope
from deploybus.errors import RefError
from deploybus.refs import check_ref
from deploybus.signing import SigningKey

pytestmark = pytest.mark.unit

HOSTILE_REFS = [
    "--upload-pack=touch /tmp/pwned", "-c", "--output=/etc/passwd", "../..", "../../etc/passwd",
    "v1/../../x", "refs/../../../x", "v1..v2", "@{-1}", "v1@{upstream}", "HEAD~1", "v1^",
    "v1 v2", "v1\nv2", "v1;id", "$(id)", "`id`", "v1|id", "/abs/path", "v1/", "v1.",
    "v1.lock", "a//b", "x" * 201, "x" * 100_000, "\x00", "v1\x00", "é", "\udcff", "",
    " v1", "~v1", "v1:v2", "*", "?", "[a]", "\\",
]

STRANGER = SigningKey.generate("stranger")


def invalid_ref(value: Any) -> bool:
    try:
        check_ref(value)
    except RefError:
        return True
    return False


hostile_text = st.one_of(
    st.sampled_from(HOSTILE_REFS),
    st.text(max_size=300),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.integers().map(lambda n: "-" * (n % 5 + 1) + str(n)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=10)


class Outcomes:
    """Dead letters and results, matched to what was sent."""

    def __init__(self, h: Any) -> None:
        self.h = h

    def letter_for(self, raw: bytes, timeout: float = 10) -> dict[str, Any]:
        # a letter carries at most 16 KiB of the body, and its sha256
        digest = hashlib.sha256(raw).hexdigest()
        return self.h.events.wait(lambda e: isinstance(e, dict) and e.get("sha256") == digest,
                                  timeout)

    def result_for(self, env: envelope.Envelope, timeout: float = 10) -> dict[str, Any]:
        return self.h.events.wait(lambda e: isinstance(e, envelope.Envelope)
                                  and e.type == "deploy.result"
                                  and e.body.get("request_id") == env.id, timeout).body

    def outcome_for(self, env: envelope.Envelope, raw: bytes,
                    timeout: float = 10) -> dict[str, Any]:
        """The dead letter of ``raw`` or the result answering ``env``, whichever came."""
        digest = hashlib.sha256(raw).hexdigest()

        def match(e: Any) -> bool:
            if isinstance(e, dict):
                return e.get("sha256") == digest
            return isinstance(e, envelope.Envelope) and e.type == "deploy.result" \
                and e.body.get("request_id") == env.id
        found = self.h.events.wait(match, timeout)
        return found if isinstance(found, dict) else {"result": found.body}


@pytest.fixture
def target(harness: Any, tmp_path: Path) -> Any:
    h = harness({"app": {"scripts": {"pre": f"touch {tmp_path}/script-ran"}}}, start=False)
    h.repo.commit("v1")
    agent = h.start()
    h.outcomes = Outcomes(h)
    h.agent = agent
    h.marker = tmp_path / "script-ran"
    h.threads_before = threading.active_count()
    return h


def assert_untouched(h: Any) -> None:
    assert not h.marker.exists(), "a script ran"
    assert not (h.site.state / "mirrors").exists(), "git was called"
    journal = h.site.state / "journal"
    assert not journal.exists() or not os.listdir(journal), "a request was accepted"
    assert h.agent.agent.dispatcher.subscriptions[0].thread.is_alive()


def no_handler_failures(h: Any) -> None:
    bad = [e for e in h.events.letters if e["reason"].startswith("handler failed")]
    assert bad == [], bad


def still_deploys(h: Any) -> None:
    r = h.deploy("v1")
    assert r["status"] == "succeeded", r
    assert h.marker.exists()


settings_ = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


def test_malformed_messages_are_dead_lettered_with_a_reason(target: Any) -> None:
    fields = st.fixed_dictionaries({}, optional={
        "v": json_values, "id": json_values, "type": json_values, "at": json_values,
        "expires": json_values, "sender": json_values, "correlation": json_values,
        "body": json_values, "sig": json_values, "extra": json_values})
    raw = st.one_of(
        st.binary(max_size=500),
        fields.map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.just(b"{" * 100_000),
        st.just(b'{"v": 1, "body": "' + b"x" * (1024 * 1024 + 10) + b'"}'),
    ).filter(lambda b: b"deploy.request" not in b)

    @settings_
    @given(raw)
    def run(data: bytes) -> None:
        target.bus.publish(f"deploy.requests.{target.site.host}", data)
        letter = target.outcomes.letter_for(data)
        assert letter["reason"].startswith("invalid message: "), letter
        assert len(letter["reason"]) > len("invalid message: ")
        assert letter["daemon"] == "deploy_agent"

    run()
    assert_untouched(target)
    no_handler_failures(target)
    still_deploys(target)


def test_hostile_requests_are_refused_with_a_reason(target: Any) -> None:
    body_keys = {"rollout": json_values | hostile_text, "project": json_values | hostile_text,
                 "environment": json_values | hostile_text, "host": json_values | hostile_text,
                 "ref": json_values | hostile_text, "user": json_values,
                 "action": st.sampled_from(["deploy", "rollback", "delete", "", None]) |
                 hostile_text, "release": hostile_text | json_values}
    base = {"rollout": "r", "project": "app", "environment": "prod", "host": "h1",
            "ref": "v1", "action": "deploy"}

    @st.composite
    def requests(draw: Any) -> envelope.Envelope:
        body: dict[str, Any] = dict(base)
        body["rollout"] = uuid.uuid4().hex[:16]
        changed = draw(st.lists(st.sampled_from(sorted(body_keys)), min_size=1, max_size=4,
                                unique=True))
        for k in changed:
            body[k] = draw(body_keys[k])
        # Something must make it unacceptable: an invalid ref for a deploy, an invalid
        # release for a rollback, or a bad name, host or action.
        if body.get("action") in ("deploy", None, "") and not invalid_ref(body.get("ref")):
            body["ref"] = draw(st.sampled_from(HOSTILE_REFS))
        if body.get("action") == "rollback":
            body["release"] = draw(st.sampled_from(["../..", "--x", "a/b", "", "x" * 129]))
        key = draw(st.sampled_from([target.site.key, target.site.key, STRANGER, None]))
        ttl = draw(st.sampled_from([300, 300, -10, 3 * 86400]))
        at = envelope.now() + draw(st.sampled_from([timedelta(0), timedelta(0),
                                                    timedelta(hours=1)]))
        corr = draw(st.one_of(st.none(), hostile_text))
        env = envelope.new("deploy.request", body, sender=draw(st.text(max_size=50)),
                           correlation=corr, ttl=ttl, at=at)
        try:
            return key.sign(env) if key else env
        except UnicodeEncodeError:  # lone surrogates cannot be signed; send it unsigned
            return env

    @settings_
    @given(requests())
    def run(env: envelope.Envelope) -> None:
        try:
            raw = env.encode()
        except UnicodeEncodeError:
            raw = json.dumps(env.__dict__).encode()
        target.bus.publish(f"deploy.requests.{target.site.host}", raw)
        outcome = target.outcomes.outcome_for(env, raw)
        if "result" in outcome:
            result = outcome["result"]
            assert env.sig is not None and env.sig["key"] == target.site.key.id, \
                "only the orchestrator's requests are answered"
            assert result["status"] == "refused", result
            assert isinstance(result["reason"], str) and result["reason"]
        else:
            assert outcome["reason"].startswith(("invalid message: ", "untrusted message: ")), \
                outcome

    run()
    assert_untouched(target)
    no_handler_failures(target)
    audit_file = target.site.state / "audit.jsonl"
    audit = [json.loads(x) for x in audit_file.read_text().splitlines()] \
        if audit_file.exists() else []
    assert all(e["decision"] == "refused" and e["reason"] and e["signer"] == "orchestrator"
               for e in audit), "only requests the orchestrator's key signed are audited"
    still_deploys(target)


def test_lapsed_request_is_refused_and_marked_so_its_sender_may_ask_anew(target: Any) -> None:
    """A request that arrives after its expiry is refused (never run), and the
    refusal says ``lapsed``: the orchestrator asks anew when the wait was a
    broker outage's. Other expiry problems are not marked."""
    h = target
    lapsed = h.site.request("v1", ttl=-10)
    h.site.send(h.bus, lapsed)
    result = h.outcomes.result_for(lapsed)
    assert result["status"] == "refused" and result["lapsed"] is True, result
    assert "expired at" in result["reason"]
    future = h.site.key.sign(envelope.new(
        "deploy.request", {"rollout": "f1", "project": "app", "environment": "prod",
                           "host": h.site.host, "user": "t", "ref": "v1"},
        sender="test", correlation="f1", ttl=300, at=envelope.now() + timedelta(hours=1)))
    h.site.send(h.bus, future)
    result = h.outcomes.result_for(future)
    assert result["status"] == "refused" and "lapsed" not in result, result
    assert "future" in result["reason"]
    assert_untouched(h)
