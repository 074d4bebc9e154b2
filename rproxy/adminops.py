"""
The operator's part of the admin port: the dashboard and the runtime API
behind its buttons.

  /, /ui/                   the dashboard (static files from rproxy/ui)
  /api/v1                   what the API offers (no key needed)
  /api/v1/dashboard         the dashboard's snapshot (L{rproxy.console})
  /api/v1/servers           backends and servers in the configuration's words
  /api/v1/servers/B/S       GET one server; PATCH {"state": "drain"|"maint"|
                            "ready", "weight": N} (HAProxy's "set server")
  /api/v1/reload            GET the last reload; POST re-reads the file and
                            answers once it is applied or refused

Writes need the admin key when C{admin.api_key} is set, like the rest of
/api/v1; the page asks for it once and keeps it in C{sessionStorage}.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from rproxy.adminhttp import ApiError, ApiLeaf, finish, json_body, json_response, refuse_unless_read
from rproxy.pool import AdminError

if TYPE_CHECKING:
    from rproxy.console import Console
    from rproxy.service import RProxyService

__all__ = ["API", "ApiIndex", "Dashboard", "Reload", "Servers", "UIFiles", "ui_files"]

UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")

_TYPES = {".html": b"text/html; charset=utf-8", ".css": b"text/css; charset=utf-8",
          ".js": b"text/javascript; charset=utf-8", ".svg": b"image/svg+xml"}

# what the page may load: only from the admin port itself, no inline code
_SECURITY = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]

# GET /api/v1: path, methods, what it does
API = [
    ("/api/v1", "GET", "this list (no key needed)"),
    ("/api/v1/dashboard", "GET", "the dashboard's snapshot: frontends, backends, tunnels, token pools, reload"),
    ("/api/v1/servers", "GET", "backends and their servers: state, weight, connections, last check"),
    ("/api/v1/servers/{backend}/{server}", "GET, PATCH",
     'one server; PATCH {"state": "drain"|"maint"|"ready", "weight": 0-1000}'),
    ("/api/v1/reload", "GET, POST", "the last configuration reload; POST reloads the file and answers the result"),
    ("/api/v1/agents", "GET", "tunnel agents logged in"),
    ("/api/v1/agents/known", "GET", "agents in PostgreSQL with their last heartbeat"),
    ("/api/v1/models", "GET", "models served by logged-in agents"),
    ("/api/v1/keys", "GET, POST, DELETE", "API keys in PostgreSQL"),
    ("/api/v1/backends", "GET, POST, PATCH, PUT, DELETE", "the backends table (source: postgres pools)"),
    ("/api/v1/stats", "GET", "requests and bytes per key and agent"),
]


def ui_files(directory: str = UI_DIR) -> dict[bytes, tuple[bytes, bytes]]:
    """
    The dashboard's files by name, read once: a few kilobytes.
    """
    files = {}
    for name in sorted(os.listdir(directory)):
        kind = _TYPES.get(os.path.splitext(name)[1])
        if kind is None:
            continue
        with open(os.path.join(directory, name), "rb") as f:
            files[name.encode("ascii")] = (f.read(), kind)
    return files


class UIFiles(Resource):
    """
    /ui/NAME: the dashboard's static files from memory; / and /ui/ are
    index.html.
    """

    isLeaf = True

    def __init__(self, files: dict[bytes, tuple[bytes, bytes]]) -> None:
        super().__init__()
        self.files = files

    def render(self, request: Request) -> bytes:
        refused = refuse_unless_read(request, subpaths=True)
        if refused is not None:
            return refused
        path = [p for p in request.postpath or () if p]
        name = path[0] if len(path) == 1 else b"index.html" if not path else b""
        found = self.files.get(name)
        if found is None:
            return json_response(request, 404, {"error": "not found"})
        body, kind = found
        request.setHeader(b"content-type", kind)
        for header, value in _SECURITY:
            request.setHeader(header, value)
        return body


class ApiIndex(Resource):
    """
    /api/v1: what the API offers, and whether it needs the key (the page
    asks for it before its first call rather than after a 401).
    """

    isLeaf = True

    def __init__(self, service: RProxyService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Request) -> bytes:
        refused = refuse_unless_read(request, subpaths=True)
        if refused is not None:
            return refused
        return json_response(request, 200, {
            "version": "v1",
            "auth": "Authorization: Bearer <admin.api_key> (when admin.api_key is set)",
            "key_required": self.service.config.admin.api_key is not None,
            "endpoints": [{"path": p, "methods": m, "description": d} for p, m, d in API],
        })


class Dashboard(ApiLeaf):
    """
    /api/v1/dashboard: the console's snapshot, the same bytes for every
    viewer within a sample.
    """

    def __init__(self, service: RProxyService, console: Console) -> None:
        super().__init__(service)
        self.console = console

    def render_get(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return self.console.snapshot_bytes()


class Servers(ApiLeaf):
    """
    /api/v1/servers[/{backend}[/{server}]]: GET; PATCH on a server sets
    its state and weight (see L{rproxy.pool.Pool.set_admin}).
    """

    def render(self, request: Request) -> Any:
        refused = self.unauthorized(request)
        if refused is not None:
            return refused
        try:
            path = [p.decode("utf-8") for p in request.postpath or () if p]
        except UnicodeDecodeError:
            return json_response(request, 404, {"error": "not found"})
        if len(path) > 2:
            return json_response(request, 404, {"error": "not found"})
        pools = self.service.pools
        if path and path[0] not in pools:
            return json_response(request, 404, {"error": f"no backend {path[0]!r}"})
        if request.method in (b"GET", b"HEAD"):
            if not path:
                return json_response(request, 200, {"backends": [p.describe() for p in pools.values()]})
            described = pools[path[0]].describe()
            if len(path) == 1:
                return json_response(request, 200, described)
            for entry in described["servers"]:
                if entry["name"] == path[1]:
                    return json_response(request, 200, entry)
            return json_response(request, 404, {"error": f"backend {path[0]!r} has no server {path[1]!r}"})
        if request.method == b"PATCH" and len(path) == 2:
            return self.patch(request, path[0], path[1])
        request.setHeader(b"allow", b"GET, HEAD, PATCH" if len(path) == 2 else b"GET, HEAD")
        return json_response(request, 405, {"error": "method not allowed here"})

    def patch(self, request: Request, backend: str, name: str) -> bytes:
        pool = self.service.pools[backend]
        if pool.server(name) is None:
            return json_response(request, 404, {"error": f"backend {backend!r} has no server {name!r}"})
        try:
            body = json_body(request)
            unknown = sorted(set(body) - {"state", "weight"})
            if unknown:
                raise ApiError(400, f"unknown field {unknown[0]!r} (a server takes state and weight)")
            if not body:
                raise ApiError(400, "nothing to change: give state, weight or both")
            peer = request.getClientAddress()
            pool.set_admin(name, body.get("state"), body.get("weight"),
                           by=f"the admin API ({getattr(peer, 'host', peer)})")
        except ApiError as e:
            return json_response(request, e.status, {"error": e.message})
        except AdminError as e:
            return json_response(request, 400, {"error": str(e)})
        for entry in pool.describe()["servers"]:
            if entry["name"] == name:
                return json_response(request, 200, entry)
        raise AssertionError("the server went away")  # pragma: no cover - nothing between


class Reload(ApiLeaf):
    """
    /api/v1/reload: GET the last reload's time, result and errors; POST
    re-reads the configuration file (validated first, off the reactor)
    and answers once the reload is applied (200) or refused (422).
    """

    def render(self, request: Request) -> Any:
        refused = self.unauthorized(request)
        if refused is not None:
            return refused
        if request.postpath not in ([], [b""]):
            return json_response(request, 404, {"error": "not found"})
        if request.method in (b"GET", b"HEAD"):
            return json_response(request, 200, {"reload": self.service.last_reload})
        if request.method != b"POST":
            request.setHeader(b"allow", b"GET, HEAD, POST")
            return json_response(request, 405, {"error": "method not allowed here"})
        if self.service.config_path is None:
            return json_response(request, 409, {"error": "rproxy runs without a configuration file to reload"})
        request.notifyFinish().addErrback(lambda _: setattr(request, "rproxy_gone", True))
        before = self.service.last_reload

        def answer(_: object) -> None:
            last = self.service.last_reload
            if last is None or last is before:
                finish(request, 409, {"error": "the reload was not applied (rproxy is stopping)", "reload": last})
            else:
                finish(request, 200 if last["result"] in ("ok", "partial") else 422, {"reload": last})

        def failed(failure: Any) -> None:
            self.service.log.failure("admin: reload failed", failure)
            finish(request, 500, {"error": "the reload failed; see the log", "reload": self.service.last_reload})

        self.service.reload_from_file().addCallbacks(answer, failed)
        return NOT_DONE_YET
