"""
Tests for L{rproxy.tokenpool}: the lease logic with a task.Clock and a
login function the test answers by hand.
"""

from __future__ import annotations

import os
import random

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import Credential, TokenPoolConfig
from rproxy.config.model import UpstreamTLSConfig
from rproxy.tls import self_signed
from rproxy.tokenpool import (
    LoginRefused,
    LoginResult,
    NoTokens,
    TokenPool,
    TokenQueueFull,
    TokenQueueTimeout,
    _TLSPolicy,
    clean_token,
    parse_login_answer,
)


def pool_config(users: int = 2, **kwargs: object) -> TokenPoolConfig:
    credentials = tuple(Credential(f"u{i}", f"p{i}") for i in range(users))
    defaults: dict[str, object] = {"ttl": 100.0, "refresh_before": 10.0, "queue_timeout": 5.0,
                                   "retry_initial": 1.0, "retry_max": 8.0, "max_login_failures": 3}
    defaults.update(kwargs)
    return TokenPoolConfig(name="t", host="127.0.0.1", port=1, credentials=credentials, **defaults)  # type: ignore[arg-type]


class Logins:
    """
    A login function whose calls the test answers: C{pending} holds
    (credential, Deferred) in call order.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Credential, defer.Deferred[LoginResult]]] = []
        self.issued = 0

    def __call__(self, credential: Credential) -> defer.Deferred[LoginResult]:
        d: defer.Deferred[LoginResult] = defer.Deferred()
        self.pending.append((credential, d))
        return d

    def answer_all(self, ttl: float | None = None) -> list[str]:
        tokens = []
        pending, self.pending = self.pending, []
        for credential, d in pending:
            self.issued += 1
            token = f"{credential.username}-tok{self.issued}"
            tokens.append(token)
            d.callback(LoginResult(token, ttl))
        return tokens

    def fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, []
        for _, d in pending:
            d.errback(error)


class TokenPoolTests(SynchronousTestCase):
    def make(self, users: int = 2, **kwargs: object) -> tuple[TokenPool, Logins, Clock]:
        clock, logins = Clock(), Logins()
        pool = TokenPool(pool_config(users, **kwargs), logins, clock, random.Random(1))
        pool.start()
        self.addCleanup(pool.stop)
        return pool, logins, clock

    def test_startup_logs_in_every_session(self) -> None:
        """
        Every credential (times sessions_per_credential) logs in at start;
        the pool holds no token until a login answers.
        """
        pool, logins, _ = self.make(users=2, sessions_per_credential=3)
        self.assertEqual(sorted(c.username for c, _ in logins.pending), ["u0"] * 3 + ["u1"] * 3)
        self.assertFalse(pool.has_token())
        self.assertIsNone(pool.try_lease())
        logins.answer_all()
        self.assertEqual(pool.counts(), {"total": 6, "in_use": 0, "available": 6, "waiting": 0})
        self.assertEqual(pool.status()["status"], "healthy")

    def test_login_concurrency_is_bounded(self) -> None:
        """
        At most login_concurrency logins are in flight.
        """
        pool, logins, _ = self.make(users=10, login_concurrency=3)
        self.assertEqual(len(logins.pending), 3)
        logins.answer_all()
        self.assertEqual(len(logins.pending), 3)
        while logins.pending:
            logins.answer_all()
        self.assertEqual(pool.counts()["total"], 10)

    def test_lease_is_exclusive_until_released(self) -> None:
        """
        A leased token is not handed to anyone else until it is released.
        """
        pool, logins, _ = self.make(users=2)
        logins.answer_all()
        a, b = pool.try_lease(), pool.try_lease()
        assert a is not None and b is not None
        self.assertNotEqual(a.token, b.token)
        self.assertIsNone(pool.try_lease())
        self.assertEqual(pool.counts(), {"total": 2, "in_use": 2, "available": 0, "waiting": 0})
        a.release()
        a.release()  # twice is harmless
        c = pool.try_lease()
        assert c is not None
        self.assertEqual(c.token, a.token)
        self.assertEqual(pool.counts()["in_use"], 2)

    def test_waiters_are_served_fifo(self) -> None:
        """
        Connections waiting for a token get one in arrival order, and a
        newcomer does not overtake them.
        """
        pool, logins, clock = self.make(users=1)
        logins.answer_all()
        held = pool.try_lease()
        assert held is not None
        order: list[int] = []
        leases = []
        for i in range(3):
            d = pool.lease()
            d.addCallback(lambda lease, i=i: (order.append(i), leases.append(lease)))
        self.assertEqual(pool.counts()["waiting"], 3)
        held.release()
        self.assertIsNone(pool.try_lease())  # waiters first
        for _ in range(2):
            clock.advance(0.5)
            leases[-1].release()
        self.assertEqual(order, [0, 1, 2])
        self.assertEqual(pool.counts()["waiting"], 0)
        self.assertEqual(pool.wait_count, 4)  # the first lease waited 0s
        self.assertAlmostEqual(pool.wait_sum, 0.5 + 1.0)

    def test_waiter_times_out(self) -> None:
        """
        After queue_timeout a waiter fails with TokenQueueTimeout and
        leaves the queue.
        """
        pool, logins, clock = self.make(users=1, queue_timeout=5.0)
        logins.answer_all()
        held = pool.try_lease()
        d = pool.lease()
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.failureResultOf(d, TokenQueueTimeout)
        self.assertEqual(pool.counts()["waiting"], 0)
        self.assertEqual(pool.timeouts, 1)
        assert held is not None
        held.release()
        self.assertEqual(pool.counts()["available"], 1)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """
        A waiter whose client went away (cancel) leaves the queue and is
        skipped when a token frees.
        """
        pool, logins, _ = self.make(users=1)
        logins.answer_all()
        held = pool.try_lease()
        gone = pool.lease()
        staying = pool.lease()
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual(pool.counts()["waiting"], 1)
        assert held is not None
        held.release()
        lease = self.successResultOf(staying)
        self.assertEqual(lease.token, held.token)

    def test_queue_limit(self) -> None:
        """
        Beyond max_waiters, a lease fails at once.
        """
        pool, logins, _ = self.make(users=1, max_waiters=2)
        logins.answer_all()
        pool.try_lease()
        waiting = [pool.lease(), pool.lease()]
        self.failureResultOf(pool.lease(), TokenQueueFull)
        pool.stop()
        for d in waiting:
            self.failureResultOf(d, NoTokens)

    def test_waiter_gets_first_token_of_startup(self) -> None:
        """
        A connection that arrives before any login finished waits, and
        gets the first token.
        """
        pool, logins, _ = self.make(users=1)
        d = pool.lease()
        self.assertNoResult(d)
        [token] = logins.answer_all()
        self.assertEqual(self.successResultOf(d).token, token)

    def test_refresh_before_expiry_keeps_the_lease(self) -> None:
        """
        A token is renewed at ttl - refresh_before; the connection holding
        it keeps its lease and sees the new token.
        """
        pool, logins, clock = self.make(users=1, ttl=100.0, refresh_before=10.0)
        [first] = logins.answer_all()
        lease = pool.try_lease()
        assert lease is not None
        clock.advance(89.9)
        self.assertEqual(logins.pending, [])
        clock.advance(0.2)
        self.assertEqual(len(logins.pending), 1)
        self.assertEqual(lease.token, first)  # the old token serves meanwhile
        self.assertTrue(lease.ready())
        [second] = logins.answer_all()
        self.assertEqual(lease.token, second)
        self.assertIs(pool.sessions[0].lease, lease)
        self.assertEqual(pool.refreshes["ok"], 1)
        self.assertEqual(pool.logins["ok"], 1)

    def test_ttl_from_the_answer(self) -> None:
        """
        A lifetime given by the upstream, if shorter, sets the refresh.
        """
        pool, logins, clock = self.make(users=1, ttl=100.0, refresh_before=10.0)
        logins.answer_all(ttl=8.0)
        clock.advance(3.9)
        self.assertEqual(logins.pending, [])
        clock.advance(0.2)
        self.assertEqual(len(logins.pending), 1)

    def test_unauthorized_relogs_in_and_holder_waits(self) -> None:
        """
        A 401 marks the token stale: it logs in again at once, and the
        holder's next request waits for the new token.  A second 401 for
        the same old token starts no second login.
        """
        pool, logins, _ = self.make(users=1)
        [old] = logins.answer_all()
        lease = pool.try_lease()
        assert lease is not None
        lease.unauthorized(old)
        lease.unauthorized(old)
        self.assertEqual(len(logins.pending), 1)
        self.assertFalse(lease.ready())
        d = lease.wait()
        self.assertNoResult(d)
        [new] = logins.answer_all()
        self.assertIs(self.successResultOf(d), lease)
        self.assertEqual(lease.token, new)
        self.assertEqual(pool.unauthorized_total, 2)
        lease.unauthorized(old)  # late 401 for the replaced token
        self.assertEqual(logins.pending, [])

    def test_upstream_down_retries_with_backoff(self) -> None:
        """
        Logins failing for want of an upstream are retried with growing,
        jittered delays (up to retry.max), for ever, and never take the
        credential out.
        """
        pool, logins, clock = self.make(users=1, retry_initial=1.0, retry_max=8.0, max_login_failures=3)
        delays = []
        for _ in range(8):
            logins.fail_all(ConnectionRefusedError("refused"))
            waited = 0.0
            while not logins.pending:
                clock.advance(0.05)
                waited += 0.05
            delays.append(waited)
        self.assertLessEqual(delays[0], 1.05)
        self.assertGreater(delays[3], 3.9)  # 8s x [0.5, 1)
        self.assertTrue(all(d <= 8.05 for d in delays))
        self.assertFalse(pool.sessions[0].out)
        self.assertEqual(pool.logins["error"], 8)
        logins.answer_all()
        self.assertTrue(pool.has_token())

    def test_refused_credential_is_taken_out(self) -> None:
        """
        After max_login_failures refusals in a row a credential is taken
        out: waiters fail at once when no credential is left, it is
        reported, and a later successful login brings it back.
        """
        pool, logins, clock = self.make(users=1, max_login_failures=3, retry_max=8.0, queue_timeout=60.0)
        waiter = pool.lease()
        for _ in range(3):
            logins.fail_all(LoginRefused("login answered 401"))
            clock.advance(8.0)
        self.failureResultOf(waiter, NoTokens)
        self.failureResultOf(pool.lease(), NoTokens)
        self.assertEqual(pool.status()["credentials_out"], ["u0"])
        self.assertEqual(pool.status()["status"], "unavailable")
        self.assertEqual(len(logins.pending), 1)  # still retried, every retry.max
        logins.answer_all()
        self.assertEqual(pool.status()["credentials_out"], [])
        self.assertIsNotNone(pool.try_lease())

    def test_failed_refresh_keeps_the_old_token_until_expiry(self) -> None:
        """
        While refreshes fail, the old token serves until it expires, with
        retries before that; once expired it is not leased.
        """
        pool, logins, clock = self.make(users=1, ttl=100.0, refresh_before=10.0, retry_initial=20.0,
                                        retry_max=20.0)
        [old] = logins.answer_all()
        clock.advance(90.0)
        logins.fail_all(ConnectionRefusedError())
        lease = pool.try_lease()
        assert lease is not None and lease.token == old
        lease.release()
        clock.advance(5.0)  # retried within half the time left, not 20s later
        self.assertEqual(len(logins.pending), 1)
        logins.fail_all(ConnectionRefusedError())
        clock.advance(5.1)
        self.assertFalse(pool.has_token())
        self.assertIsNone(pool.try_lease())

    def test_retired_pool_stops_when_idle(self) -> None:
        """
        A pool replaced by a reload serves its leases and then stops
        (no more refreshes).
        """
        pool, logins, clock = self.make(users=1, ttl=100.0, refresh_before=10.0)
        logins.answer_all()
        lease = pool.try_lease()
        pool.retire()
        self.assertTrue(pool.running)
        self.failureResultOf(pool.lease(), NoTokens)
        assert lease is not None
        lease.release()
        self.assertFalse(pool.running)
        clock.advance(200)
        self.assertEqual(logins.pending, [])

    def test_stop_fails_waiters(self) -> None:
        pool, logins, _ = self.make(users=1)
        d = pool.lease()
        pool.stop()
        self.failureResultOf(d, NoTokens)
        logins.answer_all()  # a login answering after the stop is ignored
        self.assertFalse(pool.has_token())


class LoginAnswerTests(SynchronousTestCase):
    config = pool_config(1)

    def test_dolphindb_answer(self) -> None:
        """
        DolphinDB's answer: code "0", the token in result[0], wrapped over
        lines (the line breaks are dropped).
        """
        body = (b'{"session": "2333906441", "user": "admin", "code": "0", "message": "",'
                b' "result": ["kRYEw4RK2m/x1G4Q\\nPIgIfppIWo1u\\n"]}')
        result = parse_login_answer(self.config, 200, body)
        self.assertEqual(result, LoginResult("kRYEw4RK2m/x1G4QPIgIfppIWo1u", None))

    def test_refusals(self) -> None:
        """
        401/403, an error code and a missing token are refusals (they count
        against the credential); 5xx and garbage are upstream trouble.
        """
        for status, body in [(401, b""), (403, b"{}"),
                             (200, b'{"code": "1", "message": "The user name or password is incorrect.", "result": []}'),
                             (200, b'{"code": "0", "result": []}')]:
            self.assertRaises(LoginRefused, parse_login_answer, self.config, status, body)
        for status, body in [(500, b"{}"), (200, b"<html>"), (302, b"")]:
            error = self.assertRaises(ValueError, parse_login_answer, self.config, status, body)
            self.assertNotIsInstance(error, LoginRefused)

    def test_other_shapes(self) -> None:
        """
        token and expires_in paths; ok_field off.
        """
        config = attrs.evolve(self.config, token_field="data.access_token", ok_field=None,
                              expires_field="data.expires_in")
        result = parse_login_answer(config, 200, b'{"code": 7, "data": {"access_token": "abc", "expires_in": 30}}')
        self.assertEqual(result, LoginResult("abc", 30.0))

    def test_header_injection_refused(self) -> None:
        """
        A token that could split a header is refused.
        """
        self.assertEqual(clean_token("ab\r\ncd"), "abcd")
        self.assertRaises(LoginRefused, clean_token, "ab\x00cd")
        self.assertRaises(LoginRefused, clean_token, "  ")
        self.assertRaises(LoginRefused, clean_token, 42)


class LoginLoopTests(SynchronousTestCase):
    """
    A session's login loop survives errors in the handling of a login.
    """

    def test_bad_login_result_is_logged_and_retried(self) -> None:
        """
        A login whose result breaks its handling (a ttl that is no number)
        is logged, and the session logs in again after retry_max.
        """
        clock, logins = Clock(), Logins()
        pool = TokenPool(pool_config(users=1), logins, clock, random.Random(1))
        pool.start()
        self.addCleanup(pool.stop)
        [(_, d)] = logins.pending
        logins.pending.clear()
        d.callback(LoginResult("tok", "soon"))  # type: ignore[arg-type]
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertFalse(pool.has_token())
        clock.advance(pool.config.retry_max)
        self.assertEqual(len(logins.pending), 1)
        logins.answer_all()
        self.assertTrue(pool.has_token())


class TLSPolicyTests(SynchronousTestCase):
    """
    L{rproxy.tokenpool._TLSPolicy}: the login connections' TLS options.
    """

    def test_ca_read_once(self) -> None:
        """
        The CA file is read when the first login connects, and the options
        built then serve every later login: a CA file removed afterwards
        (or a slow disk) no longer touches a login.
        """
        cert, _ = self_signed("login.example")
        ca = self.mktemp()
        with open(ca, "wb") as f:
            f.write(cert)
        policy = _TLSPolicy(pool_config(tls=UpstreamTLSConfig(ca=ca, server_name="login.example")))
        first = policy.creatorForNetloc(b"127.0.0.1", 443)
        os.remove(ca)
        second = policy.creatorForNetloc(b"127.0.0.1", 443)
        self.assertIs(first, second)
        self.assertEqual(first._hostnameASCII, "login.example")
