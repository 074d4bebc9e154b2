"""
Config of the connection-level features: the PROXY protocol (accepted on
frontends, sent to backends), the L4 access log of TCP frontends, one
port for several protocols (C{protocol: detect}) and TLS passthrough by
SNI.

  - frontends: C{proxy_protocol: true} (or C{{from: [CIDR, ...], timeout:
    3s}}),
    C{access_log: {format: tcplog|json, path: FILE}} (tcp frontends),
    C{detect: {tls: F, http: F, default: F, timeout: 3s}} (with
    C{protocol: detect}), C{tls_passthrough: {sni: {NAME: BACKEND},
    default: BACKEND, timeout: 5s}} (tcp frontends).
  - backends: C{send_proxy: v1|v2}.

Errors name the key path, as everywhere in L{rproxy.config}.
"""

from __future__ import annotations

import difflib
from typing import Any

import attrs

from rproxy.config import values as v
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief

__all__ = [
    "DetectOptions",
    "L4LogOptions",
    "PassthroughOptions",
    "ProxyProtocolOptions",
    "check_references",
    "read_frontend_l4",
    "read_send_proxy",
]


@attrs.frozen
class ProxyProtocolOptions:
    """
    C{proxy_protocol:} of a frontend: the header (v1 or v2) must arrive
    within C{timeout} seconds.

    @ivar sources: (C{from:}) the networks of the proxies allowed to send
        one (a connection from elsewhere is closed at accept); None:
        anyone (the port must then be reachable by the proxies only).
    """

    timeout: float = 5.0
    sources: tuple[Any, ...] | None = None


@attrs.frozen
class L4LogOptions:
    """
    C{access_log:} of a tcp frontend: one line per connection, HAProxy's
    C{tcplog} shape or JSON, to C{path} (None: the process log).
    """

    format: str = "tcplog"
    path: str | None = None


@attrs.frozen
class DetectOptions:
    """
    C{detect:} of a C{protocol: detect} frontend: which frontend serves
    TLS, HTTP and anything else; how long and how many bytes to peek.
    """

    tls: str | None = None
    http: str | None = None
    default: str | None = None
    timeout: float = 3.0
    max_bytes: int = 16

    def targets(self) -> dict[str, str]:
        return {k: t for k, t in (("tls", self.tls), ("http", self.http), ("default", self.default)) if t}


@attrs.frozen
class PassthroughOptions:
    """
    C{tls_passthrough:} of a tcp frontend: the backend for each SNI name
    (exact, or C{*.suffix} for one more label), and for a ClientHello
    without SNI, with an unknown name, or unreadable (None: close).
    """

    sni: tuple[tuple[str, str], ...] = ()
    default: str | None = None
    timeout: float = 5.0
    max_hello: int = 16 * 1024

    def backend_for(self, name: str | None) -> str | None:
        if name:
            name = name.lower().rstrip(".")
            for pattern, backend in self.sni:
                if pattern == name:
                    return backend
            for pattern, backend in self.sni:
                if pattern.startswith("*.") and name.endswith(pattern[1:]) and "." not in name[: -len(pattern) + 1]:
                    return backend
        return self.default

    def backends(self) -> set[str]:
        names = {b for _, b in self.sni}
        if self.default:
            names.add(self.default)
        return names


_L4_LOG_FORMATS = ("tcplog", "json")


def read_frontend_l4(section: Section, protocol: str) -> dict[str, Any]:
    """
    The connection-level fields of a frontend (keyword arguments of
    L{FrontendConfig}); C{access_log} is read here for tcp frontends
    only (an http frontend's is C{http.access_log}).
    """
    fields: dict[str, Any] = {"proxy_protocol": _read_proxy_protocol(section)}
    listen = section.data.get("listen") if isinstance(section.data, dict) else None
    if fields["proxy_protocol"] is not None and isinstance(listen, str) and listen.startswith("ssl:"):
        section.error("proxy_protocol", "the header comes before TLS, which an ssl: listen string starts at once; "
                      "use listen: tcp:... with tls: {cert: ..., key: ...}")
    if protocol == "tcp" and section.has("access_log"):
        fields["l4_log"] = _read_l4_log(section)
    if protocol == "detect":
        fields["detect"] = _read_detect(section)
        if section.has("tls"):
            section.error("tls", "a protocol: detect frontend hands TLS to its detect.tls frontend; "
                          "put tls there")
    elif section.has("detect"):
        section.raw("detect")
        section.error("detect", "needs protocol: detect")
    if section.has("tls_passthrough"):
        if protocol != "tcp":
            section.raw("tls_passthrough")
            section.error("tls_passthrough", "needs protocol: tcp")
        elif section.has("tls"):
            section.raw("tls_passthrough")
            section.error("tls_passthrough", "passes TLS through untouched: remove tls (which terminates it)")
        else:
            fields["tls_passthrough"] = _read_passthrough(section)
    return fields


def _read_proxy_protocol(section: Section) -> ProxyProtocolOptions | None:
    raw = section.raw("proxy_protocol")
    if raw is MISSING or raw is None or raw is False:
        return None
    if raw is True:
        return ProxyProtocolOptions()
    if not isinstance(raw, dict):
        section.error("proxy_protocol", f"expected true, false or {{from: [10.0.0.0/8], timeout: 5s}}, "
                                        f"got {brief(raw)}")
        return None
    from rproxy.config.access import read_networks

    options = section.section("proxy_protocol")
    timeout = options.value("timeout", v.positive_duration, 5.0)
    sources = read_networks(options, "from")
    options.finish()
    return ProxyProtocolOptions(timeout=timeout, sources=sources)


def _read_l4_log(section: Section) -> L4LogOptions | None:
    raw = section.raw("access_log")
    if raw is None or raw == "off":
        return None
    if isinstance(raw, str):
        return L4LogOptions(format=section.value("access_log", v.choice(_L4_LOG_FORMATS + ("off",))))
    if not isinstance(raw, dict):
        section.error("access_log", f"expected tcplog, json, off or {{format: ..., path: ...}}, got {brief(raw)}")
        return None
    log = section.section("access_log")
    format_ = log.value("format", v.choice(_L4_LOG_FORMATS), "tcplog")
    path = log.value("path", _log_path, None)
    log.finish()
    return L4LogOptions(format=format_, path=path)


def _log_path(value: object) -> str:
    path = v.text(value)
    if any(c in path for c in "\0\r\n"):
        raise ValueError(f"{brief(path)} is not a file path")
    return path


def _read_detect(section: Section) -> DetectOptions | None:
    if not section.has("detect"):
        section.raw("detect")
        section.error("detect", "required with protocol: detect ({tls: FRONTEND, http: FRONTEND, default: FRONTEND})")
        return None
    detect = section.section("detect")
    options = DetectOptions(
        tls=detect.value("tls", v.name, None),
        http=detect.value("http", v.name, None),
        default=detect.value("default", v.name, None),
        timeout=detect.value("timeout", v.positive_duration, 3.0),
        max_bytes=detect.value("max_bytes", v.int_in(8, 4096), 16),
    )
    if detect.ok and not options.targets():
        detect.error("default", "name at least one frontend (tls, http or default)")
    detect.finish()
    return options


def _read_passthrough(section: Section) -> PassthroughOptions | None:
    passthrough = section.section("tls_passthrough")
    if not passthrough.ok:
        return None
    pairs: list[tuple[str, str]] = []
    raw = passthrough.raw("sni")
    if raw is not MISSING:
        if not isinstance(raw, dict):
            passthrough.error("sni", f'expected a mapping of names to backends ({{"a.example": backend}}), '
                              f"got {brief(raw)}")
        else:
            sni = passthrough.section("sni")
            for key in raw:
                pattern = _sni_pattern(sni, key)
                backend = sni.value(key, v.name) if isinstance(key, str) else None
                if pattern and backend:
                    pairs.append((pattern, backend))
    options = PassthroughOptions(
        sni=tuple(pairs),
        default=passthrough.value("default", v.name, None),
        timeout=passthrough.value("timeout", v.positive_duration, 5.0),
    )
    if passthrough.ok and not pairs and options.default is None:
        passthrough.error("sni", "name at least one server name (or a default backend)")
    passthrough.finish()
    return options


def _sni_pattern(section: Section, key: object) -> str | None:
    if not isinstance(key, str) or not key:
        section.errors.append(f"{section.path}: key {brief(key)} is not a server name")
        return None
    name = key.lower().rstrip(".")
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if not all(label and all(c.isalnum() or c in "-_" for c in label) and label.isascii() for label in labels):
        section.error(key, f"{brief(key)} is not a server name (a.example, or *.example for one more label)")
        return None
    return name


def read_send_proxy(section: Section) -> str | None:
    """
    C{send_proxy:} of a backend: C{v1}, C{v2}, or absent/false.
    """
    raw = section.raw("send_proxy")
    if raw is MISSING or raw is None or raw is False:
        return None
    return section.value("send_proxy", v.choice(("v1", "v2")), None)  # type: ignore[no-any-return]


def check_references(frontends: list[Any], backends: set[str], path_of: Any) -> list[str]:
    """
    The errors in what the frontends' detect and tls_passthrough name:
    frontends that do not exist or are themselves C{protocol: detect},
    backends that do not exist.  C{path_of(name)} is a frontend's key path.
    """
    errors: list[str] = []
    by_name = {f.name: f for f in frontends}
    for frontend in frontends:
        detect = getattr(frontend, "detect", None)
        if detect is not None:
            for key, target in detect.targets().items():
                where = f"{path_of(frontend.name)}.detect.{key}"
                other = by_name.get(target)
                if other is None:
                    close = difflib.get_close_matches(target, sorted(by_name), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    errors.append(f"{where}: no frontend named {brief(target)}{hint}")
                elif other.protocol == "detect":
                    errors.append(f"{where}: {brief(target)} is itself a protocol: detect frontend")
                elif key == "tls" and other.protocol == "http" and not other.tls:
                    errors.append(f"{where}: {brief(target)} is an http frontend without tls: "
                                  "TLS connections need one that terminates TLS (tls:) or a tcp frontend")
        passthrough = getattr(frontend, "tls_passthrough", None)
        if passthrough is not None:
            for pattern, backend in passthrough.sni:
                if backend not in backends:
                    errors.append(f"{path_of(frontend.name)}.tls_passthrough.sni.{pattern}: "
                                  f"no backend named {brief(backend)}")
            if passthrough.default is not None and passthrough.default not in backends:
                errors.append(f"{path_of(frontend.name)}.tls_passthrough.default: "
                              f"no backend named {brief(passthrough.default)}")
    return errors
