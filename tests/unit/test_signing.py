"""deploybus.signing: keys, signatures, freshness, replay and policy."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploybus import envelope
from deploybus.envelope import decode, new
from deploybus.errors import (
    ConfigError,
    EnvelopeError,
    ExpiredError,
    LapsedError,
    ReplayError,
    SignatureError,
)
from deploybus.protocol import Role
from deploybus.signing import (
    MAX_TTL,
    PolicyRule,
    ReplayCache,
    SigningKey,
    TrustedKey,
    Verifier,
    key_id,
    parse_public,
    public_line,
)


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("ci")


@pytest.fixture
def verifier(key: SigningKey) -> Verifier:
    return Verifier({"ci": TrustedKey("ci", Role.CI, key.public)},
                    [PolicyRule(signer="ci", projects=["shop*"],
                                environments=["staging", "prod-*"])])


def request(ttl: float | None = 60, at=None, body=None):
    """A rollout (a message that causes something), as CI asks for one."""
    return new("deploy.rollout", body or {"project": "shop", "environment": "staging"},
               sender="ci@h", correlation="r1", ttl=ttl, at=at)


def test_sign_then_verify_returns_signer(key, verifier):
    env = key.sign(request())
    assert env.sig == {"alg": "ed25519", "key": key.id, "value": env.sig["value"]}
    assert verifier.verify(env, project="shop", environment="staging").name == "ci"


def test_signature_survives_the_wire(key, verifier):
    env = decode(key.sign(request()).encode())
    assert verifier.signer(env).name == "ci"
    assert verifier.verify(env, project="shop-api", environment="prod-eu").name == "ci"


def test_unsigned_is_refused(verifier):
    with pytest.raises(SignatureError, match="not signed"):
        verifier.verify(request(), project="shop", environment="staging")


def test_tampered_body_is_refused(key, verifier):
    signed = key.sign(request())
    d = json.loads(signed.encode())
    d["body"]["environment"] = "prod-eu"
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.verify(decode(json.dumps(d).encode()), project="shop", environment="prod-eu")


@pytest.mark.parametrize("field, value", [("sender", "evil@h"), ("type", "deploy.control"),
                                          ("correlation", "other"), ("id", "0123456789abcdef")])
def test_tampered_header_is_refused(key, verifier, field, value):
    d = json.loads(key.sign(request()).encode())
    d[field] = value
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.signer(decode(json.dumps(d).encode()))


def test_garbage_signature_value_is_refused(key, verifier):
    env = key.sign(request())
    env = env.with_sig(env.sig | {"value": "!!not base64!!"})
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.signer(env)


def test_other_algorithm_is_refused(key, verifier):
    env = key.sign(request())
    with pytest.raises(SignatureError, match="unsupported signature algorithm 'rsa'"):
        verifier.signer(env.with_sig(env.sig | {"alg": "rsa"}))


def test_unknown_key_is_refused(verifier):
    stranger = SigningKey.generate("ci")  # same name, different key
    with pytest.raises(SignatureError, match="unknown key"):
        verifier.verify(stranger.sign(request()), project="shop", environment="staging")


def test_key_id_swapped_to_a_trusted_one_is_refused(key, verifier):
    stranger = SigningKey.generate("mallory")
    env = stranger.sign(request())
    env = env.with_sig(env.sig | {"key": key.id})
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.signer(env)


def test_expired_is_refused(key, verifier):
    env = key.sign(request(ttl=30, at=envelope.now() - timedelta(minutes=5)))
    with pytest.raises(LapsedError, match="expired at"):
        verifier.verify(env, project="shop", environment="staging")


def test_future_dated_is_refused(key, verifier):
    env = key.sign(request(ttl=600, at=envelope.now() + timedelta(minutes=5)))
    with pytest.raises(ExpiredError, match="dated in the future") as info:
        verifier.verify(env, project="shop", environment="staging")
    assert not isinstance(info.value, LapsedError), "future-dated is not a lapse"


def test_small_clock_skew_is_tolerated(key, verifier):
    env = key.sign(request(ttl=600, at=envelope.now() + timedelta(seconds=20)))
    assert verifier.verify(env, project="shop", environment="staging").name == "ci"


def test_no_expiry_is_refused(key, verifier):
    with pytest.raises(ExpiredError, match="without an expiry"):
        verifier.verify(key.sign(request(ttl=None)), project="shop", environment="staging")


def test_too_long_ttl_is_refused(key, verifier):
    env = key.sign(request(ttl=MAX_TTL.total_seconds() + 1))
    with pytest.raises(ExpiredError, match="more than"):
        verifier.verify(env, project="shop", environment="staging")


def test_max_ttl_exactly_is_accepted(key, verifier):
    env = key.sign(request(ttl=MAX_TTL.total_seconds()))
    assert verifier.verify(env, project="shop", environment="staging").name == "ci"


def test_replayed_id_is_refused(key, verifier):
    env = key.sign(request())
    verifier.verify(env, project="shop", environment="staging")
    with pytest.raises(ReplayError, match=f"message {env.id} was already received"):
        verifier.verify(decode(env.encode()), project="shop", environment="staging")


def test_refused_message_is_not_remembered_as_seen(key, verifier):
    env = key.sign(request())
    with pytest.raises(SignatureError):
        verifier.verify(env, project="other", environment="staging")
    assert verifier.verify(env, project="shop", environment="staging").name == "ci"


@pytest.mark.parametrize("project, environment", [
    ("blog", "staging"),        # project glob shop* does not match
    ("shop", "production"),     # environment glob prod-* does not match
    ("shop", "prod"),
    ("Shop", "staging"),        # globs are case-sensitive
])
def test_policy_denies(key, verifier, project, environment):
    with pytest.raises(SignatureError, match=f"signer 'ci' \\(ci\\) may not act on '{project}' "
                                             f"in '{environment}'"):
        verifier.verify(key.sign(request()), project=project, environment=environment)


def test_policy_is_default_deny(key):
    v = Verifier({"ci": TrustedKey("ci", Role.CI, key.public)}, [])
    with pytest.raises(SignatureError, match="may not act on"):
        v.verify(key.sign(request()), project="shop", environment="staging")


def test_policy_rule_is_per_signer(key):
    other = SigningKey.generate("ops")
    v = Verifier({"ci": TrustedKey("ci", Role.CI, key.public),
                  "ops": TrustedKey("ops", Role.PERSON, other.public)}, [PolicyRule("ops")])
    assert v.verify(other.sign(request()), project="x", environment="y").name == "ops"
    with pytest.raises(SignatureError, match="may not act on"):
        v.verify(key.sign(request()), project="x", environment="y")


def test_policy_rule_defaults_allow_everything():
    assert PolicyRule("a").allows("a", "anything", "anywhere")
    assert not PolicyRule("a").allows("b", "anything", "anywhere")


# -- replay cache ---------------------------------------------------------------------

def test_replay_cache_in_memory():
    c = ReplayCache()
    c.check_and_add("m1", time.time() + 60)
    c.check_and_add("m2", time.time() + 60)
    with pytest.raises(ReplayError):
        c.check_and_add("m1", time.time() + 60)


def test_replay_cache_forgets_after_until():
    c = ReplayCache()
    c.check_and_add("m1", time.time() - 1)
    c.check_and_add("m1", time.time() + 60)  # the first entry had lapsed


def test_replay_cache_persists_across_instances(tmp_path):
    path = tmp_path / "seen.jsonl"
    ReplayCache(path).check_and_add("m1", time.time() + 60)
    again = ReplayCache(path)
    with pytest.raises(ReplayError):
        again.check_and_add("m1", time.time() + 60)
    again.check_and_add("m2", time.time() + 60)
    with pytest.raises(ReplayError):
        ReplayCache(path).check_and_add("m2", time.time() + 60)


def test_replay_cache_drops_lapsed_entries_on_load(tmp_path):
    path = tmp_path / "seen.jsonl"
    path.write_text(json.dumps(["old", time.time() - 5]) + "\n"
                    + json.dumps(["new", time.time() + 60]) + "\n")
    c = ReplayCache(path)
    assert set(c.seen) == {"new"}
    assert [json.loads(line)[0] for line in path.read_text().splitlines()] == ["new"]
    c.check_and_add("old", time.time() + 60)


def test_replay_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "seen.jsonl"
    good = json.dumps(["m1", time.time() + 60]) + "\n"
    path.write_text(good + '["m2", 17')  # the crash hit mid-write
    c = ReplayCache(path)
    with pytest.raises(ReplayError):
        c.check_and_add("m1", time.time() + 60)
    c.check_and_add("m2", time.time() + 60)
    # The torn line was rewritten away: the file parses line by line again.
    for line in path.read_text().splitlines():
        json.loads(line)
    assert not (tmp_path / "seen.tmp").exists()


def test_verifier_replay_survives_restart(key, tmp_path):
    env = key.sign(request())
    policy = [PolicyRule("ci")]
    Verifier({"ci": TrustedKey("ci", Role.CI, key.public)}, policy,
             replay=ReplayCache(tmp_path / "s")).verify(
        env, project="p", environment="e")
    with pytest.raises(ReplayError):
        Verifier({"ci": TrustedKey("ci", Role.CI, key.public)}, policy,
             replay=ReplayCache(tmp_path / "s")).verify(
            env, project="p", environment="e")


# -- key files ------------------------------------------------------------------------

def test_save_writes_0600_private_key_and_public_line(key, tmp_path):
    priv, pub = key.save(tmp_path / "keys")
    assert priv == tmp_path / "keys" / "ci.key" and pub == tmp_path / "keys" / "ci.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_text() == public_line(key.public, "ci") + "\n"
    loaded = SigningKey.load(priv)
    assert loaded.name == "ci" and loaded.id == key.id
    assert key_id(parse_public(pub.read_text())) == key.id


def test_save_is_0600_even_with_permissive_umask(key, tmp_path):
    old = os.umask(0)
    try:
        priv, _ = key.save(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600


def test_save_refuses_to_overwrite(key, tmp_path):
    priv, _ = key.save(tmp_path)
    before = priv.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        SigningKey.generate("ci").save(tmp_path)
    assert priv.read_bytes() == before


def test_save_refuses_when_only_public_exists(tmp_path):
    (tmp_path / "ci.pub").write_text("mine\n")
    with pytest.raises(FileExistsError):
        SigningKey.generate("ci").save(tmp_path)
    assert not (tmp_path / "ci.key").exists()
    assert (tmp_path / "ci.pub").read_text() == "mine\n"


def test_load_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read private key .*missing.key: No such file"):
        SigningKey.load(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(ConfigError, match="junk.key is not a usable private key"):
        SigningKey.load(tmp_path / "junk.key")


def test_signed_by_loaded_key_verifies(key, tmp_path):
    priv, pub = key.save(tmp_path)
    v = Verifier({"ci": TrustedKey("ci", Role.CI, parse_public(pub.read_text()))},
                 [PolicyRule("ci")])
    assert v.verify(SigningKey.load(priv).sign(request()), project="a", environment="b").name == "ci"


def test_parse_public_round_trip(key):
    assert key_id(parse_public(public_line(key.public, "ci"))) == key.id
    assert key_id(parse_public("  " + public_line(key.public, "x") + "  \n")) == key.id
    raw = base64.b64encode(b"\x01" * 32).decode()
    parse_public(f"ed25519 {raw}")  # the name is optional


@pytest.mark.parametrize("text, message", [
    ("", "expected 'ed25519 <base64> \\[name\\]'"),
    ("ed25519", "expected 'ed25519"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA x", "expected 'ed25519"),
    ("ed25519 !!!notbase64!!! x", "not an ed25519 public key"),
    (f"ed25519 {base64.b64encode(b'short').decode()} x", "not an ed25519 public key"),
    (f"ed25519 {base64.b64encode(bytes(33)).decode()} x", "not an ed25519 public key"),
])
def test_parse_public_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_public(text, where="key ops")
    assert str(info.value).startswith("key ops: ")


def test_errors_are_envelope_errors():
    # Daemons catch EnvelopeError for "refuse this message".
    for cls in (SignatureError, ExpiredError, ReplayError):
        assert issubclass(cls, EnvelopeError)


def test_private_key_type_checked(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "ec.key").write_bytes(pem)
    with pytest.raises(ConfigError, match="not an ed25519 private key"):
        SigningKey.load(tmp_path / "ec.key")
    assert isinstance(SigningKey.generate("x").private, Ed25519PrivateKey)


@pytest.mark.parametrize("line", ["5", "null", '"m9"', '["m9", "tomorrow"]', "{}"])
def test_replay_cache_skips_any_corrupt_line(tmp_path, line):
    # Not only torn JSON: a line that parses but is not [id, until] must not
    # stop the agent from starting (today: TypeError out of __init__).
    path = tmp_path / "seen.jsonl"
    path.write_text(json.dumps(["m1", time.time() + 60]) + "\n" + line + "\n")
    c = ReplayCache(path)
    with pytest.raises(ReplayError):
        c.check_and_add("m1", time.time() + 60)
