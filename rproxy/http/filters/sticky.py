"""
Stickiness and hash keys: which server of the chosen pool a request
prefers.

  - L{StickyCookie} (C{http.sticky_cookie}): a client whose cookie names a
    server goes to it while it has a slot; every response from another
    server sets the cookie to that server's name.
  - L{HashKey}: for a pool balanced by consistent hash (C{ip-hash},
    C{hash}), the key its C{hash_key} names: the client's address, a
    header (C{header:NAME}) or a cookie (C{cookie:NAME}).
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.reader import RequestHead

__all__ = ["StickyCookie", "HashKey", "cookie"]

_HASHING = frozenset({"ip-hash", "hash"})


def cookie(head: RequestHead, name: bytes) -> bytes | None:
    """
    The value of cookie C{name} in the request, or None.
    """
    for key, value in head.headers:
        if key.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            cookie_name, eq, cookie_value = part.strip().partition(b"=")
            if eq and cookie_name == name:
                return cookie_value.strip().strip(b'"')
    return None


class StickyCookie(Filter):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def choose(self, exchange: Any) -> None:
        if exchange.pinned is None:
            wanted = cookie(exchange.head, self.name)
            if wanted:
                exchange.prefer = wanted.decode("ascii", "replace")

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        server = exchange.server
        if server is not None and exchange.pinned is None:
            name = server.name.encode()
            if cookie(exchange.head, self.name) != name:
                extra.append((b"Set-Cookie", self.name + b"=" + name + b"; Path=/; HttpOnly"))


class HashKey(Filter):
    @staticmethod
    def wanted(pools: Any) -> bool:
        return any(pool.config.algorithm in _HASHING for pool in pools.values())

    def choose(self, exchange: Any) -> None:
        pool = exchange.pool
        if pool is None or pool.config.algorithm not in _HASHING:
            return
        kind, _, name = pool.config.hash_key.partition(":")
        if kind == "header":
            exchange.key = exchange.head.header(name.lower().encode())
        elif kind == "cookie":
            exchange.key = cookie(exchange.head, name.encode())
        else:
            exchange.key = exchange.client.peer_ip
