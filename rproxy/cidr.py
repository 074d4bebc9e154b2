"""
CIDR lists: which client addresses an allow/deny list, C{trusted_proxies}
or any other address rule matches.

Pure and sans-I/O: a L{CIDRSet} is built once from the config's strings
(an address alone is a /32 or /128) and answers C{ip in cidrs} for the
text form of an address, as transports give it.  IPv4-mapped IPv6
addresses (C{::ffff:10.0.0.1}) match the IPv4 networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["AccessList", "CIDRSet", "parse_network"]


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    One network from C{"10.0.0.0/8"}, C{"::1"} or C{"192.0.2.7"}.

    @raise ValueError: not an address or network (host bits set count as
        an error: C{10.0.0.1/8} is most likely a typo).
    """
    return ipaddress.ip_network(text.strip(), strict=True)


class CIDRSet:
    """
    A set of networks, matched by integer masks per address family.
    """

    __slots__ = ("networks", "_v4", "_v6", "_cache")

    def __init__(self, networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        nets = [n if not isinstance(n, str) else parse_network(n) for n in networks]
        self.networks = tuple(nets)
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 6)
        # answers per address seen: clients come back; bounded
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"CIDRSet({[str(n) for n in self.networks]!r})"

    def __contains__(self, address: str) -> bool:
        cache = self._cache
        hit = cache.get(address)
        if hit is not None:
            return hit
        found = self._match(address)
        if len(cache) >= 4096:
            cache.clear()
        cache[address] = found
        return found

    def _match(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False  # (a UNIX socket's path, say: no network holds it)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        table = self._v4 if ip.version == 4 else self._v6
        return any(value & mask == net for net, mask in table)


class AccessList:
    """
    A frontend's or route's C{allow}/C{deny} lists: an address is refused
    if a C{deny} network holds it, or if there is an C{allow} list and
    none of its networks holds it (deny wins, as in nginx and HAProxy's
    usual C{tcp-request connection reject} pair).
    """

    __slots__ = ("allow", "deny")

    def __init__(self, allow: CIDRSet, deny: CIDRSet) -> None:
        self.allow = allow
        self.deny = deny

    def __repr__(self) -> str:
        return f"AccessList(allow={self.allow!r}, deny={self.deny!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccessList):
            return NotImplemented
        return (self.allow.networks, self.deny.networks) == (other.allow.networks, other.deny.networks)

    def __hash__(self) -> int:
        return hash((self.allow.networks, self.deny.networks))

    def permits(self, address: str) -> bool:
        if self.deny and address in self.deny:
            return False
        return not self.allow or address in self.allow
