"""
The runtime API and the dashboard's resources, through
C{treq.testing.StubTreq} on a started service with a memory reactor.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.admin import AdminRoot
from rproxy.config import ConfigError, config_from_mapping
from rproxy.service import RProxyService


def mapping(api_key: str | None = None) -> dict[str, Any]:
    admin: dict[str, Any] = {"listen": None}
    if api_key is not None:
        admin["api_key"] = api_key
    return {
        "admin": admin,
        "backends": [{"name": "web", "health_check": {"type": "none"},
                      "servers": [{"address": "127.0.0.1:9001", "name": "a"},
                                  {"address": "127.0.0.1:9002", "name": "b", "weight": 2}]}],
        "frontends": [{"name": "web", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1",
                       "backend": "web"}],
    }


class RuntimeApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.start()

    def start(self, api_key: str | None = None, loader: Any = None) -> None:
        self.reactor = MemoryReactorClock()
        self.service = RProxyService(config_from_mapping(mapping(api_key)), self.reactor,
                                     registry=CollectorRegistry(), config_path="rproxy.yaml" if loader else None,
                                     config_loader=loader)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.stub = StubTreq(AdminRoot(self.service))

    def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = json.dumps(body).encode() if body is not None else None
        response = self.successResultOf(self.stub.request(method, "http://admin" + path, data=data,
                                                          headers=headers))
        return response.code, json.loads(self.successResultOf(self.stub.content(response)))

    def test_index_lists_the_api(self) -> None:
        """GET /api/v1 (and /api/v1/) lists endpoints and says whether the key is needed."""
        for path in ("/api/v1", "/api/v1/"):
            status, body = self.call("GET", path)
            self.assertEqual(status, 200)
            self.assertIn({"path": "/api/v1/servers/{backend}/{server}", "methods": "GET, PATCH",
                           "description": 'one server; PATCH {"state": "drain"|"maint"|"ready", "weight": 0-1000}'},
                          body["endpoints"])
            self.assertFalse(body["key_required"])

    def test_patch_drain_then_ready(self) -> None:
        """PATCH state drain takes the server out of rotation and shows it in /stats and the metrics."""
        status, body = self.call("PATCH", "/api/v1/servers/web/a", {"state": "drain"})
        self.assertEqual((status, body["state"], body["admin_state"]), (200, "draining", "drain"))
        pool = self.service.pools["web"]
        self.assertEqual({pool.pick().name for _ in range(4)}, {"b"})  # type: ignore[union-attr]
        status, stats = self.call("GET", "/stats")
        self.assertEqual([(s["server_id"], s["state"], s["admin_state"]) for s in stats["pools"][0]["backends"]],
                         [("a", "draining", "drain"), ("b", "up", "ready")])
        from prometheus_client import generate_latest

        metrics = generate_latest(self.service.registry).decode()
        self.assertIn('rproxy_server_admin_state{backend="web",server="a",state="drain"} 1.0', metrics)
        self.assertIn('rproxy_server_up{backend="web",server="a"} 0.0', metrics)
        status, body = self.call("PATCH", "/api/v1/servers/web/a", {"state": "ready", "weight": 4})
        self.assertEqual((status, body["state"], body["weight"], body["configured_weight"]), (200, "up", 4, 1))
        self.assertIn('rproxy_server_weight{backend="web",server="a"} 4.0',
                      generate_latest(self.service.registry).decode())

    def test_patch_refusals(self) -> None:
        """Bad PATCHes answer JSON errors naming the problem, and change nothing."""
        cases = [
            ("/api/v1/servers/nope/a", {"state": "drain"}, 404, "no backend 'nope'"),
            ("/api/v1/servers/web/zz", {"state": "drain"}, 404, "backend 'web' has no server 'zz'"),
            ("/api/v1/servers/web/a", {"state": "off"}, 400, "state must be one of ready, drain, maint"),
            ("/api/v1/servers/web/a", {"weight": "3"}, 400, "weight must be an integer from 0 to 1000"),
            ("/api/v1/servers/web/a", {"colour": "red"}, 400,
             "unknown field 'colour' (a server takes state and weight)"),
            ("/api/v1/servers/web/a", {}, 400, "nothing to change: give state, weight or both"),
            ("/api/v1/servers/web/a", [1], 400, "the body must be a JSON object"),
        ]
        for path, body, status, error in cases:
            self.assertEqual(self.call("PATCH", path, body), (status, {"error": error}), (path, body))
        self.assertEqual(self.call("PATCH", "/api/v1/servers/web")[0], 405)
        a = self.service.pools["web"].server("a")
        self.assertEqual((a.admin_state, a.weight), ("ready", 1))  # type: ignore[union-attr]

    def test_servers_listing(self) -> None:
        """GET /api/v1/servers uses the configuration's words."""
        status, body = self.call("GET", "/api/v1/servers")
        self.assertEqual(status, 200)
        backend = body["backends"][0]
        self.assertEqual((backend["name"], backend["algorithm"], [s["name"] for s in backend["servers"]]),
                         ("web", "round-robin", ["a", "b"]))
        self.assertEqual(self.call("GET", "/api/v1/servers/web/b")[1]["weight"], 2)

    def test_health_uses_config_words(self) -> None:
        """/health lists backends with servers, addresses and the algorithm."""
        body = self.call("GET", "/health")[1]
        self.assertEqual(body["backends"][0]["servers"][0]["address"], "127.0.0.1:9001")
        self.assertEqual(body["backends"][0]["algorithm"], "round-robin")

    def test_key_required(self) -> None:
        """With admin.api_key set, the dashboard data and PATCH need the key; the index says so."""
        self.start(api_key="sekret")
        self.assertTrue(self.call("GET", "/api/v1")[1]["key_required"])
        self.assertEqual(self.call("GET", "/api/v1/dashboard"), (401, {"error": "missing or invalid bearer token"}))
        self.assertEqual(self.call("GET", "/api/v1/servers", key="wrong")[0], 401)
        self.assertEqual(self.call("PATCH", "/api/v1/servers/web/a", {"state": "maint"}, key="sekret")[0], 200)
        self.assertEqual(self.call("GET", "/api/v1/dashboard", key="sekret")[0], 200)

    def test_dashboard_snapshot(self) -> None:
        """The snapshot carries frontends, backends (with operator state), tunnels, token pools and reload."""
        self.call("PATCH", "/api/v1/servers/web/b", {"state": "maint"})
        self.reactor.advance(1)
        status, body = self.call("GET", "/api/v1/dashboard")
        self.assertEqual(status, 200)
        self.assertEqual([f["name"] for f in body["frontends"]], ["web"])
        self.assertEqual([s["state"] for s in body["backends"][0]["servers"]], ["up", "maintenance"])
        self.assertEqual((body["tunnels"], body["token_pools"], body["reload"]), ([], [], None))
        self.assertEqual(body["process"]["problems"], [])

    def test_ui_is_served(self) -> None:
        """/ and /ui/ serve the page, /ui/app.js the script, with a same-origin-only policy."""
        for path, kind in (("/", b"text/html"), ("/ui/", b"text/html"), ("/ui/app.js", b"text/javascript"),
                           ("/ui/style.css", b"text/css")):
            response = self.successResultOf(self.stub.get("http://admin" + path))
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(kind), path)
            self.assertIn(b"default-src 'none'", response.headers.getRawHeaders(b"content-security-policy")[0])
        page = self.successResultOf(self.stub.content(self.successResultOf(self.stub.get("http://admin/"))))
        self.assertNotIn(b"http", page.replace(b"http-equiv", b""))  # nothing from elsewhere
        self.assertEqual(self.successResultOf(self.stub.get("http://admin/ui/nope.js")).code, 404)
        self.assertEqual(self.successResultOf(self.stub.get("http://admin/ui/../admin.py")).code, 404)

    def test_reload_reports_result(self) -> None:
        """POST /api/v1/reload answers once the file is applied or refused, with when, result and errors."""
        loaded: list[defer.Deferred[Any]] = []

        def loader(path: str) -> defer.Deferred[Any]:
            loaded.append(defer.Deferred())
            return loaded[-1]

        self.start(loader=loader)
        self.assertEqual(self.call("GET", "/api/v1/reload"), (200, {"reload": None}))
        pending = self.stub.request("POST", "http://admin/api/v1/reload")
        self.assertNoResult(pending)
        loaded[-1].errback(ConfigError(["backends[0].servers[0]: bad address"]))
        self.stub.flush()
        response = self.successResultOf(pending)
        body = json.loads(self.successResultOf(self.stub.content(response)))
        self.assertEqual((response.code, body["reload"]["result"], body["reload"]["errors"], body["reload"]["count"]),
                         (422, "invalid", ["backends[0].servers[0]: bad address"], 1))
        pending = self.stub.request("POST", "http://admin/api/v1/reload")
        loaded[-1].callback(config_from_mapping(mapping()))
        self.stub.flush()
        response = self.successResultOf(pending)
        body = json.loads(self.successResultOf(self.stub.content(response)))
        self.assertEqual((response.code, body["reload"]["result"], body["reload"]["count"]), (200, "ok", 2))

    def test_reload_without_file(self) -> None:
        """Without a configuration file there is nothing to reload: 409."""
        self.assertEqual(self.call("POST", "/api/v1/reload"),
                         (409, {"error": "rproxy runs without a configuration file to reload"}))

    def test_state_survives_reload(self) -> None:
        """A drain set through the API survives a reload that leaves the server as it was, not one that changes it."""
        configs: list[Any] = []
        self.start(loader=lambda path: defer.succeed(configs.pop(0)))
        self.call("PATCH", "/api/v1/servers/web/a", {"state": "drain", "weight": 5})
        configs.append(config_from_mapping(mapping()))
        self.assertEqual(self.call("POST", "/api/v1/reload")[0], 200)
        server = self.call("GET", "/api/v1/servers/web/a")[1]
        self.assertEqual((server["state"], server["weight"]), ("draining", 5))
        changed = mapping()
        changed["backends"][0]["servers"][0]["weight"] = 3
        configs.append(config_from_mapping(changed))
        self.assertEqual(self.call("POST", "/api/v1/reload")[0], 200)
        server = self.call("GET", "/api/v1/servers/web/a")[1]
        self.assertEqual((server["state"], server["weight"]), ("up", 3))
