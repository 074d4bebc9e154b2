"""
Authentication (C{auth:} on a frontend or a route): a request must carry
an API key (C{Authorization: Bearer KEY}, C{api_keys: true}) or Basic
credentials (C{basic: {users_file: ...}}), else 401 with the
C{WWW-Authenticate} challenges of the methods allowed.

  - API keys are checked through the key chain the tunnels use (Redis
    cache, then PostgreSQL, then the static C{api_keys}:
    L{rproxy.store.auth.KeyChain}); the request waits on the lookup.  A key
    is never logged, nor sent back.  Identical lookups in flight share one
    (L{KeyLookups}), and at most 64 different ones are under way per key
    chain: past that the request is answered 503 with Retry-After, as
    Basic checks are.
  - Basic passwords are checked against bcrypt or argon2 hashes in a
    thread (L{rproxy.passwords}); an unknown user costs a check too, so
    that timing does not tell which users exist.

Credentials are passed on to the server as they came (a route's
C{remove_headers: [authorization]} drops them).
"""

from __future__ import annotations

import binascii
import weakref
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.config.access import AuthConfig
from rproxy.http.filters import Filter
from rproxy.http.filters.access import route_of
from rproxy.http.routes import RouteTable
from rproxy.passwords import PasswordChecker, TooBusy

__all__ = ["AuthFilter", "KeyLookups", "challenges", "lookups_for"]

log = Logger()

MAX_KEY_LOOKUPS = 64


class KeyLookups:
    """
    The API key lookups in flight on one key chain: a key already being
    looked up waits on that lookup (which is cancelled once every request
    waiting on it has gone); at most C{max_pending} different keys at once,
    past which L{lookup} fails with L{TooBusy} at once.
    """

    def __init__(self, keys: Any, max_pending: int = MAX_KEY_LOOKUPS) -> None:
        self.keys = keys
        self.max_pending = max_pending
        # key -> (the chain's lookup, the requests' Deferreds waiting on it)
        self._running: dict[str, tuple[defer.Deferred[Any], list[defer.Deferred[Any]]]] = {}
        self.runs = 0
        self.too_busy = 0

    @property
    def pending(self) -> int:
        return len(self._running)

    def lookup(self, key: str) -> defer.Deferred[Any]:
        waiting: defer.Deferred[Any] = defer.Deferred(lambda d: self._left(key, d))
        running = self._running.get(key)
        if running is not None:
            running[1].append(waiting)
            return waiting
        if len(self._running) >= self.max_pending:
            self.too_busy += 1
            return defer.fail(TooBusy(f"{len(self._running)} API key lookups under way"))
        waiters = [waiting]
        d = self.keys.lookup(key)
        self._running[key] = (d, waiters)
        self.runs += 1
        d.addBoth(self._done, key, waiters)
        return waiting

    def _done(self, result: Any, key: str, waiters: list[defer.Deferred[Any]]) -> None:
        entry = self._running.get(key)
        if entry is not None and entry[1] is waiters:
            del self._running[key]
        for waiting in waiters:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    def _left(self, key: str, waiting: defer.Deferred[Any]) -> None:
        """
        A request waiting on C{key}'s lookup went away: the lookup is
        cancelled when it was the last.
        """
        entry = self._running.get(key)
        if entry is None or waiting not in entry[1]:
            return
        d, waiters = entry
        waiters.remove(waiting)
        if not waiters:
            del self._running[key]
            d.cancel()


# one per key chain (a chain may serve several frontends), kept as long
# as the chain is
_LOOKUPS: weakref.WeakKeyDictionary[Any, KeyLookups] = weakref.WeakKeyDictionary()


def lookups_for(keys: Any) -> KeyLookups:
    """
    The lookups in flight on key chain C{keys}.
    """
    lookups = _LOOKUPS.get(keys)
    if lookups is None:
        lookups = _LOOKUPS[keys] = KeyLookups(keys)
    return lookups

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
        d = lookups_for(keys).lookup(presented)
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
            self._unavailable(exchange, "too many API key lookups under way" if what == "checking an API key"
                              else "too many password checks under way")
            return
        log.failure("frontend {frontend}: {what} failed", reason, frontend=self.frontend.name, what=what)
        self._unavailable(exchange, "cannot check credentials now")

    def _unavailable(self, exchange: Any, why: str) -> None:
        self.frontend.refusals["auth_unavailable"] += 1
        exchange.fail(503, why, retry_after=True)

    def _refuse(self, exchange: Any, method: _Method, why: str) -> None:
        self.frontend.refusals["auth"] += 1
        exchange.fail(401, why, headers=method.challenges)
