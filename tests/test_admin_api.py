"""
The admin API without a network: its resource tree through
C{treq.testing.StubTreq}, and the admin site's requests (a refused body is
answered from the head) on a L{StringTransport}.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rproxy.admin import AdminRoot, build_admin_site
from rproxy.adminhttp import MAX_BODY
from rproxy.config import config_from_mapping
from rproxy.service import RProxyService


def service_of(admin: dict[str, Any], **more: Any) -> RProxyService:
    """
    An RProxyService that is built but not started: its admin tree answers
    from its configuration, with no store behind it.
    """
    config = config_from_mapping({"admin": {"listen": "tcp:0:interface=127.0.0.1", **admin}, **more})
    return RProxyService(config, MemoryReactorClock(), registry=CollectorRegistry())


class NotConfiguredTests(SynchronousTestCase):
    """
    Without C{stores.postgres} the database resources say so: no retry
    would help, so it is not the 503 of a store that is down.
    """

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        stub = StubTreq(AdminRoot(service_of({})))
        response = self.successResultOf(stub.request(method, "http://admin" + path, **kw))
        return response.code, json.loads(self.successResultOf(stub.content(response)))

    def test_keys_not_configured(self) -> None:
        """
        The key API answers 501 naming the missing setting, for every method.
        """
        expected = (501, {"error": "the key store (stores.postgres) is not configured"})
        self.assertEqual(self.call("GET", "/api/v1/keys"), expected)
        self.assertEqual(self.call("POST", "/api/v1/keys", data=b'{"name": "x"}'), expected)
        self.assertEqual(self.call("DELETE", "/api/v1/keys/1"), expected)

    def test_database_resources_not_configured(self) -> None:
        """
        Backends, stats and known agents answer 501 as well.
        """
        for path in ("/api/v1/backends", "/api/v1/backends/s1", "/api/v1/stats", "/api/v1/agents/known"):
            self.assertEqual(self.call("GET", path),
                             (501, {"error": "the database (stores.postgres) is not configured"}), path)

    def test_no_key_is_an_open_api(self) -> None:
        """
        With no C{admin.api_key} the API needs no Authorization.
        """
        self.assertEqual(self.call("GET", "/api/v1/models"), (200, {"data": [], "object": "list"}))


class EarlyRefusalTests(SynchronousTestCase):
    """
    The admin site answers a body it will not read from the request head:
    401 without the key, 413 past L{MAX_BODY}; either closes the connection.
    """

    def connect(self, api_key: str | None = "adm") -> StringTransport:
        admin = {"api_key": api_key} if api_key is not None else {}
        self.service = service_of(admin)
        self.protocol = build_admin_site(self.service).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(transport)
        return transport

    def answer(self, transport: StringTransport) -> tuple[int, dict[bytes, bytes], Any]:
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines[1:])}
        return int(lines[0].split()[1]), fields, json.loads(body)

    def test_body_without_key(self) -> None:
        """
        A POST announcing 10 GB without the key gets 401 as soon as its head
        is in, and the connection closes; later body bytes add nothing.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\n\r\n")
        status, fields, body = self.answer(transport)
        self.assertEqual((status, body), (401, {"error": "missing or invalid bearer token"}))
        self.assertEqual((fields[b"connection"], fields[b"www-authenticate"]), (b"close", b'Bearer realm="rproxy"'))
        self.assertTrue(transport.disconnecting)
        written = transport.value()
        self.protocol.dataReceived(b"x" * 100000)
        self.assertEqual(transport.value(), written)

    def test_wrong_key_with_expect_continue(self) -> None:
        """
        A wrong key with C{Expect: 100-continue} gets the 401 and no
        "100 Continue" invitation to send the body.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"PUT /api/v1/backends/a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer nope\r\n"
                                   b"Expect: 100-continue\r\nContent-Length: 20\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        self.assertNotIn(b"100 Continue", transport.value())

    def test_chunked_body_without_key(self) -> None:
        """
        A chunked body (no length announced) without the key is refused
        from the head too.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.answer(transport)[0], 401)

    def test_announced_body_too_large(self) -> None:
        """
        With the key, a Content-Length past 64 KiB gets 413 from the head.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer adm\r\n"
                                   b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        status, fields, body = self.answer(transport)
        self.assertEqual((status, body, fields[b"connection"]), (413, {"error": "the body is larger than 64 KiB"}, b"close"))
        self.assertTrue(transport.disconnecting)

    def test_open_api_bounds_the_body(self) -> None:
        """
        With no key configured the size bound still holds.
        """
        transport = self.connect(api_key=None)
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n")
        self.assertEqual(self.answer(transport)[0], 413)

    def test_chunked_body_too_large(self) -> None:
        """
        A chunked body is cut with 413 once it passes 64 KiB, before the
        request reaches a resource.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer adm\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (32 * 1024, b"{" * 32 * 1024)
        self.protocol.dataReceived(chunk * 2)
        self.assertEqual(transport.value(), b"")
        self.protocol.dataReceived(chunk + b"0\r\n\r\n")
        self.assertEqual(self.answer(transport)[:3:2], (413, {"error": "the body is larger than 64 KiB"}))
        self.assertTrue(transport.disconnecting)

    def test_small_body_with_key_reaches_the_api(self) -> None:
        """
        A small body with the right key is read and answered by the resource
        (here: no store configured).
        """
        transport = self.connect()
        self.protocol.dataReceived(b"POST /api/v1/keys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer adm\r\n"
                                   b"Content-Length: 13\r\n\r\n{\"name\": \"x\"}")
        status, _, body = self.answer(transport)
        self.assertEqual((status, body), (501, {"error": "the key store (stores.postgres) is not configured"}))
        self.assertFalse(transport.disconnecting)

    def test_probes_need_no_key(self) -> None:
        """
        Requests without a body are not touched: probes answer without the key.
        """
        transport = self.connect()
        self.protocol.dataReceived(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.answer(transport)[:3:2], (200, {"status": "ok"}))

    def test_timeouts_on_the_service_reactor(self) -> None:
        """
        The channels' idle timeouts run on the service's reactor, not the
        global one: an idle admin connection is closed when its clock says so.
        """
        transport = self.connect()
        clock = self.service.reactor
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)
