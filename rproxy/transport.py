"""
TCP transports that send at once.

Twisted's C{FileDescriptor.write} never sends: it appends to a buffer,
registers the socket for writability (one C{epoll_ctl}), waits for the next
reactor turn, sends, and unregisters (a second C{epoll_ctl}).  For a proxy,
which writes every chunk it reads, that is most of the cost of a splice.
The transports here try C{send()} right away when nothing is queued (what
asyncio and uvloop do) and fall back to Twisted's buffered path for
whatever the kernel does not take, so ordering, backpressure (producer
pausing) and connection teardown stay Twisted's own.

How it hooks in, using only public classes and their documented hooks:
  - L{ImmediateSendPort} is a C{tcp.Port} whose C{transport} class
    attribute (the documented way to choose the server transport) is
    L{ImmediateSendServer}.
  - L{ImmediateSendConnector} is a C{tcp.Connector} whose
    C{_makeTransport} hook builds an L{ImmediateSendClient}.

Invariant that makes the fast path safe: the base class's write buffer is
non-empty only while the descriptor is registered for writing
(C{startWriting} was called and C{stopWriting} was not called since), since
C{doWrite} calls C{stopWriting} exactly when it has emptied the buffer.  We
track that registration ourselves (C{_rpQueued}) by wrapping the two
methods, so we never read the base class's private buffer attributes.

Only plain TCP takes the fast path; a transport on which TLS was started
(C{startTLS}) writes through the TLS layer as before.
"""

from __future__ import annotations

import _socket
import errno
import functools
import os
import socket
from typing import Any

from twisted.internet import defer, error, main, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IReadWriteDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.config.endpoints import parse_endpoint
from rproxy.shortage import LOCAL_ERRNOS, local_connect_error

__all__ = [
    "ImmediateSendServer",
    "ImmediateSendClient",
    "ImmediateSendPort",
    "ImmediateSendConnector",
    "listen_tcp",
    "connect_tcp",
    "supports_immediate_send",
]

_log = Logger()
_RETRY_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})


class _ImmediateSendMixin:
    """
    Send at once when nothing is queued; queue the rest as usual.  Closing
    and half-closing with nothing queued also happen without the round trip
    through the reactor's write registration that Twisted makes to flush an
    empty buffer.
    """

    # True while registered for writability, i.e. while the buffered
    # path holds data or a close/half-close is pending.
    _rpQueued = False
    # True while registered for reading (pausing unregisters).
    _rpReading = False
    # Set once the connection is closing, aborting or half-closed for
    # writing: from then on every write takes the base class's path.
    _rpNoFast = False
    # Writing was shut down by the fast half-close: later writes are
    # dropped, as Twisted drops writes after loseWriteConnection.
    _rpWriteClosed = False
    # The fast close is scheduled; nothing is left to flush.
    _rpClosing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The fields write() reads on every call live on the instance (an
        # instance's own field is the fast path of attribute access, a class
        # default the slow one); set before the base class's __init__, which
        # may already start writing.
        self._rpQueued = self._rpNoFast = self._rpWriteClosed = self._rpClosing = False
        self._rpReading = False
        self.TLS = False
        self.disconnecting = False
        self.producer = None
        self.bufferSize = type(self).bufferSize  # type: ignore[attr-defined]
        super().__init__(*args, **kwargs)

    def doRead(self) -> Any:
        # tcp.Connection.doRead with its _dataReceived inline (one call
        # fewer per read)
        try:
            data = self.socket.recv(self.bufferSize)  # type: ignore[attr-defined]
        except OSError as se:
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)  # type: ignore[attr-defined]
        return None

    def startReading(self) -> None:
        self._rpReading = True
        super().startReading()  # type: ignore[misc]

    def stopReading(self) -> None:
        # (not registered: nothing to undo; connectionLost always asks,
        # after a fast close has already stopped reading)
        if self._rpReading:
            self._rpReading = False
            super().stopReading()  # type: ignore[misc]

    def startWriting(self) -> None:
        self._rpQueued = True
        super().startWriting()  # type: ignore[misc]

    def stopWriting(self) -> None:
        # (not registered: nothing to undo; connectionLost always asks)
        if self._rpQueued:
            self._rpQueued = False
            super().stopWriting()  # type: ignore[misc]

    def _rpIdle(self) -> bool:
        """
        Connected, plain TCP, nothing buffered, not closing.
        """
        return (
            not self._rpQueued
            and self.connected  # type: ignore[attr-defined]
            and not self.disconnecting  # type: ignore[attr-defined]
            and not self.TLS  # type: ignore[attr-defined]
        )

    def loseConnection(self, *args: Any, **kwargs: Any) -> None:
        if self._rpIdle() and self.producer is None:  # type: ignore[attr-defined]
            # Nothing to flush: close on the next reactor turn (as
            # abortConnection does, but orderly: FIN, not RST).
            self._rpNoFast = True
            self._rpClosing = True
            self.disconnecting = True
            self.stopReading()  # type: ignore[attr-defined]
            _close_soon(self)
            return
        self._rpNoFast = True
        super().loseConnection(*args, **kwargs)  # type: ignore[misc]

    def loseWriteConnection(self) -> None:
        if self._rpIdle() and not self._rpWriteClosed:
            # Nothing to flush: send the FIN now and tell the protocol.
            self._rpNoFast = True
            self._rpWriteClosed = True
            try:
                self.socket.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
            except OSError:
                pass
            protocol = IHalfCloseableProtocol(self.protocol, None)  # type: ignore[attr-defined]
            if protocol is not None:
                protocol.writeConnectionLost()
            return
        self._rpNoFast = True
        super().loseWriteConnection()  # type: ignore[misc]

    def abortConnection(self) -> None:
        self._rpNoFast = True
        super().abortConnection()  # type: ignore[misc]

    def unregisterProducer(self) -> None:
        if self._rpClosing:
            # the base class would register for writing to finish a
            # close that is already scheduled
            self.producer = None
            return
        super().unregisterProducer()  # type: ignore[misc]

    def write(self, data: bytes) -> None:
        if (
            self._rpQueued
            or self._rpNoFast
            or self.TLS  # type: ignore[attr-defined]
            or not self.connected  # type: ignore[attr-defined]
            or type(data) is not bytes
        ):
            if not self._rpWriteClosed:
                super().write(data)  # type: ignore[misc]
            return
        try:
            sent = self.socket.send(data)  # type: ignore[attr-defined]
        except OSError as e:
            if e.errno not in _RETRY_LATER:
                # Let the buffered path meet the error and close the
                # connection the usual way, from doWrite.
                super().write(data)  # type: ignore[misc]
                return
            sent = 0
        if sent == len(data):
            return
        super().write(data[sent:] if sent else data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        if not self._rpWriteClosed:
            super().writeSequence(iovec)  # type: ignore[misc]


# One Failure for every orderly fast close, as Twisted's reactor shares one
# per reason: its parents (used by every check()) are computed once.
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)
_closing: dict[Any, list[Any]] = {}


def _close_soon(transport: Any) -> None:
    """
    Finish C{transport}'s close on the next reactor turn; all closes asked
    for during one turn share one timed call.
    """
    reactor = transport.reactor
    batch = _closing.get(reactor)
    if batch is None:
        batch = _closing[reactor] = []
        reactor.callLater(0, _finish_closes, reactor)
    batch.append(transport)


def _finish_closes(reactor: Any) -> None:
    for transport in _closing.pop(reactor, ()):
        try:
            transport.connectionLost(_CONNECTION_DONE)
        except Exception:  # noqa: BLE001 - one protocol's bug must not keep others open
            _log.failure("closing {transport}", transport=transport)


class ImmediateSendServer(_ImmediateSendMixin, tcp.Server):
    """
    An accepted TCP connection that sends at once when it can.
    """

    # No shutdown(2) before close(2): sockets are close-on-exec and never
    # shared, so close alone sends the FIN (after any unsent data), one
    # system call fewer per connection.
    _shouldShutdown = False
    # TCP_NODELAY is already on (inherited from ImmediateSendPort).
    noDelay = True


class ImmediateSendClient(_ImmediateSendMixin, tcp.Client):
    """
    An outgoing TCP connection that sends at once when it can (made by
    L{ImmediateSendConnector}, for servers named by host name).
    """

    _shouldShutdown = False


class ImmediateSendConnection(_ImmediateSendMixin, tcp.Connection):
    """
    An outgoing TCP connection made by L{PendingConnect}: a plain
    C{tcp.Connection} over an already connected socket.
    """

    _shouldShutdown = False
    noDelay = True  # set by PendingConnect before connecting

    def __init__(self, skt: socket.socket, protocol: Any, reactor: Any, peer: Any) -> None:
        super().__init__(skt, protocol, reactor)
        self.connected = 1
        self._peer = peer
        self.logstr = f"{type(protocol).__name__},client"

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        host, port = self.socket.getsockname()[:2]
        return type(self._peer)("TCP", host, port)


@implementer(IReadWriteDescriptor)
class PendingConnect:
    """
    A non-blocking connect(2) to an IP address, and the connector that
    stands for it until it completes.

    It does what C{tcp.Connector} and C{tcp.Client} do for a literal IP
    address, in one reactor registration: no deferred first attempt, no
    second C{connect_ex} to learn the result (C{SO_ERROR} tells), and the
    connected socket is handed to an L{ImmediateSendConnection}.  Failures
    reach C{factory.clientConnectionFailed(self, reason)} exactly once, never
    from inside the call that started the connect; success reaches
    C{factory.buildProtocol(peer)} and the protocol's C{makeConnection}.
    """

    def __init__(self, reactor: Any, host: str, port: int, factory: Any, timeout: float) -> None:
        self.reactor = reactor
        self.factory = factory
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.peer = _address(family, host, port)
        self.done = False
        self.timer: Any = None
        # non-blocking from socket(2) on, saving an ioctl (an OSError here,
        # at the descriptor limit say, is connect_tcp's to report)
        self.socket = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = self.socket.connect_ex((host, port))
        except OSError as e:
            err = e.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.timer = reactor.callLater(0, self._fail, _connect_error(err))
            return
        self.timer = reactor.callLater(timeout, self._fail, error.TimeoutError())
        reactor.addWriter(self)

    def fileno(self) -> int:
        return -1 if self.done else self.socket.fileno()

    def logPrefix(self) -> str:
        return "PendingConnect"

    def doWrite(self) -> None:
        if self.done:
            return None
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(_connect_error(err))
            return None
        # unregister while fileno() is still valid: the epoll reactor looks
        # up a selectable whose fileno() is -1 by scanning all of them
        self.reactor.removeWriter(self)
        self.done = True
        self.timer.cancel()
        protocol = self.factory.buildProtocol(self.peer)
        transport = ImmediateSendConnection(self.socket, protocol, self.reactor, self.peer)
        transport.startReading()
        protocol.makeConnection(transport)
        return None

    doRead = doWrite

    def connectionLost(self, reason: Failure) -> None:
        # the reactor saw EPOLLERR/EPOLLHUP: the connect failed
        if self.done:
            return
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(_connect_error(err))
        else:
            self._fail(error.ConnectError(string=reason.getErrorMessage()))

    def stopConnecting(self) -> None:
        """
        Give up (IConnector); the factory hears of it as a C{UserError}.
        """
        if not self.done:
            self._fail(error.UserError(string="connection was cancelled"))

    def _fail(self, reason: Exception) -> None:
        if self.done:
            return
        self.reactor.removeWriter(self)  # before done: see doWrite
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.socket.close()
        self.factory.clientConnectionFailed(self, Failure(reason))


def _connect_error(err: int) -> error.ConnectError:
    """
    The exception for a connect that failed with C{err}: a
    L{LocalConnectError} when this process ran short of something.
    """
    if err in LOCAL_ERRNOS:
        return local_connect_error(err)
    return error.getConnectError((err, os.strerror(err)))


class _Unstarted:
    """
    The connector of a connect the reactor refused to start (it raised):
    the factory hears of it from the next reactor turn, as of any failed
    connect, so that callers have one way to handle failures.
    """

    def __init__(self, reactor: Any, factory: Any, reason: Exception) -> None:
        self.factory = factory
        self.timer = reactor.callLater(0, self._fail, reason)

    def stopConnecting(self) -> None:
        if self.timer.active():
            self.timer.cancel()
            self._fail(error.UserError(string="connection was cancelled"))

    def _fail(self, reason: Exception) -> None:
        self.factory.clientConnectionFailed(self, Failure(reason))


class _ListeningSocket(socket.socket):
    """
    A listening socket whose C{accept} makes the new socket object from
    plain integers: C{socket.socket.accept} reads C{family} and C{type}
    through properties that convert them to enums, about a quarter of the
    Python work of an accept.
    """

    __slots__ = ()

    def accept(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        # (a listening socket here is non-blocking: socket.accept would
        # not make the new one blocking either)
        return socket.socket(_FAMILY.__get__(self), socket.SOCK_STREAM, _PROTO.__get__(self), fd), addr


_FAMILY = _socket.socket.family  # the C getters: plain ints
_PROTO = _socket.socket.proto


class ImmediateSendPort(tcp.Port):
    """
    A listening TCP port whose connections are L{ImmediateSendServer}s,
    with Nagle's algorithm off (accepted sockets inherit TCP_NODELAY from
    the listening socket, saving a system call per connection).
    """

    transport = ImmediateSendServer

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the same object, with the cheaper accept (same layout: no slots added)
        skt.__class__ = _ListeningSocket
        return skt


class ImmediateSendConnector(tcp.Connector):
    """
    A connector whose connections are L{ImmediateSendClient}s.
    """

    def _makeTransport(self) -> tcp.Client:
        return ImmediateSendClient(self.host, self.port, self.bindAddress, self, self.reactor)


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


@functools.lru_cache(maxsize=4096)
def _address(family: int, host: str, port: int) -> IPv4Address | IPv6Address:
    """
    The (immutable) address of a server, made once per server.
    """
    return (IPv6Address if family == socket.AF_INET6 else IPv4Address)("TCP", host, port)


def supports_immediate_send(reactor: object) -> bool:
    """
    Whether C{reactor} runs real sockets through C{tcp.Port}/C{tcp.Connector}
    (the posix reactors); test reactors do not.
    """
    return isinstance(reactor, PosixReactorBase)


def listen_tcp(
    reactor: IReactorTCP,
    port: int,
    factory: IProtocolFactory,
    backlog: int = 511,
    interface: str = "",
) -> IListeningPort:
    """
    Listen like C{reactor.listenTCP}, with immediate-send connections when
    the reactor allows it.
    """
    if not supports_immediate_send(reactor):
        return reactor.listenTCP(port, factory, backlog, interface)
    listening = ImmediateSendPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(
    reactor: IReactorTCP,
    host: str,
    port: int,
    factory: Any,
    timeout: float = 30,
    bindAddress: tuple[str, int] | None = None,
) -> Any:
    """
    Connect like C{reactor.connectTCP}, with an immediate-send connection
    when the reactor allows it.

    Never raises for a connect that cannot start: every failure reaches
    C{factory.clientConnectionFailed} from a later reactor turn, one for
    want of a local resource (descriptors, ...) as a L{LocalConnectError}
    or C{ConnectBindError} (see L{rproxy.shortage.is_local}).
    """
    try:
        if not supports_immediate_send(reactor):
            return reactor.connectTCP(host, port, factory, timeout, bindAddress)
        if bindAddress is None and _is_ip(host):
            return PendingConnect(reactor, host, port, factory, timeout)
        connector = ImmediateSendConnector(host, port, factory, timeout, bindAddress, reactor)
        connector.connect()
        return connector
    except OSError as e:
        reason = _connect_error(e.errno) if e.errno else error.ConnectError(string=str(e))
        return _Unstarted(reactor, factory, reason)


@implementer(IStreamServerEndpoint)
class TCPServerEndpoint:
    """
    A stream server endpoint for plain TCP whose connections send at once.
    """

    def __init__(self, reactor: IReactorTCP, port: int, backlog: int = 511, interface: str = "") -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(listen_tcp, self._reactor, self._port, factory, self._backlog, self._interface)




def server_endpoint(reactor: Any, description: str, backlog: int = 511) -> IStreamServerEndpoint:
    """
    The endpoint for a listen string from the configuration, parsed by the
    parser that checked it (L{rproxy.config.endpoints.parse_endpoint}).

    Plain C{tcp:} descriptions get an immediate-send L{TCPServerEndpoint};
    C{ssl:} descriptions get TLS from L{rproxy.tls} (which negotiates ALPN
    where Twisted's own C{ssl:} endpoint fails every client that offers it);
    every other type (C{unix:}, C{tcp6:}, ...) goes to Twisted's
    C{serverFromString}, with options the parse has already checked.

    @raise ValueError: C{description} is not a valid listen string.
    """
    endpoint = parse_endpoint(description)
    if endpoint.kind == "ssl":
        from rproxy.tls import ssl_server_endpoint

        return ssl_server_endpoint(reactor, endpoint, backlog)
    if endpoint.kind == "tcp":
        port = endpoint.port
        given = endpoint.backlog
        return TCPServerEndpoint(reactor, port or 0, given if given is not None else backlog, endpoint.interface)
    return serverFromString(reactor, description)


def adopt_tcp_port(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """
    Serve C{factory} on a listening socket bound by another process (an
    rproxy master, L{rproxy.workers}), with immediate-send connections as
    L{listen_tcp} gives.  C{fd} is duplicated; the caller closes its own.
    """
    if not supports_immediate_send(reactor):
        return reactor.adoptStreamPort(fd, family, factory)  # type: ignore[no-any-return]
    listening = ImmediateSendPort._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    listening.socket.__class__ = _ListeningSocket
    return listening  # type: ignore[no-any-return]
