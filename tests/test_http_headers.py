"""
Tests for L{rproxy.http.headers}: what the proxy changes in the heads it
forwards, byte for byte.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from rproxy.http.headers import (
    error_response,
    finish_scanned_head,
    request_head,
    response_fields,
    response_head,
    scan_response_head,
)


def fields_of(block: bytes) -> list[tuple[bytes, bytes]]:
    """
    The (name, value) pairs of a CRLF-prefixed field block.
    """
    pairs = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
    return pairs


def _lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n"), head
    return head[:-4].split(b"\r\n")


class RequestHeadTests(SynchronousTestCase):
    def head(self, headers: list[tuple[bytes, bytes]], **kwargs: object) -> list[bytes]:
        options: dict[str, object] = {"client_ip": b"10.0.0.9", "proto": b"http", "chunked": False,
                                      "content_length": None}
        options.update(kwargs)
        return _lines(request_head(b"GET", b"/a?b", headers, **options))  # type: ignore[arg-type]

    def test_forwarding_fields(self) -> None:
        """
        X-Forwarded-For is appended to (every earlier one joined in order),
        X-Forwarded-Proto and -Host are set, a client's own are dropped,
        Via is added after the client's, Host is kept.
        """
        lines = self.head([
            (b"Host", b"Example.com:8080"), (b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"),
            (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil"), (b"Via", b"1.0 other"),
            (b"Accept", b"*/*"),
        ])
        self.assertEqual(lines, [
            b"GET /a?b HTTP/1.1", b"Host: Example.com:8080", b"Via: 1.0 other", b"Accept: */*",
            b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.9", b"X-Forwarded-Proto: http",
            b"X-Forwarded-Host: Example.com:8080", b"Via: 1.1 rproxy",
        ])

    def test_hop_by_hop_dropped(self) -> None:
        """
        Connection and every field it names (in any case, across several
        Connection fields, named before or after), Keep-Alive,
        Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Expect
        and the client's Content-Length are not forwarded.
        """
        lines = self.head([
            (b"X-Before", b"1"), (b"Connection", b"keep-alive, X-Before"), (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Trailer", b"X"),
            (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"websocket"), (b"Expect", b"100-continue"),
            (b"Content-Length", b"5"), (b"connection", b"x-after"), (b"X-After", b"2"), (b"X-Kept", b"3"),
        ], chunked=True)
        self.assertEqual(lines, [
            b"GET /a?b HTTP/1.1", b"X-Kept: 3", b"X-Forwarded-For: 10.0.0.9", b"X-Forwarded-Proto: http",
            b"Via: 1.1 rproxy", b"Transfer-Encoding: chunked",
        ])

    def test_plain_connection_values(self) -> None:
        """
        Connection: close or keep-alive (any of their usual spellings)
        names no field; a list that also names one still drops that one.
        """
        for value in (b"close", b"Close", b"keep-alive", b"Keep-Alive", b"keep-alive, close"):
            lines = self.head([(b"Connection", value), (b"Close", b"1"), (b"Keep-Alive", b"timeout=5")])
            self.assertEqual(lines[1], b"Close: 1", value)
        lines = self.head([(b"Connection", b"Close, X-Hop"), (b"X-Hop", b"1"), (b"X-Kept", b"2")])
        self.assertEqual(lines[1], b"X-Kept: 2")

    def test_framing_set_by_proxy(self) -> None:
        lines = self.head([(b"Host", b"h")], content_length=12)
        self.assertEqual(lines[-1], b"Content-Length: 12")

    def test_upgrade_kept_when_upgrading(self) -> None:
        """
        An upgrade request keeps Upgrade (even when Connection names it)
        and says Connection: upgrade.
        """
        lines = self.head([(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                           (b"Sec-WebSocket-Key", b"k")], upgrade=True)
        self.assertIn(b"Upgrade: websocket", lines)
        self.assertIn(b"Sec-WebSocket-Key: k", lines)
        self.assertEqual(lines[-1], b"Connection: upgrade")

    def test_host_rewrite_and_route_rules(self) -> None:
        """
        Host may be set to the server's (X-Forwarded-Host keeps the
        client's); a route's removed and set fields replace the client's.
        """
        lines = self.head([(b"Host", b"public.example"), (b"X-Secret", b"s"), (b"x-tag", b"client"),
                           (b"Authorization", b"Bearer client")],
                          host=b"10.1.1.1", set_headers=[(b"X-Tag", b"route")],
                          remove=frozenset({b"x-secret", b"x-tag"}))
        self.assertEqual(lines, [
            b"GET /a?b HTTP/1.1", b"Host: 10.1.1.1", b"Authorization: Bearer client",
            b"X-Forwarded-For: 10.0.0.9", b"X-Forwarded-Proto: http", b"X-Forwarded-Host: public.example",
            b"Via: 1.1 rproxy", b"X-Tag: route",
        ])


class ResponseHeadTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """
        response_fields keeps end-to-end fields in order and reports the
        framing fields it drops.
        """
        lines, length, encoded = response_fields([
            (b"Server", b"x"), (b"Content-Length", b"10"), (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
        ])
        self.assertEqual((lines, length, encoded), ([b"Server: x", b"Set-Cookie: a=1", b"Set-Cookie: b=2"],
                                                    b"10", False))
        self.assertEqual(response_fields([(b"transfer-encoding", b"chunked")]), ([], None, True))

    def test_framings(self) -> None:
        headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"3")]
        self.assertEqual(
            _lines(response_head(200, b"OK", headers, version=(1, 1), framing="length", content_length=3)),
            [b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Via: 1.1 rproxy", b"Content-Length: 3"])
        self.assertEqual(
            _lines(response_head(200, b"", headers, version=(1, 1), framing="chunked"))[-1:],
            [b"Transfer-Encoding: chunked"])
        self.assertEqual(
            _lines(response_head(200, b"OK", headers, version=(1, 0), framing="close", close=True))[-2:],
            [b"Via: 1.1 rproxy", b"Connection: close"])
        # HEAD: no body, but the entity's length
        self.assertEqual(
            _lines(response_head(200, b"OK", headers, version=(1, 1), framing="none", content_length=3))[-1],
            b"Content-Length: 3")
        # an HTTP/1.0 client that keeps the connection is told so
        self.assertEqual(
            _lines(response_head(204, b"", [], version=(1, 0), framing="none")),
            [b"HTTP/1.0 204 No Content", b"Via: 1.1 rproxy", b"Connection: keep-alive"])

    def test_upgrade(self) -> None:
        lines = _lines(response_head(101, b"Switching Protocols", [
            (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"a")],
            version=(1, 1), framing="none", upgrade=True))
        self.assertEqual(lines, [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                                 b"Sec-WebSocket-Accept: a", b"Via: 1.1 rproxy", b"Connection: upgrade"])

    def test_reason_phrases(self) -> None:
        self.assertEqual(_lines(response_head(599, b"", [], version=(1, 1), framing="none"))[0],
                         b"HTTP/1.1 599 Unknown")
        self.assertEqual(_lines(response_head(200, b"Fine", [], version=(1, 1), framing="none"))[0],
                         b"HTTP/1.1 200 Fine")

    def test_error_response(self) -> None:
        data = error_response(503, 'no "server"', extra=[(b"Retry-After", b"1")])
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertEqual(body, b'{"error": "no \\"server\\""}\n')
        self.assertIn(b"Retry-After: 1", head)
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertTrue(head.endswith(b"Connection: close"))

    def test_error_response_is_json(self) -> None:
        """Control characters and lone surrogates in the message still make valid JSON."""
        message = 'bad\x00 \x1f "q" \\ \udc80 \u00e9'
        head, _, body = error_response(502, message).partition(b"\r\n\r\n")
        self.assertEqual(json.loads(body), {"error": message})
        self.assertIn(b"Content-Length: %d\r\n" % len(body), head)


class ScannedResponseHeadTests(SynchronousTestCase):
    """
    The response head as bytes: hop-by-hop fields cut out, the rest kept
    as the server wrote it.
    """

    HEAD = (b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 10\r\nCONNECTION: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nKeep-Alive-Extra: kept\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\nTE: x\r\nTEs: kept")

    def test_scan(self) -> None:
        line, block, has_length, encoded = scan_response_head(self.HEAD)
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(fields_of(block), [
            (b"Server", b"x"), (b"Content-Length", b"10"), (b"Keep-Alive-Extra", b"kept"),
            (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"TEs", b"kept")])
        self.assertEqual((has_length, encoded), (True, False))

    def test_agrees_with_field_list(self) -> None:
        """
        The byte scan keeps what the field-list rewrite keeps, Content-Length
        aside (which the scan leaves in place).
        """
        line, block, _, _ = scan_response_head(self.HEAD)
        fields = [(n, v.strip()) for n, _, v in (f.partition(b":") for f in self.HEAD.split(b"\r\n")[1:])]
        kept, _, _ = response_fields(fields)
        self.assertEqual([b"%s: %s" % pair for pair in fields_of(block) if pair[0] != b"Content-Length"], kept)

    def test_framing_fields(self) -> None:
        _, block, has_length, encoded = scan_response_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked")
        self.assertEqual((block, has_length, encoded), (b"", False, True))
        # Connection cannot take Content-Length away from the framing
        _, block, has_length, _ = scan_response_head(
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3")
        self.assertEqual((block, has_length), (b"\r\nContent-Length: 3", True))

    def test_upgrade(self) -> None:
        line, block, _, _ = scan_response_head(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: a", upgrade=True)
        self.assertEqual(_lines(finish_scanned_head(101, line, block, version=(1, 1), framing="none",
                                                    upgrade=True)),
                         [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Sec-WebSocket-Accept: a",
                          b"Via: 1.1 rproxy", b"Connection: upgrade"])

    def test_status_line(self) -> None:
        """
        The server's status line goes on when both speak HTTP/1.1; else
        it is rewritten for the client's version, keeping the phrase.
        """
        self.assertEqual(_lines(finish_scanned_head(200, b"HTTP/1.1 200 Fine", b"", version=(1, 1),
                                                    framing="length")),
                         [b"HTTP/1.1 200 Fine", b"Via: 1.1 rproxy"])
        self.assertEqual(_lines(finish_scanned_head(200, b"HTTP/1.0 200 Fine", b"", version=(1, 1),
                                                    framing="chunked")),
                         [b"HTTP/1.1 200 Fine", b"Via: 1.1 rproxy", b"Transfer-Encoding: chunked"])
        self.assertEqual(_lines(finish_scanned_head(404, b"HTTP/1.1 404", b"", version=(1, 0), framing="close",
                                                    close=True, extra=[(b"X-A", b"b")])),
                         [b"HTTP/1.0 404 Not Found", b"Via: 1.1 rproxy", b"X-A: b", b"Connection: close"])
        self.assertEqual(_lines(finish_scanned_head(204, b"HTTP/1.1 204 No Content", b"", version=(1, 0),
                                                    framing="none")),
                         [b"HTTP/1.0 204 No Content", b"Via: 1.1 rproxy", b"Connection: keep-alive"])
