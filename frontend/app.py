"""Flask application: dashboard, deploy form, live rollout page, JSON API."""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import git
from flask import Flask, abort, jsonify, redirect, render_template, request, session, url_for

from deploybus import envelope, topics
from deploybus.errors import DeployBusError
from deploybus.refs import check_name, check_ref
from deploybus.runner import Context
from deploybus.store import Store

#: Seconds a list of tags is cached per project.
TAG_CACHE_SECONDS = 15.0

#: Hosts silent for longer than this many heartbeat intervals are shown as down.
DOWN_AFTER_BEATS = 3


def create_app(ctx: Context, store: Store, *, healthy: Callable[[], bool] = lambda: True,
               secret_key: bytes | None = None) -> Flask:
    app = Flask(__name__)
    app.secret_key = secret_key or secrets.token_bytes(32)
    tag_cache: dict[str, tuple[float, list[dict[str, str]]]] = {}

    def tags(project: str) -> list[dict[str, str]]:
        cached = tag_cache.get(project)
        if cached and time.monotonic() - cached[0] < TAG_CACHE_SECONDS:
            return cached[1]
        pc = ctx.config.projects[project]
        try:
            out = str(git.cmd.Git().ls_remote("--tags", "--refs", "--", pc.git))
        except git.GitCommandError:
            out = ""
        result = []
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            result.append({"tag": ref.removeprefix("refs/tags/"), "commit": sha})
        result.sort(key=lambda t: t["tag"], reverse=True)
        tag_cache[project] = (time.monotonic(), result)
        return result

    def host_rows() -> list[dict[str, Any]]:
        seen = {h["name"]: h for h in store.hosts()}
        rows = []
        for env in ctx.config.environments.values():
            for name in env.hosts:
                h = seen.get(name) or {}
                info = h.get("info", {})
                interval = info.get("interval", 10) or 10
                rows.append({
                    "environment": env.name, "host": name,
                    "alive": bool(h) and h["age"] < interval * DOWN_AFTER_BEATS,
                    "last_seen": h.get("last_seen"),
                    "projects": info.get("projects", {}),
                })
        return rows

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return session["csrf"]

    def check_csrf() -> None:
        sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
        if not hmac.compare_digest(sent, session.get("csrf", "")) or not sent:
            abort(400, "missing or wrong CSRF token; reload the page")

    app.jinja_env.globals["csrf_token"] = csrf_token

    def start_rollout(data: dict[str, Any], user: str) -> str:
        project = check_name(data.get("project"), "project")
        environment = check_name(data.get("environment"), "environment")
        ref = check_ref(data.get("ref"))
        if project not in ctx.config.projects:
            raise DeployBusError(f"unknown project {project!r}")
        ec = ctx.config.environments.get(environment)
        if ec is None:
            raise DeployBusError(f"unknown environment {environment!r}")
        hosts = data.get("hosts") or None
        if hosts is not None:
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise DeployBusError("hosts must be a list of names")
            bad = [h for h in hosts if h not in ec.hosts]
            if bad:
                raise DeployBusError(f"not in {environment}: {', '.join(bad)}")
        rollout = uuid.uuid4().hex[:16]
        env = envelope.new("deploy.rollout", {
            "rollout": rollout, "project": project, "environment": environment, "ref": ref,
            "hosts": hosts, "user": user}, sender=f"web@{ctx.host}", correlation=rollout,
            ttl=3600)
        # into the orchestrator's queue even if none has run on this broker yet
        ctx.bus.publish_for(topics.ROLLOUTS, topics.ORCHESTRATOR_ROLLOUTS,
                            ctx.signing_key.sign(env).encode())
        return rollout

    def current_user() -> str:
        # Login arrives with the front-end issue; until then the web acts as "web".
        return "web"

    @app.get("/healthz")
    def healthz() -> Any:
        ok = healthy()
        return jsonify({"ok": ok, "stats": ctx.stats.snapshot()}), (200 if ok else 503)

    @app.get("/")
    def dashboard() -> Any:
        return render_template("dashboard.html", config=ctx.config, hosts=host_rows(),
                               rollouts=store.rollouts(15),
                               tags={p: tags(p) for p in ctx.config.projects})

    @app.post("/deploy")
    def deploy_form() -> Any:
        check_csrf()
        data = {"project": request.form.get("project"),
                "environment": request.form.get("environment"),
                "ref": request.form.get("ref", "").strip(),
                "hosts": request.form.getlist("hosts") or None}
        try:
            rollout = start_rollout(data, current_user())
        except DeployBusError as exc:
            return render_template("dashboard.html", config=ctx.config, hosts=host_rows(),
                                   rollouts=store.rollouts(15), error=str(exc),
                                   tags={p: tags(p) for p in ctx.config.projects}), 400
        return redirect(url_for("rollout_page", rollout=rollout))

    @app.get("/rollouts/<rollout>")
    def rollout_page(rollout: str) -> Any:
        return render_template("rollout.html", rollout_id=rollout)

    @app.get("/api/hosts")
    def api_hosts() -> Any:
        return jsonify(host_rows())

    @app.get("/api/projects")
    def api_projects() -> Any:
        return jsonify([{"name": p.name, "git": p.git, "tags": tags(p.name)}
                        for p in ctx.config.projects.values()])

    @app.get("/api/rollouts")
    def api_rollouts() -> Any:
        return jsonify(store.rollouts(int(request.args.get("limit", 50))))

    @app.get("/api/rollouts/<rollout>")
    def api_rollout(rollout: str) -> Any:
        r = store.rollout(rollout)
        if r is None:
            return jsonify({"id": rollout, "state": "pending", "hosts": [], "logs": []}), 404
        return jsonify(r)

    @app.post("/api/rollouts")
    def api_start() -> Any:
        check_csrf()
        try:
            rollout = start_rollout(request.get_json(force=True) or {}, current_user())
        except DeployBusError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"rollout": rollout, "url": url_for("api_rollout", rollout=rollout)}), 202

    @app.get("/api/csrf")
    def api_csrf() -> Any:
        return jsonify({"csrf": csrf_token()})

    return app
