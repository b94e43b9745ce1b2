"""The repo fetcher: one bare mirror per project this host serves.

On start it clones or fetches every mirror; after that it fetches the
project named by each ``git.push`` on ``git.commits``. Pushes for projects
this host does not serve are acked and ignored. A fetch that fails is logged
and counted; the next push or restart fetches again, and the agent fetches
on its own when a deploy asks for a ref the mirror lacks.

On a host that watches Debian packages (``packages:`` in the config) it
also runs the package-list command once per burst of ``package.update``,
on a thread of its own (:mod:`.packages`).
"""

from __future__ import annotations

from deploybus import gitutil, topics
from deploybus.bus import Delivery
from deploybus.daemons.repo_fetcher import svn
from deploybus.daemons.repo_fetcher.packages import PackageUpdates
from deploybus.dispatch import Dispatcher, Message
from deploybus.errors import DeployBusError
from deploybus.heartbeat import Heartbeat
from deploybus.runner import STOP_GRACE, Context, Service


class RepoFetcher(Service):
    name = "repo_fetcher"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.state_dir = ctx.config.host(ctx.host).state_dir
        self.dispatcher = Dispatcher(ctx.bus, daemon=self.name, host=ctx.host, stats=ctx.stats,
                                     verifier=ctx.config.verifier())
        self.heartbeat = Heartbeat(ctx, "fetcher", interval=ctx.config.host(ctx.host).heartbeat,
                                   log=self.log)
        watch = ctx.config.host(ctx.host).packages
        #: apt-get update on package.update; None when the host watches no package.
        self.packages = (PackageUpdates(ctx, watch, state_dir=self.state_dir, log=self.log)
                         if watch is not None and watch.watch else None)

    def served(self) -> dict[str, str]:
        return {p.name: p.git for p in self.ctx.config.projects_for_host(self.ctx.host)}

    def fetch(self, project: str, revision: int | None = None) -> None:
        pc = self.ctx.config.projects[project]
        if pc.vcs == "svn":  # an export cache, no git mirror (daemons/repo_fetcher/svn.py)
            svn.refresh(self.state_dir, pc, revision, log=self.log, stats=self.ctx.stats)
            return
        if revision is not None:
            return  # an svn.commit naming a git project: nothing to fetch
        url = self.served()[project]
        try:
            path = gitutil.update_mirror(self.state_dir, project, url, maintenance=True)
        except DeployBusError as exc:
            self.ctx.stats.incr("fetch_failed")
            self.log.warning("fetch failed", project=project, error=str(exc))
            return
        self.ctx.stats.incr("fetched")
        self.log.info("mirror updated", project=project, mirror=str(path))

    def start(self) -> None:
        gitutil.no_prompts()
        self.heartbeat.start()  # alive while the first fetches run, however long
        if self.packages is not None:  # before the fetches: they may take long
            self.packages.start()
            self.dispatcher.subscribe(topics.PACKAGES, self.packages.on_update,
                                      queue=topics.fetcher_packages_queue(self.ctx.host),
                                      types={"package.update"})
        for project in self.served():
            self.fetch(project)
        self.dispatcher.subscribe(topics.GIT_COMMITS, self.on_push,
                                  queue=topics.fetcher_queue(self.ctx.host),
                                  types={"git.push", "svn.commit"})

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.heartbeat.stop()
        self.dispatcher.close(timeout)
        if self.packages is not None:  # a command in progress finishes and is reported
            self.packages.stop(timeout)

    def healthy(self) -> bool:
        return self.heartbeat.alive() and (self.packages is None or self.packages.alive())

    def on_push(self, msg: Message, _d: Delivery) -> None:
        """A ``git.push`` signed by a git (or CI) key: fetch that project's
        mirror if this host serves it (an ``svn.commit``: export that revision)."""
        project = getattr(msg.body, "project", None)
        if isinstance(project, str) and project in self.served():
            self.fetch(project, getattr(msg.body, "revision", None))
