"""
Pooled upstream connections across a reload that moves a server (its
address, the backend's TLS or PROXY header changed, or it left): none
serves another request (L{rproxy.http.upstream.UpstreamPool.moved}, heard
through L{rproxy.pool.Pool.on_moved}); the real HTTP engine on fake
transports and a fake clock.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import error
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import UpstreamTLSConfig
from rproxy.handoff import HeaderFirstFactory
from tests.test_http_frontend import GET, OK, Harness


def reloaded(h: Harness, **changes: Any) -> None:
    """
    Reload the harness's backend with C{changes} (as the service does:
    L{Pool.update}), its pool's moves heard by the upstream pool.
    """
    h.pool.on_moved(h.upstreams.moved)
    h.pool.update(attrs.evolve(h.pool.config, **changes))


def moved_to(h: Harness, port: int) -> tuple[Any, ...]:
    """The backend's servers with s0 at 127.0.0.1:C{port}."""
    s0 = h.pool.config.servers[0]
    return (attrs.evolve(s0, address=f"127.0.0.1:{port}", port=port),)


class MovedServerTests(SynchronousTestCase):
    def served(self, h: Harness, conn: Any = None) -> tuple[Any, Any, Any]:
        """
        One request from a client (C{conn}, else a new one) that needs a
        new upstream connection; that connection, its transport, the
        client's.
        """
        if conn is None:
            conn, client = h.client()
        else:
            client = conn.transport
        conn.dataReceived(GET)
        upstream, server = h.upstream()
        upstream.dataReceived(OK)
        return upstream, server, client

    def test_idle_connection_closed_at_reload(self) -> None:
        """
        A kept-alive connection to a server's old address closes at the
        reload; the next request connects to the new address.
        """
        h = Harness()
        upstream, server, _ = self.served(h)
        self.assertEqual(h.upstreams.idle_count(), 1)
        reloaded(h, servers=moved_to(h, 8002))
        self.assertTrue(server.disconnecting)
        self.assertEqual(h.upstreams.idle_count(), 0)
        conn, client = h.client()
        conn.dataReceived(GET)
        self.assertEqual(h.connects(), [("127.0.0.1", 8002)])

    def test_busy_connection_not_kept(self) -> None:
        """
        A connection with a request in flight at the reload answers it,
        then closes instead of going back to the pool.
        """
        h = Harness()
        conn, client = h.client()
        conn.dataReceived(GET)
        upstream, server = h.upstream()
        reloaded(h, servers=moved_to(h, 8002))
        upstream.dataReceived(OK)
        self.assertTrue(client.value().endswith(b"\r\n\r\nok"))
        self.assertTrue(server.disconnecting)
        self.assertEqual(h.upstreams.idle_count(), 0)
        conn.dataReceived(GET)
        self.assertEqual(h.connects(), [("127.0.0.1", 8002)])

    def test_unchanged_server_keeps_connection(self) -> None:
        """A reload that changes no address, TLS or PROXY header keeps the idle connection for the next request."""
        h = Harness()
        upstream, server, _ = self.served(h)
        reloaded(h, queue_size=10)
        self.assertFalse(server.disconnecting)
        conn, _ = h.client()
        conn.dataReceived(GET)
        self.assertEqual(h.connects(), [])
        self.assertEqual(server.value().count(b"GET /x"), 2)

    def test_tls_turned_on(self) -> None:
        """Backend tls: added: the plain idle connection closes; the next one speaks TLS."""
        h = Harness()
        _, server, _ = self.served(h)
        reloaded(h, tls=UpstreamTLSConfig(verify=False))
        self.assertTrue(server.disconnecting)
        conn, _ = h.client()
        conn.dataReceived(GET)
        [(_, _, factory, _, _)] = h.clock.tcpClients
        self.assertIsInstance(factory, TLSMemoryBIOFactory)

    def test_send_proxy_turned_on(self) -> None:
        """
        send_proxy added: the idle connection (opened without a header)
        closes, and the next request gets a connection that starts with one.
        """
        h = Harness()
        _, server, _ = self.served(h)
        reloaded(h, send_proxy="v1")
        self.assertTrue(server.disconnecting)
        conn, _ = h.client()
        conn.dataReceived(GET)
        [(_, _, factory, _, _)] = h.clock.tcpClients
        self.assertIsInstance(factory, HeaderFirstFactory)

    def test_removed_server_connections(self) -> None:
        """A server the reload removes: its idle connection closes and the pool forgets it."""
        h = Harness(servers=[{"address": "127.0.0.1:8001", "name": "s0"}, {"address": "127.0.0.1:8002", "name": "s1"}])
        _, server, _ = self.served(h)
        s0 = h.pool.servers[0]
        reloaded(h, servers=h.pool.config.servers[1:])
        self.assertTrue(server.disconnecting)
        self.assertNotIn(s0, h.upstreams.idle)

    def test_open_connections_forgotten(self) -> None:
        """Connections closed or never connected leave no trace in the pool's record of open ones."""
        h = Harness()
        upstream, _, _ = self.served(h)
        conn, _ = h.client()
        upstream.connectionLost(Failure(error.ConnectionDone()))
        conn.dataReceived(GET)
        h.refuse()
        self.assertEqual(h.upstreams.open, {})
