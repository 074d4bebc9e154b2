"""
The listening sockets of a machine with workers.

The master binds them (L{bind}); each worker adopts its own
(L{AdoptedEndpoint}).  For TCP the master binds one socket per worker slot,
all with C{SO_REUSEPORT} on the same address: the kernel spreads new
connections over the sockets by a hash of the client's address and port,
so each worker accepts from its own queue.  A single socket shared by
every worker would wake all of them for each connection (Twisted's
epoll registration has no EPOLLEXCLUSIVE) and let whichever runs first
accept a burst (Twisted accepts up to a hundred at a time): uneven spread
and wasted wake-ups.  The master keeps every socket open, so the queue of
a worker that died waits for its replacement instead of being reset.
C{unix:} listeners (no port hash) are one socket shared by every worker.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from rproxy.config import parse_endpoint
from rproxy.config.endpoints import Endpoint

__all__ = ["bind", "AdoptedEndpoint", "endpoint_for", "family_of"]


def family_of(endpoint: Endpoint) -> int:
    if endpoint.kind == "unix":
        return socket.AF_UNIX
    if endpoint.kind == "tcp6" or ":" in endpoint.interface:
        return socket.AF_INET6
    return socket.AF_INET


def bind(listen: str, backlog: int, slots: Sequence[int], port: int | None = None) -> dict[int, socket.socket]:
    """
    Listening sockets for C{listen}, one per slot (the same object for
    every slot of a C{unix:} listener).  A port 0 is chosen by the first
    bind and reused by the others; C{port} overrides the listen string's
    (more sockets beside ones bound before).

    @raise OSError: a socket could not bind (none is left open).
    @raise ValueError: a listen string workers cannot share.
    """
    endpoint = parse_endpoint(listen)
    if endpoint.kind == "systemd":
        raise ValueError("systemd listeners need global.workers: 1")
    backlog = endpoint.backlog if endpoint.backlog is not None else backlog
    family = family_of(endpoint)
    made: dict[int, socket.socket] = {}
    try:
        if family == socket.AF_UNIX:
            sock = _unix_socket(endpoint, backlog)
            return dict.fromkeys(slots, sock)
        port = port if port is not None else endpoint.port or 0
        host = endpoint.interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")  # noqa: S104 - as Twisted
        for slot in slots:
            sock = socket.socket(family, socket.SOCK_STREAM)
            made[slot] = sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # accepted sockets inherit it (one system call fewer each)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in made.values():
            sock.close()
        raise
    return made


def _unix_socket(endpoint: Endpoint, backlog: int) -> socket.socket:
    path = endpoint.get("address") or endpoint.params[0][1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and endpoint.get("lockfile") != "1":
            os.unlink(path)
        sock.bind(path)
        mode = endpoint.get("mode")
        if mode is not None:
            os.chmod(path, int(mode, 8))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A server endpoint whose C{listen} serves a socket received from the
    master.
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        from rproxy.transport import adopt_tcp_port

        if self._family == socket.AF_UNIX:
            return defer.execute(self._reactor.adoptStreamPort, self._fd, self._family, factory)
        return defer.execute(adopt_tcp_port, self._reactor, self._fd, self._family, factory)


def endpoint_for(reactor: Any, listen: str, fd: int) -> Any:
    """
    The endpoint serving C{listen} on the adopted C{fd}: with TLS for an
    C{ssl:} listen string, as L{rproxy.tls.ssl_server_endpoint} gives.
    """
    endpoint = parse_endpoint(listen)
    adopted = AdoptedEndpoint(reactor, fd, family_of(endpoint))
    if endpoint.kind == "ssl":
        from rproxy.tls import TLSServerEndpoint, ssl_pairs

        return TLSServerEndpoint(adopted, ssl_pairs(endpoint))
    return adopted
