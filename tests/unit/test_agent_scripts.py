"""deploy_agent.scripts: batching and bounding output, timeouts that kill the
whole process group, accounts, and killing a group a dead agent left behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from deploybus.config import OutputConfig
from deploybus.daemons.deploy_agent import scripts
from deploybus.daemons.deploy_agent.scripts import OutputBatcher, run_script
from deploybus.errors import DeployError


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str, list[str] | None]] = []

    def __call__(self, step: str, message: str, lines: list[str] | None) -> None:
        self.calls.append((time.monotonic(), step, message, lines))

    def lines(self) -> list[str]:
        return [x for _, _, _, lines in self.calls for x in lines or []]

    def batches(self) -> list[list[str]]:
        return [lines for _, _, _, lines in self.calls if lines]


def test_batcher_sends_full_batches_at_once_and_the_rest_when_due() -> None:
    sent = Sent()
    b = OutputBatcher("pre", sent, OutputConfig(interval=0.2, lines=3))
    b.feed(b"a\nb\nc\nd\ne")
    b.flush()
    assert sent.batches() == [["a", "b", "c"]], "a full batch goes at once; d waits"
    b.flush()
    assert len(sent.batches()) == 1
    time.sleep(0.25)
    b.flush()
    assert sent.batches()[-1] == ["d"], "d has waited its interval"
    b.close()  # "e" had no newline: it still counts
    b.flush(force=True)
    assert sent.lines() == ["a", "b", "c", "d", "e"]


def test_batcher_cuts_long_lines_and_keeps_memory_bounded() -> None:
    sent = Sent()
    b = OutputBatcher("post", sent, OutputConfig(line_chars=100))
    b.feed(b"x" * 250 + b"\n")
    for _ in range(100):  # a 1 MB line arriving in pieces, no newline yet
        b.feed(b"y" * 10000)
        assert len(b.buf) <= 400
    b.feed(b"yyy\nafter\n")
    b.flush(force=True)
    assert sent.lines() == ["x" * 100 + " ... [line cut]", "y" * 100 + " ... [line cut]",
                            "after"]


def test_batcher_truncates_after_max_bytes_and_counts_the_rest() -> None:
    sent = Sent()
    b = OutputBatcher("pre", sent, OutputConfig(max_bytes=1024))
    b.feed(b"".join(b"%04d-------\n" % i for i in range(1000)))  # 12 bytes a line
    b.flush(force=True)
    lines = sent.lines()
    assert lines[-1] == "... output truncated after 1020 bytes"
    assert lines[:-1] == [f"{i:04}-------" for i in range(85)]
    assert b.dropped == (1000 - 85) * 12
    assert b.total == 12000


def test_batcher_replaces_bad_utf8_and_strips_cr() -> None:
    sent = Sent()
    b = OutputBatcher("pre", sent, OutputConfig())
    b.feed(b"caf\xc3\xa9\r\n\xff\xfe\n")
    b.flush(force=True)
    assert sent.lines() == ["café", "\ufffd\ufffd"]


def test_run_script_streams_and_reports_the_last_line_on_failure(tmp_path: Path) -> None:
    sent = Sent()
    with pytest.raises(DeployError, match=r"^post script failed with exit code 3: broken$"):
        run_script("post", "echo one; echo broken >&2; exit 3", cwd=tmp_path, env={},
                   timeout=10, progress=sent)
    assert sent.lines() == ["one", "broken"]
    assert sent.calls[0][2] == "running post script"
    assert sent.calls[-1][2] == "post script failed with exit code 3"


def test_run_script_timeout_kills_the_group_including_background_children(tmp_path: Path
                                                                            ) -> None:
    sent = Sent()
    started = time.monotonic()
    with pytest.raises(DeployError, match="^pre script timed out after 0.5s$"):
        run_script("pre", f"sleep 60 & echo $! > {tmp_path}/bg; trap '' TERM; sleep 60",
                   cwd=tmp_path, env={}, timeout=0.5, progress=sent)
    assert time.monotonic() - started < scripts.KILL_GRACE + 3
    pid = int((tmp_path / "bg").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


def test_background_process_holding_the_pipe_does_not_hang_the_step(tmp_path: Path) -> None:
    sent = Sent()
    started = time.monotonic()
    run_script("post", f"sleep 30 & echo $! > {tmp_path}/bg; echo started", cwd=tmp_path,
               env={}, timeout=10, progress=sent)
    assert time.monotonic() - started < scripts.DRAIN_AFTER_EXIT + 2
    assert "started" in sent.lines()
    os.kill(int((tmp_path / "bg").read_text()), 9)


def test_on_start_gets_the_process_group_and_its_start_time(tmp_path: Path) -> None:
    seen = []
    run_script("pre", "echo $$ > pid", cwd=tmp_path, env={}, timeout=5, progress=Sent(),
               on_start=lambda pgid, start: seen.append((pgid, start)))
    assert seen[0][0] == int((tmp_path / "pid").read_text())
    assert isinstance(seen[0][1], int)


def test_kill_orphan_group_kills_the_group_it_recorded() -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    try:
        start = scripts.proc_start_time(proc.pid)
        assert start is not None
        assert not scripts.kill_orphan_group(proc.pid, start + 1), "another process: spared"
        assert proc.poll() is None
        assert scripts.kill_orphan_group(proc.pid, start)
        assert proc.wait(5) == -9
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_orphan_group_of_a_gone_group_does_nothing() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    start = scripts.proc_start_time(proc.pid)
    proc.wait()
    assert not scripts.kill_orphan_group(proc.pid, start)


def test_run_as_unknown_user_and_group() -> None:
    with pytest.raises(DeployError, match="user 'no-such-user-x' does not exist"):
        scripts.run_as("no-such-user-x", None)
    with pytest.raises(DeployError, match="group 'no-such-group-x' does not exist"):
        scripts.run_as("root", "no-such-group-x")
    assert scripts.run_as(None, None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_run_as_nobody_runs_the_script_as_nobody(tmp_path: Path) -> None:
    runas = scripts.run_as("nobody", None)
    assert runas is not None and runas.uid == 65534
    sent = Sent()
    run_script("post", "id -un; id -G; echo $HOME $USER", cwd=tmp_path, env={"PATH":
               os.environ["PATH"]}, timeout=5, progress=sent, runas=runas)
    assert sent.lines() == ["nobody", str(runas.gid), "/nonexistent nobody"]
