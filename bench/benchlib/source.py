"""The project every method deploys: a generated git repository (cached), this
run's origin cloned from it, and a new tag on a new commit for every deploy."""

from __future__ import annotations

import base64
import os
import random
import shutil
import tempfile
from pathlib import Path

from .common import BenchError, git

#: The generated project: ~200 files, ~2 MB, deterministic content.
REPO_FILES = 200
#: Their total size (the content is base64 of pseudo-random bytes).
REPO_BYTES = 2 * 1024 * 1024
#: The generator's seed: the same project every time.
REPO_SEED = 20240601
#: Part of the cache entry's name: bump when the generator changes (new cache entry).
REPO_VERSION = "v1"


def file_name(i: int) -> str:
    """file0000..file0019 at the top, the rest spread over src/pkgNN/."""
    name = f"file{i:04d}.txt"
    return name if i < 20 else f"src/pkg{i % 12:02d}/{name}"


def make_cached_repo(cache: Path) -> Path:
    """The bare repository with tag v1 (built once, then reused)."""
    bare = cache / f"origin-{REPO_VERSION}.git"
    if (bare / "refs" / "tags" / "v1").exists() or (bare / "packed-refs").exists():
        return bare
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    try:
        work = tmp / "work"
        work.mkdir()
        git("init", "-q", "-b", "main", cwd=work)
        rng = random.Random(REPO_SEED)
        weights = [rng.uniform(0.3, 1.7) for _ in range(REPO_FILES)]
        total = sum(weights)
        for i, w in enumerate(weights):
            size = int(REPO_BYTES * w / total)
            raw = base64.b64encode(rng.randbytes(size * 3 // 4 + 3))[:size]
            lines = [raw[j:j + 76] for j in range(0, len(raw), 76)]
            p = work / file_name(i)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\n".join(lines) + b"\n")
        (work / "VERSION").write_text("v1\n")
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "bench project v1", cwd=work)
        git("tag", "v1", cwd=work)
        git("clone", "-q", "--bare", str(work), str(tmp / "bare.git"), cwd=tmp)
        try:
            os.rename(tmp / "bare.git", bare)
        except OSError:
            if not bare.exists():  # a concurrent bench run won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bare


class Source:
    """This run's origin (a clone of the cache) and a work tree to make tags in."""

    def __init__(self, cache_bare: Path, work: Path) -> None:
        self.origin = work / "origin.git"
        self.tree = work / "src"
        git("clone", "-q", "--bare", str(cache_bare), str(self.origin), cwd=work)
        git("clone", "-q", str(self.origin), str(self.tree), cwd=work)
        self.n = 0

    def new_tag(self, label: str) -> str:
        """A new commit (VERSION changes) with a new tag, pushed to origin."""
        self.n += 1
        tag = f"{label}-{self.n}"
        (self.tree / "VERSION").write_text(tag + "\n")
        git("commit", "-q", "-am", f"release {tag}", cwd=self.tree)
        git("tag", tag, cwd=self.tree)
        git("push", "-q", "origin", "main", tag, cwd=self.tree)
        return tag

    def files(self) -> int:
        """How many files the project has (for the report)."""
        return int(git("ls-files", cwd=self.tree).count("\n") + 1)

    def size(self) -> int:
        """The work tree's bytes, .git left out (for the report)."""
        return sum(p.stat().st_size for p in self.tree.rglob("*")
                   if p.is_file() and ".git" not in p.parts)


def check_hosts(roots: list[Path], tag: str) -> None:
    """Every host's current release is the tag's tree."""
    bad = []
    for app in roots:
        try:
            version = (app / "current" / "VERSION").read_text().strip()
            ok = version == tag and (app / "current" / "file0001.txt").is_file()
        except OSError:
            ok, version = False, "missing"
        if not ok:
            bad.append(f"{app}: {version}")
    if bad:
        raise BenchError(f"{len(bad)} host(s) not on {tag}: " + "; ".join(bad[:5]))
