"""gitutil on real git: mirrors, resolving refs through the long-running
``git cat-file`` per mirror, and export."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from deploybus import gitutil
from deploybus.errors import RefError

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **GIT_ENV})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Origin:
    def __init__(self, base: Path) -> None:
        self.work = base / "work"
        self.work.mkdir()
        git("init", "-q", "-b", "main", cwd=self.work)
        self.state = base / "state"

    def commit(self, tag: str | None = None, *, annotated: bool = False) -> str:
        (self.work / "VERSION").write_text(f"{tag}\n")
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", f"commit {tag}", cwd=self.work)
        if tag:
            git("tag", *(["-a", "-m", tag] if annotated else []), tag, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def mirror(self) -> Path:
        return gitutil.update_mirror(self.state, "app", str(self.work))


@pytest.fixture
def origin(tmp_path: Path):
    o = Origin(tmp_path)
    yield o
    gitutil.close_resolvers()


def test_resolve_sees_what_each_fetch_adds(origin: Origin) -> None:
    c1 = origin.commit("v1")
    mirror = origin.mirror()
    assert gitutil.resolve(mirror, "v1") == c1
    c2 = origin.commit("v2", annotated=True)
    with pytest.raises(RefError, match="not found"):
        gitutil.resolve(mirror, "v2")  # not fetched yet
    origin.mirror()
    assert gitutil.resolve(mirror, "v2") == c2, "an annotated tag resolves to its commit"
    assert gitutil.resolve(mirror, "main") == c2
    assert gitutil.resolve(mirror, c1[:12]) == c1


def test_resolve_after_repack_and_packed_refs(origin: Origin) -> None:
    c1 = origin.commit("v1")
    mirror = origin.mirror()
    assert gitutil.resolve(mirror, "v1") == c1
    git("--git-dir", str(mirror), "gc", "-q", "--prune=now", cwd=mirror)
    git("--git-dir", str(mirror), "pack-refs", "--all", cwd=mirror)
    assert not (mirror / "refs" / "tags" / "v1").exists(), "v1 should be in packed-refs now"
    c2 = origin.commit("v2")
    origin.mirror()
    assert gitutil.resolve(mirror, "v1") == c1
    assert gitutil.resolve(mirror, "v2") == c2


def test_resolver_replaced_when_it_dies_or_the_mirror_is_recloned(origin: Origin) -> None:
    c1 = origin.commit("v1")
    mirror = origin.mirror()
    assert gitutil.resolve(mirror, "v1") == c1
    proc = gitutil._resolvers[mirror].proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert gitutil.resolve(mirror, "v1") == c1, "a dead cat-file is replaced"
    shutil.rmtree(mirror)
    c2 = origin.commit("v2")
    origin.mirror()  # a fresh clone at the same path
    assert gitutil.resolve(mirror, "v2") == c2


def test_resolve_refuses_what_is_not_a_commit_or_not_a_ref(origin: Origin) -> None:
    origin.commit("v1")
    mirror = origin.mirror()
    tree = git("--git-dir", str(mirror), "rev-parse", "v1^{tree}", cwd=mirror)
    with pytest.raises(RefError):
        gitutil.resolve(mirror, tree)  # a tree, not a commit
    for hostile in ("--upload-pack=touch /tmp/x", "../../etc", "v1\nmain", "a b"):
        with pytest.raises(RefError):
            gitutil.resolve(mirror, hostile)
    with pytest.raises(RefError, match="no mirror"):
        gitutil.resolve(mirror.parent / "nothing.git", "v1")
    assert gitutil.resolve(mirror, "v1"), "the resolver still answers after refusals"


def test_has_commit_takes_only_a_full_commit_id(origin: Origin) -> None:
    c1 = origin.commit("v1", annotated=True)
    mirror = origin.mirror()
    assert gitutil.has_commit(mirror, c1)
    tag_object = git("--git-dir", str(mirror), "rev-parse", "v1", cwd=mirror)
    assert tag_object != c1
    assert not gitutil.has_commit(mirror, tag_object), "a tag object is not a commit"
    assert not gitutil.has_commit(mirror, "0" * 40)
    assert not gitutil.has_commit(mirror.parent / "nothing.git", c1), "no mirror yet"
    for loose in ("v1", c1[:12], "main"):
        with pytest.raises(RefError, match="not a full commit id"):
            gitutil.has_commit(mirror, loose)


@pytest.mark.parametrize("text, shown", [
    ("fatal: unable to access 'https://ci:s3cret@git.example.com/app.git/': 403",
     "fatal: unable to access 'https://ci:***@git.example.com/app.git/': 403"),
    ("https://ghp_T0KEN@github.com/acme/app.git", "https://***@github.com/acme/app.git"),
    ("https://user:p@ss@host:8443/x.git?y=1", "https://user:***@host:8443/x.git?y=1"),
    ("from http://a:b@h1/ and https://tok@h2/", "from http://a:***@h1/ and https://***@h2/"),
    ("ssh://git@git.example.com/app.git", "ssh://git@git.example.com/app.git"),
    ("ssh://git:pw@git.example.com/app.git", "ssh://git:***@git.example.com/app.git"),
    ("git@github.com:acme/app.git", "git@github.com:acme/app.git"),
    ("https://github.com/acme/app.git", "https://github.com/acme/app.git"),
    ("mail me at a@b.c", "mail me at a@b.c"),
])
def test_redact_text_hides_credentials_in_urls(text: str, shown: str) -> None:
    assert gitutil.redact_text(text) == shown
