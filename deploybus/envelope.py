"""The message envelope every deploybus message travels in.

JSON with one schema version field, validated on receipt::

    {"v": 1, "id": "...", "type": "deploy.request", "at": "2026-...Z",
     "expires": "2026-...Z" | null, "sender": "orchestrator@web1",
     "correlation": "<rollout id>" | null, "body": {...}, "sig": {...} | null}

``sig`` (see :mod:`deploybus.signing`) covers the canonical JSON of every other
field, so nothing but the signature itself can change unnoticed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from deploybus.errors import EnvelopeError

#: The envelope schema version this code writes and accepts.
SCHEMA_VERSION = 1

#: Largest envelope accepted, in bytes: deploy logs are batched below this.
MAX_SIZE = 1024 * 1024

#: Message types deploybus knows.
TYPES = frozenset({
    "git.push", "svn.commit", "ci.build", "package.update", "package.updated", "presence",
    "deploy.rollout", "deploy.rollout.status", "deploy.control", "deploy.request",
    "deploy.progress", "deploy.result",
})

_FIELDS = ("v", "id", "type", "at", "expires", "sender", "correlation", "body", "sig")


def now() -> datetime:
    return datetime.now(UTC)


def fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str, field: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise EnvelopeError(f"{field}: not an ISO 8601 time: {value!r:.60}") from None
    if t.tzinfo is None:
        raise EnvelopeError(f"{field}: time without a timezone: {value!r:.60}")
    return t


@dataclass(frozen=True)
class Envelope:
    """One message. Build with :func:`new`, read with :func:`decode`."""

    v: int
    id: str
    type: str
    at: str
    expires: str | None
    sender: str
    correlation: str | None
    body: dict[str, Any]
    sig: dict[str, str] | None = None

    @property
    def at_time(self) -> datetime:
        return parse_time(self.at, "at")

    @property
    def expires_time(self) -> datetime | None:
        return parse_time(self.expires, "expires") if self.expires else None

    def unsigned_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies the body, which cost more
        # than the signature itself (docs/performance.md).
        return {"v": self.v, "id": self.id, "type": self.type, "at": self.at,
                "expires": self.expires, "sender": self.sender,
                "correlation": self.correlation, "body": self.body}

    def signing_bytes(self) -> bytes:
        """Canonical bytes the signature covers: sorted keys, no whitespace."""
        return json.dumps(self.unsigned_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def with_sig(self, sig: dict[str, str]) -> Envelope:
        return replace(self, sig=sig)

    def encode(self) -> bytes:
        return json.dumps(self.unsigned_dict() | {"sig": self.sig}, separators=(",", ":"),
                          ensure_ascii=False).encode()


def new(type: str, body: dict[str, Any], *, sender: str, correlation: str | None = None,
        ttl: float | None = None, at: datetime | None = None) -> Envelope:
    """A fresh unsigned envelope; ``ttl`` seconds sets ``expires``."""
    if type not in TYPES:
        raise EnvelopeError(f"unknown message type {type!r}")
    t = at or now()
    return Envelope(
        v=SCHEMA_VERSION, id=uuid.uuid4().hex, type=type, at=fmt_time(t),
        expires=fmt_time(t + timedelta(seconds=ttl)) if ttl is not None else None,
        sender=sender, correlation=correlation, body=body,
    )


def _require(d: dict[str, Any], key: str, kinds: type | tuple[type, ...], *,
             optional: bool = False) -> Any:
    if key not in d:
        raise EnvelopeError(f"missing field {key!r}")
    value = d[key]
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is int:
        raise EnvelopeError(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def decode(raw: bytes) -> Envelope:
    """Parse and validate ``raw``; raise :class:`EnvelopeError` saying why not."""
    if len(raw) > MAX_SIZE:
        raise EnvelopeError(f"message of {len(raw)} bytes exceeds {MAX_SIZE}")
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(d, dict):
        raise EnvelopeError("not a JSON object")
    v = _require(d, "v", int)
    if v != SCHEMA_VERSION:
        raise EnvelopeError(f"unsupported schema version {v!r} (this build reads {SCHEMA_VERSION})")
    extra = set(d) - set(_FIELDS)
    if extra:
        raise EnvelopeError(f"unknown fields {sorted(extra)}")
    mid = _require(d, "id", str)
    if not 8 <= len(mid) <= 64 or not mid.isascii():
        raise EnvelopeError("id must be 8-64 ASCII characters")
    mtype = _require(d, "type", str)
    if mtype not in TYPES:
        raise EnvelopeError(f"unknown message type {mtype!r:.60}")
    at = _require(d, "at", str)
    parse_time(at, "at")
    expires = _require(d, "expires", str, optional=True)
    if expires is not None:
        parse_time(expires, "expires")
    sender = _require(d, "sender", str)
    correlation = _require(d, "correlation", str, optional=True)
    body = _require(d, "body", dict)
    sig = _require(d, "sig", dict, optional=True)
    if sig is not None and not all(isinstance(sig.get(k), str) for k in ("alg", "key", "value")):
        raise EnvelopeError("sig must have string alg, key and value")
    env = Envelope(v=v, id=mid, type=mtype, at=at, expires=expires, sender=sender,
                   correlation=correlation, body=body, sig=sig)
    try:
        env.signing_bytes()
    except UnicodeEncodeError:
        raise EnvelopeError("message contains unpaired surrogates") from None
    return env


def progress_entries(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of a ``deploy.progress`` body: ``{step, message, lines, at}``
    each; an agent sends the progress of one deploy that comes close together
    as one message, and a ``deploy.result`` may carry the last ones.
    EnvelopeError if the body has no list of entries."""
    entries = body.get("entries")
    if not isinstance(entries, list):
        raise EnvelopeError("progress without a list of entries")
    return [e for e in entries if isinstance(e, dict)]
