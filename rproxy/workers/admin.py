"""
The master's admin port: rproxy's admin tree (L{rproxy.admin.AdminRoot},
whose C{/api/v1} acts once, in the master), with the machine-wide pages
answered from every worker's figures.

The master collects them over the control channel when a page is asked
for, rather than through prometheus-client's multiprocess mode: that mode
reads counters from files each process writes, so it cannot carry the
collectors that read live objects at scrape time (connections open, pool
state, token leases: most of rproxy's metrics), needs its directory set
before the first import, and keeps the files of dead workers; the channel
is already there, carries /health and /stats too, and a scrape costs one
request per worker.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from rproxy.admin import AdminRoot, Agents, Models
from rproxy.adminhttp import AdminSite, finish, refuse_unless_read
from rproxy.adminops import Servers
from rproxy.workers.console import MachineConsole
from rproxy.workers.merge import add_totals, merge_agents, merge_health, merge_pools, sum_metrics
from rproxy.workers.state import admin_message

if TYPE_CHECKING:
    from rproxy.workers.master import MasterService

__all__ = ["build_master_site"]

log = Logger()


class _Merged(Resource):
    isLeaf = True

    def __init__(self, master: MasterService) -> None:
        super().__init__()
        self.master = master

    def render(self, request: Request) -> Any:
        refused = refuse_unless_read(request)
        if refused is not None:
            return refused
        d = defer.Deferred.fromCoroutine(self.answer())

        def send(result: tuple[int, bytes, bytes]) -> None:
            if request.finished or request._disconnected:
                return
            status, content_type, body = result
            request.setResponseCode(status)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("admin: {path} failed", failure, path=request.path)
            send((500, b"application/json", b'{"error": "internal error"}\n'))

        d.addCallback(send).addErrback(failed)
        return NOT_DONE_YET

    async def answer(self) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    async def workers(self) -> tuple[list[dict[str, Any]], list[str]]:
        """
        The reports of the workers that answered, and a problem for each
        that did not.
        """
        answered, problems = _answered(self.master.slots, await self.master.reports())
        return answered, problems


def _answered(slots: list[Any], reports: list[dict[str, Any] | None]) -> tuple[list[dict[str, Any]], list[str]]:
    problems = []
    answered = []
    for slot, report in zip(slots, reports, strict=True):
        if report is None:
            problems.append(f"worker {slot.slot}: not running" if slot.process is None
                            else f"worker {slot.slot}: not ready")
        else:
            answered.append(report)
    return answered, problems


def _body(status: int, body: Any) -> tuple[int, bytes, bytes]:
    import json

    return status, b"application/json", json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class MergedReadyz(_Merged):
    async def answer(self) -> tuple[int, bytes, bytes]:
        reports, problems = await self.workers()
        problems += self.master.inner.readiness_problems()
        for report in reports:
            for problem in report.get("ready", []):
                if problem not in problems:
                    problems.append(problem)
        inner = self.master.inner
        stores = inner.stores.status() if inner.stores is not None else "embedded"
        if problems:
            return _body(503, {"status": "unavailable", "problems": problems, "stores": stores})
        return _body(200, {"status": "ready", "stores": stores})


class MergedHealth(_Merged):
    async def answer(self) -> tuple[int, bytes, bytes]:
        master = self.master
        by_slot = await master.reports()
        reports, problems = _answered(master.slots, by_slot)
        detail = merge_health(master.inner.health_detail(), [r["health"] for r in reports if "health" in r],
                              problems)
        add_totals({"health": detail}, master.carried_totals("report", by_slot))
        detail["workers"] = [_worker(slot, report) for slot, report in zip(master.slots, by_slot, strict=True)]
        if master.tunnels_in_workers:
            # each worker a node of the cluster: its status as /health of
            # a single process shows it
            nodes = [r["health"]["cluster"] for r in reports if "cluster" in r.get("health", {})]
            detail["tunnels"] = {"process": "workers", "names": sorted(t.name for t in master.config.tunnels),
                                 "nodes": [n["node_id"] for n in nodes]}
            cross = {n["cross_node"] for n in nodes}
            detail["cluster"] = {"node_id": master.config.cluster.node_id,
                                 "cross_node": cross.pop() if len(cross) == 1 else "partial", "workers": nodes}
        else:
            detail["tunnels"] = {"process": "master", "pid": os.getpid(), "names": sorted(master.inner.tunnels)}
        return _body(200 if detail["status"] == "ok" else 503, detail)


def _worker(slot: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """
    One worker in C{/health}: its process, and what it serves (how many
    connections it took, so the spread over workers shows; the servers
    it cannot use, so a state change shows reaching it).
    """
    entry = {"worker": slot.slot, "pid": slot.pid if slot.process is not None else None,
             "running": slot.process is not None, "configured": slot.configured, "restarts": slot.restarts}
    if report is not None and "health" in report:
        frontends = report["health"]["frontends"]
        entry["connections"] = sum(f["total_connections"] for f in frontends)
        entry["active_connections"] = sum(f["active_connections"] for f in frontends)
        entry["unusable_servers"] = report.get("unusable", [])
    return entry


class MergedStats(_Merged):
    async def answer(self) -> tuple[int, bytes, bytes]:
        by_slot = await self.master.reports()
        reports, _ = _answered(self.master.slots, by_slot)
        stats = {"pools": merge_pools(self.master.inner.stats()["pools"],
                                      [r["stats"]["pools"] for r in reports if "stats" in r])}
        add_totals({"stats": stats}, self.master.carried_totals("report", by_slot))
        return _body(200, stats)


class MergedMetrics(_Merged):
    async def answer(self) -> tuple[int, bytes, bytes]:
        by_slot = await self.master.reports()
        texts = [generate_latest(self.master.inner.registry).decode("utf-8")]
        for slot, report in zip(self.master.slots, by_slot, strict=True):
            texts += slot.metrics(report)
        return 200, CONTENT_TYPE_LATEST.encode("ascii"), sum_metrics(texts).encode("utf-8")


class MachineAgents(Agents):
    """
    C{/api/v1/agents} in the master of workers that run the tunnels: the
    agents every worker sees (L{merge_agents}), asked when the page is;
    a worker that does not answer in time is left out (its agents show
    again through the other workers once the cluster lists them).
    C{/api/v1/agents/known} stays the database's.
    """

    def __init__(self, master: MasterService) -> None:
        super().__init__(master.inner)
        self.master = master

    def render_get(self, request: Request) -> Any:
        if not self.master.tunnels_in_workers:
            return super().render_get(request)
        d = defer.Deferred.fromCoroutine(self.master.reports(op="agents"))
        d.addCallback(lambda reports: finish(request, 200, {
            "tunnels": merge_agents([r for r in reports if r is not None])}))
        d.addErrback(lambda f: (log.failure("admin: /api/v1/agents failed", f),
                                finish(request, 500, {"error": "internal error"})))
        return NOT_DONE_YET


class MachineModels(Models):
    """
    C{/api/v1/models} in the master of workers that run the tunnels: the
    models of the agents L{MachineAgents} lists.
    """

    def __init__(self, master: MasterService) -> None:
        super().__init__(master.inner)
        self.master = master

    def render_get(self, request: Request) -> Any:
        def answer(reports: list[dict[str, Any] | None]) -> None:
            models: dict[str, set[str]] = {}
            for tunnel in merge_agents([r for r in reports if r is not None]):
                for agent in tunnel["agents"]:
                    for model in agent.get("models", []):
                        models.setdefault(model, set()).add(f"{tunnel['name']}/{agent['id']}")
            finish(request, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "agents": sorted(a)} for m, a in sorted(models.items())]})

        if not self.master.tunnels_in_workers:
            return super().render_get(request)
        d = defer.Deferred.fromCoroutine(self.master.reports(op="agents"))
        d.addCallback(answer)
        d.addErrback(lambda f: (log.failure("admin: /api/v1/models failed", f),
                                finish(request, 500, {"error": "internal error"})))
        return NOT_DONE_YET


class MachineServers(Servers):
    """
    C{/api/v1/servers} in the master: a change (drain, maint, ready,
    weight) acts once, in the master's pool, then reaches every worker,
    whose pools pick the servers of new connections.
    """

    def __init__(self, master: MasterService) -> None:
        super().__init__(master.inner)
        self.master = master

    def patch(self, request: Request, backend: str, name: str) -> bytes:
        body = super().patch(request, backend, name)
        if request.code == 200:
            pool = self.master.inner.pools[backend]
            server = pool.server(name)
            if server is not None:
                self.master.broadcast(admin_message(pool, server))
        return body


def build_master_site(master: MasterService) -> Site:
    """
    The master's admin site; its dashboard samples every worker while it
    listens (L{MachineConsole}).
    """
    console = MachineConsole(master, master.reactor)
    root = AdminRoot(master.inner, console)
    root.putChild(b"readyz", MergedReadyz(master))
    health = MergedHealth(master)
    root.putChild(b"health", health)
    root.putChild(b"healthz", health)
    root.putChild(b"stats", MergedStats(master))
    root.putChild(b"metrics", MergedMetrics(master))
    v1 = root.children[b"api"].children[b"v1"]
    v1.putChild(b"servers", MachineServers(master))
    v1.putChild(b"agents", MachineAgents(master))
    v1.putChild(b"models", MachineModels(master))
    return AdminSite(root, lambda: master.config.admin.api_key, master.reactor, console)
