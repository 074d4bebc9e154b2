"""
Password checks against bcrypt and argon2 hashes, off the reactor.

A bcrypt or argon2 check costs tens to hundreds of milliseconds of CPU on
purpose: on the reactor thread it would stall every connection.  Checks run
in a small thread pool of their own (both libraries release the GIL while
hashing), at most C{max_pending} queued or running (past that a check
fails at once with L{TooBusy}, so that a flood of guesses holds a bounded
amount of memory and threads); identical checks in flight share one run;
and a successful check is remembered for a short TTL in a bounded cache,
so that a client sending the same credentials on every request pays the
hash once per TTL.  Failures are not remembered: each costs a run.

The cache holds HMAC-SHA-256 digests of (user, password, stored hash)
under a key drawn per process, never a password; a changed hash (a
reloaded users file) misses the cache.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["PasswordChecker", "TooBusy", "check_hash", "checker_for"]

# bcrypt reads the first 72 bytes of a password (as htpasswd -B does when
# it hashes one)
_BCRYPT_MAX = 72


class TooBusy(Exception):
    """
    Too many password checks are queued: the request should be retried.
    """


def check_hash(password: bytes, hashed: str) -> bool:
    """
    Whether C{password} matches C{hashed} (bcrypt C{$2a$/$2b$/$2y$} or
    argon2 C{$argon2id$/$argon2i$/$argon2d$}); a malformed hash matches
    nothing.  Slow by design: call it in a thread.
    """
    if hashed.startswith("$argon2"):
        from argon2 import PasswordHasher
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            return PasswordHasher().verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False
    import bcrypt

    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX], hashed.encode("ascii"))
    except ValueError:
        return False


class PasswordChecker:
    """
    Checks passwords with L{check_hash} through C{run}, caching successes.

    @param run: C{run(f, *args)} calls C{f(*args)} elsewhere (a thread) and
        returns a Deferred of its result.
    """

    def __init__(self, clock: Any, run: Callable[..., defer.Deferred[bool]], max_pending: int = 64,
                 cache_size: int = 1024, check: Callable[[bytes, str], bool] = check_hash) -> None:
        self.clock = clock
        self._run = run
        self._check = check
        self.max_pending = max_pending
        self.cache_size = cache_size
        self._secret = os.urandom(32)
        # digest -> when the success expires; oldest first
        self._cache: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        # digest -> the callers waiting on the run in flight
        self._running: dict[bytes, list[defer.Deferred[bool]]] = {}
        self.runs = 0
        self.cache_hits = 0
        self.too_busy = 0

    @property
    def pending(self) -> int:
        """
        Checks queued or running.
        """
        return len(self._running)

    def verify(self, user: str, password: bytes, hashed: str, ttl: float) -> defer.Deferred[bool]:
        """
        Whether C{password} is C{user}'s, whose stored hash is C{hashed}; a
        success is remembered for C{ttl} seconds (0: not at all).  Fails
        with L{TooBusy} when C{max_pending} checks are already under way.
        """
        digest = hmac.new(self._secret, b"\0".join((user.encode("utf-8"), password, hashed.encode("ascii"))),
                          hashlib.sha256).digest()
        expires = self._cache.get(digest)
        if expires is not None:
            if self.clock.seconds() < expires:
                self.cache_hits += 1
                self._cache.move_to_end(digest)
                return defer.succeed(True)
            del self._cache[digest]
        waiting: defer.Deferred[bool] = defer.Deferred()
        running = self._running.get(digest)
        if running is not None:
            running.append(waiting)
            return waiting
        if len(self._running) >= self.max_pending:
            self.too_busy += 1
            return defer.fail(TooBusy(f"{len(self._running)} password checks under way"))
        self._running[digest] = [waiting]
        self.runs += 1
        d = self._run(self._check, password, hashed)
        d.addBoth(self._done, digest, ttl)
        return waiting

    def _done(self, result: Any, digest: bytes, ttl: float) -> None:
        waiters = self._running.pop(digest)
        if result is True and ttl > 0:
            cache = self._cache
            cache[digest] = self.clock.seconds() + ttl
            cache.move_to_end(digest)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        for waiting in waiters:
            # (a waiter cancelled meanwhile, its client gone, ignores this)
            if isinstance(result, bool):
                waiting.callback(result)
            else:
                waiting.errback(result)


# one checker (one thread pool, one cache) per reactor, shared by every
# frontend and kept across reloads
_CHECKERS: weakref.WeakKeyDictionary[Any, PasswordChecker] = weakref.WeakKeyDictionary()


def checker_for(reactor: Any, threads: int = 2) -> PasswordChecker:
    """
    The password checker of C{reactor}, made on first use: its thread pool
    of C{threads} starts with the first check and stops when the reactor
    does.
    """
    checker = _CHECKERS.get(reactor)
    if checker is None:
        pool = ThreadPool(minthreads=0, maxthreads=threads, name="rproxy-passwords")

        def run(f: Callable[..., bool], *args: Any) -> defer.Deferred[bool]:
            if not pool.started:
                pool.start()
                reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
            return deferToThreadPool(reactor, pool, f, *args)

        checker = _CHECKERS[reactor] = PasswordChecker(reactor, run)
    return checker
