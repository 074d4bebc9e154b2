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

Probes and metrics need no key.  Errors are JSON C{{"error": "..."}}.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

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
        problems = self.service.readiness_problems()
        if problems:
            request.setHeader(b"retry-after", b"1")
            return _json(request, 503, {"status": "unavailable", "problems": problems})
        return _json(request, 200, {"status": "ready"})


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

    def render(self, request: Request) -> bytes:
        expected = self.service.config.admin.api_key
        if expected is not None:
            header = request.getHeader(b"authorization") or b""
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), expected.encode()):
                request.setHeader(b"www-authenticate", b'Bearer realm="rproxy"')
                return _json(request, 401, {"error": "missing or invalid bearer token"})
        return super().render(request)


class Agents(_ApiLeaf):
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
        v1.putChild(b"models", Models(service))
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
                           "/api/v1/agents", "/api/v1/models"]},
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
