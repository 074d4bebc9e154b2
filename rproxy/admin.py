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

Probes and metrics need no key.  Errors are JSON C{{"error": "..."}}.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from rproxy.service import RProxyService

__all__ = ["build_admin_site", "AdminRoot"]


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, service: RProxyService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _json(request, 405, {"error": "method not allowed"})
        if request.postpath not in ([], [b""]):
            return _json(request, 404, {"error": "not found"})
        return self.render_get(request)

    def render_get(self, request: Request) -> bytes:
        raise NotImplementedError


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


class _ApiLeaf(_Leaf):
    """
    /api/v1 resources: when C{admin.api_key} is set they need
    C{Authorization: Bearer <api_key>} (compared in constant time).
    """

    def unauthorized(self, request: Request) -> bytes | None:
        """
        The 401 answer when the bearer token is missing or wrong, else None.
        """
        expected = self.service.config.admin.api_key
        if expected is None:
            return None
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected.encode()):
            return None
        request.setHeader(b"www-authenticate", b'Bearer realm="rproxy"')
        return _json(request, 401, {"error": "missing or invalid bearer token"})

    def render(self, request: Request) -> bytes:
        refused = self.unauthorized(request)
        return refused if refused is not None else super().render(request)


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
            for agent in tunnel.registry.agents.values():
                for model in agent.models:
                    models.setdefault(model, set()).add(f"{tunnel.name}/{agent.agent_id}")
        return _json(request, 200, {
            "object": "list",
            "data": [{"id": m, "object": "model", "agents": sorted(a)} for m, a in sorted(models.items())],
        })


class Keys(_ApiLeaf):
    """
    /api/v1/keys: POST {"name", "level"} -> {"id", "key"} (the plain key
    shown once); GET ?limit=&after= lists; DELETE /api/v1/keys/{id} revokes.
    Needs stores.postgres; 503 while it is down.
    """

    def render(self, request: Request) -> Any:
        refused = self.unauthorized(request)
        if refused is not None:
            return refused
        stores = self.service.stores
        keys = stores.keys.postgres if stores is not None else None
        if keys is None:
            return _json(request, 503, {"error": "the key store (stores.postgres) is not available"})
        path = [p for p in request.postpath if p]
        method = request.method
        if method == b"POST" and not path:
            work = self._create(request, keys)
        elif method == b"GET" and not path:
            work = self._list(request, keys)
        elif method == b"DELETE" and len(path) == 1:
            work = self._revoke(request, path[0])
        else:
            request.setHeader(b"allow", b"GET, POST, DELETE")
            return _json(request, 405 if not path or len(path) == 1 else 404, {"error": "not allowed here"})
        # the client may leave while the database answers
        request.notifyFinish().addErrback(lambda _: setattr(request, "rproxy_gone", True))
        d = defer.Deferred.fromCoroutine(work)

        def failed(failure: Any) -> None:
            self.service.log.failure("admin: key operation failed", failure)
            _finish(request, 503, {"error": "the key store is not available"})

        d.addErrback(failed)
        return NOT_DONE_YET

    async def _create(self, request: Request, keys: Any) -> None:
        try:
            body = json.loads(request.content.read(65536) or b"{}")
        except ValueError:
            _finish(request, 400, {"error": "the body must be a JSON object"})
            return
        if not isinstance(body, dict):
            _finish(request, 400, {"error": "the body must be a JSON object"})
            return
        name, level = body.get("name"), body.get("level", -1)
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            _finish(request, 400, {"error": "name: a string of 1 to 100 characters is required"})
            return
        if isinstance(level, bool) or not isinstance(level, int) or level < -1:
            _finish(request, 400, {"error": "level: an integer >= -1 is required"})
            return
        record, plain = await keys.create(name, level)
        _finish(request, 201, {"id": record.id, "key": plain, "name": name, "level": level})

    async def _list(self, request: Request, keys: Any) -> None:
        try:
            limit = int(request.args.get(b"limit", [b"100"])[0])
            after = int(request.args.get(b"after", [b"0"])[0])
        except ValueError:
            _finish(request, 400, {"error": "limit and after must be integers"})
            return
        if not 1 <= limit <= 1000:
            _finish(request, 400, {"error": "limit must be from 1 to 1000"})
            return
        records = await keys.list(limit=limit, after=after)
        items = [
            {"id": r.id, "name": r.name, "level": r.level,
             "created_at": r.created_at.isoformat() if r.created_at else None,
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None}
            for r in records
        ]
        page = {"keys": items, "next_after": items[-1]["id"] if len(items) == limit else None}
        _finish(request, 200, page)

    async def _revoke(self, request: Request, raw_id: bytes) -> None:
        if not raw_id.isdigit():
            _finish(request, 400, {"error": "the key id must be an integer"})
            return
        assert self.service.stores is not None
        if await self.service.stores.keys.revoke(int(raw_id)):
            _finish(request, 200, {"id": int(raw_id), "revoked": True})
        else:
            _finish(request, 404, {"error": "no live key with that id"})


class _StoreApi(_ApiLeaf):
    """
    An /api/v1 resource over PostgreSQL: C{handle(request, path)} is a
    coroutine that answers with L{_finish}; 503 while the store is down.
    """

    methods = b"GET"

    def store(self) -> Any:
        stores = self.service.stores
        return None if stores is None or stores.postgres_state != "up" else stores

    def render(self, request: Request) -> Any:
        refused = self.unauthorized(request)
        if refused is not None:
            return refused
        stores = self.store()
        if stores is None:
            return _json(request, 503, {"error": "the database (stores.postgres) is not available"})
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        request.notifyFinish().addErrback(lambda _: setattr(request, "rproxy_gone", True))
        d = defer.Deferred.fromCoroutine(self.handle(request, stores, path))

        def failed(failure: Any) -> None:
            self.service.log.failure("admin: database operation failed", failure)
            _finish(request, 503, {"error": "the database is not available"})

        d.addErrback(failed)
        return NOT_DONE_YET

    async def handle(self, request: Request, stores: Any, path: list[str]) -> None:
        raise NotImplementedError

    def not_allowed(self, request: Request) -> None:
        request.setHeader(b"allow", self.methods)
        _finish(request, 405, {"error": "method not allowed here"})


def _page(request: Request, default: int = 100) -> tuple[int, str] | None:
    try:
        limit = int(request.args.get(b"limit", [str(default).encode()])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        _finish(request, 400, {"error": "limit must be an integer from 1 to 1000"})
        return None
    after = request.args.get(b"after", [b""])[0].decode("utf-8", "replace")
    return limit, after


def _body(request: Request) -> Any:
    raw = request.content.read(65537)
    if len(raw) > 65536:
        _finish(request, 413, {"error": "the body is larger than 64 KiB"})
        return None
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        _finish(request, 400, {"error": "the body must be a JSON object"})
        return None
    return body


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
            page = _page(request)
            if page is None:
                return
            pool = request.args.get(b"pool", [None])[0]
            rows = await table.list(page[0], page[1], pool.decode("utf-8", "replace") if pool else None)
            _finish(request, 200, {"backends": rows,
                                   "next_after": rows[-1]["server_id"] if len(rows) == page[0] else None})
        elif not path and method == b"POST":
            body = _body(request)
            if body is None:
                return
            try:
                fields = validate(body)
            except BackendError as e:
                _finish(request, 400, {"error": str(e)})
                return
            row = await table.create(fields)
            if row is None:
                _finish(request, 409, {"error": f"server_id {fields['server_id']!r} exists"})
            else:
                _finish(request, 201, row)
        elif path and method == b"GET":
            row = await table.get(path[0])
            _finish(request, 200, row) if row else _finish(request, 404, {"error": "no such server_id"})
        elif path and method in (b"PATCH", b"PUT"):
            body = _body(request)
            if body is None:
                return
            try:
                fields = validate(body, partial=True)
            except BackendError as e:
                _finish(request, 400, {"error": str(e)})
                return
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
            hours = float(request.args.get(b"hours", [b"24"])[0])
        except ValueError:
            hours = -1
        if not 0 < hours <= 24 * 366:
            _finish(request, 400, {"error": "hours must be a number from 0 to 8784"})
            return
        key = request.args.get(b"key", [b""])[0].decode("utf-8", "replace") or None
        agent = request.args.get(b"agent", [b""])[0].decode("utf-8", "replace") or None
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
        page = _page(request)
        if page is None:
            return
        limit, after = page
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


def _finish(request: Request, status: int, body: Any) -> None:
    if request.finished or getattr(request, "rproxy_gone", False):
        return
    request.write(_json(request, status, body))
    request.finish()


class AdminRoot(Resource):
    """
    The root of the admin tree; unknown paths answer JSON 404.
    """

    def __init__(self, service: RProxyService) -> None:
        super().__init__()
        self.putChild(b"livez", Livez(service))
        self.putChild(b"readyz", Readyz(service))
        health = Health(service)
        self.putChild(b"health", health)
        self.putChild(b"healthz", health)
        self.putChild(b"stats", Stats(service))
        self.putChild(b"metrics", MetricsPage(service))
        v1 = _Branch()
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

    def render(self, request: Request) -> bytes:
        return _json(
            request,
            200,
            {"endpoints": ["/livez", "/readyz", "/health", "/healthz", "/stats", "/metrics",
                           "/api/v1/agents", "/api/v1/agents/known", "/api/v1/models", "/api/v1/keys",
                           "/api/v1/backends", "/api/v1/stats"]},
        )


class _Branch(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "not found"})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "not found"})


class _AdminSite(Site):
    def log(self, request: Request) -> None:
        """
        Probes are scraped every few seconds; keep them out of the log.
        """


def build_admin_site(service: RProxyService) -> Site:
    site = _AdminSite(AdminRoot(service))
    site.noisy = False
    site.displayTracebacks = False
    return site
