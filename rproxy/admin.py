"""
The admin port: a plain twisted.web resource tree.

  /livez            200 while the process runs
  /readyz           200 when every frontend has a server up, else 503
                    naming what is down
  /health, /healthz JSON detail of frontends and backends
  /stats            JSON per backend, in the VK gateway's shape
  /metrics          Prometheus text
  /api/v1/agents    tunnel agents (bearer admin.api_key when set)
  /api/v1/models    models served by logged-in agents (same)
  /api/v1/keys      POST/GET/DELETE API keys in PostgreSQL (same)
  /api/v1/backends  CRUD on the backends table (same)
  /api/v1/stats     requests and bytes per key and agent (same)
  /api/v1/agents/known  agents in PostgreSQL with their last heartbeat
  /, /ui/, /api/v1, /api/v1/dashboard, /api/v1/servers, /api/v1/reload
                    the dashboard and the runtime API (L{rproxy.adminops})

Probes and metrics need no key.  Errors are JSON C{{"error": "..."}}.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from rproxy.adminhttp import AdminSite, ApiError
from rproxy.adminhttp import ApiLeaf as _ApiLeaf
from rproxy.adminhttp import Leaf as _Leaf
from rproxy.adminhttp import checked_text as _text
from rproxy.adminhttp import finish as _finish
from rproxy.adminhttp import json_body as _body
from rproxy.adminhttp import json_response as _json
from rproxy.adminops import ApiIndex, Dashboard, Reload, Servers, UIFiles, ui_files
from rproxy.console import Console

if TYPE_CHECKING:
    from rproxy.service import RProxyService

__all__ = ["build_admin_site", "AdminRoot"]


class Livez(_Leaf):
    def render_get(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Readyz(_Leaf):
    def render_get(self, request: Request) -> bytes:
        service = self.service
        problems = service.readiness_problems()
        # stores that are down do not make rproxy unready (it serves from
        # static keys and cached data) but are shown
        stores = service.stores.status() if service.stores is not None else "embedded"
        if problems:
            request.setHeader(b"retry-after", b"1")
            return _json(request, 503, {"status": "unavailable", "problems": problems, "stores": stores})
        return _json(request, 200, {"status": "ready", "stores": stores})


class Health(_Leaf):
    def render_get(self, request: Request) -> bytes:
        detail = self.service.health_detail()
        return _json(request, 200 if detail["status"] == "ok" else 503, detail)


class Stats(_Leaf):
    def render_get(self, request: Request) -> bytes:
        return _json(request, 200, self.service.stats())


class MetricsPage(_Leaf):
    def render_get(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.service.registry)


class Agents(_ApiLeaf):
    """
    /api/v1/agents: the live agents; /api/v1/agents/known: the database's.
    """

    def __init__(self, service: RProxyService) -> None:
        super().__init__(service)
        self.known = KnownAgents(service)

    def render(self, request: Request) -> Any:
        if request.postpath == [b"known"]:
            return self.known.render(request)
        return super().render(request)

    def render_get(self, request: Request) -> bytes:
        return _json(request, 200, {
            "tunnels": [{"name": t.name, "agents": t.agents()} for t in self.service.tunnels.values()]
        })


class Models(_ApiLeaf):
    def render_get(self, request: Request) -> bytes:
        models: dict[str, set[str]] = {}
        for tunnel in self.service.tunnels.values():
            for agent in tunnel.registry.candidates():  # the whole cluster's
                for model in agent.models:
                    models.setdefault(model, set()).add(f"{tunnel.name}/{agent.agent_id}")
        return _json(request, 200, {
            "object": "list",
            "data": [{"id": m, "object": "model", "agents": sorted(a)} for m, a in sorted(models.items())],
        })


class _StoreApi(_ApiLeaf):
    """
    An /api/v1 resource over PostgreSQL: C{handle(request, stores, path)}
    is a coroutine that answers with L{_finish} or raises L{ApiError}.
    501 when C{stores.postgres} is not configured at all (no retry helps),
    503 while it is down.  Input PostgreSQL would refuse (NUL characters,
    lone surrogates, integers out of its range, JSON nested past the
    parser's limit) is the client's error, 400, checked before the query.
    """

    methods = b"GET"
    what = "the database (stores.postgres)"

    def render(self, request: Request) -> Any:
        refused = self.unauthorized(request)
        if refused is not None:
            return refused
        stores = self.service.stores
        if stores is None or stores.config.postgres_dsn is None:
            return _json(request, 501, {"error": f"{self.what} is not configured"})
        if stores.postgres_state != "up":
            return _json(request, 503, {"error": f"{self.what} is not available"})
        try:
            path = [_text(p.decode("utf-8", "replace"), "the path") for p in request.postpath if p]
        except ApiError as e:
            return _json(request, e.status, {"error": e.message})
        # the client may leave while the database answers
        request.notifyFinish().addErrback(lambda _: setattr(request, "rproxy_gone", True))
        d = defer.Deferred.fromCoroutine(self.handle(request, stores, path))

        def failed(failure: Any) -> None:
            if failure.check(ApiError):
                _finish(request, failure.value.status, {"error": failure.value.message})
                return
            self.service.log.failure("admin: database operation failed", failure)
            _finish(request, 503, {"error": f"{self.what} is not available"})

        d.addErrback(failed)
        return NOT_DONE_YET

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        raise NotImplementedError

    def not_allowed(self, request: Request) -> None:
        request.setHeader(b"allow", self.methods)
        _finish(request, 405, {"error": "method not allowed here"})


# PostgreSQL's integer and bigint: a value outside them is refused by the
# database, which makes it the client's error, not the store's
_INT4 = 2**31 - 1
_INT8 = 2**63 - 1
_DIGITS = re.compile(r"-?[0-9]{1,19}")


def _arg(request: Request, name: str, default: str = "") -> str:
    raw = request.args.get(name.encode("ascii"), [None])[0]
    return default if raw is None else _text(raw.decode("utf-8", "replace"), name)


def _integer(raw: str, what: str, low: int, high: int) -> int:
    """
    ASCII digits (int() would also take "+1", " 1" or "1_0") within
    [low, high].
    """
    if _DIGITS.fullmatch(raw) is None or not low <= int(raw) <= high:
        raise ApiError(400, f"{what} must be an integer from {low} to {high}")
    return int(raw)


def _page(request: Request, default: int = 100) -> tuple[int, str]:
    return _integer(_arg(request, "limit", str(default)), "limit", 1, 1000), _arg(request, "after")


class Keys(_StoreApi):
    """
    /api/v1/keys: POST {"name", "level"} -> {"id", "key"} (the plain key
    shown once); GET ?limit=&after= lists; DELETE /api/v1/keys/{id} revokes.
    """

    methods = b"GET, POST, DELETE"
    what = "the key store (stores.postgres)"

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        keys = stores.keys.postgres
        if keys is None:
            raise ApiError(503, f"{self.what} is not available")
        method = request.method
        if len(path) > 1:
            _finish(request, 404, {"error": "not found"})
        elif method == b"POST" and not path:
            await self._create(request, keys)
        elif method == b"GET" and not path:
            limit, after = _page(request)
            await self._list(request, keys, limit, _integer(after or "0", "after", 0, _INT8))
        elif method == b"DELETE" and path:
            key_id = _integer(path[0], "the key id", 1, _INT8)
            if await stores.keys.revoke(key_id):
                # the agents logged in with it here are logged out at once
                for tunnel in self.service.tunnels.values():
                    tunnel.revoke_key(key_id=key_id)
                _finish(request, 200, {"id": key_id, "revoked": True})
            else:
                _finish(request, 404, {"error": "no live key with that id"})
        else:
            self.not_allowed(request)

    async def _create(self, request: Request, keys: Any) -> None:
        body = _body(request)
        name, level = body.get("name"), body.get("level", -1)
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise ApiError(400, "name: a string of 1 to 100 characters is required")
        if isinstance(level, bool) or not isinstance(level, int) or not -1 <= level <= _INT4:
            raise ApiError(400, f"level: an integer from -1 to {_INT4} is required")
        record, plain = await keys.create(name, level)
        _finish(request, 201, {"id": record.id, "key": plain, "name": name, "level": level})

    async def _list(self, request: Request, keys: Any, limit: int, after: int) -> None:
        records = await keys.list(limit=limit, after=after)
        items = [
            {"id": r.id, "name": r.name, "level": r.level,
             "created_at": r.created_at.isoformat() if r.created_at else None,
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None}
            for r in records
        ]
        _finish(request, 200, {"keys": items, "next_after": items[-1]["id"] if len(items) == limit else None})


class Backends(_StoreApi):
    """
    /api/v1/backends: the backends table (the VK gateway's config.local).
    GET ?pool=&limit=&after= lists; POST creates; GET, PATCH (or PUT) and
    DELETE /api/v1/backends/{server_id}.  Pools with C{source: postgres}
    follow the table within a second.
    """

    methods = b"GET, POST, PATCH, PUT, DELETE"

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        from rproxy.store.backends import BackendError, validate

        table = stores.backends
        method = request.method
        if len(path) > 1:
            _finish(request, 404, {"error": "not found"})
        elif not path and method == b"GET":
            limit, after = _page(request)
            rows = await table.list(limit, after, _arg(request, "pool") or None)
            _finish(request, 200, {"backends": rows,
                                   "next_after": rows[-1]["server_id"] if len(rows) == limit else None})
        elif not path and method == b"POST":
            try:
                fields = validate(_body(request))
            except BackendError as e:
                raise ApiError(400, str(e)) from None
            row = await table.create(fields)
            if row is None:
                _finish(request, 409, {"error": f"server_id {fields['server_id']!r} exists"})
            else:
                _finish(request, 201, row)
        elif path and method == b"GET":
            row = await table.get(path[0])
            _finish(request, 200, row) if row else _finish(request, 404, {"error": "no such server_id"})
        elif path and method in (b"PATCH", b"PUT"):
            try:
                fields = validate(_body(request), partial=True)
            except BackendError as e:
                raise ApiError(400, str(e)) from None
            row = await table.update(path[0], fields)
            _finish(request, 200, row) if row else _finish(request, 404, {"error": "no such server_id"})
        elif path and method == b"DELETE":
            if await table.delete(path[0]):
                _finish(request, 200, {"server_id": path[0], "deleted": True})
            else:
                _finish(request, 404, {"error": "no such server_id"})
        else:
            self.not_allowed(request)


class StatsApi(_StoreApi):
    """
    /api/v1/stats?hours=24&key=&agent=: requests and bytes per key and
    agent (from the request records of shared keys), summed over the last
    C{hours}.
    """

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        if path or request.method not in (b"GET", b"HEAD"):
            self.not_allowed(request) if not path else _finish(request, 404, {"error": "not found"})
            return
        try:
            hours = float(_arg(request, "hours", "24"))
        except ValueError:
            hours = -1
        if not 0 < hours <= 24 * 366:  # NaN too
            raise ApiError(400, "hours must be a number from 0 to 8784")
        key = _arg(request, "key") or None
        agent = _arg(request, "agent") or None
        rows = await stores.connection().runQuery(
            "SELECT key_name, agent_id, sum(requests), sum(bytes_in), sum(bytes_out),"
            " min(period_start), max(period_start) FROM stats"
            " WHERE period_start >= now() - make_interval(secs => %s)"
            " AND (%s::text IS NULL OR key_name = %s) AND (%s::text IS NULL OR agent_id = %s)"
            " GROUP BY key_name, agent_id ORDER BY key_name, agent_id LIMIT 1000",
            (hours * 3600, key, key, agent, agent),
        )
        _finish(request, 200, {"hours": hours, "stats": [
            {"key": k, "agent": a, "requests": int(r), "bytes_in": int(i), "bytes_out": int(o),
             "first_period": first.isoformat(), "last_period": last.isoformat()}
            for k, a, r, i, o, first, last in rows
        ]})


class KnownAgents(_StoreApi):
    """
    /api/v1/agents/known: every agent the database has seen, with its
    last heartbeat, newest first (paginated by C{after}, a last_seen).
    """

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        limit, after = _page(request)
        rows = await stores.connection().runQuery(
            "SELECT a.id, a.first_seen, a.last_seen, a.system_info, a.models,"
            " h.at, h.cpu, h.memory, h.disk, h.load, h.active_streams FROM agents a"
            " LEFT JOIN LATERAL (SELECT * FROM heartbeats WHERE agent_id = a.id ORDER BY at DESC LIMIT 1) h"
            " ON true WHERE (%s = '' OR a.id > %s) ORDER BY a.id LIMIT %s",
            (after, after, limit),
        )
        agents = []
        for agent_id, first, last, info, models, at, cpu, memory, disk, load, streams in rows:
            agents.append({
                "id": agent_id, "first_seen": first.isoformat(), "last_seen": last.isoformat(),
                "system_info": info, "models": models,
                "last_heartbeat": None if at is None else {
                    "at": at.isoformat(), "cpu": cpu, "memory": memory, "disk": disk, "load": load,
                    "active_streams": streams},
            })
        _finish(request, 200, {"agents": agents, "next_after": agents[-1]["id"] if len(agents) == limit else None})


class AdminRoot(Resource):
    """
    The root of the admin tree; unknown paths answer JSON 404.
    """

    def __init__(self, service: RProxyService, console: Console | None = None) -> None:
        super().__init__()
        if console is None:
            console = Console(service, service.clock)
        self.console = console
        ui = UIFiles(ui_files())
        self.putChild(b"", ui)
        self.putChild(b"ui", ui)
        self.putChild(b"livez", Livez(service))
        self.putChild(b"readyz", Readyz(service))
        health = Health(service)
        self.putChild(b"health", health)
        self.putChild(b"healthz", health)
        self.putChild(b"stats", Stats(service))
        self.putChild(b"metrics", MetricsPage(service))
        v1 = _Branch()
        v1.putChild(b"", ApiIndex(service))
        v1.putChild(b"dashboard", Dashboard(service, console))
        v1.putChild(b"servers", Servers(service))
        v1.putChild(b"reload", Reload(service))
        v1.putChild(b"agents", Agents(service))
        v1.putChild(b"backends", Backends(service))
        v1.putChild(b"stats", StatsApi(service))
        v1.putChild(b"models", Models(service))
        v1.putChild(b"keys", Keys(service))
        api = _Branch()
        api.putChild(b"v1", v1)
        self.putChild(b"api", api)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()



class _Branch(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        # /api/v1 without the slash lists the API, as /api/v1/ does
        index = self.children.get(b"")
        if index is not None:
            return index.render(request)
        return _json(request, 404, {"error": "not found"})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "not found"})


def build_admin_site(service: RProxyService) -> Site:
    """
    The admin port's site; the dashboard samples while it listens.
    """
    console = Console(service, service.clock)
    return AdminSite(AdminRoot(service, console), lambda: service.config.admin.api_key, service.reactor,
                     console)
