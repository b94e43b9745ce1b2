"""deploy_agent.journal: durable entries, old-format entries, pruning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from deploybus.daemons.deploy_agent.journal import Journal


def test_write_and_read_back(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal")
    j.ensure()
    assert j.get("r1") is None
    j.write("r1", {"state": "accepted", "request": {"ref": "v1"}})
    assert j.get("r1") == {"state": "accepted", "request": {"ref": "v1"}}
    j.write("r1", {"state": "done", "result": {"status": "succeeded"}}, sync=False)
    assert j.get("r1")["state"] == "done"
    assert [p.name for p in j.dir.iterdir()] == ["r1.json"], "no temporary files stay"


def test_entries_from_before_states_read_as_done_and_published(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"status": "succeeded", "release": "R"}))
    assert j.get("old") == {"state": "done", "published": True,
                            "result": {"status": "succeeded", "release": "R"}}


def test_an_unreadable_entry_counts_as_handled(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    (tmp_path / "torn.json").write_text('{"state": "runn')
    entry = j.get("torn")
    assert entry["state"] == "done" and entry["result"]["status"] == "failed"


def test_entries_oldest_first_and_leftover_temporaries_removed(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for i, name in enumerate(("b", "a", "c")):
        j.write(name, {"state": "done", "n": i})
        os.utime(tmp_path / f"{name}.json", (1000 + i, 1000 + i))
    (tmp_path / ".x.json.tmp-1234").write_text("{")
    assert [r for r, _ in j.entries()] == ["b", "a", "c"]
    assert not (tmp_path / ".x.json.tmp-1234").exists()


def test_prune_removes_only_old_done_and_published(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    old = time.time() - 30 * 24 * 3600
    for name, entry in {"old-done": {"state": "done", "published": True},
                        "old-unsent": {"state": "done", "published": False},
                        "old-running": {"state": "running"},
                        "new-done": {"state": "done", "published": True}}.items():
        j.write(name, entry)
        if name.startswith("old"):
            os.utime(tmp_path / f"{name}.json", (old, old))
    assert j.prune() == ["old-done"]
    assert sorted(p.stem for p in tmp_path.iterdir()) == ["new-done", "old-running",
                                                         "old-unsent"]
