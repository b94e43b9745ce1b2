"""Forge webhooks (daemons/git_listener/forges.py): detection, signatures,
delivery ids, payloads and repository matching.

The payloads under ``payloads/`` follow each forge's documented examples
(see the comments of each test); headers are the ones each forge documents.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from daemons.git_listener import forges
from daemons.git_listener.forges import FORGES, ZERO, Delivery, WebhookError
from deploybus import protocol

pytestmark = pytest.mark.unit

PAYLOADS = Path(__file__).parent / "payloads"
SECRET = b"s3cret-for-tests"


def load(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def github_headers(event: str, body: bytes = b"") -> dict[str, str]:
    # docs.github.com "Webhook events and payloads" > Delivery headers
    return {"X-GitHub-Hook-ID": "292430182", "X-GitHub-Event": event,
            "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "User-Agent": "GitHub-Hookshot/044aadd", "Content-Type": "application/json",
            "X-GitHub-Hook-Installation-Target-Type": "repository",
            "X-GitHub-Hook-Installation-Target-ID": "79929171",
            "X-Hub-Signature": "sha1=d57c68ca6f92289e6987922ff26938930f6e66a2",
            "X-Hub-Signature-256": "sha256=" + sign(body)}


def gitlab_headers(event: str) -> dict[str, str]:
    # docs.gitlab.com user/project/integrations/webhooks > Delivery headers
    return {"User-Agent": "GitLab/17.4.0", "Content-Type": "application/json",
            "X-Gitlab-Instance": "https://gitlab.example.com",
            "X-Gitlab-Webhook-UUID": "02affd2d-2cba-4033-917d-ec22d5dc4b38",
            "X-Gitlab-Event": event,
            "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
            "Idempotency-Key": "f5e5f430-f57b-4e6e-9fac-d9128cd7232f",
            "X-Gitlab-Token": SECRET.decode()}


def gitea_headers(event: str, body: bytes = b"") -> dict[str, str]:
    # docs.gitea.com usage/webhooks > Event information (plus the signature)
    uuid = "f6266f16-1bf3-46a5-9ea4-602e06ead473"
    return {"X-GitHub-Delivery": uuid, "X-GitHub-Event": event,
            "X-Gogs-Delivery": uuid, "X-Gogs-Event": event,
            "X-Gitea-Delivery": uuid, "X-Gitea-Event": event,
            "Content-Type": "application/json",
            "X-Gitea-Signature": sign(body), "X-Gogs-Signature": sign(body),
            "X-Hub-Signature-256": "sha256=" + sign(body)}


def bitbucket_headers(event: str, body: bytes = b"") -> dict[str, str]:
    # support.atlassian.com/bitbucket-cloud/docs/event-payloads > HTTP headers
    return {"X-Event-Key": event, "X-Hook-UUID": "cb4b1d2a-3c16-4a0e-9a0f-1b2c3d4e5f60",
            "X-Request-UUID": "afe5b8c6-8e5e-4c0b-b1d7-2a8c3f3e9d11", "X-Attempt-Number": "1",
            "User-Agent": "Bitbucket-Webhooks/2.0", "Content-Type": "application/json",
            "X-Hub-Signature": "sha256=" + sign(body)}


HEADERS = {"github": github_headers, "gitlab": lambda e, b=b"": gitlab_headers(e),
           "gitea": gitea_headers, "bitbucket": bitbucket_headers}


def valid_git_push(push: dict[str, Any]) -> None:
    """The receiver adds ``project`` and sends it as a git.push: it must fit."""
    assert set(push) == {"ref", "old", "new", "pusher", "created", "deleted", "commits"}
    body = protocol.parse("git.push", {**push, "project": "app"})
    msgspec.json.encode(protocol.to_dict(body))  # encodable (no lone surrogates)


def parse(forge: str, name: str, event: str) -> Delivery:
    body = load(name)
    delivery = forges.parse(forge, HEADERS[forge](event, body), body)
    for push in delivery.pushes:
        valid_git_push(push)
    return delivery


# -- detect ----------------------------------------------------------------------------


def test_detect_each_forge_from_its_documented_headers() -> None:
    assert forges.detect(github_headers("push")) == "github"
    assert forges.detect(gitlab_headers("Push Hook")) == "gitlab"
    assert forges.detect(bitbucket_headers("repo:push")) == "bitbucket"


def test_detect_gitea_before_github_it_imitates() -> None:
    headers = gitea_headers("push")
    assert "X-GitHub-Event" in headers
    assert forges.detect(headers) == "gitea"
    # Forgejo's own headers; Gogs' alone
    assert forges.detect({"X-Forgejo-Event": "push", "X-GitHub-Event": "push"}) == "gitea"
    assert forges.detect({"X-Gogs-Event": "push"}) == "gitea"


@pytest.mark.parametrize("name", ["x-github-event", "X-GITHUB-EVENT", "X-Github-Event"])
def test_detect_any_header_case_dict_or_werkzeug(name: str) -> None:
    assert forges.detect({name: "push"}) == "github"
    assert forges.detect(Headers([(name, "push")])) == "github"
    assert forges.detect(Headers([("x-gitea-event", "push"), (name, "push")])) == "gitea"


def test_detect_none_for_unknown_or_blank() -> None:
    assert forges.detect({}) is None
    assert forges.detect({"Content-Type": "application/json", "User-Agent": "curl/8"}) is None
    assert forges.detect({"X-GitHub-Event": "  "}) is None
    assert forges.detect(Headers()) is None


# -- delivery ids ----------------------------------------------------------------------


def test_delivery_id_per_forge() -> None:
    assert forges.delivery_id("github", github_headers("push")) == \
        "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert forges.delivery_id("gitea", gitea_headers("push")) == \
        "f6266f16-1bf3-46a5-9ea4-602e06ead473"
    assert forges.delivery_id("bitbucket", bitbucket_headers("repo:push")) == \
        "afe5b8c6-8e5e-4c0b-b1d7-2a8c3f3e9d11"


def test_gitlab_delivery_id_prefers_idempotency_key() -> None:
    headers = gitlab_headers("Push Hook")
    # Idempotency-Key is the same on GitLab's retries and "Resend Request"
    assert forges.delivery_id("gitlab", headers) == "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"
    del headers["Idempotency-Key"]  # GitLab before 17.4
    assert forges.delivery_id("gitlab", headers) == "13792a34-cac6-4fda-95a8-c58e00a3954e"
    del headers["X-Gitlab-Event-UUID"]
    assert forges.delivery_id("gitlab", headers) is None


def test_delivery_id_case_insensitive_capped_and_printable() -> None:
    assert forges.delivery_id("github", {"x-github-delivery": " abc "}) == "abc"
    assert forges.delivery_id("github", Headers([("X-GITHUB-DELIVERY", "abc")])) == "abc"
    assert forges.delivery_id("github", {"X-GitHub-Delivery": "a" * 200}) == "a" * 200
    assert forges.delivery_id("github", {"X-GitHub-Delivery": "a" * 201}) is None
    assert forges.delivery_id("github", {"X-GitHub-Delivery": "a\x00b"}) is None
    assert forges.delivery_id("github", {}) is None
    assert forges.delivery_id("nope", github_headers("push")) is None


def test_parse_carries_the_delivery_id() -> None:
    assert parse("github", "github-push.json", "push").id == \
        "72d3162e-cc78-11e3-81ab-4c9367dc0958"


# -- verify ----------------------------------------------------------------------------


def test_github_documented_test_vector() -> None:
    # docs.github.com "Validating webhook deliveries" > Testing the webhook payload validation
    secret = b"It's a Secret to Everybody"
    body = b"Hello, World!"
    expected = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(body, secret) == expected
    headers = {"X-Hub-Signature-256": "sha256=" + expected}
    assert forges.verify("github", headers, body, secret)
    assert forges.verify("github", Headers([("x-hub-signature-256", "sha256=" + expected)]),
                         body, secret)
    assert not forges.verify("github", headers, b"Hello, World?", secret)
    assert not forges.verify("github", headers, body, b"It's a Secret to Everybody!")
    assert not forges.verify("github", {"X-Hub-Signature-256": expected}, body, secret)


def test_github_refuses_missing_sha1_only_and_empty_secret() -> None:
    body = load("github-push.json")
    headers = github_headers("push", body)
    assert forges.verify("github", headers, body, SECRET)
    del headers["X-Hub-Signature-256"]
    assert not forges.verify("github", headers, body, SECRET)  # the SHA-1 one is not enough
    assert not forges.verify("github", github_headers("push", body), body, b"")
    empty = {"X-Hub-Signature-256": "sha256=" + sign(body, b"")}
    assert not forges.verify("github", empty, body, b"")


def test_gitea_signature_is_bare_hex() -> None:
    body = load("gitea-push.json")
    assert forges.verify("gitea", {"X-Gitea-Signature": sign(body)}, body, SECRET)
    assert forges.verify("gitea", {"x-gitea-signature": sign(body).upper()}, body, SECRET)
    assert forges.verify("gitea", {"X-Forgejo-Signature": sign(body)}, body, SECRET)
    assert not forges.verify("gitea", {"X-Gitea-Signature": "sha256=" + sign(body)}, body,
                             SECRET)
    assert not forges.verify("gitea", {"X-Gitea-Signature": sign(body)}, body + b" ", SECRET)
    assert not forges.verify("gitea", {}, body, SECRET)


def test_gitlab_token_is_the_secret() -> None:
    body = load("gitlab-push.json")
    assert forges.verify("gitlab", {"X-Gitlab-Token": SECRET.decode()}, body, SECRET)
    assert forges.verify("gitlab", Headers([("x-gitlab-token", SECRET.decode())]), body, SECRET)
    assert not forges.verify("gitlab", {"X-Gitlab-Token": "wrong"}, body, SECRET)
    assert not forges.verify("gitlab", {"X-Gitlab-Token": ""}, body, b"")
    assert not forges.verify("gitlab", {}, body, SECRET)
    assert not forges.verify("gitlab", {"X-Gitlab-Token": "sécret\udc80"}, body, SECRET)
    # a non-ASCII token as text, or as a WSGI server decodes header bytes (latin-1)
    secret = "sécret".encode()
    assert forges.verify("gitlab", {"X-Gitlab-Token": "sécret"}, body, secret)
    assert forges.verify("gitlab", {"X-Gitlab-Token": secret.decode("latin-1")}, body, secret)


def test_bitbucket_signature_is_prefixed_sha256() -> None:
    body = load("bitbucket-push.json")
    assert forges.verify("bitbucket", {"X-Hub-Signature": "sha256=" + sign(body)}, body, SECRET)
    assert not forges.verify("bitbucket", {"X-Hub-Signature": sign(body)}, body, SECRET)
    assert not forges.verify("bitbucket", {"X-Hub-Signature": "sha1=" + sign(body)}, body,
                             SECRET)
    assert not forges.verify("bitbucket", {"X-Hub-Signature-256": "sha256=" + sign(body)},
                             body, SECRET)


def test_verify_unknown_forge_or_odd_header_is_false() -> None:
    body = b"{}"
    assert not forges.verify("sourcehut", {"X-Hub-Signature-256": "sha256=" + sign(body)},
                             body, SECRET)
    for value in ("sha256=", "sha256=zz", "sha256=é" * 40, "=", "\x00", "sha256=" + "0" * 63):
        assert not forges.verify("github", {"X-Hub-Signature-256": value}, body, SECRET)
        assert not forges.verify("gitea", {"X-Gitea-Signature": value}, body, SECRET)


# -- parse: GitHub ---------------------------------------------------------------------


def test_github_branch_push_with_two_commits() -> None:
    d = parse("github", "github-push.json", "push")
    assert (d.forge, d.event, d.ping) == ("github", "push", False)
    assert d.pushes == ({
        "ref": "refs/heads/master",
        "old": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "new": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "pusher": "Codertocat", "created": False, "deleted": False,
        "commits": [
            {"id": "1481a2de7b2a7d02428ad93446ab166be7793fbb", "author": "Codertocat",
             "subject": "Update README.md"},
            {"id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "author": "Codertocat",
             "subject": "Add a greeting"}]},)
    assert d.repository == {"Codertocat/Hello-World", "https://github.com/Codertocat/Hello-World",
                            "https://github.com/Codertocat/Hello-World.git",
                            "git@github.com:Codertocat/Hello-World.git",
                            "git://github.com/Codertocat/Hello-World.git"}


def test_github_branch_creation() -> None:
    (push,) = parse("github", "github-push-new-branch.json", "push").pushes
    assert push["old"] == ZERO and push["created"] and not push["deleted"]
    assert push["new"] == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    assert push["commits"] == [{"id": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
                                "author": "Codertocat", "subject": "Initial commit"}]


def test_github_tag_push() -> None:
    (push,) = parse("github", "github-push-tag.json", "push").pushes
    assert push["ref"] == "refs/tags/v1.0.0"
    assert push["created"] and push["old"] == ZERO and push["commits"] == []


def test_github_deletion_has_zero_new() -> None:
    # the push example of GitHub's docs: tag simple-tag deleted
    (push,) = parse("github", "github-push-delete-tag.json", "push").pushes
    assert push == {"ref": "refs/tags/simple-tag",
                    "old": "6113728f27ae82c7b1a177c8d03f9e96e0adf246", "new": ZERO,
                    "pusher": "Codertocat", "created": False, "deleted": True, "commits": []}


def test_github_pusher_falls_back_to_sender() -> None:
    payload = json.loads(load("github-push.json"))
    del payload["pusher"]
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert push["pusher"] == "Codertocat"
    del payload["sender"]
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert push["pusher"] is None
    valid_git_push(push)


def test_github_ping() -> None:
    d = parse("github", "github-ping.json", "ping")
    assert d.ping and d.pushes == ()
    assert "Octocoders/Hello-World" in d.repository
    assert "https://api.github.com/repos/Octocoders/Hello-World" not in d.repository


@pytest.mark.parametrize("name,event", [("github-create.json", "create"),
                                        ("github-delete.json", "delete")])
def test_github_create_and_delete_publish_nothing(name: str, event: str) -> None:
    """The push event of the same ``git push`` says it, with the shas:
    create/delete give only the short ref name, so they are ignored."""
    d = parse("github", name, event)
    assert (d.event, d.pushes, d.ping) == (event, (), False)
    assert "Codertocat/Hello-World" in d.repository


def test_github_other_events_are_ignored_not_refused() -> None:
    body = json.dumps({"action": "opened", "issue": {"number": 1},
                       "repository": {"full_name": "Codertocat/Hello-World"}}).encode()
    d = forges.parse("github", github_headers("issues"), body)
    assert (d.event, d.pushes, d.ping) == ("issues", (), False)
    # an event that is not a push needs none of a push's fields
    assert forges.parse("github", github_headers("star"), b"{}").pushes == ()


# -- parse: GitLab ---------------------------------------------------------------------


def test_gitlab_push_event() -> None:
    d = parse("gitlab", "gitlab-push.json", "Push Hook")
    assert d.id == "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"
    assert d.pushes == ({
        "ref": "refs/heads/master",
        "old": "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "new": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        "pusher": "jsmith", "created": False, "deleted": False,
        "commits": [
            {"id": "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327", "author": "Jordi Mallach",
             "subject": "Update Catalan translation to e38cb41."},
            {"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "author": "GitLab dev user",
             "subject": "fixed readme"}]},)
    assert {"mike/diaspora", "http://example.com/mike/diaspora",
            "git@example.com:mike/diaspora.git",
            "http://example.com/mike/diaspora.git"} <= d.repository


def test_gitlab_tag_push_event() -> None:
    d = parse("gitlab", "gitlab-tag-push.json", "Tag Push Hook")
    (push,) = d.pushes
    assert push["ref"] == "refs/tags/v1.0.0"
    assert push["created"] and push["old"] == ZERO
    assert push["new"] == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"
    # the documented tag example has no user_username
    assert push["pusher"] == "John Smith"
    assert "ssh://git@example.com/jsmith/example.git" in d.repository


def test_gitlab_tag_deletion_with_null_checkout_sha() -> None:
    (push,) = parse("gitlab", "gitlab-tag-delete.json", "Tag Push Hook").pushes
    assert push["deleted"] and push["new"] == ZERO
    assert push["old"] == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"


def test_gitlab_old_empty_commits_string_and_system_hook() -> None:
    payload = json.loads(load("gitlab-push.json"))
    payload["commits"] = ""  # GitLab's data builder once sent "" for no commits
    body = json.dumps(payload).encode()
    (push,) = forges.parse("gitlab", gitlab_headers("Push Hook"), body).pushes
    assert push["commits"] == []
    d = forges.parse("gitlab", gitlab_headers("System Hook"), body)
    assert len(d.pushes) == 1
    other = json.dumps({"object_kind": "merge_request"}).encode()
    assert forges.parse("gitlab", gitlab_headers("System Hook"), other).pushes == ()


def test_gitlab_test_delivery_moving_nothing_is_a_ping() -> None:
    payload = json.loads(load("gitlab-push.json"))
    payload["before"] = payload["after"]  # "Test" in a repository of one commit
    body = json.dumps(payload).encode()
    d = forges.parse("gitlab", gitlab_headers("Push Hook"), body)
    assert d.ping and d.pushes == ()


def test_gitlab_merge_request_is_ignored() -> None:
    body = json.dumps({"object_kind": "merge_request",
                       "project": {"path_with_namespace": "mike/diaspora"}}).encode()
    d = forges.parse("gitlab", gitlab_headers("Merge Request Hook"), body)
    assert (d.pushes, d.ping, d.event) == ((), False, "Merge Request Hook")
    assert d.repository == {"mike/diaspora"}


# -- parse: Gitea ----------------------------------------------------------------------


def test_gitea_push_event() -> None:
    d = parse("gitea", "gitea-push.json", "push")
    assert (d.forge, d.ping, d.id) == ("gitea", False, "f6266f16-1bf3-46a5-9ea4-602e06ead473")
    assert d.pushes == ({
        "ref": "refs/heads/develop",
        "old": "28e1879d029cb852e4844d9c718537df08844e03",
        "new": "bffeb74224043ba2feb48d137756c8a9331c449a",
        "pusher": "gitea", "created": False, "deleted": False,
        "commits": [{"id": "bffeb74224043ba2feb48d137756c8a9331c449a", "author": "Gitea",
                     "subject": "Webhooks Yay!"}]},)
    assert d.repository == {"gitea/webhooks", "http://localhost:3000/gitea/webhooks",
                            "ssh://gitea@localhost:2222/gitea/webhooks.git",
                            "http://localhost:3000/gitea/webhooks.git"}


def test_gitea_test_delivery_is_a_ping() -> None:
    d = parse("gitea", "gitea-test-delivery.json", "push")
    assert d.ping and d.pushes == ()


def test_gitea_lists_commits_newest_first_and_they_are_reversed() -> None:
    payload = json.loads(load("gitea-push.json"))
    newer = dict(payload["commits"][0], id="c" * 40, message="second\nbody")
    payload["commits"] = [newer, payload["commits"][0]]
    body = json.dumps(payload).encode()
    (push,) = forges.parse("gitea", gitea_headers("push"), body).pushes
    assert [c["subject"] for c in push["commits"]] == ["Webhooks Yay!", "second"]


@pytest.mark.parametrize("event", ["create", "delete", "pull_request", "issues"])
def test_gitea_other_events_are_ignored(event: str) -> None:
    body = json.dumps({"ref": "develop", "ref_type": "branch", "sha": "a" * 40,
                       "repository": {"full_name": "gitea/webhooks"}}).encode()
    d = forges.parse("gitea", gitea_headers(event), body)
    assert (d.pushes, d.ping) == ((), False)


# -- parse: Bitbucket Cloud ------------------------------------------------------------


def test_bitbucket_changes_become_pushes() -> None:
    d = parse("bitbucket", "bitbucket-push.json", "repo:push")
    assert (d.forge, d.event, d.ping) == ("bitbucket", "repo:push", False)
    assert d.repository == {"martinherren1984/publictestrepo",
                            "https://bitbucket.org/martinherren1984/publictestrepo"}
    update, tag, deletion = d.pushes
    assert update == {
        "ref": "refs/heads/main",
        "old": "a51241ae1f00cbe728930db48e890b18fd527f99",
        "new": "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277",
        "pusher": "mherren", "created": False, "deleted": False,
        "commits": [  # Bitbucket lists the most recent first: reversed
            {"id": "7d5b2ad1b1ec7b2a4ea3fd0a9d5f7f5d4b4d9e41", "author": "Martin Herren",
             "subject": "Pin the runner image"},
            {"id": "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277", "author": "Martin Herren",
             "subject": "a"}]}
    assert tag == {"ref": "refs/tags/v1.2.0", "old": ZERO,
                   "new": "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277", "pusher": "mherren",
                   "created": True, "deleted": False, "commits": []}
    assert deletion == {"ref": "refs/heads/feature/old-experiment",
                        "old": "a51241ae1f00cbe728930db48e890b18fd527f99", "new": ZERO,
                        "pusher": "mherren", "created": False, "deleted": True,
                        "commits": []}


def test_bitbucket_pusher_falls_back_to_display_name() -> None:
    payload = json.loads(load("bitbucket-push.json"))
    del payload["actor"]["nickname"]
    body = json.dumps(payload).encode()
    d = forges.parse("bitbucket", bitbucket_headers("repo:push"), body)
    assert {p["pusher"] for p in d.pushes} == {"Martin Herren"}


def test_bitbucket_skips_non_git_ref_types_and_no_op_changes() -> None:
    payload = json.loads(load("bitbucket-push.json"))
    changes = payload["push"]["changes"]
    changes[0]["new"]["type"] = changes[0]["old"]["type"] = "bookmark"
    changes[1]["old"] = copy.deepcopy(changes[1]["new"])  # moves nothing
    body = json.dumps(payload).encode()
    d = forges.parse("bitbucket", bitbucket_headers("repo:push"), body)
    assert [p["ref"] for p in d.pushes] == ["refs/heads/feature/old-experiment"]


def test_bitbucket_ping_and_other_events() -> None:
    d = forges.parse("bitbucket", bitbucket_headers("diagnostics:ping"), b'{"test": true}')
    assert d.ping and d.pushes == ()
    d = forges.parse("bitbucket", bitbucket_headers("pullrequest:created"), b"{}")
    assert (d.ping, d.pushes) == (False, ())


# -- parse: limits and malformed payloads ----------------------------------------------


def test_at_most_fifty_commits_the_newest_with_texts_cut() -> None:
    payload = json.loads(load("github-push.json"))
    template = payload["commits"][0]
    payload["commits"] = [dict(template, id=f"{i:040x}", message=f"commit {i}\n\nbody",
                               author={"name": "N" * 300})
                          for i in range(60)]
    payload["commits"][-1]["message"] = "S" * 300 + "\nrest"
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert len(push["commits"]) == 50
    assert push["commits"][0]["subject"] == "commit 10"
    assert push["commits"][-1]["subject"] == "S" * 200
    assert push["commits"][0]["author"] == "N" * 200
    valid_git_push(push)


def test_malformed_commits_are_skipped_not_fatal() -> None:
    payload = json.loads(load("github-push.json"))
    payload["commits"] = [None, 3, {"id": "abc"}, {"id": "A" * 40, "message": ["x"],
                                                   "author": "someone"}]
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert push["commits"] == [{"id": "a" * 40, "author": None, "subject": None}]


def test_control_characters_are_dropped_from_texts() -> None:
    payload = json.loads(load("github-push.json"))
    payload["commits"][0]["message"] = "red \x1b[31malert\r\nmore"
    payload["pusher"]["name"] = "eve\u2028\x07"
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert push["commits"][0]["subject"] == "red [31malert"
    assert push["pusher"] == "eve"


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"push"',
                                  b"null", b"[" * 100_000 + b"]" * 100_000])
def test_not_a_json_object_is_400(body: bytes) -> None:
    for forge in FORGES:
        event = {"github": "push", "gitlab": "Push Hook", "gitea": "push",
                 "bitbucket": "repo:push"}[forge]
        with pytest.raises(WebhookError) as exc:
            forges.parse(forge, HEADERS[forge](event, body), body)
        assert exc.value.status == 400


@pytest.mark.parametrize("change", [
    {"ref": None}, {"ref": "master"}, {"ref": "refs/heads/a b"}, {"ref": "refs/"},
    {"ref": "refs/heads/" + "x" * 250}, {"before": "abc"}, {"after": None},
    {"after": "g" * 40}, {"before": 12},
])
def test_push_without_what_a_push_needs_is_400(change: dict[str, Any]) -> None:
    payload = json.loads(load("gitea-push.json"))
    payload.update(change)
    body = json.dumps(payload).encode()
    with pytest.raises(WebhookError) as exc:
        forges.parse("gitea", gitea_headers("push"), body)
    assert exc.value.status == 400


def test_sha256_repositories_and_upper_case_shas() -> None:
    payload = json.loads(load("github-push.json"))
    payload["before"], payload["after"] = "A" * 64, "b" * 64
    body = json.dumps(payload).encode()
    (push,) = forges.parse("github", github_headers("push"), body).pushes
    assert (push["old"], push["new"]) == ("a" * 64, "b" * 64)


@pytest.mark.parametrize("mutate", [
    lambda p: p.pop("push"),
    lambda p: p["push"].update(changes={"a": 1}),
    lambda p: p["push"]["changes"].append("x"),
    lambda p: p["push"]["changes"].append({"old": None, "new": None}),
    lambda p: p["push"]["changes"][0].update(new=[1]),
    lambda p: p["push"]["changes"][0]["new"].pop("name"),
    lambda p: p["push"]["changes"][0]["new"]["target"].update(hash="c14c1bb"),
])
def test_bitbucket_malformed_changes_are_400(mutate: Any) -> None:
    payload = json.loads(load("bitbucket-push.json"))
    mutate(payload)
    body = json.dumps(payload).encode()
    with pytest.raises(WebhookError) as exc:
        forges.parse("bitbucket", bitbucket_headers("repo:push"), body)
    assert exc.value.status == 400


def test_missing_event_header_or_unknown_forge_is_400() -> None:
    body = load("github-push.json")
    with pytest.raises(WebhookError, match="x-github-event"):
        forges.parse("github", {"Content-Type": "application/json"}, body)
    with pytest.raises(WebhookError) as exc:
        forges.parse("sourcehut", github_headers("push"), body)
    assert exc.value.status == 400


def test_parse_reads_werkzeug_headers() -> None:
    body = load("gitlab-push.json")
    headers = Headers([(k.lower(), v) for k, v in gitlab_headers("Push Hook").items()])
    d = forges.parse("gitlab", headers, body)
    assert d.event == "Push Hook" and len(d.pushes) == 1
    assert d.id == "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"


# -- matches ---------------------------------------------------------------------------


def delivery(*names: str) -> Delivery:
    return Delivery(forge="github", event="push", id=None, repository=frozenset(names),
                    pushes=(), ping=False)


SAME = ["https://github.com/Team/App.git", "https://github.com/team/app",
        "https://github.com/team/app/", "git@github.com:team/app.git",
        "ssh://git@github.com/team/app", "ssh://git@github.com/team/app.git",
        "ssh://git@GitHub.com:22/Team/App.git", "git://github.com/team/app.git",
        "http://github.com/team/app.git/"]


@pytest.mark.parametrize("payload_url", SAME)
@pytest.mark.parametrize("git_url", SAME)
def test_url_forms_match_each_other(payload_url: str, git_url: str) -> None:
    assert forges.matches(delivery(payload_url), git_url=git_url, repository=None)
    assert forges.matches(delivery(payload_url), git_url="/srv/elsewhere.git",
                          repository=git_url)


@pytest.mark.parametrize("other", ["https://github.com/team/app2", "https://gitlab.com/team/app",
                                   "git@github.com:team/app/sub.git", "https://github.com/app",
                                   "git@github.com:other/team/app.git"])
def test_other_repositories_do_not_match(other: str) -> None:
    d = delivery("https://github.com/team/app.git", "git@github.com:team/app.git")
    assert not forges.matches(d, git_url=other, repository=None)
    assert not forges.matches(d, git_url="git@github.com:team/app.git", repository=other)


def test_repository_full_name_is_case_insensitive() -> None:
    d = parse("github", "github-push.json", "push")
    for name in ("Codertocat/Hello-World", "codertocat/hello-world", "codertocat/hello-world.git",
                 "/codertocat/hello-world/", "github.com/codertocat/hello-world"):
        assert forges.matches(d, git_url="/srv/git/x.git", repository=name), name
    assert not forges.matches(d, git_url="git@github.com:codertocat/hello-world.git",
                              repository="codertocat/other")


def test_repository_full_name_matches_a_url_path_when_no_full_name_given() -> None:
    d = delivery("https://bitbucket.org/martinherren1984/publictestrepo")
    assert forges.matches(d, git_url="", repository="martinherren1984/PublicTestRepo")


def test_git_url_matches_the_payload_urls() -> None:
    assert forges.matches(parse("github", "github-push.json", "push"),
                          git_url="git@github.com:codertocat/hello-world.git", repository=None)
    assert forges.matches(parse("gitlab", "gitlab-push.json", "Push Hook"),
                          git_url="https://example.com/mike/diaspora", repository=None)
    # Bitbucket gives a web URL and the full name, no clone URL
    assert forges.matches(parse("bitbucket", "bitbucket-push.json", "repo:push"),
                          git_url="git@bitbucket.org:martinherren1984/publictestrepo.git",
                          repository=None)
    # Gitea's ssh URL has a port, its http URL another one
    assert forges.matches(parse("gitea", "gitea-push.json", "push"),
                          git_url="gitea@localhost:gitea/webhooks.git", repository=None)


def test_git_url_of_a_mirror_matches_the_full_name_it_ends_with() -> None:
    d = parse("github", "github-push.json", "push")
    for git_url in ("git@mirror.example.org:codertocat/hello-world.git",
                    "/srv/git/Codertocat/Hello-World.git",
                    "https://mirror.example.org/git/codertocat/hello-world"):
        assert forges.matches(d, git_url=git_url, repository=None), git_url
    for git_url in ("/srv/git/xcodertocat/hello-world.git",
                    "git@mirror.example.org:hello-world.git",
                    "/srv/git/notcodertocat/hello-world.git"):
        assert not forges.matches(d, git_url=git_url, repository=None), git_url


def test_matches_nothing_from_nothing() -> None:
    assert not forges.matches(delivery(), git_url="git@github.com:team/app.git", repository=None)
    assert not forges.matches(delivery("team/app"), git_url="", repository=None)
    assert not forges.matches(delivery("team/app"), git_url="x", repository="   ")
    assert not forges.matches(delivery("https://[::1/team/app"), git_url="https://[::1/team/app",
                              repository=None)


# -- hostile input ---------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["refs/heads/main", "a" * 40, ZERO, "branch",
                                              "tag", "push"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["ref", "before", "after", "commits", "id", "message",
                                       "author", "name", "pusher", "login", "push", "changes",
                                       "new", "old", "type", "target", "hash", "actor",
                                       "repository", "full_name", "links", "html", "href",
                                       "clone", "project", "user_username", "object_kind"])
                      | st.text(max_size=8), children, max_size=6),
    max_leaves=30)

EVENTS = {"github": ["push", "ping", "create", "issues"],
          "gitlab": ["Push Hook", "Tag Push Hook", "System Hook", "Note Hook"],
          "gitea": ["push", "create", "delete"],
          "bitbucket": ["repo:push", "diagnostics:ping", "repo:fork"]}
FIXTURES = {"github": "github-push.json", "gitlab": "gitlab-push.json",
            "gitea": "gitea-push.json", "bitbucket": "bitbucket-push.json"}


def check_parse(forge: str, event: str, body: bytes) -> None:
    try:
        d = forges.parse(forge, HEADERS[forge](event, body), body)
    except WebhookError as exc:
        assert exc.status == 400
        return
    assert d.forge == forge and isinstance(d.ping, bool)
    assert all(isinstance(n, str) for n in d.repository)
    for push in d.pushes:
        valid_git_push(push)
    forges.matches(d, git_url="git@github.com:team/app.git", repository=None)
    forges.matches(d, git_url="/srv/x", repository="team/app")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forge=st.sampled_from(FORGES), data=st.data(), payload=JSON)
def test_random_json_gives_a_delivery_or_a_400(forge: str, data: st.DataObject,
                                                payload: Any) -> None:
    event = data.draw(st.sampled_from(EVENTS[forge]))
    check_parse(forge, event, json.dumps(payload).encode())


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forge=st.sampled_from(FORGES), data=st.data())
def test_fixtures_with_random_parts_replaced_give_a_delivery_or_a_400(
        forge: str, data: st.DataObject) -> None:
    """Real payloads with any one or two parts swapped for any JSON: reaches
    every field a parser reads, with every type in its place."""
    payload = json.loads(load(FIXTURES[forge]))
    for _ in range(data.draw(st.integers(1, 2))):
        paths = _paths(payload)
        path = data.draw(st.sampled_from(paths))
        value = data.draw(JSON)
        if not path:
            payload = value
            break
        parent = payload
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
    event = EVENTS[forge][0]
    check_parse(forge, event, json.dumps(payload).encode())


@settings(max_examples=200, deadline=None)
@given(forge=st.sampled_from(FORGES), body=st.binary(max_size=64),
       headers=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5))
def test_random_bytes_and_headers_never_raise_anything_else(
        forge: str, body: bytes, headers: dict[str, str]) -> None:
    forges.detect(headers)
    forges.delivery_id(forge, headers)
    assert not forges.verify(forge, headers, body, b"")
    forges.verify(forge, headers, body, SECRET)
    try:
        forges.parse(forge, headers, body)
    except WebhookError as exc:
        assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(names=st.frozensets(st.text(max_size=30), max_size=4), git_url=st.text(max_size=40),
       repository=st.none() | st.text(max_size=40))
def test_matches_never_raises(names: frozenset[str], git_url: str,
                              repository: str | None) -> None:
    d = Delivery(forge="gitea", event="push", id=None, repository=names, pushes=(), ping=False)
    assert isinstance(forges.matches(d, git_url=git_url, repository=repository), bool)
