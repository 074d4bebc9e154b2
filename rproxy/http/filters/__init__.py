"""
Filters: the policy of the HTTP engine, in named phases.

The engine (L{rproxy.http.exchange}) knows no policy by name; a frontend
has an ordered list of filters, and each phase calls, in that order, the
filters that define its method (Pingora's C{ProxyHttp} hooks).  The phase
contract:

  - C{request(exchange) -> Deferred | None}: the request head is in.  Look
    at it, or answer it yourself (C{exchange.answer(...)} for a bodiless
    answer on a kept connection, C{exchange.fail(status, message)} for an
    error that closes it): the chain stops there.  Return a Deferred to
    make the engine wait (it fires None; the chain goes on with the next
    filter; a failure is logged as C{doing} and answered 502).
  - C{choose(exchange) -> None}: choose the upstream: set
    C{exchange.pool}, and optionally C{pinned} (the one server allowed),
    C{prefer} (a server to try first), C{key} (the consistent-hash key),
    C{target} (the target sent on), C{route} (what chose it).  May answer
    like C{request}.  No pool after this phase is a 404.
  - C{attempt(exchange, server) -> None}: an upstream attempt begins: the
    server is chosen (C{exchange.attempts} counts this one); a connection
    to it is taken next.  Called once per attempt, retries included.
  - C{attempt_end(exchange, server, outcome) -> None}: that attempt is
    over; C{outcome} is the response's status (an int) if a response head
    came, else a short reason (a str: "connect: ...", "upstream: ...",
    "timeout", "aborted").  Called exactly once per C{attempt}.
  - C{upstream_request(exchange, set_headers, remove) -> (set_headers,
    remove)}: the head about to be sent to the server: return the header
    fields to set (a tuple of (name, value)) and the lowercase names to
    remove, adding to what the previous filters returned.
  - C{response(exchange, extra) -> None}: the final response head from the
    server (C{exchange.status}); append fields to C{extra} (a list).
  - C{log(exchange, backend) -> None}: the exchange is over (answered,
    failed or upgraded): C{backend} is its pool's name or C{"-"}.
  - C{closed(connection) -> None}: a client connection has ended (give back
    what the filter held for it).

Every phase is synchronous but C{request}; none may raise (the engine
does not catch: a filter's failure is a bug).  A filter holds its
configuration; per-request values go on C{exchange.notes} (a dict, None
until a filter sets one), per-connection ones on the connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Filter", "Chain", "PHASES"]

PHASES = ("request", "choose", "attempt", "attempt_end", "upstream_request", "response", "log", "closed")


class Filter:
    """
    A policy: override the phase methods it takes part in (see the module).

    @cvar doing: what the filter's wait does, for the log line of a failure.
    """

    doing = "a filter"

    def request(self, exchange: Any) -> Any:
        return None

    def choose(self, exchange: Any) -> None:
        pass

    def attempt(self, exchange: Any, server: Any) -> None:
        pass

    def attempt_end(self, exchange: Any, server: Any, outcome: int | str) -> None:
        pass

    def upstream_request(self, exchange: Any, set_headers: tuple[tuple[bytes, bytes], ...],
                         remove: frozenset[bytes]) -> tuple[tuple[tuple[bytes, bytes], ...], frozenset[bytes]]:
        return set_headers, remove

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        pass

    def log(self, exchange: Any, backend: str) -> None:
        pass

    def closed(self, connection: Any) -> None:
        pass


class Chain:
    """
    A frontend's filters, sorted by phase: each phase's tuple holds the
    filters that override its method, so that a phase no filter takes
    part in costs the engine an empty loop.
    """

    __slots__ = ("filters", *PHASES)

    def __init__(self, filters: Sequence[Filter] = ()) -> None:
        self.filters = tuple(filters)
        for phase in PHASES:
            base = getattr(Filter, phase)
            setattr(self, phase, tuple(f for f in self.filters if getattr(type(f), phase) is not base))

    def __repr__(self) -> str:
        return f"<Chain {[type(f).__name__ for f in self.filters]}>"
