"""
Listen addresses: the one parser of endpoint strings.

The configuration checks every listen string with L{parse_endpoint}, and
the service builds its listening endpoints from the same parse
(L{rproxy.transport.server_endpoint}), so a string that passes
C{check-config} is one the service can use: a misspelt option such as
C{tcp:8080:interfce=127.0.0.1} is refused here, with the options the type
takes, instead of failing when the service starts.

The grammar is Twisted's (C{serverFromString}): parts separated by C{:},
C{name=value} options, a backslash escaping the next character; the
options of each type are those of Twisted's parser for it.
"""

from __future__ import annotations

import difflib

import attrs

from rproxy.config.values import brief, parse_hostport, text

__all__ = ["ENDPOINT_TYPES", "Endpoint", "parse_endpoint", "normalize_listen", "split_endpoint"]

ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")

# the parameters of Twisted's parser for each type, in positional order
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    # Twisted's sslmethod, extraCertChain and dhParameters are not taken:
    # rproxy's TLS listener (rproxy.tls) does not honour them (a
    # certificate file may carry its chain)
    "ssl": ("port", "privateKey", "certKey", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


@attrs.frozen
class Endpoint:
    """
    A parsed listen string.

    @ivar kind: one of L{ENDPOINT_TYPES}.
    @ivar params: every parameter given, by Twisted's name for it.
    @ivar description: the string it was parsed from.
    """

    kind: str
    params: tuple[tuple[str, str], ...]
    description: str

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return default

    @property
    def port(self) -> int | None:
        value = self.get("port")
        return None if value is None else int(value)

    @property
    def interface(self) -> str:
        return self.get("interface") or ""

    @property
    def backlog(self) -> int | None:
        value = self.get("backlog")
        return None if value is None else int(value)

    def same_socket(self, other: Endpoint) -> bool:
        """
        Whether both describe the same listening socket (so a reload that
        changes only how the address is written keeps the socket).
        """
        if self.kind != other.kind:
            return False
        if self.port is not None:
            return (self.port, self.interface) == (other.port, other.interface) and self.port != 0
        return self.params == other.params


def _tokens(description: str) -> list[tuple[str, str | None]]:
    """
    The C{:}-separated parts of C{description} as C{(name, value)} for an
    option and C{(value, None)} for a positional part, escapes resolved
    (Twisted's C{_tokenize}: only the first unescaped C{=} of a part counts).
    """
    parts: list[tuple[str, str | None]] = []
    current: list[str] = []
    key: str | None = None
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append((key, "".join(current)) if key is not None else ("".join(current), None))
            current, key = [], None
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    parts.append((key, "".join(current)) if key is not None else ("".join(current), None))
    return parts


def split_endpoint(description: str) -> list[str]:
    """
    The C{:}-separated parts of an endpoint string, escapes resolved
    (C{name=value} parts kept whole).
    """
    return [part if value is None else f"{part}={value}" for part, value in _tokens(description)]


def _port(value: str) -> str:
    if not value.isdigit() or len(value) > 5:
        raise ValueError(f"invalid port {brief(value)}")
    if int(value) > 65535:
        raise ValueError(f"port {int(value)} out of range")
    return value


def parse_endpoint(description: str) -> Endpoint:
    """
    Parse and check a listen endpoint string such as
    C{tcp:8080:interface=127.0.0.1}.

    @raise ValueError: with a message fit to follow a key path.
    """
    tokens = _tokens(description)
    kind, value = tokens[0]
    if value is not None or kind not in ENDPOINT_TYPES:
        raise ValueError(
            f"unknown endpoint type {brief(description.split(':', 1)[0])} (expected host:port or one of "
            + ", ".join(ENDPOINT_TYPES) + ")"
        )
    names = _PARAMETERS[kind]
    given: dict[str, str] = {}
    positional = [part for part, v in tokens[1:] if v is None]
    if len(positional) > len(names):
        raise ValueError(f"too many parts in {brief(description)} ({kind} takes {', '.join(names)})")
    for name, part in zip(names, positional, strict=False):
        given[name] = part
    for name, v in tokens[1:]:
        if v is None:
            continue
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown option {brief(name)} for {kind} endpoints "
                             f"({hint}{kind} takes {', '.join(names)})")
        if name in given:
            raise ValueError(f"{name} given twice in {brief(description)}")
        given[name] = v
    first = names[0]
    if first not in given or (first == "address" and not given[first]):
        raise ValueError(f"no {'path' if first == 'address' else first} in {brief(description)}")
    if kind == "ssl" and "privateKey" not in given:
        raise ValueError(f"no privateKey in {brief(description)} (ssl endpoints need privateKey=FILE)")
    if "port" in given:
        _port(given["port"])
    if "backlog" in given and not (given["backlog"].isdigit() and 0 < int(given["backlog"]) <= 65535):
        raise ValueError(f"invalid backlog {brief(given['backlog'])} (1 to 65535)")
    if kind == "systemd":
        if given["domain"] not in _SYSTEMD_DOMAINS:
            raise ValueError(f"systemd domain {brief(given['domain'])} is not one of {', '.join(_SYSTEMD_DOMAINS)}")
        if ("index" in given) == ("name" in given):
            raise ValueError("a systemd endpoint takes index or name (one of them)")
        if "index" in given and not given["index"].isdigit():
            raise ValueError(f"invalid systemd index {brief(given['index'])}")
    return Endpoint(kind, tuple((name, given[name]) for name in names if name in given), description)


def normalize_listen(value: str) -> str:
    """
    Check a listen address and return it as a Twisted endpoint string.

    C{host:port} becomes C{tcp:port:interface=host}; endpoint strings are
    checked by L{parse_endpoint}.
    """
    value = value.strip()
    first = value.split(":", 1)[0]
    if first not in ENDPOINT_TYPES and ":" in value:
        host, port = parse_hostport(value, allow_zero=True)
        if host in ("", "*", "0.0.0.0"):
            return f"tcp:{port}"
        escaped = host.replace(":", "\\:")
        return f"tcp:{port}:interface={escaped}"
    if first not in ENDPOINT_TYPES and value.isdigit():
        raise ValueError(f"{brief(value)} is not an address; write tcp:{value} or 127.0.0.1:{value}")
    parse_endpoint(value)
    return value


def listen(value: object) -> str:
    """
    The converter for a listen key.
    """
    return normalize_listen(text(value))

