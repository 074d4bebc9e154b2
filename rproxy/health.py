"""
Active health checks.

L{HealthState} is the rise/fall counter (HAProxy's): a server that is up
goes down after C{fall} failed checks in a row, and one that is down comes
back after C{rise} good ones.  It is pure and tested without a clock.

L{HealthChecker} runs one probe loop per server of a pool on an injected
clock, with a little jitter so that checks of many servers do not fire in
lockstep, and reports verdicts to the pool (which logs each change once).
The probes themselves (L{tcp_probe}, L{http_probe}) are functions that
return a Deferred; tests inject their own.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config import HealthCheckConfig
from rproxy.pool import Pool, Server

__all__ = ["HealthState", "HealthChecker", "ProbeFailed", "tcp_probe", "http_probe", "make_prober"]

Prober = Callable[[Server, HealthCheckConfig], "defer.Deferred[object]"]


class ProbeFailed(Exception):
    """
    A probe got an answer, but not the expected one.
    """


@attrs.define
class HealthState:
    """
    Rise/fall hysteresis for one server.
    """

    rise: int
    fall: int
    up: bool = True
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool) -> bool | None:
        """
        Count one check result.

        @return: the new state (C{True} up, C{False} down) when this result
            changes it, else L{None}.
        """
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.up and self.successes >= self.rise:
                self.up = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= self.fall:
                self.up = False
                return False
        return None


class HealthChecker:
    """
    Probe every server of a pool periodically and tell the pool what was seen.
    """

    log = Logger()

    def __init__(
        self,
        pool: Pool,
        clock: IReactorTime,
        prober: Prober,
        observe: Callable[[Server, float, bool], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._prober = prober
        self._observe = observe
        self._rng = rng or random.Random()
        self._loops: dict[int, _Loop] = {}
        self.running = False

    def start(self) -> None:
        self.running = True
        self.sync()

    def sync(self) -> None:
        """
        Start loops for servers that have none, stop those of servers that
        left the pool; also applies a changed check configuration.
        """
        config = self._pool.config.health_check
        current = {id(s): s for s in self._pool.servers}
        for key in list(self._loops):
            loop = self._loops[key]
            if key not in current or loop.config != config:
                loop.stop()
                del self._loops[key]
        if not self.running or config.type == "none":
            return
        for key, server in current.items():
            if key not in self._loops:
                loop = _Loop(self, server, config)
                self._loops[key] = loop
                loop.schedule(first=True)

    def stop(self) -> None:
        self.running = False
        for loop in self._loops.values():
            loop.stop()
        self._loops.clear()

    def _verdict(self, server: Server, state: HealthState, ok: bool, reason: str) -> None:
        change = state.record(ok)
        server.check_failures = state.failures
        if change is not None:
            self._pool.set_up(server, change, reason)


class _Loop:
    def __init__(self, checker: HealthChecker, server: Server, config: HealthCheckConfig) -> None:
        self.checker = checker
        self.server = server
        self.config = config
        self.state = HealthState(config.rise, config.fall, up=server.up)
        self.call: IDelayedCall | None = None
        self.probe: defer.Deferred[object] | None = None
        self.stopped = False

    def schedule(self, first: bool = False) -> None:
        jitter = self.config.jitter
        factor = 1.0 + self.checker._rng.uniform(-jitter, jitter)
        # the first check of a new server goes out soon, spread over
        # the interval, so that a dead server is found quickly at startup
        delay = self.config.interval * (self.checker._rng.uniform(0, 0.5) if first else factor)
        self.call = self.checker._clock.callLater(delay, self.run)

    def run(self) -> None:
        self.call = None
        clock = self.checker._clock
        started = clock.seconds()
        try:
            d = self.checker._prober(self.server, self.config)
            d.addTimeout(self.config.timeout, clock)
        except Exception:
            d = defer.fail(Failure())
        self.probe = d

        def done(result: object) -> None:
            self.probe = None
            if self.stopped:
                return
            ok = not isinstance(result, Failure)
            reason = "check passed" if ok else _describe(result, self.config)  # type: ignore[arg-type]
            if self.checker._observe is not None:
                self.checker._observe(self.server, clock.seconds() - started, ok)
            try:
                self.checker._verdict(self.server, self.state, ok, reason)
            except Exception:
                self.checker.log.failure("health verdict for {server} failed", server=self.server.name)
            self.schedule()

        d.addBoth(done)

    def stop(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None


def _describe(failure: Failure, config: HealthCheckConfig) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return f"{config.type} check timed out after {config.timeout}s"
    value = failure.value
    text = str(value) or type(value).__name__
    return f"{config.type} check failed: {text}"


# -- probes ------------------------------------------------------------


class _TCPProbe(protocol.Protocol):
    def __init__(self, done: defer.Deferred[object]) -> None:
        self.done = done

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        self.done.callback(None)


class _HTTPProbe(protocol.Protocol):
    """
    Send one GET and read the status line; anything beyond it is ignored,
    and a status line longer than 4 KiB is a failure.
    """

    def __init__(self, request: bytes, expect: int, done: defer.Deferred[object]) -> None:
        self.request = request
        self.expect = expect
        self.done = done
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.buffer += data
        line, sep, _ = self.buffer.partition(b"\r\n")
        if not sep:
            if len(self.buffer) > 4096:
                self._finish(ProbeFailed("status line too long"))
            return
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._finish(ProbeFailed(f"not an HTTP response: {line[:80]!r}"))
        elif int(parts[1]) != self.expect:
            self._finish(ProbeFailed(f"status {int(parts[1])}, expected {self.expect}"))
        else:
            self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.errback(ProbeFailed("connection closed before a status line"))


def _probe(reactor: object, server: Server, timeout: float, build: Callable[[defer.Deferred[object]], protocol.Protocol],
           tls: Any = None) -> defer.Deferred[object]:
    done: defer.Deferred[object] = defer.Deferred()
    endpoint: Any
    if isIPAddress(server.host):
        # no name resolution (HostnameEndpoint would use a resolver thread)
        endpoint = TCP4ClientEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    elif isIPv6Address(server.host):
        endpoint = TCP6ClientEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    else:
        endpoint = HostnameEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    if tls is not None:
        from rproxy.tls import client_tls_options

        endpoint = wrapClientTLS(client_tls_options(tls.server_name or server.host, tls.ca, tls.verify), endpoint)
    factory = protocol.Factory.forProtocol(lambda: build(done))
    factory.noisy = False
    connecting = endpoint.connect(factory)

    def failed(reason: Failure) -> None:
        if not done.called:
            done.errback(reason)

    connecting.addErrback(failed)

    def cancel(result: Failure) -> Failure:
        if result.check(defer.CancelledError):
            connecting.cancel()
        return result

    done.addErrback(cancel)
    return done


def tcp_probe(reactor: object, server: Server, config: HealthCheckConfig) -> defer.Deferred[object]:
    """
    Succeed when a TCP connection to the server can be made.
    """
    return _probe(reactor, server, config.timeout, _TCPProbe)


def http_probe(reactor: object, server: Server, config: HealthCheckConfig) -> defer.Deferred[object]:
    """
    Succeed when C{GET path} answers the expected status.
    """
    host = config.host or (f"[{server.host}]" if ":" in server.host else server.host) + f":{server.port}"
    lines = [f"GET {config.path} HTTP/1.1", f"Host: {host}", "Connection: close", "User-Agent: rproxy-health"]
    lines += [f"{name}: {value}" for name, value in config.headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return _probe(reactor, server, config.timeout, lambda d: _HTTPProbe(request, config.expect_status, d),
                  tls=config.tls)


def make_prober(reactor: object) -> Prober:
    """
    The prober that dispatches on the check type, bound to a reactor.
    """

    def prober(server: Server, config: HealthCheckConfig) -> defer.Deferred[object]:
        if config.type == "http":
            return http_probe(reactor, server, config)
        return tcp_probe(reactor, server, config)

    return prober
