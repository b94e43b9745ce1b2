"""deploybus.layout: atomic switch, cleanup, and the per-project lock."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from deploybus.layout import Layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path, "shop")
    lay.ensure()
    return lay


def make_release(layout: Layout, name: str) -> Path:
    d = layout.releases / name
    d.mkdir()
    (d / "VERSION").write_text(name)
    return d


def leftovers(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.dir.iterdir() if ".tmp" in p.name)


def test_ensure_creates_the_tree(tmp_path):
    lay = Layout(tmp_path, "shop")
    lay.ensure()
    assert lay.releases.is_dir() and (lay.meta / "releases").is_dir()
    assert lay.current_release() is None


def test_switch_points_current_at_the_release(layout):
    make_release(layout, "r1")
    layout.switch("r1")
    assert layout.current.is_symlink()
    assert os.readlink(layout.current) == os.path.join("releases", "r1")  # relative
    assert (layout.current / "VERSION").read_text() == "r1"
    assert layout.current_release() == "r1"
    assert leftovers(layout) == []


def test_switch_replaces_the_old_link_and_leaves_no_tmp(layout):
    make_release(layout, "r1")
    make_release(layout, "r2")
    layout.switch("r1")
    layout.switch("r2")
    assert layout.current_release() == "r2"
    assert (layout.current / "VERSION").read_text() == "r2"
    assert sorted(p.name for p in layout.dir.iterdir()) == [".deploybus", "current",
                                                              "releases"]


def test_switch_to_missing_release_keeps_current(layout):
    make_release(layout, "r1")
    layout.switch("r1")
    with pytest.raises(FileNotFoundError, match="release r9 does not exist"):
        layout.switch("r9")
    assert layout.current_release() == "r1"
    assert leftovers(layout) == []


def test_switch_failure_cleans_its_tmp_link(layout):
    make_release(layout, "r1")
    layout.current.mkdir()  # rename(2) of a symlink over a directory fails
    with pytest.raises(OSError):
        layout.switch("r1")
    assert leftovers(layout) == []


def test_current_is_never_missing_during_switches(layout):
    # A reader resolving current while releases are switched sees one of
    # them, never nothing: that is what rename(2) over the link buys.
    for n in ("r1", "r2"):
        make_release(layout, n)
    layout.switch("r1")
    stop = threading.Event()
    misses: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                assert (layout.current / "VERSION").read_text() in ("r1", "r2")
            except (OSError, AssertionError) as exc:
                misses.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            layout.switch("r2" if i % 2 else "r1")
    finally:
        stop.set()
        t.join()
    assert misses == []


def test_info_round_trip(layout):
    assert layout.info("r1") == {}
    layout.write_info("r1", {"commit": "abc", "state": "ok"})
    assert layout.info("r1") == {"commit": "abc", "state": "ok"}
    (layout.meta / "releases" / "r2.json").write_text("{torn")
    assert layout.info("r2") == {}
    # write_info goes through a temporary file that does not stay behind.
    assert sorted(p.name for p in (layout.meta / "releases").iterdir()) == ["r1.json", "r2.json"]


def test_cleanup_keeps_the_newest(layout):
    names = [f"20260101T00000{i}-abc-r{i}" for i in range(6)]
    for n in names:
        make_release(layout, n)
        layout.write_info(n, {"state": "ok"})
    layout.switch(names[-1])
    removed = layout.cleanup(3)
    assert sorted(removed) == names[:3]
    assert sorted(p.name for p in layout.releases.iterdir()) == names[3:]
    assert sorted(p.stem for p in (layout.meta / "releases").iterdir()) == names[3:]
    assert layout.current_release() == names[-1]


def test_cleanup_never_removes_current(layout):
    names = [f"20260101T00000{i}-abc-r{i}" for i in range(5)]
    for n in names:
        make_release(layout, n)
    layout.switch(names[0])  # rolled back to the oldest
    removed = layout.cleanup(2)
    assert sorted(removed) == names[1:3]
    assert sorted(p.name for p in layout.releases.iterdir()) == [names[0], *names[3:]]
    assert (layout.current / "VERSION").read_text() == names[0]


def test_cleanup_removes_partials(layout):
    make_release(layout, "r1")
    layout.switch("r1")
    partial = layout.releases / "r2.partial"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "f").write_text("x")
    assert layout.cleanup(5) == ["r2.partial"]
    assert not partial.exists()
    assert [p.name for p in layout.releases.iterdir()] == ["r1"]


def test_cleanup_with_fewer_than_keep_removes_nothing(layout):
    for n in ("r1", "r2"):
        make_release(layout, n)
    assert layout.cleanup(5) == []
    assert layout.cleanup(2) == []
    assert sorted(p.name for p in layout.releases.iterdir()) == ["r1", "r2"]


def test_lock_is_exclusive_between_threads(layout):
    held, release, second_in = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with layout.lock():
            order.append("first in")
            held.set()
            release.wait(5)
            order.append("first out")

    def second() -> None:
        held.wait(5)
        with layout.lock():
            order.append("second in")
            second_in.set()

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    assert held.wait(5)
    t2.start()
    # While the first holder sits in the lock, the second must not get in.
    assert not second_in.wait(0.3)
    release.set()
    assert second_in.wait(5)
    t1.join(5)
    t2.join(5)
    assert order == ["first in", "first out", "second in"]


def test_lock_is_released_after_an_exception(layout):
    with pytest.raises(RuntimeError), layout.lock():
        raise RuntimeError("deploy failed")
    got = threading.Event()

    def other() -> None:
        with layout.lock():
            got.set()

    t = threading.Thread(target=other)
    t.start()
    assert got.wait(5)
    t.join(5)


def test_lock_is_exclusive_between_processes(layout, tmp_path):
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import fcntl, sys
        f = open({str(layout.meta / 'lock')!r}, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(3)
        sys.exit(0)
    """)
    with layout.lock():
        assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0


def test_locks_of_different_projects_are_independent(tmp_path):
    a, b = Layout(tmp_path, "a"), Layout(tmp_path, "b")
    got = threading.Event()

    def other() -> None:
        with b.lock():
            got.set()

    with a.lock():
        t = threading.Thread(target=other)
        t.start()
        assert got.wait(5)
        t.join(5)


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "a/b", "", ".hidden", "r1.partial",
                                  "x" * 129, "a\x00b", None])
def test_release_ids_that_could_leave_the_project_are_refused(layout, tmp_path, name):
    from deploybus.errors import RefError
    from deploybus.layout import check_release
    make_release(layout, "r1")
    layout.switch("r1")
    (tmp_path / "etc").mkdir()  # what "releases/../../etc" would reach
    with pytest.raises(RefError, match="invalid release"):
        check_release(name)
    with pytest.raises(RefError, match="invalid release"):
        layout.switch(name)  # type: ignore[arg-type]
    with pytest.raises(RefError, match="invalid release"):
        layout.set_state(name, "failed")  # type: ignore[arg-type]
    assert layout.info(name) == {}  # type: ignore[arg-type]
    assert os.readlink(layout.current) == os.path.join("releases", "r1")
    assert sorted(os.listdir(tmp_path)) == ["etc", "shop"]
    assert os.listdir(tmp_path / "etc") == []


def test_release_ids_the_agent_makes_are_accepted():
    from deploybus.layout import check_release
    for name in ("20261122T031000.123456-1a2b3c4d-4f2c9e01", "20261122T031000-1a2b3c4d-x",
                 "r1", "a" * 128):
        assert check_release(name) == name


@pytest.mark.parametrize("project", ["..", "../x", "a/b", "", ".deploybus"])
def test_a_layout_needs_a_project_name(tmp_path, project):
    from deploybus.errors import RefError
    with pytest.raises(RefError, match="invalid project"):
        Layout(tmp_path, project)
