"""deploybus.layout: release states, rollback target, cleanup protection,
shared links, and what a crash leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploybus.layout import Layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path, "shop")
    lay.ensure()
    return lay


def make(layout: Layout, name: str, state: str | None = "ok") -> Path:
    d = layout.releases / name
    d.mkdir()
    (d / "VERSION").write_text(name)
    if state:
        layout.write_info(name, {"state": state})
    return d


def test_rollback_target_is_the_newest_earlier_ok_release(layout):
    for name, state in [("r1", "ok"), ("r2", "ok"), ("r3", "failed"), ("r4", None),
                        ("r5", "ok"), ("r6", "ok")]:
        make(layout, name, state)
    (layout.releases / "r0.partial").mkdir()
    layout.switch("r5")
    assert layout.rollback_target() == "r2", "failed and unknown releases are skipped"
    assert layout.rollback_target("r2") == "r1"
    assert layout.rollback_target("r1") is None
    layout.clear_current()
    assert layout.rollback_target() is None


def test_complete_releases_excludes_partials_and_links(layout):
    make(layout, "r1")
    (layout.releases / "r2.partial").mkdir()
    os.symlink("r1", layout.releases / "r3")
    assert layout.complete_releases() == ["r1"]


def test_cleanup_protects_current_rollback_target_and_extra(layout):
    names = [f"r{i}" for i in range(1, 8)]
    for n in names:
        make(layout, n, "failed" if n in ("r5", "r6") else "ok")
    layout.switch("r7")
    removed = layout.cleanup(1, protect=["r1"])
    assert sorted(removed) == ["r2", "r3", "r5", "r6"]
    assert layout.complete_releases() == ["r1", "r4", "r7"]
    assert not (layout.meta / "releases" / "r2.json").exists()


def test_remove_leftovers_of_a_crash(layout):
    make(layout, "r1")
    layout.switch("r1")
    (layout.releases / "r2.partial" / "sub").mkdir(parents=True)
    os.symlink("releases/r1", layout.dir / ".current.tmp-abc")
    assert sorted(layout.remove_leftovers()) == [".current.tmp-abc", "r2.partial"]
    assert sorted(p.name for p in layout.dir.iterdir()) == [".deploybus", "current", "releases"]


def test_restore_switches_back_or_removes_current(layout):
    make(layout, "r1")
    make(layout, "r2")
    layout.switch("r2")
    layout.restore("r1")
    assert layout.current_release() == "r1"
    layout.restore(None)
    assert not os.path.lexists(layout.current)
    layout.restore(None)  # nothing there: fine


def test_set_state_keeps_the_other_fields(layout):
    layout.write_info("r1", {"commit": "abc", "state": "pending"})
    layout.set_state("r1", "failed", reason="post script failed")
    assert layout.info("r1") == {"commit": "abc", "state": "failed",
                                 "reason": "post script failed"}


def test_link_shared_creates_seeds_and_replaces(layout):
    rel = make(layout, "r1")
    (rel / "storage" / "uploads").mkdir(parents=True)
    (rel / "storage" / "uploads" / "seed").write_text("from git")
    (rel / "log").mkdir()
    (rel / "log" / "old.log").write_text("in the checkout")
    (layout.shared / "log").mkdir(parents=True)
    (layout.shared / "log" / "app.log").write_text("kept")
    (layout.shared / ".env").write_text("SECRET=1")
    linked = layout.link_shared(rel, ["log", ".env", "storage/uploads", "tmp/cache/"])
    assert linked == ["log", ".env", "storage/uploads", "tmp/cache"]
    assert os.readlink(rel / "log") == "../../shared/log"
    assert os.readlink(rel / "storage" / "uploads") == "../../../shared/storage/uploads"
    assert (rel / "log" / "app.log").read_text() == "kept", "shared wins over the checkout"
    assert not (layout.shared / "log" / "old.log").exists()
    assert (rel / ".env").read_text() == "SECRET=1"
    assert (layout.shared / "storage" / "uploads" / "seed").read_text() == "from git"
    assert (layout.shared / "tmp" / "cache").is_dir()
    assert (rel / "tmp").is_dir() and not (rel / "tmp").is_symlink()


def test_link_shared_refuses_paths_out_of_the_release(layout):
    rel = make(layout, "r1")
    for bad in ("../x", "/etc", "a/./b"):
        with pytest.raises(ValueError):
            layout.link_shared(rel, [bad])


def test_link_shared_refuses_a_symlinked_or_file_parent_in_the_checkout(layout):
    rel = make(layout, "r1")
    (rel / "real").mkdir()
    os.symlink("real", rel / "data")
    with pytest.raises(OSError, match="data in the release is not a directory"):
        layout.link_shared(rel, ["data/uploads"])
    with pytest.raises(OSError, match="VERSION in the release is not a directory"):
        layout.link_shared(rel, ["VERSION/x"])
    assert not (rel / "real" / "uploads").exists()
