"""
How an exchange fails, and when it tries again.

L{ExchangeFailures} is the half of L{rproxy.http.exchange.Exchange} that
runs when something goes wrong: no server (503), a connect failure, an
invalid or lost upstream response (502), no response in time (504), a bug
in a callback (502, logged), a client gone (abandon).  Each ends the
current attempt (the C{attempt_end} phase) and gives back the server slot
and the upstream connection, then either retries or answers and moves the
exchange to C{DONE}.

The retry rule: an idempotent request without a body is retried on another
server after a connect failure, and on a new connection after a reused one
turned out to be closed, within C{retries} and the frontend's retry
budget; after a refused connect any request is retried, outside the budget
(nothing was sent: HAProxy's and nginx's rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer, error
from twisted.python.failure import Failure

from rproxy.http.state import DONE, DUPLEX
from rproxy.http.upstream import PeerRefused
from rproxy.pool import NoServerAvailable, QueueFull, QueueTimeout
from rproxy.shortage import is_local

if TYPE_CHECKING:
    from rproxy.http.exchange import Exchange
    from rproxy.http.upstream import UpstreamConnection

__all__ = ["ExchangeFailures", "IDEMPOTENT"]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class ExchangeFailures:
    """
    The failure endings and retries of an L{rproxy.http.exchange.Exchange}
    (a base class of it: the fields, and the methods these call, are the
    exchange's).
    """

    __slots__ = ()

    def no_server(self: Exchange, reason: Failure) -> None:
        self._pending = None
        if reason.check(defer.CancelledError):
            return
        if reason.check(NoServerAvailable, QueueFull, QueueTimeout):
            self.fail(503, reason.getErrorMessage(), retry_after=True)
        else:
            self.frontend.log.failure("choosing a server failed", reason)
            self.fail(502, "no server")

    def connect_failed(self: Exchange, reason: Failure) -> None:
        self._pending = None
        if reason.check(defer.CancelledError):
            return
        server, pool = self.server, self.pool
        assert server is not None and pool is not None
        self.server = None
        self._attempt_over(server, f"connect: {reason.getErrorMessage()}")
        if is_local(reason):
            # our own shortage (descriptors, ...): not the server's fault,
            # and another server would fail the same way
            pool.release(server)
            self.frontend.shortage_failed(reason)
            if self.state is not DONE:
                self.fail(502, "out of local resources")
            return
        pool.record_failure(server, reason.getErrorMessage())
        pool.release(server)
        self.frontend.connect_errors += 1
        if self.state is DONE:
            return
        # a refused connect sent nothing: trying another server is safe
        # whatever the method, and costs the refusing server nothing, so
        # it takes no retry budget (HAProxy's and nginx's rule)
        if (
            (self.may_retry() if not reason.check(error.ConnectionRefusedError) else self.may_retry_refused())
            and pool.any_up(self.tried)
        ):
            self.frontend.retries_total += 1
            self.acquire()
            return
        self.fail(502, str(reason.value) if reason.check(PeerRefused) else f"cannot connect to {server.name}")

    def may_retry(self: Exchange) -> bool:
        return (
            self.pinned is None
            and self.head.method in IDEMPOTENT
            and not self.head.has_body
            and self.attempts <= self.frontend.config.http.retries
            and self.frontend.retry_budget_allows()
        )

    def may_retry_refused(self: Exchange) -> bool:
        return self.pinned is None and self.attempts <= self.frontend.config.http.retries

    def _drop_upstream(self: Exchange) -> UpstreamConnection | None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.exchange = None
            if not upstream.lost:
                upstream.transport.abortConnection()  # type: ignore[union-attr]
        return upstream

    def _callback_failed(self: Exchange, reason: Failure, what: str) -> None:
        """
        What a callback of a filter's wait, a server pick or a connect
        raised (a bug): one line in the log, the exchange's resources given
        back, and the client answered 502 (or cut, if its answer had begun).
        """
        self._pending = None
        if self.state is DONE and reason.check(defer.CancelledError):
            return  # the exchange ended while this waited (fail, abandon)
        self.frontend.log.error(
            "frontend {frontend}: {what} failed: {why}",
            frontend=self.frontend.name, what=what, why=f"{reason.type.__name__}: {reason.getErrorMessage()}",
        )
        self._drop_upstream()
        self.release_server()
        if self.state < DUPLEX:
            self.fail(502, f"internal error {what}")
            return
        self.state = DONE
        if not self.client.lost:
            self.client.abort()

    def upstream_failed(self: Exchange, why: str, invalid: bool = False) -> None:
        self.flush()
        if self.state is DONE:
            return
        server, pool = self.server, self.pool
        self.deadline = None
        upstream = self._drop_upstream()
        if self.state >= DUPLEX:
            # the head is out: all the client can be told is a cut
            self.state = DONE
            self.release_server(outcome=f"upstream: {why}")
            self.frontend.count(self)
            self.client.abort()
            return
        retry = upstream is not None and upstream.reused and not self.got_bytes and self.may_retry()
        if server is not None and pool is not None:
            self._attempt_over(server, f"upstream: {why}")
            pool.release(server)
            self.server = None
            if not retry:
                pool.record_failure(server, why)
        if retry:
            # a kept-alive connection the server had closed: try a fresh one
            self.frontend.retries_total += 1
            self.tried = self.tried[:-1]
            self.got_bytes = False
            self.acquire()
            return
        self.fail(502, f"upstream: {why}")

    def timed_out(self: Exchange) -> None:
        self.deadline = None
        self._drop_upstream()
        self.release_server(outcome="timeout")
        self.fail(504, f"no response within {self.frontend.config.http.response_timeout}s")

    def fail(self: Exchange, status: int, message: str, retry_after: bool = False,
             headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """
        Answer the client with an error (with C{headers} besides, such as
        a 401's WWW-Authenticate) and close its connection (-> DONE).
        """
        if self.state is DONE and status != 504:
            return
        self.state = DONE
        self.status = status
        self.deadline = None
        if self._pending is not None:
            d, self._pending = self._pending, None
            d.cancel()
        self.frontend.count(self)
        self.client.send_error(status, message, retry_after, headers)

    def abandon(self: Exchange) -> None:
        """
        The client went away (-> DONE).
        """
        if self.state is DONE:
            return
        self.state = DONE
        self.deadline = None
        if self._pending is not None:
            d, self._pending = self._pending, None
            d.cancel()
        self._drop_upstream()
        self.release_server()
