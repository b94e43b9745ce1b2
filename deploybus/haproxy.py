"""HAProxy runtime API: take a host's server out of rotation and put it back.

For environments that name an HAProxy backend, the orchestrator drains each
host's server before asking it to deploy (``set server B/S state drain``, then
``maint`` once its sessions are gone or after ``drain_timeout``) and sets it
``ready`` again after the host reports success (the agent reports success
only after its health check passed). The runtime API is a line protocol on
the admin socket (``stats socket ... level admin``), unix path or
``host:port``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from deploybus.errors import HAProxyError  # still importable from here


@dataclass(frozen=True)
class HAProxy:
    socket: str
    backend: str
    servers: dict[str, str] = field(default_factory=dict)  # host -> server name
    drain_timeout: float = 30.0

    def server(self, host: str) -> str:
        return self.servers.get(host, host)

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one runtime API command; return HAProxy's answer."""
        try:
            if self.socket.startswith("/"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                s.connect(self.socket)
            else:
                host, _, port = self.socket.rpartition(":")
                s = socket.create_connection((host, int(port)), timeout=timeout)
            with s:
                s.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise HAProxyError(f"HAProxy runtime API at {self.socket}: {exc}") from None
        answer = b"".join(chunks).decode(errors="replace").strip()
        if answer and not answer.startswith("#") and ("No such" in answer or "Unknown" in answer
                                                      or "Require" in answer):
            raise HAProxyError(f"HAProxy refused {line!r}: {answer}")
        return answer

    def state(self, host: str) -> dict[str, str]:
        """The ``show servers state`` row of ``host``'s server, by column name."""
        out = self.command(f"show servers state {self.backend}")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        header = next((ln for ln in lines if ln.startswith("# be_id")), None)
        if header is None:
            raise HAProxyError(f"unexpected answer to show servers state: {out[:200]}")
        names = header.lstrip("# ").split()
        for ln in lines:
            if ln.startswith("#") or ln[0].isdigit() is False:
                continue
            row = dict(zip(names, ln.split(), strict=False))
            if row.get("srv_name") == self.server(host):
                return row
        raise HAProxyError(f"no server {self.server(host)!r} in backend {self.backend!r}")

    def sessions(self, host: str) -> int:
        out = self.command("show stat")
        lines = out.splitlines()
        names = lines[0].lstrip("# ").split(",") if lines else []
        for ln in lines[1:]:
            row = dict(zip(names, ln.split(","), strict=False))
            if row.get("pxname") == self.backend and row.get("svname") == self.server(host):
                return int(row.get("scur") or 0)
        return 0

    def drain(self, host: str) -> None:
        """Stop new traffic to ``host``, wait for its sessions, then maintenance."""
        target = f"{self.backend}/{self.server(host)}"
        self.command(f"set server {target} state drain")
        deadline = time.monotonic() + self.drain_timeout
        while self.sessions(host) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        self.command(f"set server {target} state maint")

    def ready(self, host: str) -> None:
        self.command(f"set server {self.backend}/{self.server(host)} state ready")
