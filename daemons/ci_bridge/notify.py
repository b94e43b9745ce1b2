"""CI that reports its own builds: ``deploybus notify build`` (a job step or
any CI script) and an HTTP endpoint for Jenkins's Notification plugin. Both
publish the same signed ``ci.build`` the bridge does, so auto-deploy does
not care which way a build was heard of.

The endpoint, ``POST /ci/<server>/jenkins``, takes the plugin's JSON
(``name``, ``url``, ``build.phase`` STARTED/COMPLETED/FINALIZED,
``build.status``, ``build.number``, ``build.full_url``, ``build.scm.commit``,
``build.scm.branch``) with the shared secret of ``ci.<server>.notify_secret``
in a ``?secret=`` query parameter or an ``Authorization: Bearer`` header
(the plugin can only send a URL), compared in constant time. The job must
be the ``ci.job`` of a project on that server: that says which project the
commit belongs to. Served by waitress (a production WSGI server) from
``deploybus ci-bridge --listen HOST:PORT``.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

from flask import Flask, jsonify, request

from deploybus import protocol, topics
from deploybus.config import Config
from deploybus.errors import BusError, DeployBusError
from deploybus.runner import STOP_GRACE, Context, Service

#: Largest notification body accepted.
MAX_BODY = 256 * 1024

#: The plugin's phases and what they mean here.
PHASES = {"QUEUED": "queued", "STARTED": "started", "COMPLETED": "finished",
          "FINALIZED": "finished"}


def build_event(*, project: str, ref: str, commit: str, job: str, number: int | None,
                state: str, backend: str, result: str | None = None, url: str | None = None,
                duration: float | None = None, console_tail: list[str] | None = None
                ) -> protocol.CiBuild:
    """A ``ci.build`` a CI reported itself; its ``build`` name is
    ``<backend>/<job>#<number>``, the same for every phase of it."""
    if ref and not ref.startswith("refs/"):
        ref = f"refs/heads/{ref.removeprefix('origin/')}"
    return protocol.parse("ci.build", {
        "project": project, "ref": ref, "commit": commit, "state": state,
        "backend": backend, "job": job, "build": f"{backend}/{job}#{number}",
        **({"number": number} if number is not None else {}),
        **({"result": result} if result else {}), **({"url": url} if url else {}),
        **({"duration": duration} if duration is not None else {}),
        **({"console_tail": console_tail[-200:]} if console_tail else {})})  # type: ignore[return-value]


def project_of(cfg: Config, server: str, job: str) -> str | None:
    """The project whose ``ci:`` builds ``job`` on ``server``."""
    for pc in cfg.projects.values():
        if pc.ci is not None and pc.ci.server == server and pc.ci.job == job:
            return pc.name
    return None


def from_jenkins(cfg: Config, server: str, payload: Any) -> protocol.CiBuild | None:
    """The ``ci.build`` of a Jenkins Notification plugin payload; None for a
    phase that says nothing new; DeployBusError saying what is wrong."""
    if not isinstance(payload, dict) or not isinstance(payload.get("build"), dict):
        raise DeployBusError("not a Jenkins notification: no 'build' object")
    job, build = payload.get("name"), payload["build"]
    if not isinstance(job, str):
        raise DeployBusError("not a Jenkins notification: no job 'name'")
    state = PHASES.get(str(build.get("phase")))
    if state is None:
        return None
    project = project_of(cfg, server, job)
    if project is None:
        raise DeployBusError(f"job {job!r:.80} builds no project on {server} (ci.job)")
    scm = build.get("scm") if isinstance(build.get("scm"), dict) else {}
    number = build.get("number")
    return build_event(project=project, ref=str(scm.get("branch") or ""),
                       commit=str(scm.get("commit") or ""), job=job,
                       number=number if isinstance(number, int) else None, state=state,
                       backend=server,
                       result=str(build["status"]) if state == "finished"
                       and build.get("status") else None,
                       url=build.get("full_url") if isinstance(build.get("full_url"), str)
                       else None)


def create_app(ctx: Context) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.post("/ci/<server>/jenkins")
    def jenkins(server: str) -> Any:
        cs = ctx.config.ci_servers.get(server)
        if cs is None or cs.notify_secret is None:
            return jsonify({"error": f"no CI server {server!r:.60} takes notifications"}), 404
        secret = cs.notify_secret.read_text().strip().encode()
        given = (request.args.get("secret") or request.headers.get("Authorization", "")
                 .removeprefix("Bearer ")).encode()
        if not given or not hmac.compare_digest(given, secret):
            return jsonify({"error": "wrong or missing secret"}), 401
        payload = request.get_json(silent=True)
        try:
            event = from_jenkins(ctx.config, server, payload)
        except DeployBusError as exc:
            return jsonify({"error": str(exc)}), 400
        if event is None:
            return jsonify({"ignored": "phase"}), 202
        try:
            ctx.bus.publish(topics.CI_EVENTS, protocol.seal(
                event, key=ctx.signing_key, sender=ctx.sender, correlation=event.build))
        except BusError as exc:
            return jsonify({"error": f"the message bus is unreachable: {exc}"}), 503
        return jsonify({"published": event.build, "state": event.state.value}), 202

    return app


class NotifyServer(Service):
    """The endpoint, served by waitress from a thread."""

    name = "ci_notify"

    def __init__(self, ctx: Context, *, host: str, port: int) -> None:
        super().__init__(ctx)
        from waitress.server import create_server
        self.server = create_server(create_app(ctx), host=host, port=port, threads=4,
                                    ident="deploybus")
        self.port = int(self.server.effective_port)  # type: ignore[union-attr]
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="ci-notify")

    def start(self) -> None:
        self.thread.start()
        self.log.info("ci notifications listening", port=self.port)

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.server.close()
        self.thread.join(timeout)
