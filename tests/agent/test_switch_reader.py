"""A reader in another process resolves ``current`` in a loop while it is
switched 1,000 times between three real checkouts: it never finds
``current`` missing, dangling, pointing at a partial checkout, or at a
release whose file list differs from ``git ls-tree`` of its commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploybus import gitutil
from deploybus.layout import Layout
from tests.agent.harness import Repo, wait_until
from tests.e2e.cluster import git

pytestmark = pytest.mark.unit

SWITCHES = 1000

READER = r"""
import json, os, sys
project, expected_path, stop, ready = sys.argv[1:5]
expected = {k: set(v) for k, v in json.load(open(expected_path)).items()}
current = os.path.join(project, "current")
reads, seen, problems = 0, {}, []
while not os.path.exists(stop):
    try:
        target = os.readlink(current)
        fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        problems.append(f"current unresolvable: {exc}")
        continue
    try:
        if target.endswith(".partial"):
            problems.append(f"current -> {target}")
        found = set()
        for top, dirs, files, _ in os.fwalk(".", dir_fd=fd):
            rel = top[2:]
            found.update(f"{rel}/{n}" if rel else n for n in dirs + files)
        vfd = os.open("VERSION", os.O_RDONLY, dir_fd=fd)
        version = os.read(vfd, 100).decode().strip()
        os.close(vfd)
    except OSError as exc:
        problems.append(f"reading through current failed: {exc}")
        continue
    finally:
        os.close(fd)
    if found != expected.get(version):
        problems.append(f"{version}: file list differs from git ({len(found)} entries)")
    seen[version] = seen.get(version, 0) + 1
    reads += 1
    if reads == 1:
        open(ready, "w").close()
print(json.dumps({"reads": reads, "seen": seen, "problems": problems[:20],
                  "problem_count": len(problems)}))
"""


def test_reader_never_sees_a_missing_or_partial_current(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    commits = {
        "v1": repo.commit("v1", {f"a/{i}.txt": f"{i}\n" for i in range(40)}),
        "v2": repo.commit("v2", {f"b/c/{i}.txt": f"{i}\n" for i in range(60)}, remove=("a",)),
        "v3": repo.commit("v3", {"single": "x\n"}, remove=("b",)),
    }
    mirror = tmp_path / "mirror.git"
    git("clone", "-q", "--mirror", str(repo.bare), str(mirror), cwd=tmp_path)
    layout = Layout(tmp_path / "srv", "app")
    layout.ensure()
    for tag, commit in commits.items():
        gitutil.export(mirror, commit, layout.releases / tag)
    (tmp_path / "expected.json").write_text(json.dumps(
        {tag: sorted(repo.files(c)) for tag, c in commits.items()}))
    layout.switch("v1")
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(layout.dir),
                               str(tmp_path / "expected.json"), str(stop), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(ready.exists, 30), "the reader is reading before switching starts"
        for i in range(SWITCHES):
            layout.switch(("v1", "v2", "v3")[i % 3])
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    report = json.loads(out)
    assert report["problem_count"] == 0, report
    assert report["reads"] >= 100, report
    assert set(report["seen"]) == {"v1", "v2", "v3"}, report
    assert sorted(p.name for p in layout.dir.iterdir()) == [".deploybus", "current",
                                                             "releases"]
