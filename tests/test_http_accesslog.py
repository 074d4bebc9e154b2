"""
The HTTP access log: its exact lines, in a file of its own or the process
log, on fake transports and a fake clock.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import FrontendConfig
from rproxy.http.accesslog import escape
from tests.test_http_frontend import Harness


def with_path(config: FrontendConfig, path: str | None) -> FrontendConfig:
    """
    C{config} with its access log written to C{path}.
    """
    return attrs.evolve(config, http=attrs.evolve(config.http, access_log_path=path))


def response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.logged = EventLoggingObserver()
        globalLogPublisher.addObserver(self.logged)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged)

    def harness(self, fmt: str, path: str | None) -> Harness:
        h = Harness(http={"access_log": fmt})
        h.frontend.configure(with_path(h.frontend.config, path))
        self.addCleanup(h.frontend._close_access_log, None)
        return h

    def serve(self, h: Harness, requests: list[bytes], bodies: list[bytes]) -> None:
        """The requests on one keep-alive connection, each answered with its body."""
        conn, _ = h.client()
        for request, body in zip(requests, bodies, strict=True):
            conn.dataReceived(request)
            assert conn.exchange is not None
            upstream = conn.exchange.upstream or h.upstream()[0]
            h.clock.advance(0.25)
            upstream.dataReceived(response(body))
        h.clock.advance(0)

    def lines(self) -> list[str]:
        with open(self.path) as f:
            return f.read().splitlines()

    def test_bytes_are_the_response_body(self) -> None:
        """
        Each line's bytes are its own response's body, not the connection's
        running total.
        """
        h = self.harness("combined", self.path)
        self.serve(h, [b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4)],
                   [b"x" * 11, b"y" * 11, b"", b"z" * 3])
        self.assertEqual(self.lines(), [
            f'10.0.0.7 - - [01/Jan/1970:00:00:{s:02d} +0000] "GET /{i} HTTP/1.1" 200 {n} "-" "-" be/s0 '
            "0.250000"
            for i, (s, n) in enumerate([(0, 11), (0, 11), (0, 0), (1, 3)])
        ])

    def test_combined_escapes_like_nginx(self) -> None:
        """
        Quotes, backslashes, control and non-ASCII bytes of the target and
        fields are written as \\xHH: a client cannot end a field or forge a
        line.
        """
        h = self.harness("combined", self.path)
        self.serve(h, [b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nUser-Agent: ev"il\t\xe9\r\n'
                       b'Referer: "-" 200 0 "\r\n\r\n'], [b"ok"])
        self.assertEqual(self.lines(), [
            '10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "GET /a\\x22b\\x5Cc HTTP/1.1" 200 2 '
            '"\\x22-\\x22 200 0 \\x22" "ev\\x22il\\x09\\xE9" be/s0 0.250000'
        ])

    def test_escape(self) -> None:
        """escape() keeps printable ASCII and writes the rest as nginx does."""
        self.assertEqual(escape(b"plain /path?q=1"), "plain /path?q=1")
        self.assertEqual(escape(b'"\\\x00\x1f\x7f\xff'), "\\x22\\x5C\\x00\\x1F\\x7F\\xFF")

    def test_json_lines_of_their_own(self) -> None:
        """
        With a path, JSON records are whole lines of that file, nothing
        before them, and nothing goes to the process log.
        """
        h = self.harness("json", self.path)
        self.serve(h, [b"GET /j?q=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n\r\n"] * 2, [b"abc", b"de"])
        self.assertEqual([json.loads(line) for line in self.lines()], [
            {"backend": "be", "bytes": n, "client": "10.0.0.7", "duration": 0.25, "frontend": "fe", "method": "GET",
             "server": "s0", "status": 200, "target": "/j?q=1", "user_agent": "probe/1",
             "version": "1.1"}
            for n in (3, 2)
        ])
        self.assertEqual([e for e in self.logged if e.get("log_namespace") == "rproxy.access"], [])

    def test_process_log_without_path(self) -> None:
        """Without a path the lines are events of the rproxy.access namespace."""
        h = Harness(http={"access_log": "combined"})
        self.serve(h, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] * 2, [b"ok", b"abc"])
        self.assertEqual([e["line"] for e in self.logged if e.get("log_namespace") == "rproxy.access"], [
            '10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "GET / HTTP/1.1" 200 2 "-" "-" be/s0 0.250000',
            '10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "GET / HTTP/1.1" 200 3 "-" "-" be/s0 0.250000',
        ])

    def test_reopened_on_reload(self) -> None:
        """
        A reload (configure) after a rotation renamed the file writes to a
        new file at the path; what came before stays in the renamed one.
        """
        h = self.harness("combined", self.path)
        self.serve(h, [b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n"], [b"ok"])
        os.rename(self.path, self.path + ".1")
        h.frontend.configure(h.frontend.config)
        self.serve(h, [b"GET /new HTTP/1.1\r\nHost: x\r\n\r\n"], [b"ok"])
        [new] = self.lines()
        self.assertIn('"GET /new HTTP/1.1"', new)
        with open(self.path + ".1") as f:
            [old] = f.read().splitlines()
        self.assertIn('"GET /old HTTP/1.1"', old)

    def test_closed_when_drained(self) -> None:
        """The file is flushed and closed once the frontend has drained."""
        h = self.harness("combined", self.path)
        conn, _ = h.client()
        conn.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream, _ = h.upstream()
        upstream.dataReceived(response(b"ok"))
        h.frontend.drain(5)
        h.close(conn)
        self.assertEqual(len(self.lines()), 1)
        self.assertEqual(h.frontend.access_file._fd, -1)  # type: ignore[union-attr]

    def test_unopenable_path(self) -> None:
        """A path that cannot be opened is one logged error; lines go to the process log."""
        h = self.harness("combined", os.path.join(self.path, "missing", "access.log"))
        self.assertIsNone(h.frontend.access_file)
        [error] = [e for e in self.logged if e["log_level"].name == "error"]
        self.assertIn("access log", error["log_format"])
        self.serve(h, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], [b"ok"])
        self.assertEqual(len([e for e in self.logged if e.get("log_namespace") == "rproxy.access"]), 1)

    def test_failing_writes_logged_once(self) -> None:
        """Writes that fail (a full disk) are dropped, with one logged error."""
        h = self.harness("combined", "/dev/full")
        for _ in range(3):
            self.serve(h, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], [b"ok"])
        self.assertEqual(h.frontend.access_file.dropped, 3)  # type: ignore[union-attr]
        self.assertEqual(len([e for e in self.logged if e["log_level"].name == "error"]), 1)


class RefusalLogTests(SynchronousTestCase):
    """
    Requests the strict reader refuses are logged as requests, with what
    it knew of them.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()

    def refused(self, fmt: str, data: bytes, **http: Any) -> tuple[list[str], bytes]:
        """The lines logged for C{data} sent on a new connection, and what the client got."""
        h = Harness(http={"access_log": {"format": fmt, "path": self.path}, **http})
        self.addCleanup(h.frontend._close_access_log, None)
        conn, transport = h.client()
        conn.dataReceived(data)
        h.clock.advance(0)
        with open(self.path) as f:
            return f.read().splitlines(), transport.value()

    def test_malformed_head_combined(self) -> None:
        """A head the reader cannot read: a 400 line with "-" as its request."""
        lines, answer = self.refused("combined", b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "))
        self.assertEqual(lines, ['10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "GET /x HTTP/1.1" 400 0 "-" "-" '
                                 '-/- 0.000000'])

    def test_garbage_combined(self) -> None:
        """Bytes that are no request line: its request is "-"."""
        lines, _ = self.refused("combined", b"\x16\x03\x01\x00garbage\r\n\r\n")
        self.assertEqual(lines, ['10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "-" 400 0 "-" "-" -/- 0.000000'])

    def test_limits_json(self) -> None:
        """
        414 (its target cut at max_target), 431 and 413 are logged as JSON
        records with the status the client got.
        """
        cases = [
            (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {"max_target": 50}, 414, "GET",
             "/" + "a" * 49),
            (b"GET /h HTTP/1.1\r\nHost: x\r\nUser-Agent: ua/1\r\n" + b"X-A: 1\r\n" * 5 + b"\r\n",
             {"max_headers": 3}, 431, "GET", "/h"),
            (b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", {"max_body": 10}, 413, "POST", "/up"),
        ]
        for data, limits, status, method, target in cases:
            lines, answer = self.refused("json", data, **limits)
            self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), answer)
            [record] = [json.loads(line) for line in lines]
            self.assertEqual((record["status"], record["method"], record["target"], record["backend"],
                              record["server"], record["bytes"]), (status, method, target, "-", "-", 0))
            os.unlink(self.path)

    def test_body_over_the_limit_mid_request(self) -> None:
        """
        A chunked body that passes max_body once the request is on its way:
        the request in flight is logged once, with its own head, as a 413.
        """
        h = Harness(http={"access_log": {"format": "combined", "path": self.path}, "max_body": 10})
        self.addCleanup(h.frontend._close_access_log, None)
        conn, transport = h.client()
        conn.dataReceived(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        upstream, _ = h.upstream()
        conn.dataReceived(b"10\r\n" + b"y" * 16 + b"\r\n")
        h.clock.advance(0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        with open(self.path) as f:
            self.assertEqual(f.read().splitlines(), [
                '10.0.0.7 - - [01/Jan/1970:00:00:00 +0000] "POST /c HTTP/1.1" 413 0 "-" "-" be/s0 0.000000'])
        self.assertEqual((h.frontend.active_requests, h.frontend.requests[("-", 413)]), (0, 1))
