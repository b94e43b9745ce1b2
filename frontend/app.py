"""Flask application: dashboard, deploy form, live rollout page with its
controls, recent rollouts, JSON API.

What it trusts and shows: it answers only to the host names of
``web.allowed_hosts`` (Flask's ``TRUSTED_HOSTS``: any other ``Host`` is a
400 before a route runs, so a hostile page a browser reaches through DNS
rebinding gets nothing done); a bad parameter or body is a 400 (JSON under
``/api/``), never a 500; and no answer carries a credential: every string
of every JSON answer and every value a template shows goes through
:func:`deploybus.redact.text`.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import git
from flask import (
    Flask,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.json.provider import DefaultJSONProvider
from markupsafe import Markup
from werkzeug.exceptions import BadRequest, HTTPException, SecurityError

from deploybus import protocol, redact, topics
from deploybus.errors import (
    BusError,
    ConfigError,
    DeployBusError,
    RolloutError,
    StoreError,
)
from deploybus.liveness import host_rows
from deploybus.plan import plan
from deploybus.refs import MAX_REF, NAME_RE, check_ref
from deploybus.runner import Context
from deploybus.states import FAILED_STEPS, FINAL_STATES, SETTLED_STEPS
from deploybus.store import Store
from deploybus.strategy import Strategy

#: Seconds a list of tags is cached per project.
TAG_CACHE_SECONDS = 15.0

#: What the orchestrator accepts in a deploy.control, in button order.
CONTROL_ACTIONS = ("pause", "resume", "promote", "abort")

#: Rollouts on the dashboard, on the recent-rollouts page, and the most the
#: API lists at once.
DASHBOARD_ROLLOUTS = 15
RECENT_ROLLOUTS = 100
MAX_LIMIT = 500

#: The deploy form's fields as a person sees them: an error names the field
#: by its label, not by its key in the request.
FIELD_LABELS = {"project": "Project", "ref": "Tag or ref", "environment": "Environment",
                "hosts": "Servers", "strategy": "Strategy"}

#: Largest request body taken (a deploy request is a few hundred bytes).
MAX_BODY = 1024 * 1024

#: The box a rollout's reason is shown in, by state: only what went wrong is
#: red; a pause waits for a person and is information.
NOTICE_TONE = {"queued": "info", "running": "info", "paused": "info",
               "succeeded": "success", "partial": "warning", "aborted": "neutral",
               "failed": "error", "refused": "error"}


class FieldError(DeployBusError):
    """One field of a deploy request is wrong. The message starts with the
    field's label (``Tag or ref: ...``); ``field`` is its key.

    Defined here, not in :mod:`deploybus.errors`: it is raised and caught
    inside this module only, and it speaks the deploy form's labels, which
    the core has no business knowing."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{FIELD_LABELS[field]}: {message}")


class RedactingJSON(DefaultJSONProvider):
    """Flask's JSON, with URL credentials redacted from every string: no API
    answer (nor a page's ``tojson``) can carry one, whatever a route put in."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return super().dumps(redact.deep(obj), **kwargs)


def shown(value: Any) -> Any:
    """Jinja's ``finalize``: every value a template prints, URL credentials
    redacted (markup stays markup)."""
    if isinstance(value, str):
        clean = redact.text(value)
        if clean != value:
            return Markup(clean) if isinstance(value, Markup) else clean
    return value


def awaiting_promote(record: Mapping[str, Any]) -> bool:
    """Whether a paused rollout waits for ``promote`` after its canary
    (strategy ``pause: promote``): its first phase is settled and no host of
    a later phase was asked yet. Read from the strategy and the host states
    the store has, not from the wording of the reason."""
    hosts = {h["host"]: h["state"] for h in record.get("hosts") or []}
    try:
        strategy = Strategy.parse(record.get("strategy") or {})
        phases = strategy.phases(list(hosts))
    except DeployBusError:
        return False
    if strategy.pause != "promote" or not strategy.canary or len(phases) < 2:
        return False
    return all(hosts[h] in SETTLED_STEPS for h in phases[0]) and \
        all(hosts[h] == "pending" for phase in phases[1:] for h in phase)


def controls(record: Mapping[str, Any]) -> list[str]:
    """The control actions a person is offered for a rollout now: pause or
    abort a running one; promote (after its canary) or resume a paused one,
    or abort it; nothing once it is final."""
    state = record.get("state")
    if state == "running":
        return ["pause", "abort"]
    if state == "paused":
        return ["promote" if awaiting_promote(record) else "resume", "abort"]
    return []


def host_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """How many of the rollout's hosts succeeded, failed, are settled, in all."""
    states = [h["state"] for h in record.get("hosts") or []]
    return {"succeeded": states.count("succeeded"),
            "failed": sum(1 for s in states if s in FAILED_STEPS),
            "settled": sum(1 for s in states if s in SETTLED_STEPS),
            "total": len(states)}


def progress(record: Mapping[str, Any]) -> str:
    """``2 of 3 hosts succeeded, 1 failed`` for a person."""
    c = host_counts(record)
    if not c["total"]:
        return ""
    text = f"{c['succeeded']} of {c['total']} host{'s' if c['total'] != 1 else ''} succeeded"
    if c["failed"]:
        text += f", {c['failed']} failed"
    return text


def rollout_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored rollout with what the rollout page shows of it: whether it
    is final, the tone of its reason box, the host counts and the controls
    on offer. The page's script and its first render read the same fields."""
    state = record.get("state", "")
    return {**record, "final": state in FINAL_STATES, "tone": NOTICE_TONE.get(state, "info"),
            "counts": host_counts(record), "progress": progress(record),
            "controls": controls(record)}


def create_app(ctx: Context, store: Store, *, healthy: Callable[[], bool] = lambda: True,
               secret_key: bytes | None = None) -> Flask:
    """The web app over ``ctx`` (config, bus, signing key) and ``store``; it
    answers to the host names of ``ctx.config.web_allowed_hosts`` only."""
    allowed_hosts = list(ctx.config.web_allowed_hosts)
    if not allowed_hosts:
        # Flask would read an empty list as "any host".
        raise ConfigError("web.allowed_hosts is empty; name at least one host",
                          path=str(ctx.config.path), key="web.allowed_hosts")
    app = Flask(__name__)
    app.secret_key = secret_key or secrets.token_bytes(32)
    app.config.update(TRUSTED_HOSTS=allowed_hosts, MAX_CONTENT_LENGTH=MAX_BODY)
    app.json = RedactingJSON(app)
    app.jinja_options = {**app.jinja_options, "finalize": shown}
    tag_cache: dict[str, tuple[float, list[dict[str, str]]]] = {}

    def tags(project: str) -> list[dict[str, str]]:
        cached = tag_cache.get(project)
        if cached and time.monotonic() - cached[0] < TAG_CACHE_SECONDS:
            return cached[1]
        pc = ctx.config.projects[project]
        if pc.vcs != "git":
            return []  # an svn URL: no git tags to list (svn projects do not deploy yet)
        try:
            out = str(git.cmd.Git().ls_remote("--tags", "--refs", "--", pc.git))
        except (git.CommandError, OSError):  # its message may quote the URL: not shown
            out = ""
        result = []
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            result.append({"tag": ref.removeprefix("refs/tags/"), "commit": sha})
        result.sort(key=lambda t: t["tag"], reverse=True)
        tag_cache[project] = (time.monotonic(), result)
        return result

    def hosts() -> list[dict[str, Any]]:
        """One row per host with its verdict: the rule ``deploybus hosts`` uses."""
        return host_rows({e.name: e.hosts for e in ctx.config.environments.values()},
                         store.hosts())

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    def check_csrf() -> None:
        sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
        # as bytes: compare_digest refuses str with non-ASCII characters (a 500)
        if not sent or not hmac.compare_digest(sent.encode(),
                                               str(session.get("csrf", "")).encode()):
            abort(400, "missing or wrong CSRF token; reload the page")

    def json_body(*, silent: bool = False) -> Any:
        """The request's JSON body; a 400 saying so, never a 500, when it is
        not JSON (None instead with ``silent``). Nesting deeper than Python's
        recursion limit raises RecursionError, which Flask lets through."""
        try:
            return request.get_json(force=True, silent=silent)
        except BadRequest:
            abort(400, "the body is not valid JSON")
        except RecursionError:
            if not silent:
                abort(400, "the body is not valid JSON: nested too deeply")
        return None

    app.jinja_env.globals.update(csrf_token=csrf_token, host_counts=host_counts)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        """Under /api/ every error is JSON (``{"error": ...}``), as the API's own are."""
        if request.path.startswith("/api/"):
            return jsonify({"error": exc.description}), exc.code
        return exc

    @app.errorhandler(SecurityError)
    def untrusted_host(exc: SecurityError) -> Any:
        """A ``Host`` not in ``web.allowed_hosts``: 400 before any route ran."""
        exc.description = (f"this server does not answer to the host name "
                           f"{request.headers.get('Host', '')!r:.80}; open it by a name in "
                           "web.allowed_hosts (or add this one there); nothing was done")
        return http_error(exc)

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError) -> Any:
        """The state database cannot be read or written: 503, saying so."""
        message = f"the state database is not available; try again later ({exc})"
        if request.path.startswith("/api/"):
            return jsonify({"error": message}), 503
        return render_template("error.html", error=message), 503

    @app.errorhandler(BusError)
    def bus_error(exc: BusError) -> Any:
        """The broker is unreachable (or refuses us): 503 at once, saying that
        nothing was sent. The web's transport gives up on a publish within a
        few seconds (``deploybus web`` connects with a short publish timeout)."""
        message = (f"the message bus {redact.url(ctx.config.bus_url)} cannot be reached, so "
                   f"nothing was sent; try again when it is back ({exc})")
        if request.path.startswith("/api/"):
            return jsonify({"error": message}), 503
        return render_template("dashboard.html", config=ctx.config, hosts=hosts(),
                               rollouts=store.rollouts(DASHBOARD_ROLLOUTS),
                               tags={p: tags(p) for p in ctx.config.projects},
                               form=dict(request.form), error=message, field=None), 503

    def start_rollout(data: Mapping[str, Any], user: str) -> str:
        """Check a deploy request field by field and send it as a signed
        ``deploy.rollout``; returns its id. Raises :class:`FieldError`
        naming the field as the form shows it. The orchestrator checks it
        all again (and more: policy, windows, the lock)."""
        project, environment = data.get("project"), data.get("environment")
        if not project:
            raise FieldError("project", "choose a project")
        if not environment:
            raise FieldError("environment", "choose an environment")
        ref = data.get("ref")
        if not ref:
            raise FieldError("ref", "enter a tag (like v1.2.3) or a ref")
        if isinstance(ref, str) and len(ref) > MAX_REF:
            raise FieldError("ref", f"at most {MAX_REF} characters")
        try:
            check_ref(ref)
        except DeployBusError as exc:
            raise FieldError("ref", str(exc).removeprefix("ref ")) from None
        chosen = data.get("hosts") or None
        if chosen is not None and (not isinstance(chosen, list)
                                   or not all(isinstance(h, str) for h in chosen)):
            raise FieldError("hosts", "must be a list of server names")
        strategy = data.get("strategy")
        if strategy is not None and not isinstance(strategy, dict):
            raise FieldError("strategy", 'must be an object like {"canary": 1}')
        try:
            # the config's checks, as the CLI and the orchestrator make them
            plan(ctx.config, project=str(project) if isinstance(project, str) else project,
                 environment=environment, hosts=chosen, strategy=strategy)
        except RolloutError as exc:
            raise FieldError(exc.field.partition(".")[0], str(exc)) from None
        except TypeError:  # a project or environment that is not a name (a list...)
            field = "project" if not isinstance(project, str) else "environment"
            known = ctx.config.projects if field == "project" else ctx.config.environments
            raise FieldError(field, f"there is no {field} {data.get(field)!r:.80} (known: "
                                    f"{', '.join(known)})") from None
        chosen = list(dict.fromkeys(chosen)) if chosen else None
        rollout = uuid.uuid4().hex[:16]
        try:
            body = protocol.parse("deploy.rollout", {
                "rollout": rollout, "project": project, "environment": environment,
                "ref": ref, "user": user,
                **({"hosts": chosen} if chosen else {}),
                **({"strategy": strategy} if strategy else {})})
        except DeployBusError as exc:
            raise FieldError("strategy" if "strategy" in str(exc) else "ref",
                             str(exc)) from None
        # into the orchestrator's queue even if none has run on this broker yet
        ctx.bus.publish_for(topics.ROLLOUTS, topics.ORCHESTRATOR_ROLLOUTS, protocol.seal(
            body, key=ctx.signing_key, sender=f"web@{ctx.host}", correlation=rollout))
        return rollout

    def control_refusal(rollout: str, action: object) -> tuple[int, str] | None:
        """Why ``action`` cannot be sent for ``rollout`` (HTTP status, message),
        or None. Final rollouts are refused here; anything else the
        orchestrator decides (and says so in the rollout's log)."""
        if action not in CONTROL_ACTIONS:
            return 400, (f"unknown action {action!r:.40}; one of "
                         f"{', '.join(CONTROL_ACTIONS)}")
        record = store.rollout(rollout) if NAME_RE.fullmatch(rollout) else None
        if record is None:
            return 404, f"no rollout {rollout!r:.80} is known"
        if record["state"] in FINAL_STATES:
            return 409, (f"rollout {rollout} is {record['state']}; only a running or "
                         "paused rollout can be steered")
        return None

    def send_control(rollout: str, action: str, user: str) -> None:
        """A signed ``deploy.control``, as ``deploybus <action> ROLLOUT`` sends
        it. The answer is not awaited: the page polls the rollout, whose log
        gets ``control: <action> by <user>: <what it did>``."""
        body = protocol.Control(rollout=rollout, action=protocol.ControlAction(action),
                                user=user)
        # The web does not wait for the answer, but a pause or an abort must not
        # be applied minutes later by an orchestrator that was down when it was
        # pressed: the type's short time to live (protocol.TTL).
        ctx.bus.publish_for(topics.CONTROL, topics.ORCHESTRATOR_CONTROL, protocol.seal(
            body, key=ctx.signing_key, sender=f"web@{ctx.host}", correlation=rollout))

    def current_user() -> str:
        # Login arrives with the front-end issue; until then the web acts as "web".
        return "web"

    def limit_arg(default: int) -> int:
        """``?limit=``, clamped to 1..MAX_LIMIT; a 400 if it is not a number."""
        raw = request.args.get("limit")
        if raw is None:
            return default
        try:
            n = int(raw)
        except ValueError:
            abort(400, f"limit must be a whole number from 1 to {MAX_LIMIT}, not {raw!r:.40}")
        return max(1, min(MAX_LIMIT, n))

    def render_dashboard(form: Mapping[str, Any] | None = None, error: str | None = None,
                         field: str | None = None) -> str:
        return render_template("dashboard.html", config=ctx.config, hosts=hosts(),
                               rollouts=store.rollouts(DASHBOARD_ROLLOUTS),
                               tags={p: tags(p) for p in ctx.config.projects},
                               form=form or {}, error=error, field=field)

    @app.get("/healthz")
    def healthz() -> Any:
        """200 when every service of this process is healthy and the bus takes
        a message (a confirmed publish to ``deploybus.ping``, which nobody
        reads): what a deploy from this page needs."""
        ok = healthy()
        try:
            ctx.bus.publish(topics.PING, b"{}")
            bus = "up"
        except BusError as exc:
            ok, bus = False, f"down: {exc}"
        return jsonify({"ok": ok, "bus": bus, "stats": ctx.stats.snapshot()}), \
            (200 if ok else 503)

    @app.get("/")
    def dashboard() -> Any:
        return render_dashboard()

    @app.post("/deploy")
    def deploy_form() -> Any:
        check_csrf()
        data = {"project": request.form.get("project"),
                "environment": request.form.get("environment"),
                "ref": request.form.get("ref", "").strip(),
                "hosts": request.form.getlist("hosts") or None}
        try:
            rollout = start_rollout(data, current_user())
        except FieldError as exc:
            return render_dashboard(data, str(exc), exc.field), 400
        return redirect(url_for("rollout_page", rollout=rollout))

    @app.get("/rollouts")
    def rollouts_page() -> Any:
        return render_template("rollouts.html", rollouts=store.rollouts(RECENT_ROLLOUTS))

    @app.get("/rollouts/<rollout>")
    def rollout_page(rollout: str) -> Any:
        if not NAME_RE.fullmatch(rollout):
            abort(404, f"{rollout!r:.80} is not a rollout id")
        record = store.rollout(rollout)
        return render_template("rollout.html", rollout_id=rollout,
                               r=rollout_view(record) if record else None)

    @app.post("/rollouts/<rollout>/control")
    def rollout_control_form(rollout: str) -> Any:
        """The rollout page's buttons without JavaScript: send, then back to the page."""
        check_csrf()
        action = request.form.get("action")
        refused = control_refusal(rollout, action)
        if refused:
            flash(refused[1], "error")
        else:
            send_control(rollout, str(action), current_user())
            flash(f"{action} sent to the orchestrator; the log below shows what it did", "info")
        return redirect(url_for("rollout_page", rollout=rollout), code=303)

    @app.get("/api/hosts")
    def api_hosts() -> Any:
        return jsonify(hosts())

    @app.get("/api/projects")
    def api_projects() -> Any:
        return jsonify([{"name": p.name, "git": redact.url(p.git), "tags": tags(p.name)}
                        for p in ctx.config.projects.values()])

    @app.get("/api/rollouts")
    def api_rollouts() -> Any:
        return jsonify(store.rollouts(limit_arg(50)))

    @app.get("/api/rollouts/<rollout>")
    def api_rollout(rollout: str) -> Any:
        r = store.rollout(rollout) if NAME_RE.fullmatch(rollout) else None
        if r is None:
            return jsonify({"id": rollout, "state": "pending", "hosts": [], "logs": [],
                            "final": False, "controls": [], "progress": ""}), 404
        return jsonify(rollout_view(r))

    @app.post("/api/rollouts")
    def api_start() -> Any:
        check_csrf()
        data = json_body()
        if not isinstance(data, dict):
            return jsonify({"error": "the body must be a JSON object"}), 400
        try:
            rollout = start_rollout(data, current_user())
        except FieldError as exc:
            return jsonify({"error": str(exc), "field": exc.field}), 400
        return jsonify({"rollout": rollout, "url": url_for("api_rollout", rollout=rollout)}), 202

    @app.post("/api/rollouts/<rollout>/control")
    def api_control(rollout: str) -> Any:
        """Pause, resume, promote or abort: ``{"action": ...}`` -> 202
        ``{"sent": action}``; 400 unknown action, 404 unknown rollout, 409 final."""
        check_csrf()
        data = json_body(silent=True)
        action = data.get("action") if isinstance(data, dict) else None
        refused = control_refusal(rollout, action)
        if refused:
            return jsonify({"error": refused[1]}), refused[0]
        send_control(rollout, str(action), current_user())
        return jsonify({"sent": action}), 202

    @app.get("/api/csrf")
    def api_csrf() -> Any:
        return jsonify({"csrf": csrf_token()})

    return app
