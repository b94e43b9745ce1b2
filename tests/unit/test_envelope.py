"""deploybus.envelope: building, encoding and the validation in decode()."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from deploybus import envelope
from deploybus.envelope import MAX_SIZE, SCHEMA_VERSION, Envelope, decode, new
from deploybus.errors import EnvelopeError


def valid_dict(**changes) -> dict:
    env = new("deploy.request", {"project": "shop", "ref": "v1.2.3"}, sender="orch@web1",
              correlation="r1", ttl=60)
    d = json.loads(env.encode())
    d.update(changes)
    return d


def raw(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_new_fills_every_field():
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    env = new("deploy.request", {"a": 1}, sender="cli@h", correlation="c", ttl=90, at=at)
    assert env.v == SCHEMA_VERSION
    assert env.type == "deploy.request"
    assert env.at == "2026-03-01T12:00:00.000000Z"
    assert env.expires_time == at + timedelta(seconds=90)
    assert env.at_time == at
    assert env.sender == "cli@h" and env.correlation == "c"
    assert env.sig is None
    assert 8 <= len(env.id) <= 64


def test_new_ids_are_unique():
    assert new("presence", {}, sender="s").id != new("presence", {}, sender="s").id


def test_new_without_ttl_has_no_expiry():
    env = new("presence", {}, sender="s")
    assert env.expires is None and env.expires_time is None


def test_new_refuses_unknown_type():
    with pytest.raises(EnvelopeError, match="unknown message type 'deploy.nope'"):
        new("deploy.nope", {}, sender="s")


def test_encode_decode_round_trip():
    env = new("deploy.result", {"status": "succeeded", "n": 3, "nested": {"l": [1, "ü"]}},
              sender="agent@web1", correlation="rollout-1", ttl=3600)
    env = env.with_sig({"alg": "ed25519", "key": "k" * 16, "value": "AAAA"})
    back = decode(env.encode())
    assert back == env
    assert isinstance(back, Envelope)
    assert back.encode() == env.encode()


def test_round_trip_keeps_signing_bytes():
    env = new("deploy.rollout", {"x": [1, 2.5, None, True]}, sender="s", ttl=5)
    assert decode(env.encode()).signing_bytes() == env.signing_bytes()


def test_signing_bytes_exclude_sig_and_are_canonical():
    env = new("presence", {"b": 1, "a": 2}, sender="s")
    signed = env.with_sig({"alg": "ed25519", "key": "k", "value": "v"})
    assert signed.signing_bytes() == env.signing_bytes()
    text = env.signing_bytes().decode()
    assert '"sig"' not in text and " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))


@pytest.mark.parametrize("body, message", [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'"a string"', "not a JSON object"),
    (b"null", "not a JSON object"),
])
def test_decode_rejects_non_objects(body, message):
    with pytest.raises(EnvelopeError, match=message):
        decode(body)


@pytest.mark.parametrize("v", [2, 0, -1])
def test_decode_rejects_other_schema_versions(v):
    with pytest.raises(EnvelopeError, match=rf"unsupported schema version {v}"):
        decode(raw(valid_dict(v=v)))


@pytest.mark.parametrize("v", ["1", 1.0, True, None])
def test_decode_rejects_version_of_wrong_type(v):
    with pytest.raises(EnvelopeError, match="field 'v' has the wrong type"):
        decode(raw(valid_dict(v=v)))


@pytest.mark.parametrize("field", ["v", "id", "type", "at", "expires", "sender",
                                   "correlation", "body", "sig"])
def test_decode_names_a_missing_field(field):
    d = valid_dict()
    del d[field]
    with pytest.raises(EnvelopeError, match=f"missing field '{field}'"):
        decode(raw(d))


@pytest.mark.parametrize("field, value, tname", [
    ("id", 12345678, "int"),
    ("type", ["deploy.request"], "list"),
    ("at", 1700000000, "int"),
    ("expires", 5, "int"),
    ("sender", None, "NoneType"),
    ("correlation", 7, "int"),
    ("body", [], "list"),
    ("body", None, "NoneType"),
    ("sig", "signature", "str"),
])
def test_decode_names_a_field_of_wrong_type(field, value, tname):
    with pytest.raises(EnvelopeError, match=rf"field '{field}' has the wrong type \({tname}\)"):
        decode(raw(valid_dict(**{field: value})))


def test_decode_accepts_null_optional_fields():
    env = decode(raw(valid_dict(expires=None, correlation=None, sig=None)))
    assert env.expires is None and env.correlation is None and env.sig is None


def test_decode_rejects_unknown_fields():
    with pytest.raises(EnvelopeError, match=r"unknown fields \['extra', 'zz'\]"):
        decode(raw(valid_dict(extra=1, zz=2)))


def test_decode_rejects_unknown_type():
    with pytest.raises(EnvelopeError, match="unknown message type 'deploy.destroy'"):
        decode(raw(valid_dict(type="deploy.destroy")))


@pytest.mark.parametrize("mid", ["short", "x" * 65, "idé-non-ascii"])
def test_decode_rejects_bad_ids(mid):
    with pytest.raises(EnvelopeError, match="id must be 8-64 ASCII characters"):
        decode(raw(valid_dict(id=mid)))


@pytest.mark.parametrize("field, value, message", [
    ("at", "yesterday", "at: not an ISO 8601 time"),
    ("at", "", "at: not an ISO 8601 time"),
    ("at", "2026-01-01T00:00:00", "at: time without a timezone"),
    ("expires", "2026-13-01T00:00:00Z", "expires: not an ISO 8601 time"),
    ("expires", "2026-01-01 00:00", "expires: time without a timezone"),
])
def test_decode_rejects_bad_times(field, value, message):
    with pytest.raises(EnvelopeError, match=message):
        decode(raw(valid_dict(**{field: value})))


def test_decode_accepts_offset_times():
    env = decode(raw(valid_dict(at="2026-01-01T01:00:00+01:00")))
    assert env.at_time == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("sig", [{}, {"alg": "ed25519", "key": "k"},
                                 {"alg": "ed25519", "key": "k", "value": 5}])
def test_decode_rejects_incomplete_sig(sig):
    with pytest.raises(EnvelopeError, match="sig must have string alg, key and value"):
        decode(raw(valid_dict(sig=sig)))


def test_decode_rejects_oversize_before_parsing():
    big = b" " * (MAX_SIZE + 1)  # would be "not JSON" if it were parsed
    with pytest.raises(EnvelopeError, match=rf"message of {MAX_SIZE + 1} bytes exceeds {MAX_SIZE}"):
        decode(big)


def test_decode_accepts_message_just_under_the_limit():
    d = valid_dict()
    d["body"] = {"pad": ""}
    pad = MAX_SIZE - len(raw(d))
    d["body"]["pad"] = "x" * pad
    assert len(raw(d)) == MAX_SIZE
    assert decode(raw(d)).body["pad"] == "x" * pad


def test_decode_deeply_nested_json_is_an_envelope_error():
    # Well under MAX_SIZE, but the json module gives up with RecursionError;
    # decode() must still say "not a valid envelope" (the dispatcher catches
    # only EnvelopeError, so anything else skips the dead-letter path).
    with pytest.raises(EnvelopeError):
        decode(b"[" * 100_000)


def test_decoded_envelope_can_be_encoded_again():
    # A lone surrogate is valid JSON ("\ud800") but not encodable as UTF-8;
    # whatever decode() accepts must survive encode()/signing_bytes().
    d = valid_dict()
    d["body"] = {"note": "\ud800"}
    try:
        env = decode(raw(d))
    except EnvelopeError:
        return  # refusing it is fine too
    env.encode()
    env.signing_bytes()


def test_fmt_time_is_utc_with_z():
    t = datetime(2026, 5, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert t.hour == 16
    assert envelope.fmt_time(t) == "2026-05-01T14:00:00.000000Z"
