"""A rollout's ref is resolved once, strictly, on the remote
(:func:`deploybus.gitutil.resolve_remote`): what the tag list shows is what
deploys. git's own lookup is loose: a pushed ``refs/release/1.0`` shadows
the tag ``release/1.0``, a branch named like a commit abbreviation shadows
the commit. Real bare repositories, real ``git ls-remote``."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from deploybus import gitutil
from deploybus.errors import DeployBusError, DeployError, RefError

pytestmark = pytest.mark.unit

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **GIT_ENV})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Origin:
    """A work tree and the bare repository a project's ``git`` URL names."""

    def __init__(self, base: Path) -> None:
        self.work, self.bare = base / "work", base / "origin.git"
        self.work.mkdir()
        git("init", "-q", "-b", "main", cwd=self.work)
        git("init", "-q", "--bare", str(self.bare), cwd=base)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def commit(self, text: str) -> str:
        (self.work / "VERSION").write_text(text + "\n")
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", text, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def push(self, *refspecs: str) -> None:
        git("push", "-q", "origin", *refspecs, cwd=self.work)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def test_a_pushed_refs_release_does_not_shadow_the_tag(origin: Origin) -> None:
    tagged = origin.commit("the tag")
    git("tag", "release/1.0", cwd=origin.work)
    shadow = origin.commit("the shadow")
    origin.push("main", "refs/tags/release/1.0", f"{shadow}:refs/release/1.0")
    # git itself takes refs/release/1.0 for "release/1.0" (this is the bug):
    mirror = gitutil.update_mirror(origin.work.parent / "state", "app", str(origin.bare))
    try:
        assert gitutil.resolve(mirror, "release/1.0") == shadow
    finally:
        gitutil.close_resolvers()
    url = str(origin.bare)
    assert gitutil.resolve_remote(url, "release/1.0") == ("refs/tags/release/1.0", tagged)
    assert gitutil.resolve_remote(url, "refs/tags/release/1.0") == \
        ("refs/tags/release/1.0", tagged)
    with pytest.raises(RefError, match="not a tag or a branch"):
        gitutil.resolve_remote(url, "refs/release/1.0")


def test_a_branch_named_like_an_abbreviation_shadows_nothing(origin: Origin) -> None:
    wanted = origin.commit("the commit")
    origin.commit("the branch")
    git("branch", wanted[:7], cwd=origin.work)  # a branch named like the commit's abbreviation
    origin.push("main", wanted[:7])
    url = str(origin.bare)
    for short in (wanted[:7], wanted[:12], wanted[:39]):
        with pytest.raises(RefError, match="give the full commit id"):
            gitutil.resolve_remote(url, short)
    assert gitutil.resolve_remote(url, wanted) == (wanted, wanted)
    assert gitutil.resolve_remote(url, wanted.upper()) == (wanted, wanted)
    # The branch is reachable by its full name only.
    branch = git("rev-parse", wanted[:7], cwd=origin.work)
    assert branch != wanted
    assert gitutil.resolve_remote(url, f"refs/heads/{wanted[:7]}") == \
        (f"refs/heads/{wanted[:7]}", branch)


def test_a_tag_and_a_branch_of_the_same_name_are_ambiguous(origin: Origin) -> None:
    tagged = origin.commit("tag")
    git("tag", "v2", cwd=origin.work)
    branched = origin.commit("branch")
    git("branch", "v2", cwd=origin.work)
    origin.push("main", "refs/heads/v2", "refs/tags/v2")
    url = str(origin.bare)
    with pytest.raises(RefError) as info:
        gitutil.resolve_remote(url, "v2")
    assert str(info.value) == ("v2 is ambiguous: both a tag and a branch named v2; say "
                               "refs/tags/v2 or refs/heads/v2")
    assert gitutil.resolve_remote(url, "refs/tags/v2") == ("refs/tags/v2", tagged)
    assert gitutil.resolve_remote(url, "refs/heads/v2") == ("refs/heads/v2", branched)


def test_an_annotated_tag_gives_its_commit_and_a_branch_its_tip(origin: Origin) -> None:
    c1 = origin.commit("one")
    git("tag", "-a", "-m", "release one", "v1", cwd=origin.work)
    tag_object = git("rev-parse", "v1", cwd=origin.work)
    assert tag_object != c1
    origin.push("main", "v1")
    url = str(origin.bare)
    assert gitutil.resolve_remote(url, "v1") == ("refs/tags/v1", c1)
    assert gitutil.resolve_remote(url, "main") == ("refs/heads/main", c1)


def test_missing_refs_and_bad_names_are_refused(origin: Origin) -> None:
    origin.commit("one")
    origin.push("main")
    url = str(origin.bare)
    with pytest.raises(RefError) as info:
        gitutil.resolve_remote(url, "v9")
    assert str(info.value) == f"no tag or branch v9 in {url}"
    with pytest.raises(RefError, match="no refs/tags/v9 in"):
        gitutil.resolve_remote(url, "refs/tags/v9")
    for hostile in ("--upload-pack=touch /tmp/x", "../etc", "a b", "v1\nmain", "refs/notes/x",
                    "refs/remotes/origin/main", "HEAD@{1}"):
        with pytest.raises(RefError):
            gitutil.resolve_remote(url, hostile)


def test_a_url_that_looks_like_an_option_is_a_url(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(DeployError):
        gitutil.resolve_remote(f"--upload-pack=touch {marker}", "main")
    assert not marker.exists()


def test_errors_name_the_url_without_its_credentials() -> None:
    # Nothing listens on port 1: git fails at once, quoting the URL it was given.
    with pytest.raises(DeployBusError) as info:
        gitutil.resolve_remote("https://deployer:s3cr3t-token@127.0.0.1:1/app.git", "v1",
                               timeout=20)
    assert "s3cr3t-token" not in str(info.value)
    with pytest.raises(DeployBusError) as info:
        gitutil.resolve_remote("https://ghp_t0ken@127.0.0.1:1/app.git", "v1", timeout=20)
    assert "ghp_t0ken" not in str(info.value)


def test_update_mirror_errors_hide_the_token(tmp_path: Path) -> None:
    with pytest.raises(DeployError) as info:
        gitutil.update_mirror(tmp_path, "app", "https://ci:s3cr3t-token@127.0.0.1:1/app.git")
    assert "s3cr3t-token" not in str(info.value)
    assert "https://ci:***@127.0.0.1:1/app.git" in str(info.value)


def test_a_remote_that_never_answers_is_given_up_on() -> None:
    with socket.socket() as server:  # accepts, then says nothing
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DeployError, match="no answer within 1s"):
            gitutil.resolve_remote(f"git://127.0.0.1:{port}/app.git", "v1", timeout=1)
        assert time.monotonic() - started < 10
