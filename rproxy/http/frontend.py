"""
The factory of an HTTP frontend: its admission, its filters, its
statistics and its timers.

Module map of the HTTP engine (L{rproxy.http}):

  - C{reader.py}: the strict request parser (sans I/O).
  - C{headers.py}: request and response heads as sent on.
  - C{connection.py}: L{HTTPConnection}, a client connection: reading,
    pipelining, the producer slot, errors.
  - C{exchange.py}: L{Exchange}, one request and its response: the engine
    (phases, framing, streaming, upgrade).
  - C{failures.py}: its failure endings (502, 503, 504, abandon) and
    retries, the exchange's base class.
  - C{state.py}: the exchange's states and transitions.
  - C{upstream.py}: the connector interface, L{UpstreamConnection} and the
    keep-alive pool per peer (L{UpstreamPool}).
  - C{filters/}: the policy, one filter a module, and the phase contract.
  - C{retrybudget.py}: how many retries the frontend may make.
  - C{accesslog.py}, C{routes.py}: the access log file, the route table.

Errors are answered, never a traceback: 400/413/414/431/505 from the
reader, 404 no route, 502 connect failure or invalid or lost upstream
response, 503 no server up (Retry-After), 504 C{response_timeout}.

A drain is a soft stop: idle keep-alive connections close, busy ones get
C{Connection: close} on the response in flight and close after it.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.admission import Admission, AdmittedFigures, ConnectionLimit
from rproxy.http.accesslog import AccessLogFile
from rproxy.http.connection import HTTPConnection
from rproxy.http.exchange import Exchange
from rproxy.http.filters import Chain, Filter
from rproxy.http.filters.accesslog import AccessLogFilter
from rproxy.http.filters.circuitbreaker import CircuitBreakerFilter
from rproxy.http.filters.cors import CorsFilter
from rproxy.http.filters.direct import DirectRouteFilter
from rproxy.http.filters.policy import access_filters, auth_filters
from rproxy.http.filters.ratelimit import RateLimitFilter
from rproxy.http.filters.rewrite import RewriteFilter
from rproxy.http.filters.routes import HeaderRules, RouteFilter
from rproxy.http.filters.sticky import HashKey, StickyCookie
from rproxy.http.filters.tokens import TokenLeaseFilter
from rproxy.http.filters.tracing import TokenWaitMark, TracingFilter
from rproxy.http.headers import error_response
from rproxy.http.retrybudget import RetryBudget
from rproxy.http.routes import RouteTable
from rproxy.http.upstream import UpstreamPool
from rproxy.pool import Pool
from rproxy.shortage import ShortageLog
from rproxy.tls import HTTP_ALPN

__all__ = ["HTTPFrontend", "DURATION_BUCKETS", "default_filters", "policy_filters", "routing_filters"]

# request duration histogram buckets (seconds); the last is +Inf
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    float("inf"))
_FIRST_BUCKET = DURATION_BUCKETS[0]


def default_filters(frontend: HTTPFrontend) -> list[Filter]:
    """
    The filters of an HTTP frontend's configuration: the policy every
    HTTP frontend has (L{policy_filters}) around this one's routing
    (L{routing_filters}).
    """
    return policy_filters(frontend, routing_filters(frontend))


def policy_filters(frontend: HTTPFrontend, routing: list[Filter], log_notes: tuple[str, ...] = ()) -> list[Filter]:
    """
    The policy of any HTTP frontend, a tunnel's C{mode: http} public port
    included (L{rproxy.tunnel.httpmode}), in phase order around C{routing},
    the filters that choose the upstream: what refuses a request before it
    is routed goes before them (tracing first, whose span covers the
    others' work, the client's address behind trusted
    proxies, allow/deny and redirects, rate limits, CORS preflights, which
    carry no credentials, then authentication), what looks at the chosen
    upstream or the outcome after them (circuit breakers; the access log
    last, so that it sees what every filter did).  A new policy (a filter
    every frontend has) is added here; a new way to route, in
    L{routing_filters}.  C{log_notes}: the names of C{exchange.notes} the
    access log adds to its lines (a tunnel's agent and model).
    """
    config = frontend.config
    http = config.http
    filters: list[Filter] = []
    tracing = TracingFilter(frontend.telemetry, frontend) if frontend.telemetry is not None else None
    if tracing is not None:  # first: its span covers the other filters' work
        filters.append(tracing)
    filters += access_filters(frontend)
    if RateLimitFilter.wanted(config):
        filters.append(RateLimitFilter.make(frontend))
    if http.cors:
        filters.append(CorsFilter())
    filters += auth_filters(frontend)
    for f in routing:
        filters.append(f)
        if tracing is not None and isinstance(f, TokenLeaseFilter):
            filters.append(TokenWaitMark(tracing))  # (the token wait, on the span)
    if CircuitBreakerFilter.wanted(frontend.pools):
        filters.append(CircuitBreakerFilter())
    if http.access_log != "off":
        filters.append(AccessLogFilter(frontend, http.access_log == "json", log_notes))
    return filters


def routing_filters(frontend: HTTPFrontend) -> list[Filter]:
    """
    The routing of an HTTP frontend's configuration, in phase order: a
    token is leased first; a direct
    route chooses before the route table; stickiness and the hash key
    pick within the chosen pool.  Filters with nothing to do for this
    configuration are left out (header rules without rules, hash keys
    with no hashing pool): the frontend is configured again whenever
    its pools or routes change.
    """
    http = frontend.config.http
    filters: list[Filter] = []
    if frontend.tokens is not None:
        filters.append(TokenLeaseFilter(frontend.tokens, frontend.log))
    if http.direct_routes:
        filters.append(DirectRouteFilter(frontend.pools))
    filters.append(RouteFilter(frontend.routes, frontend.pools))
    if RewriteFilter.wanted(frontend.routes):
        filters.append(RewriteFilter(frontend.routes))
    if HeaderRules.wanted(frontend.routes):
        filters.append(HeaderRules())
    if http.sticky_cookie is not None:
        filters.append(StickyCookie(http.sticky_cookie.encode(),
                                    http.sticky_secret.encode() if http.sticky_secret else None,
                                    secure=frontend.scheme == b"https"))
    if HashKey.wanted(frontend.pools):
        filters.append(HashKey())
    return filters


@implementer(IProtocolNegotiationFactory)
class HTTPFrontend(AdmittedFigures, Factory):
    """
    The factory of one C{protocol: http} frontend.  Admission (limits,
    queue, idle sweep, drain) is an L{Admission} it owns, as the TCP
    frontend does.
    """

    log = Logger()
    noisy = False
    shortage: ShortageLog | None = None

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN may select on a TLS listener of this frontend: HTTP/1.1,
        the one version it speaks (a client offering only h2 still
        connects, without ALPN).
        """
        return list(HTTP_ALPN)

    def __init__(self, config: Any, pools: dict[str, Pool], reactor: Any, clock: Any,
                 upstreams: UpstreamPool, limit: ConnectionLimit | None = None,
                 filters: Callable[[HTTPFrontend], list[Filter]] | None = None,
                 error_response: Callable[..., bytes] = error_response) -> None:
        self.admission = Admission(config.name, config, clock, limit)
        self._filters = filters or default_filters
        # the complete response (then close) of an error rproxy answers itself
        self.error_response = error_response
        self.pool = pools[config.backend] if config.backend else next(iter(pools.values()))
        self.reactor = reactor
        self.clock = clock
        self.pools = pools
        self.upstreams = upstreams
        self._tokens: Any = None
        self._telemetry: Any = None
        self.access_file: AccessLogFile | None = None
        self.connect_errors = 0
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.configure(config)
        self.active_requests = 0
        self.retries_total = 0
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self._deadlines: IDelayedCall | None = None
        self.counted_requests = 0
        self.budget = RetryBudget(clock)
        # the API key chain (rproxy.store.auth.KeyChain) for auth: {api_keys: true}; set by the service
        self.keys: Any = None
        # requests refused by the access filters, by reason (rproxy_http_refused)
        self.refusals: collections.Counter[str] = collections.Counter()

    # -- configuration -----------------------------------------------------

    def configure(self, config: Any) -> None:
        self.admission.config = config
        self.routes = RouteTable(config.routes, config.backend)
        http = config.http
        # read once per request: kept as attributes
        self.header_timeout = http.header_timeout
        self.response_timeout = http.response_timeout
        self._access_file(http.access_log_path if http.access_log != "off" else None)
        self.host_is_server = http.host_header == "server"
        self.max_head = http.max_head
        self.scheme = b"https" if config.listen.startswith("ssl:") or config.tls else b"http"
        self.chain = Chain(self._filters(self))

    @property
    def tokens(self) -> Any:
        """
        The token pool whose leases this frontend's requests carry (set
        after configure, by the service), or None.
        """
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: Any) -> None:
        self._tokens = tokens
        self.chain = Chain(self._filters(self))

    @property
    def telemetry(self) -> Any:
        """
        The L{rproxy.telemetry.provider.Telemetry} tracing this frontend's
        requests (set by the service), or None.
        """
        return self._telemetry

    @telemetry.setter
    def telemetry(self, telemetry: Any) -> None:
        self._telemetry = telemetry
        self.chain = Chain(self._filters(self))

    # -- connections -------------------------------------------------------

    def buildProtocol(self, addr: object) -> HTTPConnection:  # type: ignore[override]
        return HTTPConnection(self, addr)

    def admit(self, conn: HTTPConnection) -> None:
        self.admission.admit(conn)

    def forget(self, conn: HTTPConnection) -> None:
        self.closed_bytes_out += conn.received
        self.closed_bytes_in += conn.delivered
        self.admission.forget(conn)
        if not self.connections and self._deadlines is not None:
            if self._deadlines.active():
                self._deadlines.cancel()
            self._deadlines = None

    def shortage_failed(self, reason: Failure) -> None:
        """
        A connect for one of our clients failed for want of a local
        resource: logged once per episode, never charged to a server.
        """
        if self.shortage is None:
            self.shortage = ShortageLog(self.log, self.clock, f"frontend {self.name}")
        self.shortage.failed(reason)

    # -- the access log file -----------------------------------------------

    def _access_file(self, path: str | None) -> None:
        """
        Log requests to the file at C{path} (None: to the process log);
        the same path again is reopened, for log rotation.
        """
        current = self.access_file
        if current is not None and current.path == path:
            current.reopen()
            return
        if current is not None:
            current.close()
            self.access_file = None
        if path is None:
            return
        try:
            self.access_file = AccessLogFile(path, self.clock)
        except OSError as e:
            self.log.error("frontend {frontend}: access log {path}: cannot open: {why}; logging to the process log",
                           frontend=self.name, path=path, why=e.strerror or e)

    def reopen_access_log(self) -> None:
        """
        Start a new access log file at the same path (after a rotation).
        """
        if self.access_file is not None:
            self.access_file.reopen()

    def _close_access_log(self, result: Any) -> Any:
        # every request is logged once the connections are gone
        if self.access_file is not None:
            self.access_file.close()
        return result

    # -- timeouts ----------------------------------------------------------

    def deadline(self, timeout: float, now: float | None = None) -> float:
        """
        The time C{timeout} seconds from C{now} (the clock's time if None),
        with the sweep that enforces header and response timeouts running.
        """
        if self._deadlines is None:
            http = self.config.http
            timeouts = [t for t in (http.header_timeout, http.response_timeout) if t > 0]
            tick = min(1.0, max(0.02, min(timeouts, default=1.0) / 4))
            self._deadlines = self.clock.callLater(tick, self._sweep_deadlines, tick)
        return (now if now is not None else self.clock.seconds()) + timeout

    def _sweep_deadlines(self, tick: float) -> None:
        """
        One timer per frontend instead of two per request: a request head
        or a response is late by at most a quarter of its timeout.
        """
        self._deadlines = None
        now = self.clock.seconds()
        pending = False
        for conn in list(self.connections):
            if conn.head_deadline is not None:
                if now >= conn.head_deadline:
                    conn.head_timed_out()
                else:
                    pending = True
            exchange = conn.exchange
            if exchange is not None and exchange.deadline is not None:
                if now >= exchange.deadline:
                    exchange.timed_out()
                else:
                    pending = True
        if pending:
            self._deadlines = self.clock.callLater(tick, self._sweep_deadlines, tick)

    # -- retries -----------------------------------------------------------

    def retry_budget_allows(self) -> bool:
        """
        Whether one more retry fits the budget (L{RetryBudget}).
        """
        return self.budget.allows(self.counted_requests)

    @property
    def budgeted_retries(self) -> int:
        return self.budget.spent

    # -- statistics --------------------------------------------------------

    def count(self, exchange: Exchange, now: float | None = None) -> None:
        """
        An exchange is over: its log phase, and the frontend's counts.
        """
        pool = exchange.pool
        backend = pool.config.name if pool is not None else "-"
        for f in exchange.chain.log:
            f.log(exchange, backend)
        key = (backend, exchange.status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if now is None:
            now = self.clock.seconds()
        budget = self.budget
        if now >= budget.next_tick:
            budget.tick(now, self.counted_requests)
        self.counted_requests += 1
        seconds = now - exchange.started
        self.duration_sum += seconds
        # (most requests take less than the first bucket: no search for them)
        self.duration_buckets[0 if seconds <= _FIRST_BUCKET else bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def count_status(self, status: int) -> None:
        self.requests[("-", status)] += 1

    def count_refused(self, exchange: Exchange) -> None:
        """
        A request the reader refused (C{exchange.status}): its log phase
        (with the backend it had been routed to, if it had), and counted
        with no backend.
        """
        pool = exchange.pool
        backend = pool.config.name if pool is not None else "-"
        for f in exchange.chain.log:
            f.log(exchange, backend)
        self.count_status(exchange.status)

    def bytes_totals(self) -> tuple[int, int]:
        """
        (from clients, to clients), open connections included.
        """
        out, back = self.closed_bytes_out, self.closed_bytes_in
        for conn in self.connections:
            out += conn.received
            back += conn.delivered
        return out, back

    # -- draining ----------------------------------------------------------

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        A soft stop (HAProxy's and nginx's): idle keep-alive connections
        close now; busy ones finish the request in flight, whose response
        says C{Connection: close}, and close after it.  What is left at
        the end of C{grace} is cut (L{Admission.drain}).
        """
        for conn in list(self.connections):
            conn.drain()
        drained = self.admission.drain(grace)
        drained.addBoth(self._close_access_log)
        return drained
