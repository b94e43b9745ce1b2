"""ed25519 signatures, trusted keys with roles, signer policy and replay refusal.

Every message on the bus is signed. Each trusted key has a role
(:class:`deploybus.protocol.Role`): what it may sign is fixed by the role
(:data:`deploybus.protocol.SENDERS`: only orchestrator keys sign deploy
requests and rollout status; only a host's own key signs its presence,
progress and results), and what a person, web or CI key may ask for
(projects x environments) by the default-deny policy. :class:`Verifier`
is the one place these rules are checked:

* :meth:`Verifier.identify`: signed by a trusted key, the signature covers
  the exact envelope, the key's role may send this type, a host's message
  names that host; for messages that cause nothing, also fresh.
* :meth:`Verifier.admit`: for messages that cause something (a rollout, a
  control, a deploy request): not expired, not dated in the future beyond
  the allowed clock skew, not seen before, and allowed by the policy for
  its project and environment. Kept apart from identify because an agent
  answers a redelivered request from its journal before it checks freshness.

Key files: the private key is PKCS#8 PEM (mode 0600); the public key is one
line ``ed25519 <base64 of the 32 raw bytes> <name>``, the form the config's
``keys.trusted`` entries take too.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploybus.envelope import Envelope, now
from deploybus.errors import (
    ConfigError,
    ExpiredError,
    LapsedError,
    ReplayError,
    SignatureError,
)
from deploybus.protocol import ACTIONS, HOST_BOUND, SENDERS, Body, Role

#: Clock difference between hosts that is tolerated for ``at``.
DEFAULT_SKEW = timedelta(seconds=60)

#: An action-causing message must expire within this time of being sent.
MAX_TTL = timedelta(days=1)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]


def public_line(public: Ed25519PublicKey, name: str) -> str:
    raw = public.public_bytes_raw()
    return f"ed25519 {base64.b64encode(raw).decode()} {name}"


def parse_public(text: str, *, where: str = "public key") -> Ed25519PublicKey:
    parts = text.strip().split()
    if len(parts) < 2 or parts[0] != "ed25519":
        raise ConfigError(f"{where}: expected 'ed25519 <base64> [name]'")
    try:
        raw = base64.b64decode(parts[1], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: not an ed25519 public key ({exc})") from None


class SigningKey:
    """A named private key that signs envelopes."""

    def __init__(self, name: str, private: Ed25519PrivateKey) -> None:
        self.name, self.private = name, private
        self.public = private.public_key()
        self.id = key_id(self.public)

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str], name: str | None = None) -> SigningKey:
        p = Path(path)
        try:
            # Imported here: cryptography's serialization costs a process that
            # only verifies (an agent without a key) about 3 MB.
            from cryptography.hazmat.primitives import serialization
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except OSError as exc:
            raise ConfigError(f"cannot read private key {p}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{p} is not a usable private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{p} is not an ed25519 private key")
        return cls(name or p.stem, key)

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``NAME.key`` (0600) and ``NAME.pub``; refuse to overwrite."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        priv, pub = d / f"{self.name}.key", d / f"{self.name}.pub"
        for p in (priv, pub):
            if p.exists():
                raise FileExistsError(f"{p} exists; not overwriting a key")
        from cryptography.hazmat.primitives import serialization
        pem = self.private.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub.write_text(public_line(self.public, self.name) + "\n")
        return priv, pub

    def sign(self, env: Envelope) -> Envelope:
        value = self.private.sign(env.signing_bytes())
        return env.with_sig({"alg": "ed25519", "key": self.id,
                             "value": base64.b64encode(value).decode()})


@dataclass(frozen=True)
class TrustedKey:
    """A public key the config trusts, its name and its role; a host key
    speaks for ``host`` only."""

    name: str
    role: Role
    public: Ed25519PublicKey
    host: str | None = None


@dataclass(frozen=True)
class Signer:
    """Who signed a message: the trusted key's name, role and (host keys) host."""

    name: str
    role: Role
    host: str | None = None

    def __str__(self) -> str:
        return self.name


#: Roles that ask for rollouts; the policy says for what.
REQUESTERS = frozenset({Role.PERSON, Role.WEB, Role.CI})


@dataclass
class PolicyRule:
    """A key (``signer``) or every key of a ``role`` may ask for rollouts of
    ``projects`` in ``environments`` (glob patterns)."""

    signer: str | None = None
    role: Role | None = None
    projects: list[str] = field(default_factory=lambda: ["*"])
    environments: list[str] = field(default_factory=lambda: ["*"])

    def allows(self, signer: Signer | str, project: str, environment: str) -> bool:
        name = signer.name if isinstance(signer, Signer) else signer
        role = signer.role if isinstance(signer, Signer) else None
        return ((self.signer is not None and name == self.signer
                 or self.role is not None and role == self.role)
                and any(fnmatch.fnmatchcase(project, p) for p in self.projects)
                and any(fnmatch.fnmatchcase(environment, e) for e in self.environments))


class ReplayCache:
    """Ids seen within their time to live; optionally kept in a file across restarts."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        if self.path and self.path.exists():
            t = time.time()
            for line in self.path.read_text().splitlines():
                try:
                    mid, until = json.loads(line)
                    if until > t:
                        self.seen[str(mid)] = float(until)
                except (ValueError, TypeError):
                    continue  # a torn last line after a crash
            self._rewrite()

    def _rewrite(self) -> None:
        assert self.path is not None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps([k, v]) + "\n" for k, v in self.seen.items()))
        os.replace(tmp, self.path)

    def check_and_add(self, mid: str, until: float) -> None:
        with self.lock:
            t = time.time()
            if len(self.seen) > 10000:
                self.seen = {k: v for k, v in self.seen.items() if v > t}
            if self.seen.get(mid, 0) > t:
                raise ReplayError(f"message {mid} was already received (replay)")
            self.seen[mid] = until
            if self.path:
                with self.path.open("a") as f:
                    f.write(json.dumps([mid, until]) + "\n")


class Verifier:
    """Checks signatures, roles, freshness, replay and policy; see the module docstring."""

    def __init__(self, trusted: dict[str, TrustedKey], policy: list[PolicyRule], *,
                 replay: ReplayCache | None = None, skew: timedelta = DEFAULT_SKEW) -> None:
        self.keys = {key_id(k.public): k for k in trusted.values()}
        self.policy = policy
        self.replay = replay or ReplayCache()
        self.skew = skew

    def signer(self, env: Envelope) -> Signer:
        """Who signed ``env`` with a trusted key; raises if unsigned or bad."""
        if env.sig is None:
            raise SignatureError("message is not signed")
        if env.sig.get("alg") != "ed25519":
            raise SignatureError(f"unsupported signature algorithm {env.sig.get('alg')!r:.30}")
        key = self.keys.get(env.sig.get("key", ""))
        if key is None:
            raise SignatureError(f"signed by unknown key {env.sig.get('key')!r:.40}")
        try:
            key.public.verify(base64.b64decode(env.sig["value"], validate=True),
                              env.signing_bytes())
        except (InvalidSignature, ValueError):
            raise SignatureError(f"bad signature (tampered message or wrong key "
                                 f"{key.name})") from None
        return Signer(key.name, key.role, key.host)

    def identify(self, env: Envelope, body: Body | None = None) -> Signer:
        """The signer of ``env``, if its key's role may send this type and a
        host's message (presence, progress, result) names the host the key
        speaks for; a message that causes nothing must also be fresh."""
        signer = self.signer(env)
        if signer.role not in SENDERS.get(env.type, ()):
            raise SignatureError(f"{signer.name} ({signer.role}) may not send {env.type}")
        if env.type in HOST_BOUND:
            named = getattr(body, "host", None) if body is not None else env.body.get("host")
            if named != signer.host:
                raise SignatureError(f"{signer.name} speaks for host {signer.host!r}, "
                                     f"not {named!r:.70}")
        if env.type not in ACTIONS:
            self._fresh(env)
        return signer

    def _fresh(self, env: Envelope) -> datetime:
        t = now()
        if env.at_time > t + self.skew:
            raise ExpiredError(f"message is dated in the future ({env.at})")
        expires = env.expires_time
        if expires is None:
            raise ExpiredError("message without an expiry")
        if expires - env.at_time > MAX_TTL:
            raise ExpiredError(f"expiry is more than {MAX_TTL} after sending")
        if expires <= t:
            raise LapsedError(f"message expired at {env.expires}")
        return expires

    def allowed(self, signer: Signer, project: str, environment: str) -> bool:
        """May ``signer`` act on ``project`` in ``environment``? Orchestrator
        keys may (their requests carry what the policy allowed a requester);
        person, web and CI keys only as a policy rule says; others never."""
        if signer.role is Role.ORCHESTRATOR:
            return True
        return signer.role in REQUESTERS and any(
            r.allows(signer, project, environment) for r in self.policy)

    def admit(self, env: Envelope, signer: Signer, *, project: str, environment: str) -> None:
        """Full check of a message that causes something, from ``signer``
        (:meth:`identify`): fresh, not a replay, allowed by the policy."""
        expires = self._fresh(env)
        if not self.allowed(signer, project, environment):
            raise SignatureError(f"signer {signer.name!r} ({signer.role}) may not act on "
                                 f"{project!r} in {environment!r}")
        self.replay.check_and_add(env.id, expires.timestamp() + self.skew.total_seconds())

    def verify(self, env: Envelope, *, project: str, environment: str) -> Signer:
        """:meth:`identify` and :meth:`admit` together; returns the signer."""
        signer = self.identify(env)
        self.admit(env, signer, project=project, environment=environment)
        return signer
