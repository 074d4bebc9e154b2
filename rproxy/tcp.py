"""
The L4 (TCP) frontend.

For each accepted client connection: hold its bytes (reading paused), take
a frontend slot (waiting in a bounded queue past C{max_connections}), take
a server slot from the pool (waiting in the pool's queue when every server
is full), connect with C{connect_timeout}, and on failure try another
server, at most C{retries} more times.  Once connected, the two
connections are spliced (L{rproxy.splice}).  A connection idle for
C{idle_timeout} in both directions is closed.

L{TCPFrontend} is the factory; it knows its open connections so that a
reload or a shutdown can drain them.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admission import Admission, AdmittedFigures, ConnectionLimit
from rproxy.config import FrontendConfig
from rproxy.pool import NoServerAvailable, Pool, QueueFull, QueueTimeout, Server
from rproxy.shortage import ShortageLog, is_local
from rproxy.splice import EarlyDataEnd, SpliceEnd
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
        self.client.backend_connected(self)

    def end_lost(self, reason: Failure) -> None:
        self.client.backend_lost(self)

    def unlink(self) -> None:
        super().unlink()
        self.client = None  # type: ignore[assignment]


class _BackendFactory(ClientFactory):
    protocol = None  # type: ignore[assignment]
    noisy = False

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> BackendConnection:
        return BackendConnection(self.client)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.client.connect_failed(reason)


class ClientConnection(EarlyDataEnd):
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

    def __init__(self, frontend: TCPFrontend) -> None:
        self.frontend = frontend
        self.tried: list[str] = []

    # -- lifecycle -------------------------------------------------------

    def connectionMade(self) -> None:
        _nodelay(self.transport)
        self.frontend.admit(self)

    def start(self) -> None:
        """
        The frontend gave this connection a slot: find it a server.
        """
        self.counted = True
        self._acquire()

    def _acquire(self) -> None:
        pool = self.pool = self.frontend.pool
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
        self._connector = connect_tcp(
            frontend.reactor, server.host, server.port, _BackendFactory(self), frontend.config.connect_timeout
        )

    def connect_failed(self, reason: Failure) -> None:
        self._connector = None
        server = self.server
        assert server is not None
        self.server = None
        pool = self.pool
        if self.lost or reason.check(error.UserError):
            # we gave up (the client left), the server did nothing wrong
            pool.release(server)
            return
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

    refuse = _abort

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
        self._early = None
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
        pool: Pool,
        reactor: IReactorTCP,
        clock: IReactorTime,
        limit: ConnectionLimit | None = None,
    ) -> None:
        self.admission = Admission(config.name, config, clock, limit)
        self.pool = pool
        self.reactor = reactor
        self.clock = clock
        self.connect_errors = 0
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0

    @property
    def config(self) -> FrontendConfig:
        return self.admission.config  # type: ignore[no-any-return]

    @config.setter
    def config(self, config: FrontendConfig) -> None:
        self.admission.config = config

    @property
    def name(self) -> str:
        return self.config.name

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

    def forget(self, conn: ClientConnection) -> None:
        self.closed_bytes_out += conn.received
        if conn.backend is not None:
            self.closed_bytes_in += conn.backend.received
        self.admission.forget(conn)

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
        return self.admission.drain(grace)


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

