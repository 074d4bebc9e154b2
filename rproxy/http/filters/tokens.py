"""
Token-pool leases (C{token_pool}): each client connection holds a lease on
one pooled upstream session for its life; its requests carry that
session's bearer token (replacing the client's Authorization), and a 401
from the server marks the token bad so that the pool logs in again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.http.filters import Filter
from rproxy.tokenpool import Lease, NoTokens, TokenQueueFull, TokenQueueTimeout

__all__ = ["TokenLeaseFilter"]

_AUTHORIZATION = frozenset({b"authorization"})


def _note(exchange: Any, token: str) -> None:
    # (added to what earlier filters noted, not in place of it)
    if exchange.notes is None:
        exchange.notes = {"token": token}
    else:
        exchange.notes["token"] = token


class TokenLeaseFilter(Filter):
    doing = "leasing a token"

    def __init__(self, tokens: Any, log: Logger) -> None:
        self.tokens = tokens
        self.log = log

    def request(self, exchange: Any) -> defer.Deferred[None] | None:
        client = exchange.client
        lease = client.lease
        if lease is None:
            lease = self.tokens.try_lease()
            if lease is None:
                return self._wait(exchange, self.tokens.lease())
            client.lease = lease
        elif not lease.ready():
            return self._wait(exchange, lease.wait())
        _note(exchange, lease.token)
        return None

    def _wait(self, exchange: Any, d: defer.Deferred[Lease]) -> defer.Deferred[None]:
        d.addCallbacks(self._leased, self._no_token, callbackArgs=(exchange,), errbackArgs=(exchange,))
        return d  # type: ignore[return-value]

    def _leased(self, lease: Lease, exchange: Any) -> None:
        client = exchange.client
        if client.lease is None:
            if client.lost:
                lease.release()
                return
            client.lease = lease
        _note(exchange, lease.token)

    def _no_token(self, reason: Failure, exchange: Any) -> None:
        if reason.check(defer.CancelledError):
            return
        if reason.check(TokenQueueTimeout, TokenQueueFull, NoTokens):
            exchange.fail(503, reason.getErrorMessage(), retry_after=True)
        else:
            self.log.failure("leasing a token failed", reason)
            exchange.fail(502, "no token")

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        notes = exchange.notes
        if not notes or "token" not in notes:
            return set_headers, remove
        # replaces whatever Authorization the client sent
        bearer = (b"Authorization", b"Bearer " + notes["token"].encode("ascii"))
        return (*set_headers, bearer), remove | _AUTHORIZATION

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        notes = exchange.notes
        if exchange.status == 401 and notes and notes.get("token") is not None:
            lease = exchange.client.lease
            if lease is not None:
                lease.unauthorized(notes["token"])

    def closed(self, connection: Any) -> None:
        if connection.lease is not None:
            connection.lease.release()
