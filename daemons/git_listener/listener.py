"""``deploybus listener``: forge webhooks in, ``git.push`` out, nothing lost.

``POST /hooks`` takes push (and tag push) webhooks from GitHub, GitLab,
Gitea/Forgejo and Bitbucket Cloud (which one sent it is read from its
headers, :mod:`.forges`). A delivery is answered once its events are in the
durable outbox (:mod:`deploybus.outbox`), fsynced: 202 and the number
queued, whether or not the broker is up. A drainer thread publishes the
outbox in order, signed with the listener's key (role ``git``), and deletes
each event once the broker confirmed it; it also publishes what the git
hook queued in the same outbox.

What each answer means (nothing but a 202 writes anything):

====  ===============================================================
200   a ping, or a delivery already accepted (the same delivery id)
202   queued (``{"queued": N}``), or an event no project acts on
      (``{"ignored": ...}``)
400   not JSON, or not a payload of the forge its headers name
401   signature or token missing or wrong (logged without either)
404   no project takes webhooks from this repository
405   not a POST; 413 body over ``listener.max_body``; 415 not JSON
====  ===============================================================

``GET /healthz`` answers 200 with the outbox's state and the counters (503
when events have waited for the bus more than a minute).

Served by waitress, a production WSGI server; behind a reverse proxy,
forward ``/hooks`` to ``listener.bind``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from flask import Flask, Response, request

from deploybus import protocol, topics
from deploybus.config import Config, ProjectConfig
from deploybus.daemons.git_listener import forges
from deploybus.errors import BusError, EnvelopeError
from deploybus.outbox import Event, Outbox, drain, drain_lock
from deploybus.runner import STOP_GRACE, Context, Service

#: Seconds between looks at the outbox for rows the git hook added.
POLL = 0.5
#: Longest wait between two drain attempts while the broker is away.
MAX_BACKOFF = 30.0
#: Seconds an event may wait before /healthz says the listener is unwell.
STALE = 60.0


def _json(data: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


class Listener(Service):
    """The HTTP receiver (waitress, in a thread) and the outbox's drainer."""

    name = "listener"

    def __init__(self, ctx: Context, *, bind: str | None = None) -> None:
        super().__init__(ctx)
        from waitress.server import create_server
        cfg = ctx.config
        self.outbox_path = cfg.outbox_path()
        Outbox(self.outbox_path).close()  # created, or a clear error now rather than per request
        self._local = threading.local()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._broker_ok = True
        host, _, port = (bind or cfg.listener.bind).rpartition(":")
        self.server = create_server(create_app(self, cfg), host=host, port=int(port),
                                    threads=8, ident="deploybus",
                                    max_request_body_size=cfg.listener.max_body + 1)
        self.port = int(self.server.effective_port)  # type: ignore[union-attr]
        self._http = threading.Thread(target=self._serve, daemon=True, name="listener-http")
        self._drainer = threading.Thread(target=self._drain_loop, daemon=True,
                                         name="listener-drain")

    # -- the outbox, one SQLite connection per thread ----------------------

    def outbox(self) -> Outbox:
        box = getattr(self._local, "box", None)
        if box is None:
            box = self._local.box = Outbox(self.outbox_path)
        return box

    def queued(self) -> None:
        """Events were added: publish them now rather than at the next poll."""
        self._wake.set()

    def _serve(self) -> None:
        try:
            self.server.run()
        except OSError:
            # stop() closes the sockets under waitress's select(): expected then
            if not self._stopping.is_set():
                raise

    # -- the drainer -------------------------------------------------------

    def _drain_loop(self) -> None:
        box = Outbox(self.outbox_path)
        backoff = 0.0
        last_prune = 0.0
        try:
            while not self._stopping.is_set():
                self._wake.wait(backoff or POLL)
                self._wake.clear()
                if self._stopping.is_set():
                    return
                if time.monotonic() - last_prune > 3600:
                    box.prune_deliveries()
                    last_prune = time.monotonic()
                try:
                    with drain_lock(self.outbox_path) as held:
                        if not held:
                            continue  # a hook's drainer is at it
                        n = drain(box, self.ctx.bus, key=self.ctx.signing_key,
                                  sender=self.ctx.sender, log=self.log)
                except BusError as exc:
                    self.ctx.stats.incr("publish_failed")
                    if self._broker_ok:
                        self.log.warning("bus unreachable; events stay queued",
                                         error=str(exc), pending=box.status()["pending"])
                    self._broker_ok = False
                    backoff = min(MAX_BACKOFF, max(1.0, backoff * 2))
                    continue
                except Exception:  # noqa: BLE001 - the drainer must not die
                    self.log.exception("drain failed")
                    backoff = min(MAX_BACKOFF, max(1.0, backoff * 2))
                    continue
                if not self._broker_ok:
                    self.log.info("bus reachable again")
                self._broker_ok, backoff = True, 0.0
                if n:
                    self.ctx.stats.incr("published", n)
        finally:
            box.close()

    # -- Service -----------------------------------------------------------

    def start(self) -> None:
        self._http.start()
        self._drainer.start()
        self.log.info("listening for webhooks", port=self.port,
                      outbox=str(self.outbox_path))

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self._stopping.set()
        self.server.close()
        self._http.join(timeout)
        self._wake.set()
        self._drainer.join(timeout)

    def healthy(self) -> bool:
        return self._http.is_alive() and self._drainer.is_alive()


def project_for(cfg: Config, delivery: forges.Delivery) -> list[ProjectConfig]:
    """The projects with a webhook whose repository this delivery names."""
    return [p for p in cfg.projects.values()
            if p.webhook is not None and p.vcs == "git"
            and forges.matches(delivery, git_url=p.git, repository=p.webhook.repository)]


def create_app(listener: Listener, cfg: Config) -> Flask:
    app = Flask(__name__)
    stats, log = listener.ctx.stats, listener.log
    max_body = cfg.listener.max_body

    @app.route("/hooks", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def hooks() -> Response:  # noqa: PLR0911 - one answer per case, in the table above
        stats.incr("requests")
        if request.method != "POST":
            return _json({"error": "POST a forge's webhook here"}, 405)
        if request.content_length is not None and request.content_length > max_body:
            stats.incr("too_large")
            return _json({"error": f"body over {max_body} bytes"}, 413)
        body = request.get_data(cache=False)
        if len(body) > max_body:
            stats.incr("too_large")
            return _json({"error": f"body over {max_body} bytes"}, 413)
        forge = forges.detect(request.headers)
        if forge is None:
            stats.incr("malformed")
            return _json({"error": "not a webhook from GitHub, GitLab, Gitea or Bitbucket "
                                   "(no event header)"}, 400)
        if request.mimetype != "application/json":
            stats.incr("wrong_type")
            return _json({"error": f"content type {request.mimetype or 'none'!r}: set the "
                                   f"webhook's content type to application/json"}, 415)
        try:
            delivery = forges.parse(forge, request.headers, body)
        except forges.WebhookError as exc:
            stats.incr("malformed")
            log.warning("webhook refused", forge=forge, status=exc.status, error=str(exc))
            return _json({"error": str(exc)}, exc.status)
        projects = project_for(cfg, delivery)
        if not projects:
            stats.incr("unknown_repository")
            log.warning("webhook for no project", forge=forge,
                        repository=sorted(delivery.repository)[:3])
            return _json({"error": "no project takes webhooks from this repository "
                                   "(projects.<p>.webhook)"}, 404)
        signed = [p for p in projects
                  if p.webhook is not None
                  and forges.verify(forge, request.headers, body, p.webhook.read_secret())]
        if not signed:
            stats.incr("bad_signature")
            log.warning("webhook signature missing or wrong", forge=forge,
                        projects=[p.name for p in projects], delivery=delivery.id)
            return _json({"error": "signature or token missing or wrong"}, 401)
        if delivery.ping:
            stats.incr("pings")
            return _json({"ok": True, "ping": True, "projects": [p.name for p in signed]}, 200)
        if not delivery.pushes:
            stats.incr("ignored")
            return _json({"ignored": delivery.event}, 202)
        events = []
        try:
            for p in signed:
                for push in delivery.pushes:
                    body_ = {**push, "project": p.name}
                    protocol.parse("git.push", body_)
                    events.append(Event(topics.GIT_COMMITS, "git.push", body_))
        except EnvelopeError as exc:
            stats.incr("malformed")
            return _json({"error": str(exc)}, 400)
        key = f"{forge}:{delivery.id}" if delivery.id else \
            f"{forge}:sha256:{hashlib.sha256(body).hexdigest()}"
        if not listener.outbox().add(events, source=forge, delivery=key):
            stats.incr("duplicates")
            return _json({"ok": True, "duplicate": True}, 200)
        listener.queued()
        stats.incr("accepted")
        stats.incr("events_queued", len(events))
        log.info("webhook queued", forge=forge, delivery=delivery.id, events=len(events),
                 projects=[p.name for p in signed])
        return _json({"queued": len(events)}, 202)

    @app.get("/healthz")
    def healthz() -> Response:
        st = listener.outbox().status()
        stale = st["oldest"] is not None and time.time() - st["oldest"] > STALE
        return _json({"ok": not stale, "outbox": st, "bus": listener._broker_ok,
                      "stats": stats.snapshot()}, 503 if stale else 200)

    return app
