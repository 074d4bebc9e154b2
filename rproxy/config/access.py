"""
Section readers for the access policy of HTTP frontends and routes, beyond
the C{allow}/C{deny} lists (L{rproxy.config.frontends.read_access}):

  - C{trusted_proxies: [CIDR, ...]} (frontends): the peers whose
    X-Forwarded-For is believed (and kept, with the peer appended); every
    other peer's is replaced by the peer's address.
  - C{auth: {api_keys: true, basic: {users_file: PATH, realm: TEXT}}}
    (frontends and routes; C{auth: false} on a route: none there).
  - C{redirect: {scheme: https, status: 308}} or C{redirect: {location:
    URL, status: 301}} (frontends and routes; C{redirect: false} on a
    route: none there).
  - C{strip_prefix: /api}, C{add_prefix: /v1} (routes).

C{http.direct_routes: true} (C{/backend/NAME/...} straight to a server) is
refused with routes that have C{allow}, C{deny} or C{auth}: a direct
route reaches a server without the policies of the route that leads to
its backend (put them on the frontend instead, where they apply to direct
routes too).

A users file holds C{user:hash} lines, the hash bcrypt (C{htpasswd -B}:
C{$2y$...}, C{$2b$...}) or argon2 (C{$argon2id$...}); it is read with the
configuration (at start and on every reload), never per request.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from rproxy.config import values as v
from rproxy.config.reader import MISSING, Section
from rproxy.config.values import brief, kind

__all__ = [
    "AuthConfig",
    "read_networks",
    "BasicAuthConfig",
    "RedirectConfig",
    "Policy",
    "REDIRECT_STATUSES",
    "parse_users",
    "read_frontend_policy",
    "read_route_policy",
]

REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# the hashes a users file may hold: (prefix, kind)
_HASHES = (("$2a$", "bcrypt"), ("$2b$", "bcrypt"), ("$2y$", "bcrypt"),
           ("$argon2id$", "argon2"), ("$argon2i$", "argon2"), ("$argon2d$", "argon2"))
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
_ARGON2 = re.compile(r"^\$argon2(id|i|d)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+\Z")
# a realm goes into a quoted-string of WWW-Authenticate
_REALM = re.compile(r'^[ !#-\[\]-~]{1,100}\Z')


@attrs.frozen
class BasicAuthConfig:
    """
    HTTP Basic authentication against a users file.

    @ivar users: (user, hash) pairs, the hash as the file holds it.
    @ivar cache_ttl: how long a successful check is remembered (0: never).
    """

    path: str
    users: tuple[tuple[str, str], ...] = attrs.field(repr=False)
    realm: str = "rproxy"
    cache_ttl: float = 60.0


@attrs.frozen
class AuthConfig:
    """
    What a request must present: an API key (C{Authorization: Bearer},
    checked through the key chain the tunnels use), Basic credentials, or
    either when both are set.  Neither: no authentication (a route's
    C{auth: false}).
    """

    api_keys: bool = False
    basic: BasicAuthConfig | None = None

    @property
    def required(self) -> bool:
        return self.api_keys or self.basic is not None


@attrs.frozen
class RedirectConfig:
    """
    Answer with a redirect instead of proxying: to the same host and target
    over C{scheme} (when the request is not already on it; C{port} if not
    the scheme's default), or to C{location} (C{{host}} and C{{target}}
    replaced by the request's).  C{status} 0: no redirect (a route's
    C{redirect: false}).
    """

    status: int = 0
    scheme: str | None = None
    port: int | None = None
    location: str | None = None


@attrs.frozen
class Policy:
    """
    The access policy of a frontend or a route.  C{auth} and C{redirect}
    None: not set here (a route then follows its frontend's); a route's
    own replaces the frontend's.

    @ivar trusted_proxies: (frontends) the networks whose X-Forwarded-For
        is believed; None: the field is passed on as it came (appended to),
        whoever sent it.
    """

    auth: AuthConfig | None = None
    redirect: RedirectConfig | None = None
    strip_prefix: str | None = None
    add_prefix: str | None = None
    trusted_proxies: tuple[Any, ...] | None = None


def read_frontend_policy(section: Section, protocol: str) -> Policy | None:
    """
    A frontend's C{trusted_proxies}, C{auth} and C{redirect}; None when it
    has none of them.
    """
    if protocol == "http":
        _check_direct_routes(section)
    keys = [key for key in ("trusted_proxies", "auth", "redirect") if section.has(key)]
    if keys and protocol != "http":
        for key in keys:
            section.raw(key)
            section.error(key, "needs protocol: http")
        return None
    if not keys:
        return None
    return Policy(
        auth=_read_auth(section, route=False),
        redirect=_read_redirect(section, route=False),
        trusted_proxies=read_networks(section, "trusted_proxies"),
    )


def _check_direct_routes(section: Section) -> None:
    """
    Refuse C{http.direct_routes} with routes that guard their backend by
    C{allow}/C{deny} or C{auth}: C{/backend/NAME/...} would reach that
    backend's servers around them.  (Read from the raw mapping: the
    routes' own errors are reported where they are read.)
    """
    http = section.data.get("http")
    routes = section.data.get("routes")
    if not (isinstance(http, dict) and http.get("direct_routes") is True and isinstance(routes, list)):
        return
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        guards = [key for key in ("allow", "deny") if route.get(key)]
        if isinstance(route.get("auth"), dict):
            guards.append("auth")
        if guards:
            section.errors.append(
                f"{section.key_path('http')}.direct_routes: /backend/NAME/... would reach the servers of backend "
                f"{brief(route.get('backend'))} without the {' and '.join(guards)} of {section.key_path('routes')}[{i}]; "
                "put that policy on the frontend (it applies to direct routes too) or turn direct_routes off")


def read_route_policy(section: Section) -> Policy | None:
    """
    A route's C{auth}, C{redirect}, C{strip_prefix} and C{add_prefix}; None
    when it has none of them.
    """
    if not any(section.has(key) for key in ("auth", "redirect", "strip_prefix", "add_prefix")):
        return None
    return Policy(
        auth=_read_auth(section, route=True),
        redirect=_read_redirect(section, route=True),
        strip_prefix=section.value("strip_prefix", _prefix, None),
        add_prefix=section.value("add_prefix", _prefix, None),
    )


def _prefix(value: object) -> str:
    path = v.url_path(value)
    if any(c in path for c in "?#%") or not path.isascii() or not path.isprintable():
        raise ValueError(f"{brief(path)} must be a plain path: no '?', '#', '%' or non-ASCII characters")
    path = path.rstrip("/")
    if not path:
        raise ValueError("'/' changes nothing: give a prefix such as /api")
    return path


def read_networks(section: Section, key: str) -> tuple[Any, ...] | None:
    """
    A list of networks under C{key} (C{10.0.0.0/8}, C{192.0.2.7},
    C{::1}); None when the key is not given.  Errors name each item's path.
    """
    from rproxy.cidr import parse_network

    raw = section.raw(key)
    if raw is MISSING or raw is None:
        return None
    if not isinstance(raw, list):
        section.error(key, f"expected a list of networks (10.0.0.0/8, 192.0.2.7, ::1), got {kind(raw)}")
        return None
    nets = []
    for path, item in section.items(key):
        try:
            if not isinstance(item, str):
                raise ValueError(f"{brief(item)} is not a network")
            nets.append(parse_network(item))
        except ValueError as e:
            section.errors.append(f"{path}: {e}")
    return tuple(nets)


def _read_auth(section: Section, route: bool) -> AuthConfig | None:
    raw = section.raw("auth")
    if raw is MISSING or raw is None:
        return None
    if raw is False and route:
        return AuthConfig()
    if not isinstance(raw, dict):
        off = " or false (no authentication on this route)" if route else ""
        section.error("auth", f"expected a mapping such as {{api_keys: true}} or {{basic: {{users_file: PATH}}}}"
                              f"{off}, got {kind(raw)} {brief(raw)}")
        return None
    auth = section.section("auth")
    api_keys = auth.value("api_keys", v.boolean, False)
    raw_basic = auth.raw("basic")
    basic = None if raw_basic is MISSING else _read_basic(auth.child(raw_basic, auth.key_path("basic")))
    auth.finish()
    if not api_keys and raw_basic is MISSING:
        section.error("auth", "names no method: set api_keys: true, basic: {users_file: PATH}, or both")
    return AuthConfig(api_keys=api_keys, basic=basic)


def _realm(value: object) -> str:
    realm = v.text(value)
    if not _REALM.match(realm):
        raise ValueError(f"{brief(realm)} must be up to 100 printable ASCII characters, without '\"' or '\\'")
    return realm


def _read_basic(section: Section) -> BasicAuthConfig | None:
    if not section.ok:
        return None
    realm = section.value("realm", _realm, "rproxy")
    cache_ttl = section.value("cache_ttl", v.duration, 60.0)
    path = section.file("users_file", required=True)
    section.finish()
    if path is None:
        return None
    users, problems = parse_users(path, section.sources.file(path))
    for problem in problems:
        section.error("users_file", problem)
    if not users and not problems:
        section.error("users_file", f"{path} holds no user:hash line")
    if problems or not users:
        return None
    return BasicAuthConfig(path=path, users=users, realm=realm, cache_ttl=cache_ttl)


def parse_users(path: str, content: bytes) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """
    The (user, hash) pairs of a users file, and its problems (one line
    each, naming the line; no hash is ever quoted).  Blank lines and
    lines starting with C{#} are skipped.
    """
    users: list[tuple[str, str]] = []
    problems: list[str] = []
    seen: set[str] = set()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return (), [f"{path} is not UTF-8 text"]
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        where = f"{path} line {number}"
        if not colon or not user:
            problems.append(f"{where}: expected user:hash")
            continue
        if not user.isprintable() or len(user) > 255:
            problems.append(f"{where}: the user name is not printable text of at most 255 characters")
            continue
        known = next((k for prefix, k in _HASHES if hashed.startswith(prefix)), None)
        if known is None:
            problems.append(f"{where}: user {brief(user)}: unsupported hash ({_scheme_of(hashed)}); "
                            "use bcrypt (htpasswd -B) or argon2id")
            continue
        if not (_BCRYPT if known == "bcrypt" else _ARGON2).match(hashed):
            problems.append(f"{where}: user {brief(user)}: malformed {known} hash")
            continue
        if user in seen:
            problems.append(f"{where}: user {brief(user)} is listed twice")
            continue
        seen.add(user)
        users.append((user, hashed))
    return tuple(users), problems


def _scheme_of(hashed: str) -> str:
    """
    What an unsupported hash is, for an error: its C{$id$} prefix (a few
    characters, never the hash itself), else what text without one is.
    """
    if hashed.startswith("$"):
        end = hashed.find("$", 1)
        if 1 < end <= 12 and hashed[1:end].replace("-", "").isalnum():
            return hashed[: end + 1]
        return "an unknown $ scheme"
    return "plain text or crypt"


def _read_redirect(section: Section, route: bool) -> RedirectConfig | None:
    raw = section.raw("redirect")
    if raw is MISSING or raw is None:
        return None
    if raw is False and route:
        return RedirectConfig()
    if not isinstance(raw, dict):
        off = " or false (no redirect on this route)" if route else ""
        section.error("redirect", f"expected a mapping such as {{scheme: https, status: 308}}{off}, "
                                  f"got {kind(raw)} {brief(raw)}")
        return None
    redirect = section.section("redirect")
    status = redirect.value("status", _status, 308)
    scheme = redirect.value("scheme", v.choice(("http", "https")), None)
    port = redirect.value("port", v.int_in(1, 65535), None)
    location = redirect.value("location", _location, None)
    redirect.finish()
    if redirect.has("scheme") and redirect.has("location"):
        redirect.error("location", "give scheme or location, not both")
        return None
    if not (redirect.has("scheme") or redirect.has("location")):
        section.error("redirect", "needs scheme (http or https) or location (a URL)")
        return None
    if scheme is None and location is None:
        return None  # (its error is recorded)
    if port is not None and scheme is None:
        redirect.error("port", "goes with scheme (a location URL holds its own port)")
    return RedirectConfig(status=status, scheme=scheme, port=port, location=location)


def _status(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in REDIRECT_STATUSES:
        return value
    raise ValueError(f"{brief(value)} is not one of {', '.join(map(str, REDIRECT_STATUSES))}")


def _location(value: object) -> str:
    url = v.text(value)
    scheme, sep, rest = url.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or rest.startswith("/"):
        raise ValueError(f"{brief(url)} is not an absolute http:// or https:// URL")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(f"{brief(url)} must be ASCII without spaces or control characters")
    left = url.replace("{host}", "").replace("{target}", "")
    if "{" in left or "}" in left:
        raise ValueError(f"{brief(url)}: the only placeholders are {{host}} and {{target}}")
    return url

