"""The web's JSON API and form answers, through Flask's test client: no
browser, no daemons. The app gets an in-process bus of its own (what it
sends is read back from the orchestrator's queues and checked signed) and a
SQLite store the tests write rollouts and heartbeats into."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from deploybus import envelope, topics
from deploybus.bus.memory import MemoryTransport
from deploybus.config import parse
from deploybus.frontend.app import create_app
from deploybus.runner import Context
from deploybus.signing import SigningKey, Verifier
from deploybus.store import Store


class Sent:
    """The envelopes the app put in one of the orchestrator's queues."""

    def __init__(self, bus: MemoryTransport, topic: str, queue: str) -> None:
        self.items: list[envelope.Envelope] = []
        self.cond = threading.Condition()
        bus.subscribe(topic, self._take, queue=queue)

    def _take(self, delivery: Any) -> None:
        with self.cond:
            self.items.append(envelope.decode(delivery.body))
            self.cond.notify_all()
        delivery.ack()

    def wait(self, n: int = 1, timeout: float = 5.0) -> list[envelope.Envelope]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


class Web:
    """The app, its store and bus, and a client that holds a CSRF token.
    ``git`` is project app's repository URL; ``extra`` is more config YAML."""

    def __init__(self, tmp: Path, *, git: str | None = None, extra: str = "") -> None:
        key = SigningKey.generate("web")
        key.save(tmp)
        self.config = parse(f"""
bus: {{url: "memory://web-{uuid.uuid4().hex}"}}
keys:
  signing: web.key
  trusted: {{web: {{key: web.pub, role: web}}}}
  policy: [{{signer: web}}]
state: {{url: "sqlite:///{tmp / 'state.db'}"}}
projects:
  app: {{git: "{git or tmp / 'none.git'}"}}
  other: {{git: {tmp / 'none.git'}}}
environments:
  prod: {{hosts: [h1, h2, h3]}}
  lab: {{hosts: [l1], projects: [other]}}
{extra}""", tmp / "deploybus.yaml")
        self.bus = MemoryTransport(self.config.bus_url)
        self.store = Store(self.config.state_url)
        self.verifier = Verifier(self.config.trusted, self.config.policy)
        ctx = Context(config=self.config, bus=self.bus, host="web1", signing_key=key)
        self.rollouts = Sent(self.bus, topics.ROLLOUTS, topics.ORCHESTRATOR_ROLLOUTS)
        self.controls = Sent(self.bus, topics.CONTROL, topics.ORCHESTRATOR_CONTROL)
        self.app = create_app(ctx, self.store)
        self.client: FlaskClient = self.app.test_client()
        # The test client asks as "localhost": an app configured without it
        # answers it 400 (tests/security/test_web_host.py) and has no token.
        self.csrf = self.client.get("/api/csrf").get_json().get("csrf", "")

    def post(self, path: str, body: Any, *, csrf: bool = True) -> Any:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.client.post(path, json=body, headers=headers)

    def rollout(self, state: str = "running", *, strategy: dict[str, Any] | None = None,
                steps: dict[str, str] | None = None) -> str:
        """A rollout in the store as the orchestrator leaves it."""
        rid = uuid.uuid4().hex[:16]
        steps = steps or {"h1": "pending", "h2": "pending"}
        self.store.create_rollout(id=rid, project="app", environment="prod", ref="v1",
                                  user="ann", hosts=list(steps), strategy=strategy)
        self.store.set_rollout(rid, state=state)
        for host, st in steps.items():
            self.store.set_step(rid, host, state=st)
        return rid


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    w = Web(tmp_path)
    yield w
    w.bus.close()


# -- POST /api/rollouts/<id>/control -----------------------------------------------------

def test_control_sends_a_signed_message_and_answers_202(web: Web) -> None:
    rid = web.rollout("paused")
    r = web.post(f"/api/rollouts/{rid}/control", {"action": "promote"})
    assert (r.status_code, r.get_json()) == (202, {"sent": "promote"})
    [env] = web.controls.wait()
    assert env.type == "deploy.control"
    assert env.body == {"rollout": rid, "action": "promote", "user": "web"}
    assert env.correlation == rid and env.sender == "web@web1" and env.expires
    assert str(web.verifier.verify(env, project="app", environment="prod")) == "web"


@pytest.mark.parametrize("body, code, says", [
    ({"action": "explode"}, 400, "unknown action 'explode'"),
    ({}, 400, "unknown action None"),
    (["pause"], 400, "unknown action"),
])
def test_control_refuses_an_unknown_action(web: Web, body: Any, code: int, says: str) -> None:
    r = web.post(f"/api/rollouts/{web.rollout()}/control", body)
    assert r.status_code == code and says in r.get_json()["error"]
    assert "pause, resume, promote, abort" in r.get_json()["error"]


def test_control_of_an_unknown_rollout_is_404(web: Web) -> None:
    r = web.post("/api/rollouts/nosuchrollout/control", {"action": "pause"})
    assert r.status_code == 404 and "no rollout 'nosuchrollout'" in r.get_json()["error"]
    r = web.post("/api/rollouts/..%2Fx/control", {"action": "pause"})
    assert r.status_code == 404


@pytest.mark.parametrize("state", ["succeeded", "partial", "failed", "refused", "aborted"])
def test_control_of_a_final_rollout_is_409(web: Web, state: str) -> None:
    rid = web.rollout(state)
    r = web.post(f"/api/rollouts/{rid}/control", {"action": "abort"})
    assert r.status_code == 409
    assert r.get_json()["error"] == (f"rollout {rid} is {state}; only a running or paused "
                                     "rollout can be steered")
    assert not web.controls.items


def test_control_needs_the_csrf_token_and_answers_json(web: Web) -> None:
    rid = web.rollout()
    r = web.post(f"/api/rollouts/{rid}/control", {"action": "abort"}, csrf=False)
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]
    assert not web.controls.items


def test_control_form_without_javascript_sends_and_goes_back(web: Web) -> None:
    rid = web.rollout("running")
    r = web.client.post(f"/rollouts/{rid}/control", data={"csrf": web.csrf, "action": "pause"})
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/rollouts/{rid}")
    assert web.controls.wait()[0].body["action"] == "pause"
    page = web.client.get(f"/rollouts/{rid}").get_data(as_text=True)
    assert "pause sent to the orchestrator" in page


# -- what the rollout page offers --------------------------------------------------------

PROMOTE = {"canary": 1, "pause": "promote", "batch": "100%", "window": 1}


@pytest.mark.parametrize("state, strategy, steps, offered", [
    ("running", None, {"h1": "requested", "h2": "pending"}, ["pause", "abort"]),
    # canary done, waiting for promote
    ("paused", PROMOTE, {"h1": "succeeded", "h2": "pending", "h3": "pending"},
     ["promote", "abort"]),
    # paused by a person during the canary: resume
    ("paused", PROMOTE, {"h1": "requested", "h2": "pending"}, ["resume", "abort"]),
    # paused by a person after the promote
    ("paused", PROMOTE, {"h1": "succeeded", "h2": "succeeded", "h3": "pending"},
     ["resume", "abort"]),
    ("paused", None, {"h1": "succeeded", "h2": "pending"}, ["resume", "abort"]),
    ("partial", None, {"h1": "succeeded", "h2": "failed"}, []),
    ("aborted", None, {"h1": "succeeded", "h2": "skipped"}, []),
])
def test_rollout_view_offers_the_controls_that_fit(web: Web, state: str, strategy: Any,
                                                    steps: dict[str, str],
                                                    offered: list[str]) -> None:
    rid = web.rollout(state, strategy=strategy, steps=steps)
    r = web.client.get(f"/api/rollouts/{rid}").get_json()
    assert r["controls"] == offered
    assert r["final"] == (state in ("partial", "aborted"))


def test_rollout_view_counts_hosts_and_tones_the_reason(web: Web) -> None:
    rid = web.rollout("partial", steps={"h1": "succeeded", "h2": "succeeded", "h3": "failed"})
    r = web.client.get(f"/api/rollouts/{rid}").get_json()
    assert r["progress"] == "2 of 3 hosts succeeded, 1 failed"
    assert r["counts"] == {"succeeded": 2, "failed": 1, "settled": 3, "total": 3}
    assert r["tone"] == "warning"
    tones = {s: web.client.get(f"/api/rollouts/{web.rollout(s)}").get_json()["tone"]
             for s in ("paused", "failed", "refused", "aborted", "succeeded")}
    assert tones == {"paused": "info", "failed": "error", "refused": "error",
                     "aborted": "neutral", "succeeded": "success"}


def test_paused_page_renders_the_info_box_and_commands_without_javascript(web: Web) -> None:
    rid = web.rollout("paused", strategy=PROMOTE, steps={"h1": "succeeded", "h2": "pending"})
    web.store.set_rollout(rid, state="paused",
                          reason="canary done; promote to continue, abort to stop")
    page = web.client.get(f"/rollouts/{rid}").get_data(as_text=True)
    assert 'class="notice notice-info"' in page and "canary done; promote" in page
    assert 'class="error"' not in page
    assert f'value="deploybus promote {rid}"' in page
    assert 'id="promote-button"' in page
    assert "1 of 2 hosts succeeded" in page


# -- GET /api/rollouts ------------------------------------------------------------------

def test_rollouts_limit_must_be_a_number_and_is_clamped(web: Web) -> None:
    r = web.client.get("/api/rollouts?limit=abc")
    assert r.status_code == 400
    assert r.get_json() == {"error": "limit must be a whole number from 1 to 500, not 'abc'"}
    for _ in range(3):
        web.rollout()
    assert len(web.client.get("/api/rollouts?limit=0").get_json()) == 1
    assert len(web.client.get("/api/rollouts?limit=-5").get_json()) == 1
    assert len(web.client.get("/api/rollouts?limit=100000").get_json()) == 3
    assert len(web.client.get("/api/rollouts").get_json()) == 3


# -- POST /api/rollouts -----------------------------------------------------------------

def test_strategy_is_passed_through_signed(web: Web) -> None:
    r = web.post("/api/rollouts", {"project": "app", "environment": "prod", "ref": "v1",
                                   "strategy": {"canary": 1, "pause": "promote"}})
    assert r.status_code == 202, r.get_json()
    [env] = web.rollouts.wait()
    assert env.body["strategy"] == {"canary": 1, "pause": "promote"}
    assert env.body["rollout"] == r.get_json()["rollout"]
    assert str(web.verifier.verify(env, project="app", environment="prod")) == "web"


@pytest.mark.parametrize("strategy, says", [
    ({"canary": 1, "speed": 3}, "Strategy: unknown strategy setting 'speed'"),
    ({"batch": "150%"}, "Strategy: batch percentage must be in (0, 100]"),
    ({"pause": "later"}, "Strategy: pause must be seconds >= 0 or 'promote'"),
    ({"canary": "h9"}, "Strategy: canary host 'h9' is not in this rollout"),
    ("canary", 'Strategy: must be an object like {"canary": 1}'),
])
def test_bad_strategy_is_refused_naming_the_problem(web: Web, strategy: Any, says: str) -> None:
    r = web.post("/api/rollouts", {"project": "app", "environment": "prod", "ref": "v1",
                                   "strategy": strategy})
    assert r.status_code == 400
    assert r.get_json()["error"].startswith(says) and r.get_json()["field"] == "strategy"
    assert not web.rollouts.items


@pytest.mark.parametrize("body, field, says", [
    ({"project": "app", "environment": "prod", "ref": ""}, "ref",
     "Tag or ref: enter a tag (like v1.2.3) or a ref"),
    ({"project": "app", "environment": "prod", "ref": "-x"}, "ref",
     "Tag or ref: '-x' has characters git refs may not start with or contain"),
    ({"project": "app", "environment": "prod", "ref": "v" * 201}, "ref",
     "Tag or ref: at most 200 characters"),
    ({"project": "nope", "environment": "prod", "ref": "v1"}, "project",
     "Project: there is no project 'nope' (known: app, other)"),
    ({"project": ["app"], "environment": "prod", "ref": "v1"}, "project",
     "Project: there is no project ['app'] (known: app, other)"),
    ({"environment": "prod", "ref": "v1"}, "project", "Project: choose a project"),
    ({"project": "app", "environment": "moon", "ref": "v1"}, "environment",
     "Environment: there is no environment 'moon' (known: prod, lab)"),
    ({"project": "app", "environment": "lab", "ref": "v1"}, "project",
     "Project: app is not deployed to lab (lab takes other)"),
    ({"project": "app", "environment": "prod", "ref": "v1", "hosts": ["h1", "l1"]}, "hosts",
     "Servers: l1 is not in prod (its hosts: h1, h2, h3)"),
])
def test_request_errors_name_the_field(web: Web, body: dict, field: str, says: str) -> None:
    r = web.post("/api/rollouts", body)
    assert r.status_code == 400
    assert r.get_json() == {"error": says, "field": field}


def test_empty_form_names_the_field_it_shows(web: Web) -> None:
    r = web.client.post("/deploy", data={"csrf": web.csrf, "project": "app",
                                         "environment": "prod", "ref": "  "})
    assert r.status_code == 400
    page = r.get_data(as_text=True)
    assert "Tag or ref: enter a tag (like v1.2.3) or a ref" in page
    assert "must be 1-200 characters" not in page
    assert 'aria-invalid="true" aria-describedby="ref-error"' in page
    # what the person chose is kept
    assert '<option value="prod" selected>' in page


def test_api_body_must_be_an_object(web: Web) -> None:
    r = web.post("/api/rollouts", ["app"])
    assert r.status_code == 400 and r.get_json() == {"error": "the body must be a JSON object"}


# -- hosts ------------------------------------------------------------------------------

def test_hosts_are_judged_by_the_one_rule(web: Web) -> None:
    web.store.record_presence("h1", {"interval": 5}, daemon="agent")
    web.store.record_presence("h1", {"interval": 5, "projects": {"app": {"release": "r1"}}})
    web.store.record_presence("h2", {"interval": 5})  # a keepalive, no agent
    rows = {h["name"]: h for h in web.client.get("/api/hosts").get_json()}
    assert list(rows) == ["h1", "h2", "h3", "l1"]
    assert rows["h1"]["verdict"] == "up" and rows["h1"]["projects"] == {"app": {"release": "r1"}}
    assert rows["h1"]["detail"].startswith("agent ")
    assert rows["h2"]["verdict"] == "agent down"
    assert rows["h3"]["verdict"] == "never seen" and rows["h3"]["environments"] == ["prod"]
    page = web.client.get("/").get_data(as_text=True)
    assert 'class="verdict-agent-down"' in page and 'class="verdict-never-seen"' in page
    assert "no agent heartbeat ever" in page


def test_every_page_has_the_navigation(web: Web) -> None:
    rid = web.rollout()
    for path in ("/", "/rollouts", f"/rollouts/{rid}"):
        page = web.client.get(path).get_data(as_text=True)
        assert 'href="/">Dashboard</a>' in page or 'href="/" aria-current="page">Dashboard' in page
        assert ">Recent rollouts</a>" in page
    assert 'href="/rollouts">&larr; Recent rollouts</a>' in \
        web.client.get(f"/rollouts/{rid}").get_data(as_text=True)
    assert rid in web.client.get("/rollouts").get_data(as_text=True)


# -- bad parameters are a 400, never a 500 ----------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000

#: Bodies of POST /api/rollouts that are not a deploy request, and what the 400 says.
BAD_BODIES: list[tuple[Any, str]] = [
    (b"{", "the body is not valid JSON"),
    (b"\xff\xfe{}", "the body is not valid JSON"),
    (DEEP.encode(), "nested too deeply"),
    (b"null", "the body must be a JSON object"),
    (b'"app"', "the body must be a JSON object"),
    (b"5", "the body must be a JSON object"),
    ({"project": {"a": 1}, "environment": "prod", "ref": "v1"}, "Project: there is no project"),
    ({"project": "app", "environment": ["prod"], "ref": "v1"}, "Environment: there is no"),
    ({"project": "app", "environment": "prod", "ref": 5}, "Tag or ref: must be a string, not int"),
    ({"project": "app", "environment": "prod", "ref": ["v1"]}, "Tag or ref: must be a string"),
    ({"project": "app", "environment": "prod", "ref": {"v": 1}}, "Tag or ref: must be a string"),
    ({"project": "app", "environment": "prod", "ref": "v1\x00"}, "Tag or ref:"),
    ({"project": "app", "environment": "prod", "ref": "v1", "hosts": "h1"}, "Servers: must be"),
    ({"project": "app", "environment": "prod", "ref": "v1", "hosts": [1]}, "Servers: must be"),
    ({"project": "app", "environment": "prod", "ref": "v1", "hosts": [["h1"]]}, "Servers:"),
    ({"project": "app", "environment": "prod", "ref": "v1", "hosts": {"h1": 1}}, "Servers:"),
    ({"project": "app", "environment": "prod", "ref": "v1", "strategy": ["canary"]},
     "Strategy: must be an object"),
    ({"project": "app", "environment": "prod", "ref": "v1", "strategy": {"canary": "\u00b2"}},
     "Strategy: canary host"),
    ({"project": "app", "environment": "prod", "ref": "v1", "strategy": {"batch": "\u00b2"}},
     "Strategy: batch"),
    ({"project": "app", "environment": "prod", "ref": "v1", "strategy": {"canary": [1]}},
     "Strategy: canary must be"),
    ({"project": "app", "environment": "prod", "ref": "v1", "strategy": {"window": "2"}},
     "Strategy: window must be"),
]


@pytest.mark.parametrize("body, says", BAD_BODIES)
def test_a_bad_deploy_body_is_a_400_naming_the_problem(web: Web, body: Any, says: str) -> None:
    if isinstance(body, bytes):
        r = web.client.post("/api/rollouts", data=body, content_type="application/json",
                            headers={"X-CSRF-Token": web.csrf})
    else:
        r = web.post("/api/rollouts", body)
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert says in r.get_json()["error"]
    assert not web.rollouts.items


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("setting", ["pause", "stuck"])
def test_a_strategy_of_no_finite_seconds_is_a_400(web: Web, raw: str, setting: str) -> None:
    body = ('{"project": "app", "environment": "prod", "ref": "v1", '
            f'"strategy": {{"{setting}": {raw}}}}}')
    r = web.client.post("/api/rollouts", data=body, content_type="application/json",
                        headers={"X-CSRF-Token": web.csrf})
    assert r.status_code == 400 and r.get_json()["field"] == "strategy"
    assert r.get_json()["error"].startswith(f"Strategy: {setting} must be seconds")


@pytest.mark.parametrize("body", [b"{", DEEP.encode(), b'{"action": {"pause": 1}}',
                                  b'{"action": ["pause"]}', b'"pause"'])
def test_a_bad_control_body_is_a_400(web: Web, body: bytes) -> None:
    r = web.client.post(f"/api/rollouts/{web.rollout()}/control", data=body,
                        content_type="application/json", headers={"X-CSRF-Token": web.csrf})
    assert r.status_code == 400 and "unknown action" in r.get_json()["error"]
    assert not web.controls.items


@pytest.mark.parametrize("token", ["\u00e9t\u00e9", "x" * 5000, " "])
def test_a_csrf_token_of_any_shape_is_a_400(web: Web, token: str) -> None:
    r = web.client.post("/api/rollouts", json={"project": "app"},
                        headers={"X-CSRF-Token": token.encode().decode("latin-1")})
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]
    r = web.client.post("/deploy", data={"csrf": token, "project": "app"})
    assert r.status_code == 400


@pytest.mark.parametrize("limit", ["", "1.5", "abc", "9" * 5000, "1e3", "0x10", "\u0000"])
def test_every_bad_limit_is_a_json_400(web: Web, limit: str) -> None:
    r = web.client.get("/api/rollouts", query_string={"limit": limit})
    assert r.status_code == 400 and "limit must be a whole number" in r.get_json()["error"]


@pytest.mark.parametrize("rid", ["%00", "..", "a" * 300, "%ff%fe", "-rf", "a.b;c", "%E2%80%AE"])
def test_a_rollout_id_of_any_shape_is_a_404(web: Web, rid: str) -> None:
    assert web.client.get(f"/rollouts/{rid}").status_code == 404
    r = web.client.get(f"/api/rollouts/{rid}")
    assert r.status_code == 404 and r.get_json()["state"] == "pending"
    r = web.post(f"/api/rollouts/{rid}/control", {"action": "pause"})
    assert r.status_code == 404 and "no rollout" in r.get_json()["error"]
    r = web.client.post(f"/rollouts/{rid}/control", data={"csrf": web.csrf, "action": "pause"})
    assert r.status_code == 303
    assert not web.controls.items


def test_a_body_too_large_is_a_413_not_read(web: Web) -> None:
    r = web.client.post("/api/rollouts", data=b"[" + b"1," * 600_000 + b"1]",
                        content_type="application/json", headers={"X-CSRF-Token": web.csrf})
    assert r.status_code == 413 and "error" in r.get_json()


def test_git_missing_leaves_the_tag_list_empty(web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    import git

    def no_git(*_args: Any, **_kwargs: Any) -> str:
        raise git.GitCommandNotFound("git", "No such file or directory")

    monkeypatch.setattr(git.cmd.Git, "ls_remote", no_git, raising=False)
    r = web.client.get("/api/projects")
    assert r.status_code == 200 and r.get_json()[0]["tags"] == []
    assert web.client.get("/").status_code == 200


def test_the_state_database_gone_is_a_503_saying_so(web: Web) -> None:
    from sqlalchemy import text
    with web.store.engine.begin() as conn:
        conn.execute(text("DROP TABLE rollout_logs"))
        conn.execute(text("DROP TABLE host_steps"))
        conn.execute(text("DROP TABLE rollouts"))
    r = web.client.get("/api/rollouts")
    assert r.status_code == 503
    assert r.get_json()["error"].startswith("the state database is not available; try again")
    assert "rollouts failed" in r.get_json()["error"]
    r = web.client.get("/rollouts")
    assert r.status_code == 503 and "the state database is not available" in r.get_data(True)
    assert web.client.get("/api/rollouts/abc").status_code == 503
