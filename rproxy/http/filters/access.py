"""
Who the client is, and whether it may come in.

  - L{ClientAddress} (C{trusted_proxies}): a request from a trusted proxy
    is the client's that its X-Forwarded-For names: the right-most address
    that is not itself a trusted proxy (nginx's C{real_ip_recursive}).
    That address is C{exchange.client_host}, which allow lists, the access
    log and ip-hash read.  A trusted peer's X-Forwarded-For goes on with
    the peer appended; any other peer's is replaced by the peer's address,
    and its C{Forwarded} and C{X-Real-IP} are dropped.
  - L{AccessFilter} (C{allow}/C{deny} on a frontend and on its routes): a
    client address a list refuses is answered 403, before any other
    policy.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from rproxy.cidr import AccessList, CIDRSet
from rproxy.http.filters import Filter
from rproxy.http.routes import RouteTable

__all__ = ["ClientAddress", "AccessFilter", "forwarded_client", "route_of"]

# what an untrusted peer may not tell the server about the client: its
# X-Forwarded-For (replaced by the peer's address), Forwarded and X-Real-IP
_CLIENT_FIELDS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
_VERDICTS = 4096
# the longest X-Forwarded-For whose answer is remembered (4096 of them: 1 MiB)
_CACHED_FIELDS = 256


def route_of(routes: RouteTable, exchange: Any) -> Any:
    """
    The route a request will take (the route table's choice, made again
    for the policies checked before the choose phase), or None: by the
    target in normal form (L{rproxy.http.filters.routes.NormalTarget}).
    """
    return routes.match(exchange.head.host, exchange.target)


def _address(text: bytes) -> str | None:
    """
    One element of X-Forwarded-For as an address in its usual text form,
    or None: C{192.0.2.7}, C{192.0.2.7:5555}, C{2001:db8::1} and
    C{[2001:db8::1]:5555} are addresses.
    """
    text = text.strip()
    if text.startswith(b"["):
        text = text[1:].partition(b"]")[0]
    elif text.count(b":") == 1:
        text = text.partition(b":")[0]  # IPv4 with a port
    try:
        return str(ipaddress.ip_address(text.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        return None


def forwarded_client(peer: str, values: list[bytes], trusted: CIDRSet) -> str:
    """
    The client's address for a request from the trusted proxy C{peer}:
    walking X-Forwarded-For (its C{values}, in order) from the right, the
    first address that is not a trusted proxy; the left-most address if
    all are; the last trusted one when an element is not an address (what
    is left of it is not believed).
    """
    client = peer
    for element in reversed(b",".join(values).split(b",")):
        address = _address(element)
        if address is None:
            break
        client = address
        if address not in trusted:
            break
    return client


class ClientAddress(Filter):
    """
    C{trusted_proxies}: sets C{exchange.client_host} from a trusted peer's
    X-Forwarded-For, and drops that field, C{Forwarded} and C{X-Real-IP}
    from any other peer's request.
    """

    def __init__(self, trusted: CIDRSet) -> None:
        self.trusted = trusted
        # (peer, fields) -> client: a proxy's clients come back; bounded
        self._clients: dict[tuple[str, tuple[bytes, ...]], str] = {}

    def request(self, exchange: Any) -> None:
        peer = exchange.client.peer_host
        if peer not in self.trusted:
            return
        values = tuple(value for name, value in exchange.head.headers if name.lower() == b"x-forwarded-for")
        if not values:
            return
        if sum(map(len, values)) > _CACHED_FIELDS:
            # (a long chain, rare: not worth keeping)
            exchange.client_host = forwarded_client(peer, list(values), self.trusted)
            return
        clients = self._clients
        key = (peer, values)
        client = clients.get(key)
        if client is None:
            if len(clients) >= _VERDICTS:
                clients.clear()
            client = clients[key] = forwarded_client(peer, list(values), self.trusted)
        exchange.client_host = client

    def upstream_request(self, exchange: Any, set_headers: Any, remove: Any) -> Any:
        if exchange.client.peer_host in self.trusted:
            return set_headers, remove
        return set_headers, remove | _CLIENT_FIELDS


class AccessFilter(Filter):
    """
    The frontend's allow/deny lists, then those of the route the request
    takes: 403, with one log line, and counted as C{access} refusals.
    """

    def __init__(self, frontend: Any, access: AccessList | None, routes: RouteTable) -> None:
        self.frontend = frontend
        self.access = access
        self.routes = routes
        self.by_route = any(rule.access is not None for rule in routes.routes)
        # the frontend list's answer per address (clients come back); bounded
        self._verdicts: dict[str, bool] = {}

    @staticmethod
    def wanted(access: AccessList | None, routes: RouteTable) -> bool:
        return access is not None or any(rule.access is not None for rule in routes.routes)

    def request(self, exchange: Any) -> None:
        address = exchange.client_host
        access = self.access
        if access is not None:
            permitted = self._verdicts.get(address)
            if permitted and not self.by_route:
                return  # (the common case, in short)
            verdicts = self._verdicts
            permitted = verdicts.get(address)
            if permitted is None:
                if len(verdicts) >= _VERDICTS:
                    verdicts.clear()
                permitted = verdicts[address] = access.permits(address)
            if not permitted:
                self._refuse(exchange, address)
                return
        if self.by_route:
            rule = route_of(self.routes, exchange)
            if rule is not None and rule.access is not None and not rule.access.permits(address):
                self._refuse(exchange, address)

    def _refuse(self, exchange: Any, address: str) -> None:
        self.frontend.refusals["access"] += 1
        exchange.fail(403, f"{address} is not allowed")
