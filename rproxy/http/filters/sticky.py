"""
Stickiness and hash keys: which server of the chosen pool a request
prefers.

  - L{StickyCookie} (C{http.sticky_cookie}): a client whose cookie names a
    server goes to it while it has a slot; every response from another
    server sets the cookie to that server's id: an HMAC of the backend's
    and server's names under C{http.sticky_secret} (or a key drawn per
    process), so that the cookie tells nothing of the server's address
    and an id naming no server of the pool is ignored.  The cookie is
    C{HttpOnly}, C{SameSite=Lax}, and C{Secure} on a TLS frontend.
  - L{HashKey}: for a pool balanced by consistent hash (C{ip-hash},
    C{hash}), the key its C{hash_key} names: the client's address, a
    header (C{header:NAME}) or a cookie (C{cookie:NAME}).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from rproxy.http.filters import Filter
from rproxy.http.reader import RequestHead

__all__ = ["StickyCookie", "HashKey", "cookie", "server_id"]

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


def server_id(secret: bytes, backend: str, server: str) -> bytes:
    """
    The opaque id of a server in a sticky cookie: a keyed hash of its
    backend's and its own name (never its address), 20 hex digits.
    """
    message = backend.encode() + b"\0" + server.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:20].encode()


# the key of server ids when the configuration gives none: one per
# process, so that a reload keeps the clients' cookies
_PROCESS_SECRET = os.urandom(32)


class StickyCookie(Filter):
    """
    @ivar secure: whether the cookie is marked C{Secure} (a TLS frontend).
    """

    _MAX_IDS = 10_000

    def __init__(self, name: bytes, secret: bytes | None = None, secure: bool = False) -> None:
        self.name = name
        self.secret = secret if secret is not None else _PROCESS_SECRET
        self.attributes = b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")
        self._ids: dict[tuple[str, str], bytes] = {}
        # id -> (backend, server) of the servers of the pools seen so far
        self._servers: dict[bytes, tuple[str, str]] = {}
        self._indexed: dict[str, tuple[str, ...]] = {}

    def id_of(self, backend: str, server: str) -> bytes:
        ids = self._ids
        sid = ids.get((backend, server))
        if sid is None:
            if len(ids) >= self._MAX_IDS:
                # (servers come and go in live pools: a bound, not a leak)
                ids.clear()
                self._servers.clear()
                self._indexed.clear()
            sid = ids[(backend, server)] = server_id(self.secret, backend, server)
            self._servers[sid] = (backend, server)
        return sid

    def choose(self, exchange: Any) -> None:
        pool = exchange.pool
        if exchange.pinned is not None or pool is None:
            return
        wanted = cookie(exchange.head, self.name)
        if not wanted:
            return
        backend = pool.config.name
        found = self._servers.get(wanted)
        if found is None:
            # a server not seen yet, or an id that names none (forged, or
            # from before a restart): index this pool's servers, once per
            # list of servers
            names = tuple(s.name for s in pool.servers)
            if self._indexed.get(backend) != names:
                for name in names:
                    self.id_of(backend, name)
                self._indexed[backend] = names
                found = self._servers.get(wanted)
        if found is not None and found[0] == backend:
            exchange.prefer = found[1]

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        server, pool = exchange.server, exchange.pool
        if server is not None and pool is not None and exchange.pinned is None:
            sid = self.id_of(pool.config.name, server.name)
            if cookie(exchange.head, self.name) != sid:
                extra.append((b"Set-Cookie", self.name + b"=" + sid + self.attributes))


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
            exchange.key = exchange.client_host.encode()
