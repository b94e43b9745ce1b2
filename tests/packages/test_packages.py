"""Package updates with real parts: a Debian repository made here
(``dpkg-deb --build``, ``dpkg-scanpackages``), a real ``apt-get update`` as
the host's ``packages.command`` (kept out of this machine's own lists,
cache and lock with ``-o`` options), RabbitMQ, signed messages; and at the
end ``deploybus package-notify`` and ``deploybus fetcher`` as processes.

What each test checks afterwards is apt's own lists directory: it holds the
repository's Packages index with the version just published, so the command
really ran, and ran after that version was in the repository.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, protocol, topics
from deploybus.bus import Delivery, connect
from deploybus.config import load
from deploybus.daemons.repo_fetcher.packages import JOURNAL
from deploybus.daemons.repo_fetcher.service import RepoFetcher
from deploybus.protocol import Role
from deploybus.runner import Context
from deploybus.signing import SigningKey
from tests.conftest import broker_url
from tests.e2e.cluster import Cluster, wait_for

pytestmark = pytest.mark.e2e

TOOLS = ("apt-get", "dpkg-deb", "dpkg-scanpackages")


@pytest.fixture(autouse=True)
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install apt and dpkg-dev", pytrace=False)


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    """An isolated bus on the real RabbitMQ (AMQP)."""
    return broker_url("rabbitmq-amqp", request, f"t{uuid.uuid4().hex[:10]}")


class AptRepo:
    """A flat repository (``deb [trusted=yes] file:DIR ./``) and the
    ``apt-get update`` command that reads it into lists of its own."""

    def __init__(self, base: Path, *, present: bool = True) -> None:
        self.base = base
        self.dir = base / "repo"
        self.build = base / "build"
        self.lists = base / "lists"
        self.cache = base / "cache"
        self.sources = base / "sources.list"
        (self.lists / "partial").mkdir(parents=True)
        (self.cache / "archives" / "partial").mkdir(parents=True)
        self.sources.write_text(f"deb [trusted=yes] file:{self.dir} ./\n")
        self._stamp = 0
        if present:
            self.create()

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index()

    @property
    def command(self) -> str:
        opts = {"Dir::Etc::sourcelist": str(self.sources), "Dir::Etc::sourceparts": "-",
                "Dir::State::Lists": str(self.lists), "Dir::Cache": str(self.cache),
                "APT::Get::List-Cleanup": "0", "Debug::NoLocking": "1",
                # plain Packages files in the lists, whatever this machine's apt.conf.d says
                "Acquire::GzipIndexes": "false"}
        if os.geteuid() == 0:  # _apt could not write into the test's directories
            opts["APT::Sandbox::User"] = "root"
        return "apt-get update -q " + " ".join(f"-o {shlex.quote(f'{k}={v}')}"
                                               for k, v in opts.items())

    def publish(self, *packages: tuple[str, str]) -> None:
        """Build a .deb of each (name, version), replacing that package's
        older one, and index the repository again."""
        for name, version in packages:
            for old in self.dir.glob(f"{name}_*.deb"):
                old.unlink()
            root = self.build / f"{name}_{version}"
            (root / "DEBIAN").mkdir(parents=True)
            (root / "DEBIAN" / "control").write_text(
                f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
                f"Maintainer: deploybus tests <t@example.invalid>\n"
                f"Description: deploybus test package\n")
            subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root),
                            str(self.dir / f"{name}_{version}_all.deb")],
                           check=True, capture_output=True)
        self._index()

    def _index(self) -> None:
        scan = subprocess.run(["dpkg-scanpackages", ".", "/dev/null"], cwd=self.dir,
                              check=True, capture_output=True)
        (self.dir / "Packages").write_bytes(scan.stdout)
        (self.dir / "Packages.gz").write_bytes(gzip.compress(scan.stdout))
        lines = ["Origin: deploybus-tests", "Label: deploybus-tests", "Suite: test",
                 f"Date: {formatdate(usegmt=True)}", "SHA256:"]
        for f in ("Packages", "Packages.gz"):
            data = (self.dir / f).read_bytes()
            lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {f}")
        (self.dir / "Release").write_text("\n".join(lines) + "\n")
        # apt's file method compares modification times in seconds: two
        # indexes written within one second must not look the same to it
        self._stamp = max(int(time.time()), self._stamp + 1)
        for f in ("Packages", "Packages.gz", "Release"):
            os.utime(self.dir / f, (self._stamp, self._stamp))

    def listed(self) -> dict[str, set[str]]:
        """What apt's lists (not the repository) say: package -> versions."""
        found: dict[str, set[str]] = {}
        for f in self.lists.glob("*_Packages"):
            for stanza in f.read_text().split("\n\n"):
                fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                              if ": " in line and not line.startswith(" "))
                if "Package" in fields:
                    found.setdefault(fields["Package"], set()).add(fields["Version"])
        return found


class Site:
    """A config with a repo key and host h1 watching ``demo-*``, a fetcher
    for h1 in this process, and a test client on the same bus that
    publishes updates and collects the reports."""

    def __init__(self, tmp: Path, bus_url: str, *, coalesce: float = 0.5,
                 before: str = "", repo_present: bool = True) -> None:
        self.tmp, self.bus_url, self.coalesce = tmp, bus_url, coalesce
        self.repo = AptRepo(tmp / "apt", present=repo_present)
        keys = tmp / "keys"
        self.repo_key = SigningKey.generate("repo")
        self.h2_key = SigningKey.generate("h2")
        for k in (self.repo_key, SigningKey.generate("h1"), self.h2_key):
            k.save(keys)
        self.state = tmp / "h1" / "state"
        #: the real apt-get update, after ``before`` (shell) if given
        self.command = before + self.repo.command
        path = tmp / "deploybus.yaml"
        path.write_text(f"""\
bus: {{url: "{bus_url}"}}
keys:
  trusted:
    repo: {{key: keys/repo.pub, role: repo}}
    h1: {{key: keys/h1.pub, role: host}}
    h2: {{key: keys/h2.pub, role: host}}
hosts:
  h1:
    root: {tmp / "h1" / "srv"}
    state_dir: {self.state}
    signing: keys/h1.key
    packages:
      watch: ["demo-*", "libdemo1"]
      command: {json.dumps(self.command)}
      coalesce: {coalesce}
""")
        self.cfg = load(path)
        self.bus = connect(bus_url, client_name="test")
        self.reports: list[envelope.Envelope] = []
        self.report_times: list[float] = []   # time.monotonic() each arrived
        self._lock = threading.Lock()
        self.bus.subscribe(topics.PACKAGES_UPDATED, self._on_report)
        self.fetcher: RepoFetcher | None = None
        self.ctx: Context | None = None

    def _on_report(self, d: Delivery) -> None:
        with self._lock:
            self.reports.append(envelope.decode(d.body))
            self.report_times.append(time.monotonic())
        d.ack()

    def start(self) -> RepoFetcher:
        self.ctx = Context(config=self.cfg, bus=connect(self.bus_url, client_name="fetcher@h1"),
                           host="h1", signing_key=self.cfg.load_signing_key("h1"))
        self.fetcher = RepoFetcher(self.ctx)
        assert self.fetcher.packages is not None
        self.fetcher.start()
        return self.fetcher

    def stop(self) -> None:
        if self.fetcher is not None and self.ctx is not None:
            self.fetcher.stop(10)
            self.ctx.bus.close()
            self.fetcher = None

    def close(self) -> None:
        self.stop()
        self.bus.close()

    def stat(self, key: str) -> int:
        assert self.ctx is not None
        return self.ctx.stats[key]

    @property
    def runs(self) -> int:
        return self.stat("apt_update_ok") + self.stat("apt_update_failed")

    def body(self, package: str, version: str, distribution: str | None = "test"
             ) -> protocol.PackageUpdate:
        return protocol.PackageUpdate(package=package, version=version,
                                      distribution=distribution)

    def send(self, package: str, version: str, *, key: Any = None) -> None:
        self.bus.publish(topics.PACKAGES, protocol.seal(
            self.body(package, version), key=key or self.repo_key, sender="repo@test"))

    def settle(self) -> None:
        """Long enough for a burst's window to close and its command to run."""
        time.sleep(self.coalesce + 2.0)

    def report_bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.reports]


@pytest.fixture
def site(tmp_path: Path, amqp_url: str, request: pytest.FixtureRequest) -> Any:
    made: list[Site] = []

    def make(**kw: Any) -> Site:
        s = Site(tmp_path / f"site{len(made)}", amqp_url, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_a_watched_package_runs_apt_get_update_once(site: Any) -> None:
    s = site()
    s.start()
    s.repo.publish(("demo-app", "1.0-1"))
    s.send("demo-app", "1.0-1")
    assert wait_for(lambda: s.runs == 1, 30), "the command never ran"
    s.settle()
    assert s.runs == 1
    assert s.stat("apt_update_ok") == 1 and s.stat("package_updates") == 1
    assert s.repo.listed() == {"demo-app": {"1.0-1"}}
    assert not (s.state / JOURNAL).exists(), "a reported run leaves nothing in the journal"


def test_the_report_arrives_signed_by_the_host(site: Any) -> None:
    s = site()
    s.start()
    s.repo.publish(("libdemo1", "2.3-4"))
    s.send("libdemo1", "2.3-4")
    assert wait_for(lambda: len(s.reports) == 1, 30), "no package.updated"
    env = s.reports[0]
    assert env.type == "package.updated" and env.sender.endswith("@h1")
    body = protocol.parse(env.type, env.body)
    signer = s.cfg.verifier().identify(env, body)
    assert (signer.name, signer.role, signer.host) == ("h1", Role.HOST, "h1")
    assert env.body["host"] == "h1"
    assert env.body["packages"] == [{"package": "libdemo1", "version": "2.3-4",
                                     "distribution": "test"}]
    assert env.body["command"] == s.command
    assert env.body["status"] == "ok" and env.body["exit_code"] == 0
    assert env.body["seconds"] > 0
    assert "Reading package lists" in env.body["output_tail"]
    # what the host's key signs, the other host's key cannot
    forged = protocol.sign(body, key=s.h2_key, sender="x@h2")
    with pytest.raises(Exception, match="speaks for host 'h2'"):
        s.cfg.verifier().identify(forged, body)


def test_an_unwatched_package_runs_nothing(site: Any) -> None:
    s = site()
    s.start()
    s.repo.publish(("other-app", "1.0"))
    s.send("other-app", "1.0")
    s.send("libdemo2", "1.0")   # a glob-like name that is not watched either
    assert wait_for(lambda: s.stat("package_updates_ignored") == 2, 30)
    s.settle()
    assert s.runs == 0 and s.stat("package_updates") == 0
    assert s.repo.listed() == {} and s.report_bodies() == []


def test_a_burst_of_ten_runs_the_command_once(site: Any) -> None:
    s = site(coalesce=3.0)
    s.start()
    burst = [(f"demo-p{i}", f"1.{i}-1") for i in range(10)]
    s.repo.publish(*burst)
    started = time.monotonic()
    for name, version in burst:
        s.send(name, version)
    sent_in = time.monotonic() - started
    assert sent_in < 1.0, f"the burst took {sent_in:.2f} s to send: not a burst"
    assert wait_for(lambda: s.runs >= 1, 30), "the command never ran"
    s.settle()
    assert s.stat("package_updates") == 10
    # every update came inside the window (sent within 1 s of a 3 s window):
    # one run, no follow-up, and not before the window closed
    assert s.runs == 1, f"{s.runs} runs for one burst"
    assert s.report_times[0] - started >= s.coalesce - 0.2
    reports = s.report_bodies()
    assert sorted((p["package"], p["version"]) for p in reports[0]["packages"]) == burst
    assert s.repo.listed() == {name: {version} for name, version in burst}


def test_updates_while_the_command_runs_cause_exactly_one_more_run(site: Any, tmp_path: Path
                                                                    ) -> None:
    started = tmp_path / "runs.log"
    s = site(coalesce=0.3, before=f"echo run >> {shlex.quote(str(started))}; sleep 3; ")
    s.start()
    s.repo.publish(("demo-a", "1.0"))
    s.send("demo-a", "1.0")
    assert wait_for(lambda: started.exists() and len(started.read_text().split()) == 1, 30)
    s.repo.publish(("demo-b", "2.0"), ("demo-c", "3.0"))
    s.send("demo-b", "2.0")
    s.send("demo-c", "3.0")
    s.send("demo-b", "2.0")   # the same update twice adds nothing
    assert wait_for(lambda: s.runs == 2, 40), f"{s.runs} runs"
    time.sleep(s.coalesce + 4.0)
    assert s.runs == 2, "one more run after the one in progress, not one per update"
    first, second = s.report_bodies()
    assert [p["package"] for p in first["packages"]] == ["demo-a"]
    assert [p["package"] for p in second["packages"]] == ["demo-b", "demo-c"]
    assert s.repo.listed() == {"demo-a": {"1.0"}, "demo-b": {"2.0"}, "demo-c": {"3.0"}}


def test_a_failing_command_is_reported_and_counted_and_the_fetcher_goes_on(site: Any) -> None:
    s = site(repo_present=False)   # sources.list names a repository that is not there yet
    fetcher = s.start()
    s.send("demo-app", "1.0")
    assert wait_for(lambda: s.runs == 1, 30)
    assert s.stat("apt_update_failed") == 1 and s.stat("apt_update_ok") == 0
    assert wait_for(lambda: len(s.reports) == 1, 10)
    failed = s.report_bodies()[0]
    assert failed["status"] == "failed" and failed["exit_code"] == 100
    assert "Failed to fetch" in failed["output_tail"] or "not found" in failed["output_tail"]
    assert fetcher.healthy()
    s.repo.create()
    s.repo.publish(("demo-app", "1.1"))
    s.send("demo-app", "1.1")
    assert wait_for(lambda: s.stat("apt_update_ok") == 1, 30), "the fetcher stopped running"
    assert s.stat("apt_update_failed") == 1
    assert s.repo.listed() == {"demo-app": {"1.1"}}


def test_unsigned_or_wrongly_signed_updates_do_nothing(site: Any) -> None:
    s = site()
    s.start()
    s.repo.publish(("demo-app", "6.6.6"))
    body = protocol.to_dict(s.body("demo-app", "6.6.6"))
    unsigned = envelope.new("package.update", body, sender="x", ttl=60).encode()
    rogue = protocol.seal(s.body("demo-app", "6.6.6"), key=SigningKey.generate("repo"),
                          sender="x")        # a key named like ours, not trusted
    a_host = protocol.seal(s.body("demo-app", "6.6.6"), key=s.h2_key,
                           sender="x@h2")    # trusted, but a host may not send updates
    tampered = json.loads(protocol.seal(s.body("demo-app", "1.0"), key=s.repo_key,
                                        sender="x"))
    tampered["body"]["version"] = "6.6.6"
    bad_version = protocol.sign(s.body("demo-app", "1.0"), key=s.repo_key, sender="x")
    bad_body = json.loads(bad_version.encode())
    bad_body["body"]["version"] = "-rm -rf"   # not a Debian version: refused before the key
    for raw in (unsigned, rogue, a_host, json.dumps(tampered).encode(),
                json.dumps(bad_body).encode()):
        s.bus.publish(topics.PACKAGES, raw)
    assert wait_for(lambda: s.stat("rejected") == 5, 30), s.ctx.stats.snapshot()  # type: ignore[union-attr]
    assert s.stat("untrusted") == 4
    s.settle()
    assert s.runs == 0 and s.stat("package_updates") == 0
    assert s.repo.listed() == {} and s.report_bodies() == []


def test_a_fetcher_stopped_mid_burst_runs_the_command_at_its_next_start(site: Any) -> None:
    s = site(coalesce=3.0)
    s.start()
    s.repo.publish(("demo-app", "4.0"))
    s.send("demo-app", "4.0")
    assert wait_for(lambda: s.stat("package_updates") == 1, 30)
    journal = s.state / JOURNAL
    assert json.loads(journal.read_text())["updates"] == [["demo-app", "4.0", "test"]]
    s.stop()                       # inside the window: nothing ran, the update was acked
    time.sleep(s.coalesce + 1)
    assert journal.exists()
    assert s.repo.listed() == {}
    s.start()                      # a new fetcher, new counters; the broker has nothing
    assert wait_for(lambda: s.runs == 1, 30), "the journal's update was not run for"
    s.settle()
    assert s.runs == 1 and s.stat("package_updates") == 0, "acked: not delivered again"
    assert s.repo.listed() == {"demo-app": {"4.0"}}
    assert not journal.exists()


# -- the CLI and the daemon as processes --------------------------------------------------

def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploybus.cli", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_package_notify_makes_a_running_fetcher_update(tmp_path: Path, amqp_url: str) -> None:
    repo = AptRepo(tmp_path / "apt")
    packages = (f"defaults:\n  packages:\n    watch: [demo-*]\n"
                f"    command: {json.dumps(repo.command)}\n    coalesce: 0.5\n")
    c = Cluster(tmp_path / "cluster", amqp_url, ["web1"], top_extra=packages)
    c.setup()
    SigningKey.generate("repo").save(c.keys)   # the repository host's own key: role repo
    text = c.config.read_text()
    c.config.write_text(text.replace("  trusted:\n",
                                     "  trusted:\n    repo: {key: keys/repo.pub, role: repo}\n",
                                     1))
    try:
        fetcher = c.start("fetcher-web1", "fetcher", "--host", "web1")
        assert fetcher.ready.wait(60), c.logs()
        repo.publish(("demo-app", "2.0-1"))
        r = c.cli("--key", str(c.key("repo")), "package-notify", "demo-app", "2.0-1",
                  "--distribution", "test")
        assert r.returncode == 0, r.stderr
        assert "package.update demo-app 2.0-1 (test) published" in r.stdout
        assert wait_for(lambda: repo.listed().get("demo-app") == {"2.0-1"}, 30), c.logs()
        assert wait_for(lambda: any('"package lists updated"' in x for x in fetcher.lines), 10)
        line = json.loads(next(x for x in fetcher.lines if '"package lists updated"' in x))
        assert line["packages"] == ["demo-app"] and line["versions"] == ["2.0-1"]
        assert line["command"] == repo.command and line["exit_status"] == 0
        assert line["seconds"] >= 0 and line["host"] == "web1"
        # a key of another role is not believed: nothing runs
        r = c.cli("--key", str(c.key("deployer")), "package-notify", "demo-app", "2.0-2")
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: any("may not send package.update" in x
                                    for x in fetcher.lines), 15), c.logs()
        time.sleep(1.5)
        assert sum('"package lists updated"' in x for x in fetcher.lines) == 1
        assert fetcher.alive()
    finally:
        c.stop()
        c.save_logs()


def test_package_notify_says_so_when_the_bus_is_unreachable(tmp_path: Path) -> None:
    SigningKey.generate("repo").save(tmp_path)
    config = tmp_path / "deploybus.yaml"
    config.write_text('bus: {url: "amqp://guest:guest@127.0.0.1:9/"}\n'
                      "keys: {signing: repo.key}\n")
    started = time.monotonic()
    r = _cli(config, "package-notify", "demo-app", "1.0", "--timeout", "2")
    assert r.returncode == 69, (r.returncode, r.stdout, r.stderr)
    assert "package.update demo-app 1.0 NOT sent: bus unavailable" in r.stderr
    assert "guest:***@" in r.stderr and "Traceback" not in r.stderr
    assert "published" not in r.stdout
    assert time.monotonic() - started < 30
    r = _cli(config, "package-notify", "demo-app", "not a version")
    assert r.returncode == 2 and "version" in r.stderr
