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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config import HealthCheckConfig
from rproxy.pool import Pool, Server
from rproxy.shortage import ShortageLog, is_local

__all__ = ["HealthState", "HealthChecker", "ProbeFailed", "tcp_probe", "http_probe", "make_prober"]

# prober(server, config, tls): tls is the client TLS options object of an
# http check of a TLS backend, loaded once per configuration, else None
Prober = Callable[[Server, HealthCheckConfig, Any], "defer.Deferred[object]"]


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

    A probe that could not even start for want of a local resource (at the
    descriptor limit, say) counts as neither success nor failure: our own
    shortage must not take healthy servers down.  Such probes are logged
    once per episode.
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
        self.shortage = ShortageLog(self.log, clock, f"health checks of backend {pool.name}")

    def start(self) -> None:
        self.running = True
        self.sync()

    def sync(self) -> None:
        """
        Start loops for servers that have none, stop those of servers that
        left the pool; also applies a changed check configuration.  Called
        at start and on every reload, it (re)loads the TLS settings the
        checks use, so that a probe reads no file.
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
        loaded: dict[str, object] = {}
        for key, server in current.items():
            loop = self._loops.get(key)
            if loop is None:
                loop = self._loops[key] = _Loop(self, server, config)
                loop.tls = self._load_tls(config, server, loaded)
                loop.start()
            else:
                loop.tls = self._load_tls(config, server, loaded)

    def _load_tls(self, config: HealthCheckConfig, server: Server, loaded: dict[str, object]) -> object:
        """
        The client TLS options of C{server}'s checks (None: plain), or the
        L{Failure} of loading them, which every probe then reports.
        """
        tls = config.tls
        if config.type != "http" or tls is None:
            return None
        name = tls.server_name or server.host
        if name not in loaded:
            from rproxy.tls import client_tls_options

            try:
                loaded[name] = client_tls_options(name, tls.ca, tls.verify)
            except Exception:
                loaded[name] = failure = Failure()
                self.log.error(
                    "health checks of backend {backend}: cannot load the TLS settings: {why}",
                    backend=self._pool.name, why=failure.getErrorMessage(),
                )
        return loaded[name]

    def stop(self) -> None:
        self.running = False
        for loop in self._loops.values():
            loop.stop()
        self._loops.clear()

    def _verdict(self, server: Server, state: HealthState, ok: bool, reason: str) -> None:
        change = state.record(ok)
        server.check_failures = state.failures
        server.last_check_ok, server.last_check_reason = ok, reason
        server.last_check_at = self._clock.seconds()
        if change is not None:
            self._pool.set_up(server, change, reason)


class _Loop:
    """
    The checks of one server: a L{LoopingCall} every C{interval}, each
    check starting after a random part of C{jitter * interval} (so that
    checks of many servers do not fire in lockstep), the next one waiting
    for the last.  Whatever goes wrong in a check is logged and the loop
    goes on.
    """

    def __init__(self, checker: HealthChecker, server: Server, config: HealthCheckConfig) -> None:
        self.checker = checker
        self.server = server
        self.config = config
        self.tls: object = None
        self.state = HealthState(config.rise, config.fall, up=server.up)
        self.loop = LoopingCall(self.run)
        self.loop.clock = checker._clock
        self.call: IDelayedCall | None = None
        self.probe: defer.Deferred[object] | None = None
        self.round: defer.Deferred[None] | None = None
        self.checked = False
        self.stopped = False

    def start(self) -> None:
        # the first check of a new server goes out soon, spread over the
        # interval, so that a dead server is found quickly at startup
        delay = self.config.interval * self.checker._rng.uniform(0, 0.5)
        self.call = self.checker._clock.callLater(delay, self._start_loop)

    def _start_loop(self) -> None:
        self.call = None
        self.loop.start(self.config.interval, now=True).addErrback(self._loop_died)

    def _loop_died(self, failure: Failure) -> None:
        # run() never fails; should it all the same, say so
        self.checker.log.failure("health checks of {server} stopped", failure, server=self.server.name)

    def run(self) -> defer.Deferred[None]:
        """
        One check; the Deferred fires (never fails) once it is judged.
        """
        self.round = defer.Deferred()
        # (the first check's start is random already)
        offset = self.config.interval * self.config.jitter * self.checker._rng.random() if self.checked else 0
        self.checked = True
        if offset > 0:
            self.call = self.checker._clock.callLater(offset, self._probe)
        else:
            self._probe()
        return self.round

    def _probe(self) -> None:
        self.call = None
        clock = self.checker._clock
        started = clock.seconds()
        try:
            if isinstance(self.tls, Failure):
                d: defer.Deferred[object] = defer.fail(self.tls)
            else:
                d = self.checker._prober(self.server, self.config, self.tls)
            d.addTimeout(self.config.timeout, clock)
        except Exception:
            d = defer.fail(Failure())
        self.probe = d
        d.addBoth(self._settle, started)

    def _settle(self, result: object, started: float) -> None:
        self.probe = None
        try:
            if not self.stopped:
                self._judge(result, started)
        except Exception:
            self.checker.log.failure("health check of {server} failed", server=self.server.name)
        finally:
            finished, self.round = self.round, None
            if finished is not None:
                finished.callback(None)

    def _judge(self, result: object, started: float) -> None:
        checker = self.checker
        if isinstance(result, Failure) and is_local(result):
            # our shortage, not the server's fault: neither up nor down
            checker.shortage.failed(result)
            return
        ok = not isinstance(result, Failure)
        reason = "check passed" if ok else _describe(result, self.config)  # type: ignore[arg-type]
        if checker._observe is not None:
            try:
                checker._observe(self.server, checker._clock.seconds() - started, ok)
            except Exception:
                checker.log.failure("recording the health check of {server} failed", server=self.server.name)
        checker._verdict(self.server, self.state, ok, reason)

    def stop(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.loop.running:
            self.loop.stop()
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
        if self.round is not None:
            finished, self.round = self.round, None
            finished.callback(None)


def _describe(failure: Failure, config: HealthCheckConfig) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return f"{config.type} check timed out after {config.timeout}s"
    value = failure.value
    text = str(value) or type(value).__name__
    return f"{config.type} check failed: {text}"


# -- probes ------------------------------------------------------------

# what an HTTP probe reads and drops after the status line, waiting for the
# server to close, before it gives up and resets the connection
_DRAIN_LIMIT = 64 * 1024
_UNDECIDED = object()


class _Probe(protocol.Protocol):
    """
    The connection of one probe.  It closes without a reset (a reset makes
    servers log an error for every check), and reports its verdict once
    the connection is closed, so that nothing a probe opened outlives it.
    """

    def __init__(self, done: defer.Deferred[object]) -> None:
        self.done = done
        self.verdict: object = _UNDECIDED  # None: passed; else the exception

    def judge(self, error: Exception | None) -> None:
        if self.verdict is _UNDECIDED:
            self.verdict = error
            self.close()

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def give_up(self) -> None:
        """
        The check's time is up: reset the connection, and report the
        verdict if there is one already.
        """
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[union-attr]
        self.report()

    def report(self) -> None:
        if self.done.called or self.verdict is _UNDECIDED:
            return
        if self.verdict is None:
            self.done.callback(None)
        else:
            self.done.errback(self.verdict)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.verdict is _UNDECIDED:
            self.verdict = self.lost_early(reason)
        self.report()

    def lost_early(self, reason: Failure) -> Exception:
        return ProbeFailed(f"connection closed: {reason.getErrorMessage()}")


class _TCPProbe(_Probe):
    """
    Passes once connected; closes with a FIN at once.
    """

    def connectionMade(self) -> None:
        self.judge(None)


class _HTTPProbe(_Probe):
    """
    Send one GET and read the status line; anything beyond it is ignored,
    and a status line longer than 4 KiB is a failure.

    Once the status line is judged, the probe half-closes (plain TCP) and
    reads what the server still sends until it closes: closing a socket
    with unread bytes would send a reset.  Past L{_DRAIN_LIMIT} bytes it
    resets after all.
    """

    def __init__(self, request: bytes, expect: int, done: defer.Deferred[object], half_close: bool) -> None:
        super().__init__(done)
        self.half_close = half_close
        self.request = request
        self.expect = expect
        self.buffer = b""
        self.drained = 0

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.verdict is not _UNDECIDED:
            self.drained += len(data)
            if self.drained > _DRAIN_LIMIT:
                self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.buffer += data
        line, sep, _ = self.buffer.partition(b"\r\n")
        if not sep:
            if len(self.buffer) > 4096:
                self.judge(ProbeFailed("status line too long"))
                self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.drained = len(self.buffer) - len(line) - 2
        self.buffer = b""
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self.judge(ProbeFailed(f"not an HTTP response: {line[:80]!r}"))
        elif int(parts[1]) != self.expect:
            self.judge(ProbeFailed(f"status {int(parts[1])}, expected {self.expect}"))
        else:
            self.judge(None)

    def close(self) -> None:
        # we asked for Connection: close: the server closes after its
        # answer; a FIN from us tells one that waits for it (under TLS,
        # which cannot half-close, the check's timeout bounds the wait)
        if self.half_close:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def lost_early(self, reason: Failure) -> Exception:
        return ProbeFailed("connection closed before a status line")


def _probe(reactor: object, server: Server, timeout: float, build: Callable[[defer.Deferred[object]], _Probe],
           tls: Any = None) -> defer.Deferred[object]:
    probes: list[_Probe] = []

    def cancel(d: defer.Deferred[object]) -> None:
        connecting.cancel()
        for probe in probes:
            probe.give_up()

    done: defer.Deferred[object] = defer.Deferred(cancel)
    endpoint: Any
    if isIPAddress(server.host):
        # no name resolution (HostnameEndpoint would use a resolver thread)
        endpoint = TCP4ClientEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    elif isIPv6Address(server.host):
        endpoint = TCP6ClientEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    else:
        endpoint = HostnameEndpoint(reactor, server.host, server.port, timeout=max(timeout, 0.001))
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)

    def made() -> _Probe:
        probe = build(done)
        probes.append(probe)
        return probe

    factory = protocol.Factory.forProtocol(made)
    factory.noisy = False
    connecting = endpoint.connect(factory)

    def failed(reason: Failure) -> None:
        if not done.called:
            done.errback(reason)

    connecting.addErrback(failed)
    return done


def tcp_probe(reactor: object, server: Server, config: HealthCheckConfig, tls: Any = None) -> defer.Deferred[object]:
    """
    Succeed when a TCP connection to the server can be made.
    """
    return _probe(reactor, server, config.timeout, _TCPProbe)


def http_probe(reactor: object, server: Server, config: HealthCheckConfig, tls: Any = None) -> defer.Deferred[object]:
    """
    Succeed when C{GET path} answers the expected status.

    @param tls: the client TLS options when C{config.tls} is set (loaded
        from C{config.tls} when not given).
    """
    if config.tls is not None and tls is None:
        from rproxy.tls import client_tls_options

        tls = client_tls_options(config.tls.server_name or server.host, config.tls.ca, config.tls.verify)
    host = config.host or (f"[{server.host}]" if ":" in server.host else server.host) + f":{server.port}"
    lines = [f"GET {config.path} HTTP/1.1", f"Host: {host}", "Connection: close", "User-Agent: rproxy-health"]
    lines += [f"{name}: {value}" for name, value in config.headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return _probe(reactor, server, config.timeout, lambda d: _HTTPProbe(request, config.expect_status, d, tls is None), tls)


def make_prober(reactor: object) -> Prober:
    """
    The prober that dispatches on the check type, bound to a reactor.
    """

    def prober(server: Server, config: HealthCheckConfig, tls: Any) -> defer.Deferred[object]:
        if config.type == "http":
            return http_probe(reactor, server, config, tls)
        return tcp_probe(reactor, server, config)

    return prober
