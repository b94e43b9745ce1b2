"""Serves the Flask app from a thread, as a :class:`deploybus.runner.Service`."""

from __future__ import annotations

import threading
from collections.abc import Callable

from werkzeug.serving import make_server

from deploybus.frontend.app import create_app
from deploybus.runner import STOP_GRACE, Context, Service
from deploybus.store import Store


class WebServer(Service):
    name = "web"

    def __init__(self, ctx: Context, *, bind: str = "127.0.0.1", port: int = 8080,
                 store: Store | None = None, healthy: Callable[[], bool] | None = None,
                 secret_key: bytes | None = None) -> None:
        super().__init__(ctx)
        self.store = store or Store(ctx.config.state_url)
        self.app = create_app(ctx, self.store, healthy=healthy or (lambda: True),
                              secret_key=secret_key)
        self.server = make_server(bind, port, self.app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="web")

    def start(self) -> None:
        self.thread.start()
        self.log.info("web listening", url=f"http://{self.server.host}:{self.port}/")

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.server.shutdown()
        self.thread.join(timeout)
