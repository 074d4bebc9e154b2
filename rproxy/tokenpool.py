"""
Token pools: bearer tokens obtained by logging in upstream, leased one per
client connection (the TPP seed, DolphinDB's REST login by default).

A pool holds one L{Session} per credential (or C{sessions_per_credential}
per credential).  A session logs in, holds a token until
C{ttl - refresh_before}, then logs in again while whoever holds it keeps
using the old token.  A client connection takes a L{Lease} on one session
when its first request arrives and gives it back when it closes; while
every session is leased, new connections wait in FIFO order for up to
C{queue_timeout}.

An upstream 401 to a request marks that session's token stale: it logs in
again at once and the connection's next request waits for the new token.
A login that fails for want of an upstream (refused connection, timeout,
5xx) is retried with growing, jittered delays for ever; a login the
upstream refuses (401/403, an error code, no token in the answer) counts
against the credential, which after C{max_login_failures} refusals in a row
is taken out of the pool, reported, and retried only every C{retry.max}.

L{TokenPool} has no I/O of its own: it calls a C{login(credential)}
function returning a Deferred (L{HTTPLogin} in production, anything in
tests) and a clock.
"""

from __future__ import annotations

import bisect
import collections
import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from rproxy.config import Credential, TokenPoolConfig
from rproxy.httpclient import fetch
from rproxy.telemetry.spans import start_span
from rproxy.tls import client_tls_options

__all__ = [
    "HTTPLogin",
    "Lease",
    "LoginRefused",
    "LoginResult",
    "NoTokens",
    "Session",
    "TokenPool",
    "TokenQueueFull",
    "TokenQueueTimeout",
    "WAIT_BUCKETS",
]

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
MAX_LOGIN_ANSWER = 1024 * 1024


class LoginRefused(Exception):
    """
    The upstream answered the login and said no (or gave no token).
    """


class NoTokens(Exception):
    """
    The pool cannot give a token: every credential is taken out, or the
    pool is stopping.
    """


class TokenQueueFull(Exception):
    pass


class TokenQueueTimeout(Exception):
    pass


@attrs.frozen
class LoginResult:
    token: str = attrs.field(repr=False)
    ttl: float | None = None


class Session:
    """
    One login of one credential, and the token it holds.
    """

    token: str | None = None
    expires_at = 0.0
    lease: Lease | None = None
    logging_in = False
    stale = False  # the upstream answered 401 to this token
    out = False  # taken out: its logins keep being refused
    idle = False  # in the pool's idle queue
    failures = 0  # failed logins in a row
    refused = 0  # refused logins in a row
    timer: IDelayedCall | None = None
    last_error = ""

    def __init__(self, credential: Credential, slot: int, label: str) -> None:
        self.credential = credential
        self.slot = slot
        self.label = label
        self.watchers: collections.deque[_Waiter] = collections.deque()

    def usable(self, now: float) -> bool:
        return self.token is not None and not self.stale and not self.out and now < self.expires_at


class Lease:
    """
    One client connection's hold on a session.
    """

    __slots__ = ("pool", "session", "released")

    def __init__(self, pool: TokenPool, session: Session) -> None:
        self.pool = pool
        self.session = session
        self.released = False

    @property
    def token(self) -> str | None:
        return self.session.token

    def ready(self) -> bool:
        """
        Whether the token can be used now (not stale, not expired).
        """
        return self.session.usable(self.pool.clock.seconds())

    def wait(self) -> defer.Deferred[Lease]:
        """
        Fires with this lease once its session holds a usable token again;
        fails after the pool's C{queue_timeout}.
        """
        return self.pool._watch(self)

    def unauthorized(self, token: str) -> None:
        """
        The upstream answered 401 to a request that carried C{token}.
        """
        self.pool._unauthorized(self.session, token)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self)


class _Waiter:
    __slots__ = ("deferred", "timer", "since", "active")

    def __init__(self, since: float) -> None:
        self.since = since
        self.active = True
        self.timer: IDelayedCall | None = None
        self.deferred: defer.Deferred[Lease] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred[Lease]) -> None:
        self.end()

    def end(self) -> bool:
        """
        Leave the queue; False if already gone.
        """
        if not self.active:
            return False
        self.active = False
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        return True


class TokenPool:
    """
    See the module docstring.
    """

    log = Logger()
    # rproxy.telemetry.provider.Telemetry (set by the service): a span per login
    telemetry: Any = None

    def __init__(
        self,
        config: TokenPoolConfig,
        login: Callable[[Credential], defer.Deferred[LoginResult]],
        clock: Any,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.clock = clock
        self._login_fn = login
        self._rng = rng or random.Random()
        many = config.sessions_per_credential > 1
        self.sessions = [
            Session(credential, slot, f"{credential.username}#{slot}" if many else credential.username)
            for credential in config.credentials
            for slot in range(config.sessions_per_credential)
        ]
        self.idle: collections.deque[Session] = collections.deque()
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.waiting = 0
        self.leased = 0
        self.running = False
        self.retired = False
        self.logins: collections.Counter[str] = collections.Counter()
        self.refreshes: collections.Counter[str] = collections.Counter()
        self.unauthorized_total = 0
        self.timeouts = 0
        self.wait_buckets = [0] * len(WAIT_BUCKETS)
        self.wait_sum = 0.0
        self.wait_count = 0
        self._slots = defer.DeferredSemaphore(config.login_concurrency)
        self._was_ready = False

    # -- life --------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.log.info(
            "token pool {pool}: logging in {count} session(s) at {host}:{port}",
            pool=self.name, count=len(self.sessions), host=self.config.host, port=self.config.port,
        )
        for session in self.sessions:
            self._login(session, "login")

    def stop(self) -> None:
        """
        Stop logging in and refreshing; waiters fail with L{NoTokens}.
        """
        self.running = False
        for session in self.sessions:
            if session.timer is not None and session.timer.active():
                session.timer.cancel()
            session.timer = None
            self._fail_watchers(session, NoTokens(f"token pool {self.name} stopped"))
        self._fail_waiters(NoTokens(f"token pool {self.name} stopped"))

    def retire(self) -> None:
        """
        A reload replaced this pool: no new waiters; leases and waiters
        already here are served until none is left, then it stops.
        """
        self.retired = True
        self._stop_if_done()

    def _stop_if_done(self) -> None:
        if self.retired and self.running and self.leased == 0 and self.waiting == 0:
            self.stop()

    # -- counts ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        now = self.clock.seconds()
        held = sum(1 for s in self.sessions if s.usable(now))
        in_use = self.leased
        available = sum(1 for s in self.sessions if s.lease is None and s.usable(now))
        return {"total": held, "in_use": in_use, "available": available, "waiting": self.waiting}

    def has_token(self) -> bool:
        now = self.clock.seconds()
        return any(s.usable(now) for s in self.sessions)

    def credentials_out(self) -> list[str]:
        """
        The usernames taken out of the pool (their logins keep being refused).
        """
        return sorted({s.credential.username for s in self.sessions if s.out})

    def status(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "status": "healthy" if counts["total"] else "unavailable",
            "pool": counts,
            "sessions": len(self.sessions),
            "credentials_out": self.credentials_out(),
            "logging_in": sum(1 for s in self.sessions if s.logging_in),
        }

    # -- leasing -----------------------------------------------------------

    def try_lease(self) -> Lease | None:
        """
        A lease on a free session with a usable token, or None (none is
        free, or others are already waiting: they come first).
        """
        if self.waiting:
            return None
        now = self.clock.seconds()
        idle = self.idle
        while idle:
            session = idle.popleft()
            session.idle = False
            if session.lease is None and session.usable(now):
                self._observe_wait(0.0)
                return self._bind(session)
        return None

    def lease(self) -> defer.Deferred[Lease]:
        """
        A lease now, or once a session is free; fails with
        L{TokenQueueTimeout} after C{queue_timeout}, L{TokenQueueFull} when
        C{max_waiters} are already waiting, L{NoTokens} when no credential
        is left in the pool.
        """
        lease = self.try_lease()
        if lease is not None:
            return defer.succeed(lease)
        if not self.running or self.retired:
            return defer.fail(NoTokens(f"token pool {self.name} is not running"))
        if self.sessions and all(s.out for s in self.sessions):
            return defer.fail(NoTokens(f"token pool {self.name}: every credential is refused upstream"))
        if self.waiting >= self.config.max_waiters:
            return defer.fail(TokenQueueFull(f"token pool {self.name}: {self.waiting} connections already wait"))
        waiter = _Waiter(self.clock.seconds())
        waiter.timer = self.clock.callLater(self.config.queue_timeout, self._waiter_timed_out, waiter)
        waiter.deferred.addBoth(self._waiter_gone)
        self.waiters.append(waiter)
        self.waiting += 1
        return waiter.deferred

    def _waiter_gone(self, result: Any) -> Any:
        # every way out of the queue (lease, timeout, cancel) passes here
        self.waiting -= 1
        self._stop_if_done()
        return result

    def _waiter_timed_out(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter.end():
            self.timeouts += 1
            waiter.deferred.errback(TokenQueueTimeout(
                f"token pool {self.name}: no token free within {self.config.queue_timeout:g}s"))

    def _bind(self, session: Session) -> Lease:
        lease = Lease(self, session)
        session.lease = lease
        self.leased += 1
        return lease

    def _observe_wait(self, seconds: float) -> None:
        self.wait_sum += seconds
        self.wait_count += 1
        self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1

    def _offer(self, session: Session) -> None:
        """
        C{session} may be free and usable: hand it to the first waiter, or
        queue it as idle.
        """
        now = self.clock.seconds()
        if session.lease is not None or not session.usable(now):
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.end():
                continue
            self._observe_wait(now - waiter.since)
            waiter.deferred.callback(self._bind(session))
            return
        if not session.idle:
            session.idle = True
            self.idle.append(session)

    def _release(self, lease: Lease) -> None:
        session = lease.session
        if session.lease is lease:
            session.lease = None
            self.leased -= 1
            self._fail_watchers(session, None)
            self._offer(session)
        self._stop_if_done()

    def _fail_waiters(self, reason: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if waiter.end():
                waiter.deferred.errback(reason)

    # -- a leased session's token going stale ------------------------------

    def _watch(self, lease: Lease) -> defer.Deferred[Lease]:
        session = lease.session
        if lease.released or session.lease is not lease:
            return defer.fail(NoTokens("the lease was given back"))
        if session.usable(self.clock.seconds()):
            return defer.succeed(lease)
        if session.out or not self.running:
            return defer.fail(NoTokens(f"token pool {self.name}: credential {session.credential.username} "
                                       "is taken out"))
        waiter = _Waiter(self.clock.seconds())
        waiter.timer = self.clock.callLater(self.config.queue_timeout, self._watcher_timed_out, session, waiter)
        session.watchers.append(waiter)
        if not session.logging_in and session.timer is None:
            self._login(session, "refresh")
        return waiter.deferred

    def _watcher_timed_out(self, session: Session, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter.end():
            self.timeouts += 1
            waiter.deferred.errback(TokenQueueTimeout(
                f"token pool {self.name}: no fresh token for {session.label} within {self.config.queue_timeout:g}s"))

    def _wake_watchers(self, session: Session) -> None:
        watchers, session.watchers = session.watchers, collections.deque()
        lease = session.lease
        for waiter in watchers:
            if waiter.end() and lease is not None:
                waiter.deferred.callback(lease)

    def _fail_watchers(self, session: Session, reason: Exception | None) -> None:
        watchers, session.watchers = session.watchers, collections.deque()
        for waiter in watchers:
            if waiter.end():
                waiter.deferred.errback(reason or NoTokens("the lease was given back"))

    def _unauthorized(self, session: Session, token: str) -> None:
        self.unauthorized_total += 1
        if session.token != token or session.stale:
            return  # already being replaced
        session.stale = True
        self.log.info("token pool {pool}: upstream refused the token of {session}; logging in again",
                      pool=self.name, session=session.label)
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None
        self._login(session, "refresh")

    # -- logging in --------------------------------------------------------

    def _login(self, session: Session, kind: str) -> None:
        session.timer = None
        if session.logging_in or not self.running:
            return
        session.logging_in = True
        d = self._slots.run(self._traced_login, session, kind)
        d.addCallbacks(self._logged_in, self._login_failed, (session, kind), None, (session, kind))
        d.addErrback(self._bug, session, kind)

    def _traced_login(self, session: Session, kind: str) -> defer.Deferred[LoginResult]:
        """
        One login (holding a login slot), in a span of its own when
        tracing is on.
        """
        config = self.config
        span = start_span(self.telemetry, "token login", {
            "rproxy.token_pool": self.name, "rproxy.token.session": session.label, "rproxy.token.kind": kind,
            "server.address": config.host, "server.port": config.port}, kind="client")
        d = self._login_fn(session.credential)
        if span.recording:
            d.addBoth(_login_span_ended, span)
        return d

    def _bug(self, failure: Failure, session: Session, kind: str) -> None:
        """
        Handling a login's outcome raised: log it, and make sure the session
        logs in again later (else it would hold no token for ever).
        """
        self.log.failure("token pool {pool}: unexpected error after a login of {session}", failure,
                         pool=self.name, session=session.label)
        session.logging_in = False
        if self.running and session.timer is None:
            session.timer = self.clock.callLater(self.config.retry_max, self._login, session, kind)

    def _counter(self, kind: str) -> collections.Counter[str]:
        return self.logins if kind == "login" else self.refreshes

    def _logged_in(self, result: LoginResult, session: Session, kind: str) -> None:
        session.logging_in = False
        if not self.running:
            return
        self._counter(kind)["ok"] += 1
        now = self.clock.seconds()
        ttl = self.config.ttl if result.ttl is None else min(self.config.ttl, max(result.ttl, 1.0))
        if session.out or session.failures:
            self.log.info("token pool {pool}: {session} logged in again after {n} failure(s)",
                          pool=self.name, session=session.label, n=session.failures)
        session.token = result.token
        session.expires_at = now + ttl
        session.stale = session.out = False
        session.failures = session.refused = 0
        session.last_error = ""
        before = self.config.refresh_before
        delay = ttl - before if ttl > before else ttl / 2
        session.timer = self.clock.callLater(delay, self._login, session, "refresh")
        if not self._was_ready:
            self._was_ready = True
            self.log.info("token pool {pool}: ready (first token held)", pool=self.name)
        self._wake_watchers(session)
        self._offer(session)

    def _login_failed(self, failure: Failure, session: Session, kind: str) -> None:
        session.logging_in = False
        if not self.running:
            return
        refused = failure.check(LoginRefused) is not None
        self._counter(kind)["refused" if refused else "error"] += 1
        session.failures += 1
        session.refused = session.refused + 1 if refused else 0
        why = failure.getErrorMessage() or failure.type.__name__
        session.last_error = why
        config = self.config
        if refused and session.refused >= config.max_login_failures and not session.out:
            session.out = True
            self.log.error(
                "token pool {pool}: credential {session} taken out of the pool: login refused "
                "{n} times in a row ({why}); retrying every {every:g}s",
                pool=self.name, session=session.label, n=session.refused, why=why, every=config.retry_max,
            )
            self._fail_watchers(session, NoTokens(f"credential {session.credential.username} is taken out"))
            if all(s.out for s in self.sessions):
                self._fail_waiters(NoTokens(f"token pool {self.name}: every credential is refused upstream"))
        elif session.failures == 1:
            self.log.warn("token pool {pool}: login of {session} failed: {why}; retrying",
                          pool=self.name, session=session.label, why=why)
        if session.out:
            delay = config.retry_max
        else:
            delay = min(config.retry_max, config.retry_initial * 2 ** min(session.failures - 1, 30))
            delay *= 0.5 + self._rng.random() / 2
        now = self.clock.seconds()
        if session.token is not None and session.expires_at > now and not session.out:
            # a failed refresh: the old token serves until it expires, but
            # a retry must come before that
            delay = min(delay, max(0.0, (session.expires_at - now) / 2))
        session.timer = self.clock.callLater(delay, self._login, session, kind)


def _login_span_ended(result: Any, span: Any) -> Any:
    if isinstance(result, Failure):
        refused = result.check(LoginRefused) is not None
        span.end(error=result.getErrorMessage() or result.type.__name__,
                 attributes={"rproxy.token.outcome": "refused" if refused else "error"})
    else:
        span.end(attributes={"rproxy.token.outcome": "ok"})
    return result


# -- the login request ------------------------------------------------------


def field(document: Any, path: str) -> Any:
    """
    The value at a dotted C{path} in parsed JSON (numbers index lists);
    None when it is not there.
    """
    value = document
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value


def clean_token(raw: object) -> str:
    """
    The token as it may go in a header: line breaks (DolphinDB wraps its
    base64 tokens) are dropped; any other control character refuses it.

    @raise LoginRefused: not a usable token.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise LoginRefused("the answer holds no token")
    token = "".join(raw.split())
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in token):
        raise LoginRefused("the token holds characters a header cannot carry")
    return token


def parse_login_answer(config: TokenPoolConfig, status: int, body: bytes) -> LoginResult:
    """
    The token in a login answer.

    @raise LoginRefused: the upstream said no (401/403, an error code, no
        token).
    @raise ValueError: any other bad answer (5xx, not JSON): retried as an
        upstream problem.
    """
    if status in (401, 403):
        raise LoginRefused(f"login answered {status}")
    if not 200 <= status < 300:
        raise ValueError(f"login answered {status}")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("login answer is not JSON") from None
    if config.ok_field is not None:
        ok = field(document, config.ok_field)
        if ok is not None and str(ok) != config.ok_value:
            message = field(document, "message")
            detail = f": {str(message)[:200]}" if message else ""
            raise LoginRefused(f"login answered {config.ok_field} {str(ok)[:50]!r}{detail}")
    raw = field(document, config.token_field)
    if raw is None:
        raise LoginRefused(f"no token at {config.token_field} in the login answer")
    token = clean_token(raw)
    ttl = None
    if config.expires_field is not None:
        seconds = field(document, config.expires_field)
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
            ttl = float(seconds)
    return LoginResult(token=token, ttl=ttl)


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """
    The token pool's TLS to its login server: built once (the CA file read
    and parsed once per configuration, not on the reactor at every login)
    and used for every login connection.  A CA file replaced on disk is
    read at the next reload that changes the pool (as backends' TLS is).
    """

    def __init__(self, config: TokenPoolConfig) -> None:
        self.config = config
        self._options: Any = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        if self._options is None:
            tls = self.config.tls
            assert tls is not None
            self._options = client_tls_options(tls.server_name or self.config.host, tls.ca, tls.verify)
        return self._options


class HTTPLogin:
    """
    Logs a credential in: POST the JSON body to the login path, read the
    token from the answer.  Calls are C{login(credential)}.
    """

    def __init__(self, config: TokenPoolConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        # one connection per login: logins are rare, and nothing lingers
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, contextFactory=_TLSPolicy(config), pool=pool,
                           connectTimeout=config.login_timeout)
        scheme = "https" if config.tls is not None else "http"
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.url = f"{scheme}://{host}:{config.port}{quote(config.login_path, safe='/?=&%:@')}".encode("ascii")

    def body(self, credential: Credential) -> bytes:
        values = {"username": credential.username, "password": credential.password}
        document = {}
        for key, template in self.config.login_body:
            text = template
            for name, value in values.items():
                text = text.replace("{" + name + "}", value)
            document[key] = text
        return json.dumps(document).encode("utf-8")

    def __call__(self, credential: Credential) -> defer.Deferred[LoginResult]:
        return defer.Deferred.fromCoroutine(self._login(credential)).addTimeout(
            self.config.login_timeout, self.reactor, self._timed_out)

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(ValueError(f"login took more than {timeout:g}s"))
        return result

    async def _login(self, credential: Credential) -> LoginResult:
        headers = {b"content-type": b"application/json", b"accept": b"application/json"}
        for name, value in self.config.login_headers:
            headers[name.encode("latin-1")] = value.encode("latin-1")
        status, body = await fetch(self.agent, b"POST", self.url, headers, self.body(credential), MAX_LOGIN_ANSWER)
        return parse_login_answer(self.config, status, body)
