"""Message bus transports, chosen by URL scheme.

``memory://`` in-process, ``stomp://`` / ``stomp+ssl://`` STOMP 1.2 (stomp.py),
``amqp://`` / ``amqps://`` AMQP 0-9-1 (kombu). See :mod:`deploybus.bus.base`
for the contract they all pass.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from deploybus.bus.base import (
    DEADLETTER_QUEUE,
    DEADLETTER_TOPIC,
    DEFAULT_PREFETCH,
    Delivery,
    Handler,
    Subscription,
    Transport,
    topic_matches,
)
from deploybus.errors import UnsupportedURL

__all__ = [
    "DEADLETTER_QUEUE", "DEADLETTER_TOPIC", "DEFAULT_PREFETCH", "Delivery", "Handler",
    "Subscription", "Transport", "connect", "redact", "topic_matches",
]

SCHEMES = ("memory", "stomp", "stomp+ssl", "amqp", "amqps")


def connect(url: str, *, client_name: str = "deploybus",
            publish_timeout: float = 30.0) -> Transport:
    """Open the transport ``url`` names. Connecting is lazy where the driver
    allows it; reconnects happen inside the transport for as long as it lives.
    ``publish_timeout`` bounds how long a publish keeps trying while the broker
    is unreachable before it raises :class:`BusConnectionError`."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from deploybus.bus.memory import MemoryTransport
        return MemoryTransport(url)
    if scheme in ("stomp", "stomp+ssl"):
        from deploybus.bus.stomp import StompTransport
        return StompTransport(url, client_name=client_name, publish_timeout=publish_timeout)
    if scheme in ("amqp", "amqps"):
        from deploybus.bus.amqp import AmqpTransport
        return AmqpTransport(url, client_name=client_name, publish_timeout=publish_timeout)
    raise UnsupportedURL(f"unsupported bus URL scheme {scheme!r} in {redact(url)!r}; "
                         f"use one of {', '.join(s + '://' for s in SCHEMES)}")


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and errors
    (:func:`deploybus.redact.url`)."""
    from deploybus.redact import url as redact_url
    return redact_url(url)
