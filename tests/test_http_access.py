"""
The access-policy filters (L{rproxy.http.filters.access}, C{auth},
C{redirect}, C{rewrite}, C{sticky}) in the real HTTP engine, with the
recording connector and transports of L{tests.test_http_engine}: a
frontend built from a configuration mapping, through C{default_filters}.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.cidr import CIDRSet
from rproxy.config import config_from_mapping
from rproxy.http.filters.access import forwarded_client
from rproxy.http.filters.rewrite import rewrite
from rproxy.http.filters.sticky import StickyCookie, server_id
from rproxy.http.frontend import HTTPFrontend
from rproxy.http.headers import request_head
from rproxy.passwords import PasswordChecker, TooBusy, check_hash
from rproxy.pool import Pool
from rproxy.store.auth import KeyChain, key_chain
from rproxy.tunnel.config import ApiKeyConfig
from rproxy.tunnel.registry import StaticKeys
from tests.test_config_access import ARGON2_HUNTER2, BCRYPT_SECRET
from tests.test_http_engine import RecordingConnector, RecordingTransport

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeKeys:
    """
    A key chain whose lookups the test answers (C{answer}).
    """

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.cancelled = 0

    def lookup(self, key: str) -> defer.Deferred[Any]:
        self.asked.append(key)
        d: defer.Deferred[Any] = defer.Deferred(lambda _: self._cancelled())
        self.pending.append(d)
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1


class Proxy:
    """
    One HTTP frontend made from C{frontend} (keys of the frontend's
    mapping), with every filter of its configuration, a recording
    connector, and clients whose address the test chooses.
    """

    def __init__(self, frontend: dict[str, Any] | None = None, servers: int = 1) -> None:
        fe: dict[str, Any] = {"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be"}
        fe.update(frontend or {})
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "be", "health_check": {"type": "none"},
                          "servers": [{"address": f"127.0.0.1:{8001 + i}", "name": f"s{i}"} for i in range(servers)]}],
            "frontends": [fe],
        })
        self.clock = MemoryReactorClock()
        self.pool = Pool(config.backends[0], self.clock)
        self.record: list[tuple[Any, ...]] = []
        self.connector = RecordingConnector(self.record)
        self.frontend = HTTPFrontend(config.frontends[0], {"be": self.pool}, self.clock, self.clock,
                                     self.connector)  # type: ignore[arg-type]

    def client(self, peer: str = "10.0.0.7") -> tuple[Any, RecordingTransport]:
        conn = self.frontend.buildProtocol(IPv4Address("TCP", peer, 5555))
        transport = RecordingTransport(self.record, "client")
        conn.makeConnection(transport)
        return conn, transport

    def send(self, head: bytes, peer: str = "10.0.0.7") -> tuple[Any, RecordingTransport]:
        conn, transport = self.client(peer)
        conn.dataReceived(head)
        return conn, transport

    def upstream_head(self) -> bytes:
        """
        Connect the pending upstream attempt and return what was sent.
        """
        upstream = self.connector.connect()
        return upstream.transport.value()


def answer(transport: RecordingTransport) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """
    The status line, fields (lower-case names) and body the client got.
    """
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    return lines[0], fields, body


def basic(user: str, password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()) + b"\r\n"


class ForwardedClientTests(SynchronousTestCase):
    trusted = CIDRSet(["10.0.0.0/8", "2001:db8::/32"])

    def test_rightmost_untrusted(self) -> None:
        """
        The client is the right-most address that is not a trusted proxy,
        whatever the number of fields and spaces.
        """
        self.assertEqual(forwarded_client("10.0.0.7", [b"198.51.100.1, 203.0.113.9", b"10.1.1.1"], self.trusted),
                         "203.0.113.9")

    def test_all_trusted(self) -> None:
        """
        When every address is a trusted proxy, the left-most one.
        """
        self.assertEqual(forwarded_client("10.0.0.7", [b"10.3.3.3,10.2.2.2"], self.trusted), "10.3.3.3")

    def test_ports_and_brackets(self) -> None:
        """
        Addresses with ports and bracketed IPv6 are addresses; IPv6 comes
        out in its compressed form.
        """
        self.assertEqual(forwarded_client("10.0.0.7", [b"[2001:DB8:0::5]:443, 192.0.2.1:80"], self.trusted),
                         "192.0.2.1")
        self.assertEqual(forwarded_client("10.0.0.7", [b"198.51.100.4, 2001:db8:0:0::9"], self.trusted),
                         "198.51.100.4")

    def test_garbage_stops_the_walk(self) -> None:
        """
        An element that is no address stops the walk: the last trusted
        address is the client (nothing left of the garbage is believed).
        """
        self.assertEqual(forwarded_client("10.0.0.7", [b"198.51.100.1, unknown, 10.1.1.1"], self.trusted),
                         "10.1.1.1")
        self.assertEqual(forwarded_client("10.0.0.7", [b"", b"x"], self.trusted), "10.0.0.7")


class TrustedProxyTests(SynchronousTestCase):
    def test_trusted_peer(self) -> None:
        """
        A trusted peer's X-Forwarded-For goes on with the peer appended,
        and the client address is the one it names.
        """
        proxy = Proxy({"trusted_proxies": ["10.0.0.0/8"]})
        conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9, 10.9.9.9\r\n\r\n")
        self.assertEqual(conn.exchange.client_host, "203.0.113.9")
        self.assertIn(b"\r\nX-Forwarded-For: 203.0.113.9, 10.9.9.9, 10.0.0.7\r\n", proxy.upstream_head())

    def test_remembered(self) -> None:
        """
        The client a proxy's X-Forwarded-For names is remembered for the
        next request with the same field (a short one only), and a long
        chain is walked all the same.
        """
        proxy = Proxy({"trusted_proxies": ["10.0.0.0/8"]})
        for _ in range(2):
            conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
            self.assertEqual(conn.exchange.client_host, "203.0.113.9")
        chain = b", ".join(b"10.1.1.%d" % i for i in range(40))
        conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.1, " + chain + b"\r\n\r\n")
        self.assertEqual(conn.exchange.client_host, "198.51.100.1")
        (filter_,) = [f for f in proxy.frontend.chain.request if type(f).__name__ == "ClientAddress"]
        self.assertEqual(list(filter_._clients.values()), ["203.0.113.9"])

    def test_untrusted_peer(self) -> None:
        """
        Any other peer's X-Forwarded-For is replaced by the peer's address,
        which is the client address; its Forwarded and X-Real-IP are
        dropped (a trusted peer's go on).
        """
        proxy = Proxy({"trusted_proxies": ["10.0.0.0/8"]})
        conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n"
                             b"x-forwarded-for: 5.6.7.8\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 7.7.7.7\r\n\r\n",
                             peer="192.0.2.50")
        self.assertEqual(conn.exchange.client_host, "192.0.2.50")
        head = proxy.upstream_head()
        self.assertIn(b"\r\nX-Forwarded-For: 192.0.2.50\r\n", head)
        for forged in (b"1.2.3.4", b"5.6.7.8", b"6.6.6.6", b"7.7.7.7"):
            self.assertNotIn(forged, head)
        # a trusted peer's fields go on
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 7.7.7.7\r\n\r\n")
        head = proxy.upstream_head()
        self.assertIn(b"\r\nForwarded: for=6.6.6.6\r\n", head)
        self.assertIn(b"\r\nX-Real-IP: 7.7.7.7\r\n", head)

    def test_no_trusted_proxies(self) -> None:
        """
        Without trusted_proxies the field is appended to, as before, and
        the client address is the peer's.
        """
        proxy = Proxy()
        conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", peer="192.0.2.50")
        self.assertEqual(conn.exchange.client_host, "192.0.2.50")
        self.assertIn(b"\r\nX-Forwarded-For: 1.2.3.4, 192.0.2.50\r\n", proxy.upstream_head())

    def test_request_head_remove(self) -> None:
        """
        request_head drops the client's X-Forwarded-For when it is in
        remove, and names the client address alone.
        """
        head = request_head(b"GET", b"/", [(b"Host", b"h"), (b"X-Forwarded-For", b"6.6.6.6")], b"10.0.0.7",
                            b"http", False, None, remove=frozenset({b"x-forwarded-for"}))
        self.assertEqual(head, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http"
                               b"\r\nX-Forwarded-Host: h\r\nVia: 1.1 rproxy\r\n\r\n")


class AccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def assertRefused(self, proxy: Proxy, transport: RecordingTransport, address: str, proxied: int = 0) -> None:
        status, fields, body = answer(transport)
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        self.assertEqual(json.loads(body), {"error": f"{address} is not allowed"})
        self.assertEqual(fields[b"connection"], [b"close"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(proxy.connector.pending), proxied)

    def test_frontend_deny(self) -> None:
        """
        A denied client gets 403 with a JSON body, one log line, and a
        refusal counted; no server is asked.
        """
        proxy = Proxy({"deny": ["10.0.0.0/24"]})
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertRefused(proxy, transport, "10.0.0.7")
        self.assertEqual(proxy.frontend.refusals, {"access": 1})
        self.assertEqual(proxy.frontend.requests, {("-", 403): 1})
        # (trial's legacy log bridge overwrites an event's "message" key:
        # the line is known by its other fields)
        self.assertEqual([(e["log_namespace"], e["frontend"], e["status"], e["peer"]) for e in self.events],
                         [("rproxy.http.frontend.HTTPFrontend", "fe", 403, "10.0.0.7:5555")])

    def test_frontend_allow(self) -> None:
        """
        A client in the allow list goes on; one outside is refused.
        """
        proxy = Proxy({"allow": ["10.0.0.0/24"]})
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(proxy.connector.pending), 1)
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer="192.0.2.1")
        self.assertRefused(proxy, transport, "192.0.2.1", proxied=1)

    def test_verdicts_bounded(self) -> None:
        """
        The frontend list's answers are remembered per address, at most
        4096 of them.
        """
        proxy = Proxy({"allow": ["10.0.0.0/8"]})
        (access,) = [f for f in proxy.frontend.chain.request if type(f).__name__ == "AccessFilter"]
        for i in range(5000):
            proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", peer=f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(access._verdicts), 5000 - 4096)
        self.assertEqual(len(proxy.connector.pending), 5000)

    def test_route_lists(self) -> None:
        """
        A route's lists apply to the requests that take it, after the
        frontend's.
        """
        proxy = Proxy({"routes": [{"path_prefix": "/admin", "backend": "be", "allow": ["192.0.2.0/24"]}]})
        _, transport = proxy.send(b"GET /admin/x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertRefused(proxy, transport, "10.0.0.7")
        proxy.send(b"GET /public HTTP/1.1\r\nHost: h\r\n\r\n")
        proxy.send(b"GET /admin/x HTTP/1.1\r\nHost: h\r\n\r\n", peer="192.0.2.9")
        self.assertEqual(len(proxy.connector.pending), 2)

    def test_lists_see_the_forwarded_client(self) -> None:
        """
        Behind a trusted proxy the lists judge the client it names, not the
        proxy.
        """
        proxy = Proxy({"trusted_proxies": ["10.0.0.0/8"], "deny": ["203.0.113.0/24"]})
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
        self.assertRefused(proxy, transport, "203.0.113.9")
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n")
        self.assertEqual(len(proxy.connector.pending), 1)


class NormalTargetTests(SynchronousTestCase):
    """
    Routes, and the policies of the route taken, see the target in normal
    form, which is what the server is sent: a path spelt another way takes
    the route the server will read it as.
    """

    ROUTES = {"routes": [{"path_prefix": "/admin", "backend": "be", "deny": ["10.0.0.0/8"]}]}
    SPELLINGS = [b"/%61dmin", b"/%61%64min/x", b"//admin", b"/./admin", b"/x/../admin", b"/../admin",
                 b"/%2e%2E/admin", b"/static/%2e%2e/admin?q=1", b"http://h/admin", b"HTTP://h:80//admin"]

    def test_spellings_take_the_route(self) -> None:
        """
        Every spelling of /admin takes the /admin route, whose deny list
        refuses the client: nothing reaches the server.
        """
        proxy = Proxy(self.ROUTES)
        for target in self.SPELLINGS:
            _, transport = proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertEqual(answer(transport)[0], b"HTTP/1.1 403 Forbidden", target)
        self.assertEqual(proxy.connector.pending, [])
        self.assertEqual(proxy.frontend.refusals, {"access": len(self.SPELLINGS)})

    def test_server_gets_the_normal_form(self) -> None:
        """
        The server is sent the target that was matched; the query is left
        as it is and an encoded slash stays encoded.
        """
        proxy = Proxy(self.ROUTES)
        for target, sent in [(b"/%61dmin//a/./b/../c?x=/../%61", b"/admin/a/c?x=/../%61"),
                             (b"/a%2fb/%7Euser", b"/a%2Fb/~user"), (b"/plain?x", b"/plain?x")]:
            proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n", peer="192.0.2.1")
            self.assertTrue(proxy.upstream_head().startswith(b"GET " + sent + b" HTTP/1.1\r\n"), target)

    def test_absolute_form(self) -> None:
        """
        An absolute-form target is routed by its own host, not the Host
        field (RFC 9112 3.2.2), and goes on in origin form with that host.
        """
        proxy = Proxy({"routes": [{"host": "admin.example", "backend": "be", "deny": ["10.0.0.0/8"]}]})
        _, transport = proxy.send(b"GET http://Admin.Example/x HTTP/1.1\r\nHost: public.example\r\n\r\n")
        self.assertEqual(answer(transport)[0], b"HTTP/1.1 403 Forbidden")
        proxy.send(b"GET http://admin.example:8080/x/../y HTTP/1.1\r\nHost: public.example\r\n\r\n",
                   peer="192.0.2.1")
        head = proxy.upstream_head()
        self.assertTrue(head.startswith(b"GET /y HTTP/1.1\r\n"), head)
        self.assertIn(b"\r\nHost: admin.example:8080\r\n", head)
        self.assertNotIn(b"Host: public.example", head)

    def test_bad_targets(self) -> None:
        """
        A malformed percent-encoding, or an absolute URL of another scheme
        or with user information: 400, nothing forwarded.
        """
        proxy = Proxy(self.ROUTES)
        for target in (b"/%zzadmin", b"/admin%4", b"ftp://h/admin", b"http://u@h/admin"):
            _, transport = proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n", peer="192.0.2.1")
            self.assertEqual(answer(transport)[0], b"HTTP/1.1 400 Bad Request", target)
        self.assertEqual(proxy.connector.pending, [])

    def test_auth_and_redirect(self) -> None:
        """
        A route's auth and redirect apply to every spelling too.
        """
        proxy = Proxy({"routes": [
            {"path_prefix": "/admin", "backend": "be", "auth": {"api_keys": True}},
            {"path_prefix": "/old", "backend": "be", "redirect": {"location": "https://new.example{target}"}},
        ]})
        proxy.frontend.keys = FakeKeys()
        _, transport = proxy.send(b"GET //admin HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(answer(transport)[0], b"HTTP/1.1 401 Unauthorized")
        _, transport = proxy.send(b"GET /x/../%6Fld/a HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(answer(transport)[1][b"location"], [b"https://new.example/old/a"])
        self.assertEqual(proxy.connector.pending, [])


class DirectRouteTests(SynchronousTestCase):
    def test_own_backends_only(self) -> None:
        """
        A direct route reaches the servers of the frontend's own backends
        (its default and its routes'), not those of another frontend's
        backend; and its target is read in normal form.
        """
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": n, "health_check": {"type": "none"},
                          "servers": [{"address": f"127.0.0.1:{port}", "name": f"{n}1"}]}
                         for n, port in (("be", 8001), ("api", 8002), ("private", 8003))],
            "frontends": [
                {"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be",
                 "http": {"direct_routes": True}, "routes": [{"path_prefix": "/api", "backend": "api"}]},
                {"name": "internal", "protocol": "http", "listen": "127.0.0.1:0", "backend": "private",
                 "allow": ["192.168.0.0/16"]},
            ],
        })
        clock = MemoryReactorClock()
        pools = {b.name: Pool(b, clock) for b in config.backends}
        record: list[tuple[Any, ...]] = []
        connector = RecordingConnector(record)
        frontend = HTTPFrontend(config.frontends[0], pools, clock, clock, connector)  # type: ignore[arg-type]
        answers = []
        for target in (b"/backend/be1/x", b"/backend/api1/x", b"/backend/private1/x", b"//backend/%70rivate1/x"):
            conn = frontend.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5555))
            transport = RecordingTransport(record, "client")
            conn.makeConnection(transport)
            conn.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            answers.append(answer(transport)[0] if transport.value() else conn.exchange.pool.config.name)
        self.assertEqual(answers, ["be", "api", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 404 Not Found"])


class RedirectTests(SynchronousTestCase):
    def test_scheme(self) -> None:
        """
        redirect: {scheme: https} answers a plain-HTTP request with the
        status and the same host (without its port) and target over https;
        the answer has an empty body and the connection stays open.
        """
        proxy = Proxy({"redirect": {"scheme": "https", "status": 308}})
        _, transport = proxy.send(b"GET /a/b?c=d HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://example.com/a/b?c=d"
                                            b"\r\nVia: 1.1 rproxy\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(proxy.connector.pending, [])

    def test_port(self) -> None:
        """
        A port other than the scheme's default is named.
        """
        proxy = Proxy({"redirect": {"scheme": "https", "port": 8443, "status": 301}})
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
        self.assertEqual(answer(transport)[1][b"location"], [b"https://[::1]:8443/"])

    def test_already_there(self) -> None:
        """
        A request a trusted proxy says came over https is not redirected
        again; an untrusted peer's word is not taken.
        """
        proxy = Proxy({"redirect": {"scheme": "https"}, "trusted_proxies": ["10.0.0.0/8"]})
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n")
        self.assertEqual(len(proxy.connector.pending), 1)
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n", peer="192.0.2.1")
        self.assertEqual(answer(transport)[0], b"HTTP/1.1 308 Permanent Redirect")

    def test_location_and_routes(self) -> None:
        """
        A route's redirect replaces the frontend's: a location with the
        target in it, or none at all (redirect: false).
        """
        proxy = Proxy({"redirect": {"scheme": "https"}, "routes": [
            {"path_prefix": "/old", "backend": "be", "redirect": {"location": "https://new.example{target}",
                                                                   "status": 301}},
            {"path_prefix": "/.well-known/", "backend": "be", "redirect": False},
        ]})
        _, transport = proxy.send(b"GET /old/x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(answer(transport)[:2], (b"HTTP/1.1 301 Moved Permanently", {
            b"location": [b"https://new.example/old/x"], b"via": [b"1.1 rproxy"], b"content-length": [b"0"]}))
        proxy.send(b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(proxy.connector.pending), 1)

    def test_bad_host(self) -> None:
        """
        A Host that cannot be put in a Location is a 400, not a redirect.
        """
        proxy = Proxy({"redirect": {"scheme": "https"}})
        _, transport = proxy.send(b"GET / HTTP/1.1\r\nHost: evil.example/x@y\r\n\r\n")
        self.assertEqual(answer(transport)[0], b"HTTP/1.1 400 Bad Request")


class RewriteTests(SynchronousTestCase):
    def test_rewrite(self) -> None:
        """
        strip_prefix takes the prefix off the path only at a segment
        boundary; add_prefix goes in front; the query stays.
        """
        cases = [
            (b"/api/x?q=1", b"/v1/x?q=1"), (b"/api", b"/v1/"), (b"/api?q", b"/v1/?q"), (b"/apis/x", b"/v1/apis/x"),
            (b"*", b"*"), (b"http://h/api/x", b"http://h/api/x"),
        ]
        self.assertEqual([(t, rewrite(t, b"/api", b"/v1")) for t, _ in cases], cases)
        self.assertEqual(rewrite(b"/api/x", b"/api", None), b"/x")
        self.assertEqual(rewrite(b"/x", None, b"/v2"), b"/v2/x")

    def test_route_target(self) -> None:
        """
        The target sent on is the route's rewrite of the client's.
        """
        proxy = Proxy({"routes": [{"path_prefix": "/api", "backend": "be", "strip_prefix": "/api",
                                   "add_prefix": "/v1"}]})
        proxy.send(b"GET /api/users?page=2 HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(proxy.upstream_head().startswith(b"GET /v1/users?page=2 HTTP/1.1\r\n"))
        proxy.send(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(proxy.upstream_head().startswith(b"GET /other HTTP/1.1\r\n"))


class ApiKeyTests(SynchronousTestCase):
    KEY = b"sk-test-0123456789"

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.proxy = Proxy({"auth": {"api_keys": True}, "routes": [
            {"path_prefix": "/health", "backend": "be", "auth": False},
            {"path_prefix": "/", "backend": "be"},
        ]})
        self.keys = FakeKeys()
        self.proxy.frontend.keys = self.keys

    def bearer(self, key: bytes = KEY, path: bytes = b"/") -> tuple[Any, RecordingTransport]:
        return self.proxy.send(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + key + b"\r\n\r\n")

    def assertUnauthorized(self, transport: RecordingTransport, why: str) -> None:
        status, fields, body = answer(transport)
        self.assertEqual(status, b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(fields[b"www-authenticate"], [b"Bearer"])
        self.assertEqual(json.loads(body), {"error": why})

    def test_valid_key_waits(self) -> None:
        """
        The request waits on the lookup (no server asked meanwhile) and
        goes on when the chain finds the key.
        """
        _, transport = self.bearer()
        self.assertEqual(self.keys.asked, [self.KEY.decode()])
        self.assertEqual(self.proxy.connector.pending, [])
        self.keys.pending[0].callback(object())
        self.assertEqual(len(self.proxy.connector.pending), 1)
        self.assertIn(b"Authorization: Bearer " + self.KEY, self.proxy.upstream_head())

    def test_invalid_key(self) -> None:
        """
        A key the chain does not know: 401 with the Bearer challenge; the
        key is in no log event.
        """
        _, transport = self.bearer()
        self.keys.pending[0].callback(None)
        self.assertUnauthorized(transport, "invalid API key")
        self.assertEqual(self.proxy.frontend.refusals, {"auth": 1})
        self.assertTrue(self.events)
        self.assertFalse([e for e in self.events if self.KEY.decode() in repr(e)])

    def test_no_credentials(self) -> None:
        """
        No Authorization, another scheme or an empty key: 401 at once,
        nothing looked up.
        """
        for head in (b"", b"Authorization: Basic eDp5\r\n", b"Authorization: Bearer \r\n"):
            _, transport = self.proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
            self.assertUnauthorized(transport, "credentials required")
        self.assertEqual(self.keys.asked, [])

    def test_route_without_auth(self) -> None:
        """
        A route with auth: false needs no key.
        """
        self.proxy.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual((self.keys.asked, len(self.proxy.connector.pending)), ([], 1))

    def test_client_leaves(self) -> None:
        """
        A client that goes away during the lookup cancels it.
        """
        conn, transport = self.bearer()
        conn.connectionLost(None)
        self.assertEqual(self.keys.cancelled, 1)
        self.assertEqual(self.proxy.connector.pending, [])

    def test_lookup_fails(self) -> None:
        """
        A lookup that fails is a 503 with Retry-After and one logged
        failure; no keys yet (before the service sets them) is a 503 too.
        """
        _, transport = self.bearer()
        self.keys.pending[0].errback(RuntimeError("bug"))
        status, fields, _ = answer(transport)
        self.assertEqual((status, fields[b"retry-after"]), (b"HTTP/1.1 503 Service Unavailable", [b"1"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.proxy.frontend.keys = None
        _, transport = self.bearer()
        self.assertEqual(json.loads(answer(transport)[2]), {"error": "API keys are not loaded yet"})
        self.assertEqual(self.proxy.frontend.refusals, {"auth_unavailable": 2})

    def test_identical_lookups_shared(self) -> None:
        """
        Requests with the same key while its lookup is in flight wait on
        that one lookup; one of them leaving does not cancel it for the
        others, the last one leaving does.
        """
        first, _ = self.bearer()
        second, _ = self.bearer()
        self.bearer(b"sk-other")
        self.assertEqual(self.keys.asked, [self.KEY.decode(), "sk-other"])
        first.connectionLost(None)
        self.assertEqual(self.keys.cancelled, 0)
        self.keys.pending[0].callback(object())
        self.assertEqual(len(self.proxy.connector.pending), 1)
        self.bearer()  # (the lookup is over: a new one)
        self.assertEqual(len(self.keys.asked), 3)
        third, _ = self.bearer(b"sk-third")
        third.connectionLost(None)
        self.assertEqual(self.keys.cancelled, 1)
        self.bearer(b"sk-third")
        self.assertEqual(self.keys.asked[-2:], ["sk-third", "sk-third"])

    def test_lookups_capped(self) -> None:
        """
        At most 64 different keys are looked up at once: the next request
        gets 503 with Retry-After at once, counted; a slot freed is taken
        again.
        """
        for i in range(64):
            self.bearer(b"sk-%d" % i)
        _, transport = self.bearer(b"sk-64")
        status, fields, body = answer(transport)
        self.assertEqual((status, fields[b"retry-after"]), (b"HTTP/1.1 503 Service Unavailable", [b"1"]))
        self.assertEqual(json.loads(body), {"error": "too many API key lookups under way"})
        self.assertEqual((len(self.keys.asked), self.proxy.frontend.refusals), (64, {"auth_unavailable": 1}))
        self.keys.pending[0].callback(None)
        self.bearer(b"sk-64")
        self.assertEqual(len(self.keys.asked), 65)

    def test_static_chain(self) -> None:
        """
        With the static keys alone (no stores) the same chain answers.
        """
        self.proxy.frontend.keys = key_chain(StaticKeys([ApiKeyConfig(key=self.KEY.decode(), name="k")]))
        self.assertIsInstance(self.proxy.frontend.keys, KeyChain)
        self.bearer()
        self.assertEqual(len(self.proxy.connector.pending), 1)
        _, transport = self.bearer(b"sk-wrong")
        self.assertUnauthorized(transport, "invalid API key")


class Threads:
    """
    The runs a PasswordChecker hands to "threads": the test finishes them
    (C{finish}), with the real hash check or an exception.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[Any, tuple[Any, ...], defer.Deferred[bool]]] = []

    def run(self, f: Any, *args: Any) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.runs.append((f, args, d))
        return d

    def finish(self, error: Exception | None = None) -> None:
        f, args, d = self.runs.pop(0)
        if error is not None:
            d.errback(error)
        else:
            d.callback(f(*args))


class BasicAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"alice:{BCRYPT_SECRET}\nbob:{ARGON2_HUNTER2}\n")
        self.proxy = Proxy({"auth": {"basic": {"users_file": path, "realm": "staff", "cache_ttl": "10s"}}})
        self.threads = Threads()
        self.checker = PasswordChecker(self.proxy.clock, self.threads.run, max_pending=2)
        self.patch(self.proxy.frontend.chain.request[0], "passwords", self.checker)

    def get(self, credentials: bytes) -> RecordingTransport:
        return self.proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n" + credentials + b"\r\n")[1]

    def assertUnauthorized(self, transport: RecordingTransport) -> None:
        status, fields, body = answer(transport)
        self.assertEqual(status, b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(fields[b"www-authenticate"], [b'Basic realm="staff", charset="UTF-8"'])

    def test_bcrypt_and_argon2(self) -> None:
        """
        A right password (bcrypt or argon2) lets the request on once its
        check, run off the reactor, says so.
        """
        self.get(basic("alice", "secret"))
        self.assertEqual(self.proxy.connector.pending, [])
        self.threads.finish()
        self.get(basic("bob", "hunter2"))
        self.threads.finish()
        self.assertEqual(len(self.proxy.connector.pending), 2)

    def test_wrong_password(self) -> None:
        """
        A wrong password, an unknown user (checked all the same, against a
        real hash), or credentials that are not base64 user:password: 401.
        """
        transport = self.get(basic("alice", "wrong"))
        self.threads.finish()
        self.assertUnauthorized(transport)
        transport = self.get(basic("mallory", "secret"))
        self.assertEqual(len(self.threads.runs), 1)
        self.threads.finish()
        self.assertUnauthorized(transport)
        for bad in (b"Authorization: Basic !!!\r\n", b"Authorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n"):
            self.assertUnauthorized(self.get(bad))
        self.assertEqual(self.threads.runs, [])
        self.assertEqual(self.proxy.frontend.refusals, {"auth": 4})

    def test_cached(self) -> None:
        """
        A success is remembered for cache_ttl: the same credentials again
        need no check until it ends.
        """
        self.get(basic("alice", "secret"))
        self.threads.finish()
        self.get(basic("alice", "secret"))
        self.assertEqual((self.threads.runs, len(self.proxy.connector.pending)), ([], 2))
        self.proxy.clock.advance(11)
        self.get(basic("alice", "secret"))
        self.assertEqual(len(self.threads.runs), 1)

    def test_too_busy(self) -> None:
        """
        Past max_pending checks under way, a request is answered 503 at
        once.
        """
        self.get(basic("alice", "a"))
        self.get(basic("alice", "b"))
        transport = self.get(basic("alice", "c"))
        self.assertEqual(answer(transport)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(self.proxy.frontend.refusals, {"auth_unavailable": 1})


class PasswordCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.threads = Threads()
        self.checker = PasswordChecker(self.clock, self.threads.run, max_pending=2, cache_size=2)

    def test_check_hash(self) -> None:
        """
        bcrypt ($2y$ as htpasswd writes it) and argon2id hashes are
        checked; a malformed hash matches nothing; bcrypt reads 72 bytes.
        """
        self.assertTrue(check_hash(b"secret", BCRYPT_SECRET))
        self.assertFalse(check_hash(b"secreT", BCRYPT_SECRET))
        self.assertTrue(check_hash(b"hunter2", ARGON2_HUNTER2))
        self.assertFalse(check_hash(b"hunter3", ARGON2_HUNTER2))
        self.assertFalse(check_hash(b"x", "$argon2id$v=19$m=8,t=1,p=1$AAAA$BBBB"))
        self.assertFalse(check_hash(b"x", "$2y$04$" + "." * 53))
        import bcrypt

        long = bcrypt.hashpw(b"p" * 72, bcrypt.gensalt(4)).decode()
        self.assertTrue(check_hash(b"p" * 100, long))

    def test_shared_run(self) -> None:
        """
        Identical checks in flight share one run; every caller gets its
        answer.
        """
        first = self.checker.verify("u", b"secret", BCRYPT_SECRET, 5)
        second = self.checker.verify("u", b"secret", BCRYPT_SECRET, 5)
        self.assertEqual(len(self.threads.runs), 1)
        self.threads.finish()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (True, True))

    def test_failures_not_cached(self) -> None:
        """
        A failed check is run again next time.
        """
        self.checker.verify("u", b"nope", BCRYPT_SECRET, 5)
        self.threads.finish()
        self.checker.verify("u", b"nope", BCRYPT_SECRET, 5)
        self.assertEqual(len(self.threads.runs), 1)

    def test_bounded(self) -> None:
        """
        The cache keeps cache_size successes (the least recent go); at
        max_pending runs a new check fails with TooBusy.
        """
        for password in (b"a", b"b", b"c"):
            self.checker.verify("u", password, BCRYPT_SECRET, 5)
            self.threads.runs.pop()[2].callback(True)
        self.assertEqual(len(self.checker._cache), 2)
        self.checker.verify("u", b"a", BCRYPT_SECRET, 5)
        self.assertEqual(len(self.threads.runs), 1)  # "a" was dropped
        self.checker.verify("u", b"x", BCRYPT_SECRET, 5)
        self.failureResultOf(self.checker.verify("u", b"y", BCRYPT_SECRET, 5), TooBusy)

    def test_cancelled_waiter(self) -> None:
        """
        A caller that cancels gets CancelledError; the run still ends and
        frees its place.
        """
        d = self.checker.verify("u", b"secret", BCRYPT_SECRET, 5)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.threads.finish()
        self.assertEqual(self.checker.pending, 0)

    def test_error(self) -> None:
        """
        A run that raises fails its callers.
        """
        d = self.checker.verify("u", b"secret", BCRYPT_SECRET, 5)
        self.threads.finish(RuntimeError("boom"))
        self.failureResultOf(d, RuntimeError)


class StickyCookieTests(SynchronousTestCase):
    def test_cookie(self) -> None:
        """
        The cookie carries the server's opaque id (not its name or address)
        with HttpOnly and SameSite=Lax, and Secure on a TLS frontend; a
        request carrying it prefers that server.
        """
        proxy = Proxy({"http": {"sticky_cookie": "SRV", "sticky_secret": "k"}}, servers=3)
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        upstream = proxy.connector.connect()
        upstream.dataReceived(OK)
        sid = server_id(b"k", "be", "s0")
        written = b"".join(r[1] for r in proxy.record if r[0] == "client.write")
        self.assertIn(b"\r\nSet-Cookie: SRV=" + sid + b"; Path=/; HttpOnly; SameSite=Lax\r\n", written)
        # the field written names neither the server's address nor its name
        [cookie] = [line for line in written.split(b"\r\n") if line.lower().startswith(b"set-cookie:")]
        for secret in (b"127.0.0.1", b":8001", b"s0"):
            self.assertNotIn(secret, cookie)

    def test_secure_on_tls(self) -> None:
        """
        On a TLS frontend the cookie is also Secure.
        """
        from tests.support import self_signed_pem

        pem = self.mktemp()
        self_signed_pem(pem)
        proxy = Proxy({"tls": {"cert": pem, "key": pem}, "http": {"sticky_cookie": "SRV"}})
        proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        proxy.connector.connect().dataReceived(OK)
        written = b"".join(r[1] for r in proxy.record if r[0] == "client.write")
        self.assertIn(b"; Path=/; HttpOnly; SameSite=Lax; Secure\r\n", written)

    def test_prefer(self) -> None:
        """
        A known id makes its server preferred; a forged id, or one of
        another backend, is ignored.
        """
        proxy = Proxy({"http": {"sticky_cookie": "SRV", "sticky_secret": "k"}}, servers=3)
        for cookie, prefer in [(server_id(b"k", "be", "s2"), "s2"), (b"0123456789abcdef0123", None),
                               (server_id(b"k", "other", "s1"), None), (b"s1", None)]:
            conn, _ = proxy.send(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=b; SRV=" + cookie + b"\r\n\r\n")
            self.assertEqual(conn.exchange.prefer, prefer, cookie)

    def test_process_secret(self) -> None:
        """
        Without sticky_secret the ids are keyed per process: the same for
        two filters of one process, and not a plain hash of the names.
        """
        a, b = StickyCookie(b"SRV"), StickyCookie(b"SRV")
        self.assertEqual(a.id_of("be", "s0"), b.id_of("be", "s0"))
        self.assertNotEqual(a.id_of("be", "s0"), server_id(b"", "be", "s0"))
