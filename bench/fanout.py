#!/usr/bin/env python3
"""Fan-out benchmark: one deploy to N hosts, done three ways, side by side.

    .venv/bin/python bench/fanout.py --hosts N [--runs R]
        [--broker amqp://guest:guest@127.0.0.1:5672//]

1. deploybus, installed as on a server (``bench/.venv-agent``: ``pip install
   .`` of this checkout, runtime dependencies only, made or refreshed on
   first use; ``--exe`` benches another command): one orchestrator and N
   agent processes (``deploybus agent --host hI``) on the broker, timed
   ``deploybus deploy ... --wait``, once per
   rollout window in ``--windows`` (default ``1,0``: one host after another,
   then all at once), and with ``--canary`` (default ``1:25%``: one canary
   host, then batches of 25%).
2. Ansible: ansible-core (its own venv, ``bench/.venv-ansible``, made on first
   use) with N ``ansible_connection=local`` hosts and forks=5.
3. The floor: the same per-host shell steps run with ``xargs -P``.

Each per-host deploy is the same work in all three: fetch the new tag into
the host's bare mirror, export the tagged tree into a new release directory,
run the post script (``test -f file0001.txt``), switch ``current`` atomically.
Each method gets one untimed deploy first (it clones the mirrors and, for
deploybus, makes sure every agent is subscribed); then the timed runs of the
methods are interleaved, each deploying a fresh tag on a fresh commit, so
every run fetches. See docs/performance.md.

It prints a table and, as its last line, one JSON object with the medians and
the ratios ``vs_ansible`` and ``vs_floor`` (deploybus median / baseline
median), and ``vs_floor_paired``: the median of the rounds' own ratios (each
round runs the methods back to back, so it drifts less with the machine).
Everything lives in a temporary directory that is removed at the end
(``--keep`` keeps it); the generated source repository is cached under
``$TMPDIR/deploybus-bench-cache``. Every process it starts is stopped at the
end, and the broker queues of its unique prefix are deleted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
#: The project's package directories (setup.cfg maps them into ``deploybus``).
PACKAGE_DIRS = ("deploybus", "daemons", "frontend")
ANSIBLE_VENV = BENCH / ".venv-ansible"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"

#: The generated project: ~200 files, ~2 MB, deterministic content.
REPO_FILES = 200
REPO_BYTES = 2 * 1024 * 1024
REPO_SEED = 20240601
REPO_VERSION = "v1"  # bump when the generator changes (new cache entry)
POST_SCRIPT = "test -f file0001.txt"
PROJECT = "bench"
ENVIRONMENT = "bench"
ANSIBLE_FORKS = 5

CLK_TCK = os.sysconf("SC_CLK_TCK")
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@invalid",
           "GIT_AUTHOR_DATE": "2024-06-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-06-01T00:00:00Z"}


class BenchError(Exception):
    pass


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        log: Path | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n[exit {p.returncode}]\n")
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-25:])
        raise BenchError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return p


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd=cwd, env=GIT_ENV).stdout.strip()


# -- the source repository -------------------------------------------------------------

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
        return int(git("ls-files", cwd=self.tree).count("\n") + 1)

    def size(self) -> int:
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


# -- CPU accounting ---------------------------------------------------------------------

def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(own, children) CPU seconds of ``pid``: its utime+stime, and that of its
    children, both those it has waited for (cutime+cstime) and those still
    running (an agent keeps a ``git cat-file`` per mirror: its CPU must count
    before the agent reaps it). (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    f = [int(x) for x in text[text.rindex(")") + 2:].split()[11:15]]
    live = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        live += sum(proc_cpu(int(k)) for k in kids)
    return (f[0] + f[1]) / CLK_TCK, (f[2] + f[3]) / CLK_TCK + live


def proc_cpu(pid: int) -> float:
    return sum(proc_cpu_split(pid))


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def system_busy() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def broker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.joinpath("comm").read_text().strip() == "beam.smp":
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


class Timed:
    """Wall time and CPU (waited children + given long-lived pids + broker)."""

    def __init__(self, pids: list[int] | None = None, bystanders: list[int] | None = None
                 ) -> None:
        self.pids = pids or []
        self.bystanders = bystanders or []
        self.broker = broker_pids()
        self.extra: dict[str, Any] = {}

    def __enter__(self) -> Timed:
        self.c0 = children_cpu()
        self.p0 = sum(proc_cpu(p) for p in self.pids)
        self.b0 = {p: proc_cpu(p) for p in self.broker}
        self.s0 = system_busy()
        self.y0 = sum(proc_cpu(p) for p in self.bystanders)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = (children_cpu() - self.c0) + (sum(proc_cpu(p) for p in self.pids) - self.p0)
        # a broker restarted meanwhile (other tests on this machine do that) counts 0
        b1 = {p: proc_cpu(p) for p in broker_pids()}
        self.broker_cpu = sum(max(0.0, b1[p] - v) for p, v in self.b0.items() if p in b1)
        # idle deploybus daemons while a baseline runs
        self.bystander_cpu = sum(proc_cpu(p) for p in self.bystanders) - self.y0
        # CPU that none of the above used: other work on the machine
        self.other_cpu = max(0.0, system_busy() - self.s0 - self.cpu - self.broker_cpu
                             - self.bystander_cpu)


# -- 1. deploybus -----------------------------------------------------------------------

def compile_project() -> None:
    """Byte-compile the project's own modules, as installing a package does
    (dpkg, pip): with PYTHONDONTWRITEBYTECODE set, as it is on some machines,
    an editable checkout would otherwise be compiled from source by every
    process the bench starts, and every CLI start would pay for it."""
    import compileall
    for d in PACKAGE_DIRS:
        compileall.compile_dir(str(REPO_ROOT / d), quiet=1)


#: ``--exe``: another deploybus command to bench (a wrapper that profiles it, say).
EXE_OVERRIDE: list[str] = []


#: A venv with deploybus installed as a server has it (``pip install .``: the
#: runtime dependencies only, no editable-install import hook, byte-compiled).
RUNTIME_VENV = BENCH / ".venv-agent"


def runtime_deploybus() -> list[str]:
    """``deploybus`` from RUNTIME_VENV; installed, or updated when any project
    source file is newer than the install. The project's own ``.venv`` is an
    editable install with the test tools: its import hook costs every process
    about 18 ms at start, and some test tools are picked up at import
    (structlog loads greenlet, which Playwright brings)."""
    exe = RUNTIME_VENV / "bin" / "deploybus"
    stamp = RUNTIME_VENV / ".installed"
    sources = [p for d in PACKAGE_DIRS for p in (REPO_ROOT / d).rglob("*.py")] + \
        [REPO_ROOT / "setup.cfg"]
    newest = max(p.stat().st_mtime for p in sources)
    if not exe.exists() or not stamp.exists() or stamp.stat().st_mtime < newest:
        print(f"  installing deploybus into {RUNTIME_VENV} (runtime dependencies only)...",
              flush=True)
        pip = str(RUNTIME_VENV / "bin" / "pip")
        if not exe.exists():
            run(["python3", "-m", "venv", str(RUNTIME_VENV)])
            run([pip, "install", "-q", str(REPO_ROOT)])
        else:  # the dependencies are there: only the project's own code changed
            run([pip, "install", "-q", "--force-reinstall", "--no-deps", str(REPO_ROOT)])
        stamp.touch()
    return [str(exe)]


def deploybus_exe() -> list[str]:
    if EXE_OVERRIDE:
        return list(EXE_OVERRIDE)
    return runtime_deploybus()


def with_prefix(url: str, prefix: str) -> str:
    return url + ("&" if "?" in url else "?") + f"prefix={prefix}"


class Deploybus:
    """One orchestrator and N agents, kept running across all deploybus runs."""

    name = "deploybus"

    def __init__(self, work: Path, source: Source, hosts: list[str], broker: str) -> None:
        self.work = work
        self.source = source
        self.hosts = hosts
        self.broker = broker
        self.prefix = f"bench{uuid.uuid4().hex[:10]}."
        self.exe = deploybus_exe()
        self.cfg = work / "deploybus.yaml"
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.logs = work / "logs"
        self.queues_deleted = False
        self.has_window = False

    def app(self, h: str) -> Path:
        return self.work / "hosts" / h / "root" / PROJECT

    def setup(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        compile_project()
        help_text = run([*self.exe, "deploy", "--help"]).stdout
        self.has_window = "--window" in help_text
        run([*self.exe, "keys", "generate", "bench", "--dir", str(self.work / "keys")])
        host_lines = "".join(f"  {h}: {{root: hosts/{h}/root, state_dir: hosts/{h}/state}}\n"
                             for h in self.hosts)
        # keep: high enough that no deploy in the bench deletes old releases (the
        # baselines do not either); the environment has no strategy: the default.
        self.cfg.write_text(
            "# generated by bench/fanout.py\n"
            f"bus:\n  url: {json.dumps(with_prefix(self.broker, self.prefix))}\n"
            "keys:\n  signing: keys/bench.key\n  trusted:\n    bench: keys/bench.pub\n"
            "  policy:\n    - signer: bench\n      projects: [\"*\"]\n"
            "      environments: [\"*\"]\n"
            "state:\n  url: sqlite:///state.db\n"
            f"hosts:\n{host_lines}"
            f"projects:\n  {PROJECT}:\n    git: {json.dumps(str(self.source.origin))}\n"
            "    keep: 100\n    script_timeout: 60\n"
            f"    scripts:\n      post: {json.dumps(POST_SCRIPT)}\n"
            f"environments:\n  {ENVIRONMENT}:\n    hosts: [{', '.join(self.hosts)}]\n"
            "    request_timeout: 300\n")
        run([*self.exe, "-c", str(self.cfg), "config", "check"])
        env = {**os.environ, "DEPLOYBUS_LOG_LEVEL": "info"}
        started = time.perf_counter()
        for name, args in [("orchestrator", ["orchestrator"])] + \
                [(h, ["agent", "--host", h]) for h in self.hosts]:
            log = self.logs / f"{name}.log"
            with open(log, "wb") as out:
                p = subprocess.Popen([*self.exe, "-c", str(self.cfg), *args], cwd=self.work,
                                     env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append((name, p, log))
        self.wait_ready(timeout=60 + 3 * len(self.hosts))
        say(f"  deploybus: orchestrator + {len(self.hosts)} agents subscribed in "
            f"{time.perf_counter() - started:.1f}s")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {name: (p, log) for name, p, log in self.procs}
        while pending:
            for name, (p, log) in list(pending.items()):
                text = log.read_text(errors="replace")
                if '"event": "ready"' in text:
                    del pending[name]
                elif p.poll() is not None:
                    raise BenchError(f"{name} exited with {p.returncode}:\n{text[-2000:]}")
            if pending and time.monotonic() > deadline:
                raise BenchError(f"not subscribed after {timeout:.0f}s: "
                                 f"{', '.join(sorted(pending)[:10])}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]

    def _watch(self, cli: subprocess.Popen[str], done: threading.Event, deadline: float,
               problems: list[str]) -> None:
        """Stop the CLI early if the orchestrator logs an error or a daemon dies (the CLI
        would otherwise wait for a final status that never comes), or at the deadline."""
        olog = self.logs / "orchestrator.log"
        offset = olog.stat().st_size
        while not done.wait(0.5):
            with open(olog, "rb") as f:
                f.seek(offset)
                new = f.read().decode(errors="replace")
            offset += len(new.encode())
            errors = [ln for ln in new.splitlines() if '"level": "error"' in ln]
            dead = [name for name, p, _ in self.procs if p.poll() is not None]
            if errors or dead or time.monotonic() > deadline:
                problems.extend(ln[:600] for ln in errors[:3])
                if dead:
                    problems.append(f"daemon(s) exited: {', '.join(dead[:5])}")
                if time.monotonic() > deadline:
                    problems.append("deploy did not finish in time")
                cli.kill()
                return

    def deploy(self, tag: str, window: int | None = None,
               strategy: list[str] | None = None) -> Timed:
        timeout = 60 + 10 * len(self.hosts)
        cmd = [*self.exe, "-c", str(self.cfg), "deploy", PROJECT, tag, "--env", ENVIRONMENT,
               "--wait", "--timeout", str(timeout), "--user", "bench"]
        if window is not None and self.has_window:
            cmd += ["--window", str(window)]
        cmd += strategy or []
        problems: list[str] = []
        done = threading.Event()
        before = {p.pid: proc_cpu_split(p.pid) for _, p, _ in self.procs}
        lines: list[tuple[float, str]] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # line times: see cli_start/cli_exit

        def read(stream: Any) -> None:
            for line in stream:
                lines.append((time.perf_counter(), line))

        with Timed(self.pids()) as t:
            cli = subprocess.Popen(cmd, cwd=self.work, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            watcher = threading.Thread(target=self._watch, daemon=True,
                                       args=(cli, done, time.monotonic() + timeout + 30,
                                             problems))
            watcher.start()
            reader = threading.Thread(target=read, args=(cli.stdout,), daemon=True)
            reader.start()
            cli.wait()
        exited = time.perf_counter()
        reader.join()
        out = "".join(line for _, line in lines)
        if lines:
            # start-up until the first line (rollout published); last line (the final
            # status) until the process is gone
            t.extra["cli_start_s"] = lines[0][0] - t.t0
            t.extra["cli_exit_s"] = max(0.0, exited - lines[-1][0])
        after = {p.pid: proc_cpu_split(p.pid) for _, p, _ in self.procs}
        done.set()
        watcher.join()
        opid = self.procs[0][1].pid
        delta = {pid: (after[pid][0] - v[0], after[pid][1] - v[1]) for pid, v in before.items()}
        t.extra["cpu_orchestrator_s"] = sum(delta[opid])
        t.extra["cpu_agents_python_s"] = sum(v[0] for pid, v in delta.items() if pid != opid)
        t.extra["cpu_agents_children_s"] = sum(v[1] for pid, v in delta.items()
                                               if pid != opid)
        t.extra["cpu_cli_s"] = t.cpu - sum(sum(v) for v in delta.values())
        with open(self.logs / "deploy-cli.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {cli.returncode}, {t.wall:.2f}s]\n")
        if cli.returncode != 0 or problems:
            raise BenchError(f"deploybus deploy {tag} exited {cli.returncode}:\n"
                             + "\n".join(out.splitlines()[-20:] + problems))
        rollout = out.split()[1].rstrip(":") if out.startswith("rollout ") else None
        if rollout:
            t.extra["orchestrator_s"] = self.rollout_span(rollout)
            busy = 0.0
            for h in self.hosts:
                j = self.work / "hosts" / h / "state" / "journal" / f"{rollout}.json"
                try:
                    entry = json.loads(j.read_text())
                    # newer journals keep the result body under "result"
                    result = entry.get("result") if isinstance(entry.get("result"), dict) \
                        else entry
                    busy += float(result.get("duration") or 0)
                except (OSError, ValueError, AttributeError):
                    pass
            t.extra["agent_busy_s"] = busy
            t.extra["agent_mean_s"] = busy / len(self.hosts)
        return t

    def rollout_span(self, rollout: str) -> float | None:
        """Seconds from the orchestrator accepting the rollout to its final state."""
        import sqlite3
        from datetime import datetime
        try:
            con = sqlite3.connect(self.work / "state.db")
            try:
                row = con.execute("select created_at, updated_at from rollouts where id = ?",
                                  (rollout,)).fetchone()
            finally:
                con.close()
            return (datetime.fromisoformat(row[1]) - datetime.fromisoformat(row[0])
                    ).total_seconds() if row else None
        except (sqlite3.Error, ValueError, TypeError):
            return None

    def roots(self) -> list[Path]:
        return [self.app(h) for h in self.hosts]

    def stop(self) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for name, p, _ in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {name} (pid {p.pid}) did not stop in time; killing it")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()
        if not self.queues_deleted:
            self.queues_deleted = True
            self.delete_queues()

    def queue_names(self) -> set[str]:
        """Every queue name deploybus could have declared (topics module + per host),
        and whatever rabbitmqctl lists under our prefix."""
        from deploybus import topics
        from deploybus.bus import DEADLETTER_QUEUE
        names = {DEADLETTER_QUEUE}
        names.update(v for k, v in vars(topics).items()
                     if k.isupper() and isinstance(v, str) and "." not in v)
        for fn in ("agent_queue", "fetcher_queue"):
            if hasattr(topics, fn):
                names.update(getattr(topics, fn)(h) for h in self.hosts)
        names = {self.prefix + n for n in names}
        if shutil.which("rabbitmqctl"):
            try:
                out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], text=True,
                                     capture_output=True, timeout=30).stdout
                names.update(ln.strip() for ln in out.splitlines()
                             if ln.strip().startswith(self.prefix))
            except (OSError, subprocess.SubprocessError):
                pass
        return names

    def delete_queues(self) -> None:
        """Drop the durable queues this run declared under its prefix."""
        if not self.broker.startswith(("amqp://", "amqps://")):
            return
        try:
            import kombu
            names = self.queue_names()
            with kombu.Connection(self.broker.split("?", 1)[0], connect_timeout=5) as conn:
                ch = conn.channel()
                for n in sorted(names):
                    try:
                        ch.queue_delete(n)
                    except Exception:  # noqa: BLE001 - never declared: channel closed
                        ch = conn.channel()
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            say(f"  note: could not delete queues {self.prefix}*: {exc}")


# -- 2. Ansible -------------------------------------------------------------------------

PLAYBOOK = """\
# generated by bench/fanout.py: the per-host deploy, as a playbook would do it
- hosts: bench
  gather_facts: false
  vars:
    hostdir: "{{ base }}/{{ inventory_hostname }}"
    mirror: "{{ hostdir }}/mirror/bench.git"
    app: "{{ hostdir }}/root/bench"
    rel: "{{ app }}/releases/{{ release }}"
  tasks:
    - name: mirror (first deploy only)
      command: git clone -q --mirror {{ origin }} {{ mirror }}
      args:
        creates: "{{ mirror }}/HEAD"
    - name: fetch
      command: git --git-dir={{ mirror }} fetch -q --prune --tags origin +refs/heads/*:refs/heads/*
    - name: export the tag into a new release directory
      shell: >-
        set -o pipefail && mkdir -p {{ rel }}.partial &&
        git --git-dir={{ mirror }} archive {{ tag }} | tar -x -C {{ rel }}.partial &&
        mv -T {{ rel }}.partial {{ rel }}
      args:
        executable: /bin/bash
    - name: post script
      shell: "{{ post }}"
      args:
        chdir: "{{ rel }}"
    - name: switch current atomically
      shell: >-
        ln -s releases/{{ release }} {{ app }}/.current.tmp &&
        mv -T {{ app }}/.current.tmp {{ app }}/current
"""


def ensure_ansible() -> Path:
    exe = ANSIBLE_VENV / "bin" / "ansible-playbook"
    if not exe.exists():
        say(f"  creating {ANSIBLE_VENV} with ansible-core (first use)...")
        run(["python3", "-m", "venv", str(ANSIBLE_VENV)])
        run([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"])
    return exe


class Ansible:
    name = "ansible"

    def __init__(self, work: Path, source: Source, hosts: list[str]) -> None:
        self.work, self.source, self.hosts = work, source, hosts
        self.exe = ensure_ansible()
        self.version = run([str(self.exe), "--version"]).stdout.splitlines()[0]

    def setup(self) -> None:
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        (self.work / "ansible.cfg").write_text(
            "[defaults]\n"
            f"forks = {ANSIBLE_FORKS}\n"
            "gathering = explicit\nhost_key_checking = False\nretry_files_enabled = False\n"
            f"interpreter_python = {ANSIBLE_VENV / 'bin' / 'python'}\n"
            f"local_tmp = {self.work / 'tmp'}\nremote_tmp = {self.work / 'tmp'}\n"
            "[connection]\npipelining = True\n")
        (self.work / "inventory.ini").write_text(
            "[bench]\n" + "".join(f"{h} ansible_connection=local\n" for h in self.hosts))
        (self.work / "deploy.yml").write_text(PLAYBOOK)

    def deploy(self, tag: str, bystanders: list[int] | None = None) -> Timed:
        release = f"{tag}-{uuid.uuid4().hex[:8]}"
        extra = json.dumps({"base": str(self.work / "hosts"), "origin": str(self.source.origin),
                            "tag": tag, "release": release, "post": POST_SCRIPT})
        env = {**os.environ, "ANSIBLE_CONFIG": str(self.work / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.work / "home"), "ANSIBLE_NOCOLOR": "1"}
        cmd = [str(self.exe), "-i", str(self.work / "inventory.ini"),
               str(self.work / "deploy.yml"), "-e", extra]
        with Timed(bystanders=bystanders) as t:
            run(cmd, cwd=self.work, env=env, log=self.work / "ansible.log")
        return t

    def roots(self) -> list[Path]:
        return [self.work / "hosts" / h / "root" / PROJECT for h in self.hosts]

    def stop(self) -> None:
        pass


# -- 3. the floor -----------------------------------------------------------------------

FLOOR_SCRIPT = """\
#!/bin/bash
# generated by bench/fanout.py: one host's deploy, plain shell
set -euo pipefail
host=$1 tag=$2 rel=$3 base=$4 origin=$5 post=$6
mirror=$base/$host/mirror/bench.git
app=$base/$host/root/bench
[ -f "$mirror/HEAD" ] || git clone -q --mirror "$origin" "$mirror"
git --git-dir="$mirror" fetch -q --prune --tags origin '+refs/heads/*:refs/heads/*'
mkdir -p "$app/releases/$rel.partial"
git --git-dir="$mirror" archive "$tag" | tar -x -C "$app/releases/$rel.partial"
mv -T "$app/releases/$rel.partial" "$app/releases/$rel"
(cd "$app/releases/$rel" && /bin/sh -c "$post")
ln -s "releases/$rel" "$app/.current.tmp.$$"
mv -T "$app/.current.tmp.$$" "$app/current"
"""


class Floor:
    name = "floor"

    def __init__(self, work: Path, source: Source, hosts: list[str], procs: int) -> None:
        self.work, self.source, self.hosts, self.procs = work, source, hosts, procs

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.script = self.work / "deploy-host.sh"
        self.script.write_text(FLOOR_SCRIPT)
        self.script.chmod(0o755)

    def deploy(self, tag: str, bystanders: list[int] | None = None) -> Timed:
        release = f"{tag}-{uuid.uuid4().hex[:8]}"
        cmd = ["xargs", "-P", str(self.procs), "-I{}", str(self.script), "{}", tag, release,
               str(self.work / "hosts"), str(self.source.origin), POST_SCRIPT]
        with Timed(bystanders=bystanders) as t:
            p = subprocess.run(cmd, input="\n".join(self.hosts) + "\n", text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise BenchError(f"xargs exited {p.returncode}:\n{p.stdout[-2000:]}")
        return t

    def roots(self) -> list[Path]:
        return [self.work / "hosts" / h / "root" / PROJECT for h in self.hosts]

    def stop(self) -> None:
        pass


# -- driver -----------------------------------------------------------------------------

def paired_ratios(methods: list[Any], head: Any) -> list[float]:
    """The headline's time over the floor's, round by round (runs are interleaved)."""
    floor = next((m for m in methods if m.key == "floor"), None)
    if head is None or floor is None:
        return []
    return [a / b for a, b in zip(head.walls, floor.walls, strict=False) if b > 0]


class Method:
    """One row of the table: a runner and how it is asked to deploy."""

    def __init__(self, key: str, label: str, runner: Any, window: int | None = None,
                 strategy: list[str] | None = None) -> None:
        self.key, self.label, self.runner, self.window = key, label, runner, window
        self.strategy = strategy
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.broker: list[float] = []
        self.other: list[float] = []
        self.bystander: list[float] = []
        self.extra: dict[str, list[float]] = {}

    def deploy(self, tag: str, bystanders: list[int]) -> Timed:
        if isinstance(self.runner, Deploybus):
            return self.runner.deploy(tag, window=self.window, strategy=self.strategy)
        return self.runner.deploy(tag, bystanders=bystanders)

    def record(self, t: Timed) -> None:
        self.walls.append(t.wall)
        self.cpus.append(t.cpu)
        self.broker.append(t.broker_cpu)
        self.other.append(t.other_cpu / t.wall if t.wall else 0.0)
        if t.bystanders:
            self.bystander.append(t.bystander_cpu / t.wall if t.wall else 0.0)
        for k, v in t.extra.items():
            if v is not None:
                self.extra.setdefault(k, []).append(v)

    def result(self) -> dict[str, Any]:
        r: dict[str, Any] = {"median_s": statistics.median(self.walls), "runs_s": self.walls,
                             "cpu_s": statistics.median(self.cpus),
                             "broker_cpu_s": statistics.median(self.broker),
                             "other_cores": max(self.other)}
        if self.bystander:
            r["idle_deploybus_cores"] = max(self.bystander)
        for k, v in self.extra.items():
            r[k] = statistics.median(v)
        return r


def fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def r3(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return [r3(x) for x in v]
    if isinstance(v, dict):
        return {k: r3(x) for k, x in v.items()}
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, required=True, help="number of hosts N")
    ap.add_argument("--runs", type=int, default=None,
                    help="timed runs per method (default 3 for N<=10, else 2)")
    ap.add_argument("--broker", default=DEFAULT_BROKER, help="bus URL for deploybus")
    ap.add_argument("--methods", default="deploybus,ansible,floor",
                    help="comma-separated subset of deploybus,ansible,floor")
    ap.add_argument("--windows", default="1,0",
                    help="deploybus rollout windows to measure, comma-separated (1: one host "
                         "after another, 0: all hosts at once); the last is the headline")
    ap.add_argument("--canary", default="1:25%", metavar="N:BATCH",
                    help="also measure canary-then-batches (default 1:25%%; '' to skip)")
    ap.add_argument("--exe", default=None,
                    help="the deploybus command to bench (default: bench/.venv-agent, "
                         "installed from this checkout with the runtime dependencies "
                         "only); e.g. .venv/bin/deploybus, or a wrapper that profiles it")
    ap.add_argument("--floor-procs", type=int, default=os.cpu_count() or 2,
                    help="xargs -P for the floor (default: nproc)")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, hosts)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    if args.exe:
        EXE_OVERRIDE[:] = [args.exe]
    n = args.hosts
    if n < 1:
        ap.error("--hosts must be >= 1")
    runs = args.runs or (3 if n <= 10 else 2)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in wanted:
        if m not in ("deploybus", "ansible", "floor"):
            ap.error(f"unknown method {m!r}")
    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
    except ValueError:
        ap.error("--windows: whole numbers, comma-separated")
    hosts = [f"h{i}" for i in range(1, n + 1)]

    # A SIGTERM must still run the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cache = Path(args.workdir or tempfile.gettempdir()) / "deploybus-bench-cache"
    work = Path(tempfile.mkdtemp(prefix="deploybus-bench-", dir=args.workdir))
    runners: list[Any] = []
    methods: list[Method] = []
    started = time.perf_counter()
    load = loadavg()
    failed = False
    try:
        say(f"fanout bench: {n} host(s), {runs} timed run(s) per method, work dir {work}")
        source = Source(make_cached_repo(cache), work)
        files, size = source.files(), source.size()
        say(f"  project: {files} files, {size / 1e6:.2f} MB (cached in {cache})")
        db: Deploybus | None = None
        for m in wanted:
            say(f"[{m}] setting up")
            if m == "deploybus":
                db = Deploybus(work / "deploybus", source, hosts, args.broker)
                runners.append(db)
                db.setup()
                if not db.has_window:
                    say("  this deploybus has no rollout strategies: one host after another")
                    windows = [1]
                for w in windows:
                    shape = ("one host after another" if w == 1 else
                             "all hosts at once" if w == 0 or w >= n else f"{w} at a time")
                    methods.append(Method(f"deploybus_w{w}", f"deploybus --window {w} "
                                          f"({shape})", db, window=w))
                if args.canary and db.has_window:
                    count, _, batch = args.canary.partition(":")
                    methods.append(Method(
                        "deploybus_canary", f"deploybus --canary {count} --batch {batch} "
                        "--window 0 (canary, then batches)", db,
                        strategy=["--canary", count, "--batch", batch or "25%",
                                  "--window", "0"]))
            elif m == "ansible":
                r: Any = Ansible(work / "ansible", source, hosts)
                runners.append(r)
                r.setup()
                methods.append(Method("ansible", f"ansible-playbook, forks={ANSIBLE_FORKS}, "
                                      "local", r))
            else:
                r = Floor(work / "floor", source, hosts, args.floor_procs)
                runners.append(r)
                r.setup()
                methods.append(Method("floor", f"shell, xargs -P {args.floor_procs}", r))
        # Warm-up: one untimed deploy per runner clones every host's mirror (and, for
        # deploybus, proves every agent is subscribed).
        for r in runners:
            tag = source.new_tag(f"{r.name}-warm")
            t = r.deploy(tag)
            check_hosts(r.roots(), tag)
            say(f"[{r.name}] warm-up deploy (clones the mirrors; untimed): {t.wall:.2f}s")
        # Timed runs, interleaved, so that other load on the machine hits all alike.
        bystanders = db.pids() if db else []
        for i in range(runs):
            for m in methods:
                tag = source.new_tag(m.key)
                # Write back what the previous run left dirty (about 2 MB per
                # host) before timing this one, so that no method pays for
                # another's disk writes.
                os.sync()
                t = m.deploy(tag, bystanders)
                check_hosts(m.runner.roots(), tag)
                m.record(t)
                say(f"[{m.key}] run {i + 1}/{runs}: {t.wall:.2f}s wall, {t.cpu:.2f}s CPU"
                    + (f", other load {t.other_cpu / t.wall:.2f} cores" if t.wall else "")
                    + "".join(f", {k} {v:.2f}s" for k, v in t.extra.items()
                              if k in ("orchestrator_s", "cli_start_s", "cli_exit_s")
                              and v is not None))
    except BenchError as exc:
        say(f"fanout bench failed: {exc}")
        say(f"(work dir kept for inspection: {work})")
        failed = True
    finally:
        for r in runners:
            try:
                r.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                say(f"  cleanup of {r.name} failed: {exc}")
        if not args.keep and not failed:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        return 1

    results = {m.key: m.result() for m in methods}
    # The headline is the last --windows entry (all at once by default), not
    # the canary row: the issues' targets are for all at once.
    dbm = [m for m in methods if isinstance(m.runner, Deploybus) and m.strategy is None]
    head = dbm[-1] if dbm else None
    dbs = results[head.key]["median_s"] if head else None
    an = results.get("ansible", {}).get("median_s")
    fl = results.get("floor", {}).get("median_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    print(f"\nfan-out of one deploy to N={n} hosts ({files} files, {size / 1e6:.1f} MB), "
          f"median of {runs} run(s), {os.cpu_count()} CPU(s)\n")
    print(f"{'method':48} {'median':>8} {'per host':>9} {'CPU':>8} {'vs ansible':>10} "
          f"{'vs floor':>9}  runs")
    for m in methods:
        res = results[m.key]
        print(f"{m.label:48} {fmt(res['median_s']):>8} {fmt(res['median_s'] / n):>9} "
              f"{fmt(res['cpu_s']):>8} {fmt(ratio(res['median_s'], an), ''):>10} "
              f"{fmt(ratio(res['median_s'], fl), ''):>9}  "
              f"{' '.join(f'{x:.2f}' for x in res['runs_s'])}")
    print()
    vs_ansible, vs_floor = ratio(dbs, an), ratio(dbs, fl)
    paired = paired_ratios(methods, head)
    if head is not None:
        print(f"headline: {head.label}")
    def verdict(value: float, *limits: tuple[str, float]) -> str:
        return ", ".join(f"{name} <= {limit:.2f}: {'met' if value <= limit else 'NOT met'}"
                         for name, limit in limits)

    # The targets are for N=50 (issue 2, then the stricter issue 3).
    if vs_ansible is not None:
        print(f"  deploybus / ansible = {vs_ansible:.2f}  (targets at N=50: "
              f"{verdict(vs_ansible, ('issue 2', 0.2), ('issue 3', 0.125))})")
    if vs_floor is not None:
        print(f"  deploybus / floor   = {vs_floor:.2f}  (targets at N=50: "
              f"{verdict(vs_floor, ('issue 2', 1.5), ('issue 3', 1.3))})")
        if head is not None and "cpu_s" in results.get("floor", {}):
            cpu_ratio = results[head.key]["cpu_s"] / max(results["floor"]["cpu_s"], 1e-9)
            print(f"  deploybus CPU / floor CPU = {cpu_ratio:.2f}  (target at N=50: "
                  f"{verdict(cpu_ratio, ('issue 3', 1.5))})")
        if head is not None and paired:
            # The machine's speed drifts between rounds; a round's two runs
            # were back to back, so their ratio drifts less than the medians'.
            print(f"  paired: deploybus / floor of the same round = "
                  f"{statistics.median(paired):.2f} median "
                  f"({' '.join(f'{x:.2f}' for x in paired)})")
            added = (results[head.key]["cpu_s"] - results["floor"]["cpu_s"]) / n
            span = results[head.key].get("orchestrator_s")
            print(f"  deploybus adds {1000 * added:.1f} ms of CPU per host (its CLI "
                  f"included) to the floor's {1000 * results['floor']['cpu_s'] / n:.1f} ms"
                  + (f"; the rollout alone (orchestrator, accepted -> final) is "
                     f"{span / fl:.2f}x the floor" if span else ""))
    print("\nnotes:")
    print("  - each method first did one untimed deploy that cloned the per-host mirrors; "
          "each timed run deployed a new tag on a new commit (every host fetches); runs "
          "of the methods were interleaved.")
    print("  - per host: fetch into the mirror, git archive into a new release dir, post "
          f"script ({POST_SCRIPT}), atomic switch of 'current'; no old-release cleanup.")
    for m in dbm:
        res = results[m.key]
        span, mean = res.get("orchestrator_s"), res.get("agent_mean_s")
        if span is not None and mean is not None:
            print(f"  - {m.label}: the orchestrator's rollout took {span:.2f}s (accepted -> "
                  f"final state, from its store) of the {res['median_s']:.2f}s; the CLI "
                  f"needed {res.get('cli_start_s', 0):.2f}s to publish the rollout and "
                  f"{res.get('cli_exit_s', 0):.2f}s to exit after printing the final "
                  f"status. One agent's deploy: {mean:.3f}s mean.")
        if "cpu_agents_python_s" in res:
            print(f"    CPU: agents {res['cpu_agents_python_s']:.2f}s in Python + "
                  f"{res['cpu_agents_children_s']:.2f}s in git/sh children, orchestrator "
                  f"{res['cpu_orchestrator_s']:.2f}s, CLI {res['cpu_cli_s']:.2f}s.")
    if dbm:
        if not any(m.window != 1 for m in dbm):
            print("  - deploybus: the orchestrator deployed hosts ONE AFTER ANOTHER "
                  "(sequential); parallel strategies will lower this figure.")
        print("  - deploybus CPU = CLI + orchestrator + agents (with their git/sh children); "
              "the broker's is not in it (median "
              f"{results[dbm[-1].key]['broker_cpu_s']:.2f}s per run).")
    if "ansible" in results:
        print(f"  - ansible: {runners_version(runners)}, gather_facts off, pipelining on.")
    idle = {k: v["idle_deploybus_cores"] for k, v in results.items()
            if "idle_deploybus_cores" in v}
    if idle:
        print("  - the idle deploybus daemons used, while the baselines ran (cores): "
              + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()))
    other = {k: res["other_cores"] for k, res in results.items()}
    busy_machine = max(other.values(), default=0.0) > 0.25
    print("  - other work on the machine during timed runs (cores, worst run): "
          + ", ".join(f"{k} {v:.2f}" for k, v in other.items())
          + (" -- WARNING: not an idle machine; figures are pessimistic"
             if busy_machine else "") + f"; load average at start {load:.2f}")
    print(f"  - deploybus revision {revision()}; total bench time "
          f"{time.perf_counter() - started:.0f}s")

    out = {"hosts": n, "runs": runs, "cpus": os.cpu_count(), "files": files, "bytes": size,
           "broker": args.broker.split("@")[-1], "headline": head.key if head else None,
           "deploybus_s": dbs, "ansible_s": an, "floor_s": fl,
           "vs_ansible": vs_ansible, "vs_floor": vs_floor,
           "floor_procs": args.floor_procs, "ansible_forks": ANSIBLE_FORKS,
           "busy_machine": busy_machine, "loadavg_start": load, "revision": revision(),
           "detail": r3(results)}
    if paired:
        out["vs_floor_paired"] = round(statistics.median(paired), 3)
    for m in dbm:
        out["detail"][m.key]["vs_ansible"] = ratio(results[m.key]["median_s"], an)
        out["detail"][m.key]["vs_floor"] = ratio(results[m.key]["median_s"], fl)
    line = json.dumps(out, sort_keys=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


def revision() -> str:
    """The deploybus checkout measured: commit, and '+dirty' with local changes."""
    try:
        head = run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"],
                    cwd=REPO_ROOT).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (BenchError, OSError):
        return "unknown"


def runners_version(runners: list[Any]) -> str:
    return next((r.version for r in runners if isinstance(r, Ansible)), "?")


if __name__ == "__main__":
    sys.exit(main())
