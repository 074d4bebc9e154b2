"""
L{rproxy.admission.Admission} on its own, with recording connections and a
fake clock: slots, the queue, refusals, the idle sweep and the drain.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.admission import Admission, ConnectionLimit


@attrs.frozen
class Limits:
    name: str = "fe"
    max_connections: int = 2
    queue_size: int = 1
    queue_timeout: float = 5.0
    idle_timeout: float = 0.0


class Conn:
    """
    A connection that records what admission asks of it.
    """

    def __init__(self, record: list[tuple[str, str]], name: str) -> None:
        self.record = record
        self.name = name
        self.counted = False
        self.quiet_ticks = 0
        self.last_total = -1
        self.queue_timer: Any = None
        self.moved = 0
        self.busy = False

    def start(self) -> None:
        self.counted = True
        self.record.append((self.name, "start"))

    def activity(self) -> int | None:
        return None if self.busy else self.moved

    def idle_abort(self) -> None:
        self.record.append((self.name, "abort"))

    def refuse(self) -> None:
        self.record.append((self.name, "refuse"))

    def peer_name(self) -> str:
        return self.name


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.record: list[tuple[str, str]] = []

    def admission(self, **limits: Any) -> Admission:
        return Admission("fe", Limits(**limits), self.clock, ConnectionLimit(100))

    def test_slots_then_queue_then_refusal(self) -> None:
        """Two start, the third waits, the fourth is refused; a close starts the waiter."""
        a = self.admission()
        conns = [Conn(self.record, f"c{i}") for i in range(4)]
        for conn in conns:
            a.admit(conn)
        self.assertEqual(self.record, [("c0", "start"), ("c1", "start"), ("c3", "refuse")])
        self.assertEqual((a.active, len(a.waiting), a.refused_total, a.total), (2, 1, 1, 4))
        a.forget(conns[0])
        self.assertEqual(self.record[-1], ("c2", "start"))
        self.assertIsNone(conns[2].queue_timer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queue_timeout(self) -> None:
        """A waiter not started within queue_timeout is refused."""
        a = self.admission(max_connections=1)
        first, waiter = Conn(self.record, "c0"), Conn(self.record, "c1")
        a.admit(first)
        a.admit(waiter)
        self.clock.advance(5)
        self.assertEqual(self.record, [("c0", "start"), ("c1", "refuse")])
        self.assertEqual((len(a.waiting), a.refused_total), (0, 1))

    def test_process_limit_shared(self) -> None:
        """The process-wide limit counts every admission's connections."""
        limit = ConnectionLimit(1)
        a = Admission("a", Limits(), self.clock, limit)
        b = Admission("b", Limits(), self.clock, limit)
        a.admit(Conn(self.record, "a0"))
        b.admit(Conn(self.record, "b0"))
        self.assertEqual(self.record, [("a0", "start")])
        self.assertEqual(len(b.waiting), 1)

    def test_idle_sweep(self) -> None:
        """A connection quiet for four sweeps is cut; a busy one is not."""
        a = self.admission(idle_timeout=4.0)
        quiet, busy = Conn(self.record, "quiet"), Conn(self.record, "busy")
        busy.busy = True
        a.admit(quiet)
        a.admit(busy)
        for _ in range(5):
            self.clock.advance(1)
        self.assertEqual(self.record[2:], [("quiet", "abort")])
        self.assertEqual(a.idle_closed, 1)

    def test_drain(self) -> None:
        """
        A drain refuses waiters and newcomers, fires when the last
        connection goes, and cuts what is left at the end of the grace.
        """
        a = self.admission(max_connections=1)
        first, waiter = Conn(self.record, "c0"), Conn(self.record, "c1")
        a.admit(first)
        a.admit(waiter)
        drained = a.drain(10)
        self.assertEqual(self.record, [("c0", "start"), ("c1", "refuse")])
        a.forget(waiter)
        late = Conn(self.record, "late")
        a.admit(late)
        a.forget(late)
        self.assertEqual(self.record[-1], ("late", "refuse"))
        self.assertNoResult(drained)
        self.clock.advance(10)
        self.assertEqual(self.record[-1], ("c0", "abort"))
        a.forget(first)
        self.successResultOf(drained)


class CompositionTests(SynchronousTestCase):
    """
    The TCP frontend, the HTTP frontend and a tunnel's public port each own
    an Admission (none inherits another's fields).
    """

    def test_every_listener_owns_one(self) -> None:
        """Each kind of listener's admission is an Admission; the HTTP frontend is no TCP frontend."""
        from rproxy.config import config_from_mapping
        from rproxy.http.frontend import HTTPFrontend
        from rproxy.http.upstream import UpstreamPool
        from rproxy.pool import Pool
        from rproxy.tcp import TCPFrontend
        from rproxy.tunnel.config import TunnelConfig
        from rproxy.tunnel.registry import StaticKeys
        from rproxy.tunnel.server import TunnelServer

        clock = Clock()
        config = config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "be", "servers": ["127.0.0.1:9"], "health_check": {"type": "none"}}],
            "frontends": [{"name": "fe", "listen": "127.0.0.1:0", "backend": "be"},
                          {"name": "h", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be"}],
        })
        pool = Pool(config.backends[0], clock)
        tcp = TCPFrontend(config.frontends[0], pool, clock, clock)
        http = HTTPFrontend(config.frontends[1], {"be": pool}, clock, clock, UpstreamPool(clock, clock))
        tcp_tunnel = TunnelServer(TunnelConfig(name="t"), StaticKeys([]), None, clock)
        http_tunnel = TunnelServer(TunnelConfig(name="h", mode="http"), StaticKeys([]), None, clock)
        assert http_tunnel.http is not None
        for admission in (tcp.admission, http.admission, tcp_tunnel.admission, http_tunnel.http.admission):
            self.assertIsInstance(admission, Admission)
        self.assertNotIsInstance(http, TCPFrontend)

    def test_tunnel_public_port_drains(self) -> None:
        """
        A mode tcp public connection is admitted (and asks for an agent);
        the tunnel's drain cuts it at the end of the grace period and ends
        once it is gone.
        """
        from twisted.internet import error
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure

        from rproxy.tunnel.config import TunnelConfig
        from rproxy.tunnel.registry import StaticKeys
        from rproxy.tunnel.server import TunnelServer
        from rproxy.tunnel.streams import PublicProtocol

        clock = Clock()
        tunnel = TunnelServer(TunnelConfig(name="t"), StaticKeys([]), None, clock)
        public = PublicProtocol(tunnel)
        transport = StringTransport()
        transport.abortConnection = lambda: self.record.append(("public", "abort"))  # type: ignore[method-assign]
        self.record: list[tuple[str, str]] = []
        public.makeConnection(transport)
        self.assertEqual((tunnel.admission.active, tunnel.public_connections), (1, {public}))
        # no agent: the connection is closed (loseConnection), still open until lost
        drained = tunnel.admission.drain(5.0)
        clock.advance(5.0)
        self.assertEqual(self.record, [("public", "abort")])
        self.assertNoResult(drained)
        public.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(drained)
        self.assertEqual(tunnel.admission.active, 0)
