"""
The L4 (TCP) frontend.

For each accepted client connection: hold its bytes (reading paused), take
a frontend slot (waiting in a bounded queue past C{max_connections}), take
a server slot from the pool (waiting in the pool's queue when every server
is full), connect with C{connect_timeout}, and on failure try another
server, at most C{retries} more times.  Once connected, the two
connections are spliced (L{rproxy.splice}).  A connection idle for
C{idle_timeout} in both directions is closed.

Options: C{allow}/C{deny} lists refuse a client at accept, before any
server is chosen (with C{proxy_protocol}, the address checked is the
client's from the header: the wrapper in L{rproxy.handoff} builds this
protocol only once it is read); C{send_proxy: v1|v2} on the backend
writes a PROXY protocol header to the server before the client's bytes;
C{tls_passthrough} chooses the backend from the SNI of the client's
ClientHello without terminating TLS (L{rproxy.passthrough}); C{access_log}
writes one line per connection (L{rproxy.l4log}).

L{TCPFrontend} is the factory; it knows its open connections so that a
reload or a shutdown can drain them.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admission import Admission, AdmittedFigures, ConnectionLimit
from rproxy.config import FrontendConfig
from rproxy.l4log import L4Log
from rproxy.passthrough import SNIRouting
from rproxy.pool import NoServerAvailable, Pool, QueueFull, QueueTimeout, Server
from rproxy.proxyproto import header_for
from rproxy.shortage import ShortageLog, is_local
from rproxy.splice import EarlyDataEnd, SpliceEnd
from rproxy.tls import tls_failure
from rproxy.transport import connect_tcp

__all__ = ["TCPFrontend", "ClientConnection", "ConnectionLimit"]


class BackendConnection(SpliceEnd):
    """
    The connection to the chosen server.
    """

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        client = self.client
        version = client.pool.config.send_proxy
        if version is not None and not client.lost:
            # before anything of the client's (HAProxy's send-proxy)
            client_transport = client.transport
            self.transport.write(  # type: ignore[union-attr]
                header_for(version, client_transport.getPeer(), client_transport.getHost()))  # type: ignore[union-attr]
        client.backend_connected(self)

    def readConnectionLost(self) -> None:
        if self.client is not None and self.client.termination is None:
            self.client.termination = "server-closed"
        super().readConnectionLost()

    def end_lost(self, reason: Failure) -> None:
        if self.client.termination is None:
            self.client.termination = "server-closed"
        self.client.backend_lost(self)

    def unlink(self) -> None:
        super().unlink()
        self.client = None  # type: ignore[assignment]


def _cancelled(reason: Failure) -> bool:
    """
    Whether a connect failed because we stopped it (C{stopConnecting}: a
    C{UserError}), not because the server did not answer: a connect
    timeout is a C{UserError} too (Twisted's C{TimeoutError} subclasses
    it), and must count against the server and close or retry the client.
    """
    return reason.check(error.UserError) is not None and reason.check(error.TimeoutError) is None


class _BackendFactory(ClientFactory):
    protocol = None  # type: ignore[assignment]
    noisy = False

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> BackendConnection:
        return BackendConnection(self.client)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.client.connect_failed(reason)


class ClientConnection(SNIRouting, EarlyDataEnd):
    """
    An accepted client connection of a TCP frontend.

    Bytes the client sends before the server connection is up are kept
    (up to L{EARLY_DATA_LIMIT}, then reading pauses) and written to the
    server first; a FIN sent that early is passed on after them.
    """

    server: Server | None = None
    pool: Pool
    backend: BackendConnection | None = None
    _acquiring: defer.Deferred[Server] | None = None
    _connector: object = None
    queue_timer: IDelayedCall | None = None
    quiet_ticks = 0
    last_total = -1
    counted = False
    closing = False
    # for the L4 log: why it ended (rproxy.l4log.TERMINATIONS), when it
    # was accepted, got a server, connected; what it was connected to
    termination: str | None = None
    # (the times and the client's address are read only for the access
    # log and allow/deny: a frontend with neither pays nothing for them)
    logged = False
    accepted_at: float | None = None
    client_host = "-"
    client_port = 0
    chosen_at: float | None = None
    connected_at: float | None = None
    backend_name: str | None = None
    server_name: str | None = None
    backend_received = 0

    def __init__(self, frontend: TCPFrontend) -> None:
        self.frontend = frontend
        self.tried: list[str] = []

    # -- lifecycle -------------------------------------------------------

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        frontend = self.frontend
        access = frontend.config.access
        if access is not None or frontend.l4_log is not None:
            if frontend.l4_log is not None:
                self.logged = True
                self.accepted_at = frontend.clock.seconds()
            peer = self.transport.getPeer()  # type: ignore[union-attr]
            self.client_host = getattr(peer, "host", "unix")
            self.client_port = getattr(peer, "port", 0)
            if access is not None and not access.permits(self.client_host):
                frontend.denied(self)
                return
        frontend.admit(self)

    def start(self) -> None:
        """
        The frontend gave this connection a slot: find it a server (after
        reading the ClientHello's SNI with C{tls_passthrough}).
        """
        self.counted = True
        passthrough = self.frontend.config.tls_passthrough
        if passthrough is not None:
            self.await_hello(passthrough)
            return
        self._acquire()

    # -- choosing and connecting -----------------------------------------

    def _acquire(self) -> None:
        pool = self.pool = self.routed_pool or self.frontend.pool
        key = None
        if pool.config.algorithm in ("ip-hash", "hash"):
            key = self.transport.getPeer().host.encode()  # type: ignore[union-attr]
        server = pool.try_acquire(key, self.tried)
        if server is not None:
            self._connect(server)
            return
        d = pool.acquire(key, self.tried)
        self._acquiring = d
        d.addCallbacks(self._connect, self._no_server)
        d.addErrback(self._pick_failed)

    def _pick_failed(self, reason: Failure) -> None:
        """
        Going on with a chosen server raised: a bug, logged; the client is
        closed rather than left waiting with its reading paused.
        """
        self.frontend.log.failure(
            "frontend {frontend}: going on with {server} failed", reason,
            frontend=self.frontend.name, server=self.server.name if self.server is not None else "?",
        )
        if self.server is not None:
            server, self.server = self.server, None
            self.pool.release(server)
        if not self.lost:
            self._abort()

    def _no_server(self, reason: Failure) -> None:
        self._acquiring = None
        if reason.check(defer.CancelledError):
            return
        self.frontend.refused(self, reason.value)
        self.termination = "no-server"
        if reason.check(NoServerAvailable, QueueFull, QueueTimeout):
            self.frontend.log.info(
                "frontend {frontend}: closing {peer}: {why}",
                frontend=self.frontend.name, peer=_peer(self.transport), why=reason.getErrorMessage(),
            )
        else:
            self.frontend.log.failure(
                "frontend {frontend}: choosing a server failed", reason, frontend=self.frontend.name
            )
        self._abort()

    def _connect(self, server: Server) -> None:
        self._acquiring = None
        if self.lost:
            self.pool.release(server)
            return
        self.server = server
        self.tried.append(server.name)
        frontend = self.frontend
        if self.logged:
            self.chosen_at = frontend.clock.seconds()
            self.backend_name = self.pool.config.name
            self.server_name = server.name
        self._connector = connect_tcp(
            frontend.reactor, server.host, server.port, _BackendFactory(self), frontend.config.connect_timeout
        )

    def connect_failed(self, reason: Failure) -> None:
        self._connector = None
        server = self.server
        assert server is not None
        self.server = None
        pool = self.pool
        if self.lost or _cancelled(reason):
            # we gave up (the client left), the server did nothing wrong
            pool.release(server)
            return
        self.termination = "connect-failed"
        if is_local(reason):
            # our own shortage (descriptors, ...): not the server's fault,
            # and another server would fail the same way
            pool.release(server)
            self.frontend.shortage_failed(reason)
            self._abort()
            return
        why = reason.getErrorMessage()
        pool.record_failure(server, why)
        pool.release(server)
        self.frontend.connect_errors += 1
        if len(self.tried) <= self.frontend.config.retries and pool.any_up(self.tried):
            self.termination = None
            self._acquire()
            return
        self.frontend.log.info(
            "frontend {frontend}: closing {peer}: connecting to {server} failed: {why}",
            frontend=self.frontend.name, peer=_peer(self.transport), server=server.name, why=why,
        )
        self._abort()

    def backend_connected(self, backend: BackendConnection) -> None:
        self._connector = None
        assert self.server is not None
        if self.logged:
            self.connected_at = self.frontend.clock.seconds()
        self.pool.record_success(self.server)
        if self.lost:
            backend.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.backend = backend
        self.join(backend)

    # -- before the splice -----------------------------------------------

    def unspliced_eof(self) -> None:
        # The client half-closed before we reached a server: what it sent
        # still goes to the server, followed by the FIN.  If it sent
        # nothing, there is nothing to deliver.
        if not self._early_size:
            self._cancel_pending()
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- teardown --------------------------------------------------------

    def _abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def refuse(self) -> None:
        """
        Admission closes it unserved: the queue is full or timed out, or
        the frontend is draining.
        """
        if self.termination is None:
            self.termination = "queue" if self.frontend.accepting else "drained"
        self._abort()

    def readConnectionLost(self) -> None:
        if self.termination is None:
            self.termination = "client-closed"
        super().readConnectionLost()

    def peer_name(self) -> str:
        return _peer(self.transport)

    def _cancel_pending(self) -> None:
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        if self._connector is not None:
            connector, self._connector = self._connector, None
            connector.stopConnecting()  # type: ignore[attr-defined]
        if self.queue_timer is not None and self.queue_timer.active():
            self.queue_timer.cancel()
        self.queue_timer = None

    def end_lost(self, reason: Failure) -> None:
        self._cancel_pending()
        self._stop_hello_timer()
        self._early = None
        if self.termination is None:
            failed = tls_failure(reason) if reason is not None and reason.value.__class__ is not error.ConnectionDone else None
            if failed is not None:
                self.termination = "tls-failed"
                self.frontend.log.info("frontend {frontend}: TLS with {peer} failed: {why}",
                                       frontend=self.frontend.name, peer=_peer(self.transport), why=failed)
            else:
                self.termination = "client-closed"
        if self.backend is not None:
            self.backend_received = self.backend.received
        self.frontend.forget(self)

    def unlink(self) -> None:
        super().unlink()
        self.backend = None

    def backend_lost(self, backend: BackendConnection) -> None:
        server = self.server
        if server is not None:
            self.server = None
            server.bytes_out += self.received
            server.bytes_in += backend.received
            self.pool.release(server)

    def activity(self) -> int | None:
        """
        Bytes moved so far both ways, for the idle sweep (None: not idle
        however quiet, which HTTP uses while a request is in flight).
        """
        return self.received + (self.backend.received if self.backend is not None else 0)

    def idle_abort(self) -> None:
        self.closing = True
        if self.termination is None:
            self.termination = "timeout" if self.frontend.accepting else "drained"
        for end in (self, self.backend):
            if end is not None and not end.lost:
                end.transport.abortConnection()  # type: ignore[union-attr]


class TCPFrontend(AdmittedFigures, Factory):
    """
    The factory of one C{protocol: tcp} frontend; its admission (limits,
    queue, idle sweep, drain) is an L{Admission} it owns.
    """

    log = Logger()
    noisy = False
    # logs connects that fail for want of local resources (made at the first)
    shortage: ShortageLog | None = None

    def __init__(
        self,
        config: FrontendConfig,
        pool: Pool | None,
        reactor: IReactorTCP,
        clock: IReactorTime,
        limit: ConnectionLimit | None = None,
        pools: dict[str, Pool] | None = None,
    ) -> None:
        self.admission = Admission(config.name, config, clock, limit)
        self.pool = pool
        # every backend by name (tls_passthrough chooses among them)
        self.pools: dict[str, Pool] = pools if pools is not None else ({pool.config.name: pool} if pool else {})
        self.reactor = reactor
        self.clock = clock
        self.connect_errors = 0
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        # refused by allow/deny; connections per backend chosen by SNI
        self.denied_total = 0
        self.routed: collections.Counter[str] = collections.Counter()
        self.l4_log: L4Log | None = None
        # the PROXY protocol layer on its listener (rproxy.handoff), if any
        self.proxy_protocol: Any = None
        self._configure_log(config)

    @AdmittedFigures.config.setter  # type: ignore[attr-defined]
    def config(self, config: FrontendConfig) -> None:
        self.admission.config = config
        self._configure_log(config)

    # -- the L4 access log -----------------------------------------------

    def _configure_log(self, config: FrontendConfig) -> None:
        """
        Open, keep (reopened: a reload rotates logs), change or close the
        access log as C{config.l4_log} says.
        """
        options = config.l4_log
        current = self.l4_log
        if current is not None and options is not None and current.path == options.path:
            current.set_format(options.format)
            current.reopen()
            return
        if current is not None:
            current.close()
        self.l4_log = L4Log(config.name, options.format, options.path, self.clock) if options is not None else None

    def reopen_access_log(self) -> None:
        """
        Start a new access log file at the same path (after a rotation).
        """
        if self.l4_log is not None:
            self.l4_log.reopen()

    def _close_log(self, result: Any) -> Any:
        if self.l4_log is not None:
            self.l4_log.close()
        return result

    def shortage_failed(self, reason: Failure) -> None:
        """
        A connect for one of our clients failed for want of a local
        resource: logged once per episode, never charged to a server.
        """
        if self.shortage is None:
            self.shortage = ShortageLog(self.log, self.clock, f"frontend {self.name}")
        self.shortage.failed(reason)

    def buildProtocol(self, addr: object) -> ClientConnection:
        return ClientConnection(self)

    def admit(self, conn: ClientConnection) -> None:
        self.admission.admit(conn)

    def refused(self, conn: ClientConnection, why: object) -> None:
        self.admission.refused_total += 1

    def denied(self, conn: ClientConnection) -> None:
        """
        C{conn}'s client is refused by the allow/deny lists: closed at
        once, one line.
        """
        self.denied_total += 1
        conn.termination = "refused-acl"
        self.log.info("frontend {frontend}: refusing {peer}: not allowed by allow/deny",
                      frontend=self.name, peer=f"{conn.client_host}:{conn.client_port}")
        conn._abort()

    def forget(self, conn: ClientConnection) -> None:
        self.closed_bytes_out += conn.received
        if conn.backend is not None:
            self.closed_bytes_in += conn.backend.received
        self.admission.forget(conn)
        if conn.logged and self.l4_log is not None:
            self.l4_log.write(conn, self.clock.seconds())

    # -- reporting -------------------------------------------------------

    def bytes_totals(self) -> tuple[int, int]:
        """
        (from clients, from servers), open connections included.
        """
        out, back = self.closed_bytes_out, self.closed_bytes_in
        for conn in self.connections:
            out += conn.received
            if conn.backend is not None:
                back += conn.backend.received
        return out, back

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        Stop admitting, let open connections finish for up to C{grace}
        seconds, then abort what is left (L{Admission.drain}).
        """
        drained = self.admission.drain(grace)
        drained.addBoth(self._close_log)
        return drained


def _nodelay(transport: object) -> None:
    if getattr(transport, "noDelay", False):
        return  # rproxy.transport sockets have it on from the start
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass


def _peer(transport: object) -> str:
    try:
        peer = transport.getPeer()  # type: ignore[attr-defined]
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"

