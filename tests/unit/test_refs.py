"""deploybus.refs: only safe git refs and names get through."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deploybus.errors import RefError
from deploybus.refs import MAX_REF, check_name, check_ref, is_commit_id


@pytest.mark.parametrize("ref", [
    "v1.2.3", "release/2026-11", "main", "feature/x_y+z", "HEAD",
    "3f2a9c1", "0123456789abcdef0123456789abcdef01234567", "a" * MAX_REF, "v1.2.lock.x",
])
def test_accepts(ref):
    assert check_ref(ref) == ref


@pytest.mark.parametrize("ref", [
    "--upload-pack=x", "-x", "-", "../etc", "a/../b", "a..b", "a//b", "x.lock", "a/b.lock",
    "a.lock/b", "x/", "x.", "a/.hidden", ".hidden", "@{", "a@{1}", "@", "", "a" * 300,
    "a" * (MAX_REF + 1), "has space", "a\nb", "a\n", "a\x00b", "a\tb", "héllo", "ref\u200b",
    "a:b", "a~1", "a^", "a?b", "a*", "a[b", "a\\b", "/a", "_x", "+x",
])
def test_refuses(ref):
    with pytest.raises(RefError):
        check_ref(ref)


@pytest.mark.parametrize("ref", [None, 1, 1.5, b"main", ["main"], {"ref": "main"}])
def test_refuses_non_strings(ref):
    with pytest.raises(RefError, match="ref must be a string"):
        check_ref(ref)


def test_error_messages_say_why():
    with pytest.raises(RefError, match="1-200 characters"):
        check_ref("")
    with pytest.raises(RefError, match="may not start with or contain"):
        check_ref("--upload-pack=x")
    with pytest.raises(RefError, match="not a valid git ref name"):
        check_ref("a..b")


def test_error_message_is_bounded():
    with pytest.raises(RefError) as info:
        check_ref("a b" * 1000)
    assert len(str(info.value)) < 200


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(
    st.text(max_size=250),
    st.text(alphabet="abz09-./_+@{}:~^ \n\x00é", max_size=40),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,60}", fullmatch=True),
    st.integers(), st.none(), st.binary(max_size=20),
))
@example("--upload-pack=x")
@example("a/../b")
def test_property_only_referror_and_accepted_refs_are_safe(ref):
    try:
        out = check_ref(ref)
    except RefError:
        return
    assert out == ref
    assert isinstance(out, str)
    assert not out.startswith("-")
    assert ".." not in out
    assert 1 <= len(out) <= MAX_REF
    assert out.isascii() and out.isprintable() and " " not in out
    assert not out.endswith((".lock", "/", "."))


def test_is_commit_id():
    assert is_commit_id("3f2a9c1")
    assert is_commit_id("0" * 40)
    assert not is_commit_id("3f2a9c")       # too short
    assert not is_commit_id("3F2A9C1")      # git prints lower case
    assert not is_commit_id("v1.2.3")


@pytest.mark.parametrize("value", ["web1", "shop-api", "a.b_c", "A" * 64])
def test_check_name_accepts(value):
    assert check_name(value) == value


@pytest.mark.parametrize("value", ["", "-x", ".x", "a b", "a/b", "A" * 65, None, 5, "é"])
def test_check_name_refuses(value):
    with pytest.raises(RefError, match="invalid project"):
        check_name(value, "project")


def test_full_commit_ids():
    from deploybus.refs import check_commit, is_full_commit_id
    assert is_full_commit_id("0" * 40) and is_full_commit_id("a" * 64)
    for value in ("3f2a9c1", "0" * 39, "0" * 41, "0" * 63, "A" * 40, "g" * 40, "refs/tags/v1"):
        assert not is_full_commit_id(value), value
    assert check_commit("ab" * 20) == "ab" * 20
    for value in ("3f2a9c1", None, 5, "main", "0" * 40 + "\n"):
        with pytest.raises(RefError, match="full commit id"):
            check_commit(value)


def test_short_ref_name():
    from deploybus.refs import short_ref_name
    assert short_ref_name("refs/tags/v1.0") == "v1.0"
    assert short_ref_name("refs/heads/release/2") == "release/2"
    assert short_ref_name("v1.0") == "v1.0"
    assert short_ref_name("refs/notes/x") == "refs/notes/x"
    assert short_ref_name("0" * 40) == "0" * 40


@pytest.mark.parametrize("user", ["alice", "Alice Smith", "josé@example.com", "ci/bot-1",
                                  "x" * 128, "李"])
def test_check_user_accepts(user):
    from deploybus.refs import check_user
    assert check_user(user) == user


@pytest.mark.parametrize("user, message", [
    ("a\x00b", "control characters"), ("a\nb", "control characters"),
    ("a\rb", "control characters"), ("\x1b[31mred", "control characters"),
    ("a\x7f", "control characters"), ("a\x85b", "control characters"),
    ("a\u2028b", "control characters"), ("a\ud800b", "control characters"),
    ("", "1-128 characters"), ("x" * 129, "1-128 characters"),
    (None, "must be a string"), (5, "must be a string"),
])
def test_check_user_refuses(user, message):
    from deploybus.refs import check_user
    with pytest.raises(RefError, match=message):
        check_user(user)
