"""
Authentication (C{auth:} on a frontend or a route): a request must carry
an API key (C{Authorization: Bearer KEY}, C{api_keys: true}) or Basic
credentials (C{basic: {users_file: ...}}), else 401 with the
C{WWW-Authenticate} challenges of the methods allowed.

  - API keys are checked through the key chain the tunnels use (Redis
    cache, then PostgreSQL, then the static C{api_keys}:
    L{rproxy.store.auth.KeyChain}); the request waits on the lookup.  A key
    is never logged, nor sent back.
  - Basic passwords are checked against bcrypt or argon2 hashes in a
    thread (L{rproxy.passwords}); an unknown user costs a check too, so
    that timing does not tell which users exist.

Credentials are passed on to the server as they came (a route's
C{remove_headers: [authorization]} drops them).
"""

from __future__ import annotations

import binascii
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config.access import AuthConfig
from rproxy.http.filters import Filter
from rproxy.http.filters.access import route_of
from rproxy.http.routes import RouteTable
from rproxy.passwords import PasswordChecker, TooBusy

__all__ = ["AuthFilter", "challenges"]

log = Logger()

_BEARER = (b"WWW-Authenticate", b"Bearer")


def challenges(auth: AuthConfig) -> tuple[tuple[bytes, bytes], ...]:
    """
    The WWW-Authenticate fields of a 401 for C{auth}.
    """
    fields = []
    if auth.api_keys:
        fields.append(_BEARER)
    if auth.basic is not None:
        fields.append((b"WWW-Authenticate", b'Basic realm="%s", charset="UTF-8"' % auth.basic.realm.encode()))
    return tuple(fields)


class _Method:
    """
    One C{auth} setting ready for requests: its users by name and its
    challenges, made once per configuration.
    """

    __slots__ = ("config", "users", "decoy", "challenges")

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.users = dict(config.basic.users) if config.basic is not None else {}
        # what an unknown user's password is checked against (a real
        # hash, so that it costs what a known user's does)
        self.decoy = next(iter(self.users.values()), "")
        self.challenges = challenges(config)


class AuthFilter(Filter):
    """
    @ivar method: the frontend's C{auth} (None: none); a route's own
        replaces it (C{auth: false}: none on that route).
    """

    doing = "checking credentials"

    def __init__(self, frontend: Any, auth: AuthConfig | None, routes: RouteTable,
                 passwords: PasswordChecker | None) -> None:
        self.frontend = frontend
        self.routes = routes
        self.passwords = passwords
        self.method = _Method(auth) if auth is not None and auth.required else None
        self.by_route: dict[Any, _Method | None] = {}
        for rule in routes.routes:
            own = rule.policy.auth if rule.policy is not None else None
            if own is not None:
                self.by_route[rule] = _Method(own) if own.required else None

    @staticmethod
    def wanted(auth: AuthConfig | None, routes: RouteTable) -> bool:
        return (auth is not None and auth.required) or any(
            rule.policy is not None and rule.policy.auth is not None and rule.policy.auth.required
            for rule in routes.routes)

    def request(self, exchange: Any) -> defer.Deferred[None] | None:
        method = self.method
        if self.by_route:
            rule = route_of(self.routes, exchange)
            if rule in self.by_route:
                method = self.by_route[rule]
        if method is None:
            return None
        authorization = exchange.head.header(b"authorization") or b""
        scheme, _, credentials = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == b"bearer" and method.config.api_keys and credentials:
            return self._check_key(exchange, method, credentials)
        if scheme == b"basic" and method.users and credentials:
            return self._check_basic(exchange, method, credentials)
        self._refuse(exchange, method, "credentials required")
        return None

    # -- API keys --------------------------------------------------------

    def _check_key(self, exchange: Any, method: _Method, key: bytes) -> defer.Deferred[None] | None:
        keys = self.frontend.keys
        if keys is None:
            self._unavailable(exchange, "API keys are not loaded yet")
            return None
        try:
            presented = key.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(exchange, method, "invalid API key")
            return None
        d = keys.lookup(presented)
        d.addCallbacks(self._key_checked, self._failed, callbackArgs=(exchange, method),
                       errbackArgs=(exchange, "checking an API key"))
        return d

    def _key_checked(self, record: Any, exchange: Any, method: _Method) -> None:
        if record is None:
            self._refuse(exchange, method, "invalid API key")

    # -- Basic -----------------------------------------------------------

    def _check_basic(self, exchange: Any, method: _Method, credentials: bytes) -> defer.Deferred[None] | None:
        try:
            user_password = binascii.a2b_base64(credentials, strict_mode=True)
            user_bytes, colon, password = user_password.partition(b":")
            user = user_bytes.decode("utf-8")
        except (binascii.Error, ValueError):
            colon = b""
        basic = method.config.basic
        if not colon or self.passwords is None or basic is None:
            self._refuse(exchange, method, "invalid credentials")
            return None
        hashed = method.users.get(user)
        known = hashed is not None
        d = self.passwords.verify(user, password, hashed or method.decoy, basic.cache_ttl)
        d.addCallbacks(self._password_checked, self._failed, callbackArgs=(exchange, method, known),
                       errbackArgs=(exchange, "checking a password"))
        return d

    def _password_checked(self, matched: bool, exchange: Any, method: _Method, known: bool) -> None:
        if not (matched and known):
            self._refuse(exchange, method, "invalid credentials")

    # -- answers ---------------------------------------------------------

    def _failed(self, reason: Failure, exchange: Any, what: str) -> None:
        if reason.check(defer.CancelledError):
            return  # the client went away
        if reason.check(TooBusy):
            self._unavailable(exchange, "too many password checks under way")
            return
        log.failure("frontend {frontend}: {what} failed", reason, frontend=self.frontend.name, what=what)
        self._unavailable(exchange, "cannot check credentials now")

    def _unavailable(self, exchange: Any, why: str) -> None:
        self.frontend.refusals["auth_unavailable"] += 1
        exchange.fail(503, why, retry_after=True)

    def _refuse(self, exchange: Any, method: _Method, why: str) -> None:
        self.frontend.refusals["auth"] += 1
        exchange.fail(401, why, headers=method.challenges)
