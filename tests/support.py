"""
Helpers for end-to-end tests: real sockets on 127.0.0.1, port 0.
"""

from __future__ import annotations

import functools
import gc
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from rproxy.config import config_from_mapping
from rproxy.service import RProxyService

reactor: Any = _reactor
T = TypeVar("T")


def async_test(f: Callable[..., Awaitable[T]]) -> Callable[..., defer.Deferred[T]]:
    """
    Let trial run an C{async def} test method.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return defer.Deferred.fromCoroutine(f(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


def turn(clock: IReactorTime | None = None, delay: float = 0) -> defer.Deferred[None]:
    return deferLater(clock or reactor, delay, lambda: None)


async def wait_for(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.01) -> None:
    """
    Let the reactor run until C{check()} holds; fail after C{timeout}.
    """
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await turn(delay=step)
        waited += step


@implementer(IHalfCloseableProtocol)
class EchoBackend(protocol.Protocol):
    """
    Greets with its server's name, then echoes; on the client's FIN it
    sends C{bye} and closes.
    """

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.transport.write(self.factory.name.encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections.discard(self)


class EchoFactory(protocol.Factory):
    protocol = EchoBackend
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: set[EchoBackend] = set()
        self.received = 0


class StreamBackend(protocol.Protocol):
    """
    Streams C{size} deterministic bytes as a push producer, so that what it
    has written shows how far the proxy's backpressure let it go.
    """

    def connectionMade(self) -> None:
        self.factory.instances.append(self)
        self.sent = 0
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = self.factory.chunk
        while not self.paused and self.sent < self.factory.size:
            self.transport.write(chunk)
            self.sent += len(chunk)
        if self.sent >= self.factory.size:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.paused = True


class StreamFactory(protocol.Factory):
    protocol = StreamBackend
    noisy = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunk = bytes(range(256)) * 256  # 64 KiB
        self.instances: list[StreamBackend] = []

    def digest(self) -> str:
        h = hashlib.sha256()
        for _ in range(self.size // len(self.chunk)):
            h.update(self.chunk)
        return h.hexdigest()


class Client(protocol.Protocol):
    """
    Collects what it reads; C{closed} fires on connection loss.
    """

    def __init__(self, keep: bool = True) -> None:
        self.data = bytearray()
        self.count = 0
        self.keep = keep
        self.hash = hashlib.sha256()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.data += data
        else:
            self.hash.update(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True
        self.closed.callback(None)

    async def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        await wait_for(lambda: marker in self.data or self.lost, timeout)
        if marker not in self.data:
            raise AssertionError(f"connection closed before {marker!r}; got {bytes(self.data)!r}")
        index = self.data.index(marker) + len(marker)
        out = bytes(self.data[:index])
        del self.data[:index]
        return out


async def listen(factory: protocol.Factory) -> Any:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return port


async def connect(port: int, client: Client | None = None) -> Client:
    client = client or Client()
    factory = protocol.Factory.forProtocol(lambda: client)
    factory.noisy = False
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return client


class ServiceMixin:
    """
    Start an L{RProxyService} on the real reactor for a test, and stop it
    (and everything else the test opened) afterwards.
    """

    async def start_service(self, data: dict[str, Any], **kwargs: Any) -> RProxyService:
        # (set in the caller's mapping too: a test that reloads it must not
        # move the admin port to the default 18081, which may be taken)
        data.setdefault("admin", {"listen": "tcp:0:interface=127.0.0.1"})
        data = dict(data)
        data.setdefault("global", {"grace_period": "2s"})
        service = RProxyService(config_from_mapping(data), reactor, registry=CollectorRegistry(), **kwargs)
        service.startService()
        await service.ready
        self.addCleanup(self._stop_service, service)  # type: ignore[attr-defined]
        return service

    async def _stop(self, service: RProxyService) -> None:
        if service.running:
            await service.stopService()
        await turn()
        await turn()

    def _stop_service(self, service: RProxyService) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop(service))

    async def backend(self, name: str) -> tuple[EchoFactory, Any]:
        factory = EchoFactory(name)
        port = await listen(factory)
        self.addCleanup(self._close_port, port, factory)  # type: ignore[attr-defined]
        return factory, port

    def _close_port(self, port: Any, factory: Any) -> defer.Deferred[None]:
        for conn in list(getattr(factory, "connections", ())):
            conn.transport.abortConnection()
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: turn())

    def client_cleanup(self, client: Client) -> None:
        def close() -> defer.Deferred[None] | None:
            if not client.lost and client.transport is not None:
                client.transport.abortConnection()
                return client.closed
            return None

        self.addCleanup(close)  # type: ignore[attr-defined]


def backends_config(*ports: int, **backend: Any) -> dict[str, Any]:
    """
    One backend "web" over the given ports and one tcp frontend "web".
    """
    b = {"name": "web", "servers": [{"address": f"127.0.0.1:{p}", "name": f"s{i}"} for i, p in enumerate(ports)],
         "health_check": {"type": "none"}}
    b.update(backend)
    return {
        "backends": [b],
        "frontends": [{"name": "web", "listen": "tcp:0:interface=127.0.0.1", "backend": "web"}],
    }


def self_signed_pem(path: str, hostname: str = "localhost") -> bytes:
    """
    Write a self-signed certificate and its key (PEM) to C{path}; return
    the certificate alone (PEM), for the client's trust root.
    """
    from rproxy.tls import self_signed

    cert_pem, key_pem = self_signed(hostname, days=1)
    with open(path, "wb") as f:
        f.write(key_pem + cert_pem)
    return cert_pem


def collector_off(test: Any) -> None:
    """
    Collect what is garbage now, then keep Python's cycle collector off
    until C{test} ends, so that L{left_for_collector} sees what the test
    left behind.
    """
    gc.collect()
    gc.disable()
    test.addCleanup(gc.enable)


def left_for_collector(kinds: tuple[type, ...]) -> list[Any]:
    """
    The objects of C{kinds} that reference counting could not free: those
    only the cycle collector would (it is asked now, keeping what it finds).
    """
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
