"""
Tests for L{rproxy.http.reader}: strict parsing, limits, and the
http-desync-guardian corpus (written by others, in ../shared/corpora).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from rproxy.http.headers import request_head
from rproxy.http.reader import Body, EndOfMessage, HTTPError, RequestHead, RequestReader, Upgrade

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                      "corpora", "http-desync-guardian")

# Cases the corpus calls Compliant or Acceptable that rproxy refuses on
# purpose (llhttp's strict mode; a 400 is the safe side of each).
DELIBERATELY_STRICT = {
    # 501, as nginx answers: rproxy re-frames a body as chunked and would drop the other codings
    "Correct TE OK": "a transfer coding other than chunked (gzip, chunked)",
    "Multiple transfer encoding headers in a single request OK": "a transfer coding other than chunked",
    "Different Transfer-Encoding headers": "a transfer coding other than chunked (gzip, then chunked)",
    "Different Transfer-Encoding headers combined": "transfer codings other than chunked",
    "Transfer-Encoding: identity and chunked OK": "a transfer coding other than chunked (deflate, identity, chunked)",
    "TE with custom parameters OK": "Transfer-Encoding parameters on chunked",
    "Transfer-Encoding with a param: chunked;custom_param": "Transfer-Encoding parameters on chunked",
    "International in URI": "raw non-ASCII bytes in the request target",
    "Empty URI": "an empty request target",
    "No TE/CL headers, some others are non-compliant": "control characters in header fields",
    "TE and some others are non-compliant": "control characters in header fields",
    "A non-essential header with a non-printable character (x01)": "control characters in header fields",
    "CL and some others are non-compliant": "control characters in header fields",
    "Empty version, which means HTTP/0.9": "HTTP/0.9",
    "Non-RFC, but OK HTTP/0.9": "HTTP/0.9",
    "Unknown but OK HTTP/1.2": "an HTTP version other than 1.0 and 1.1",
    "Some-Header\\x01": "control characters in header fields",
    "\\x01Some-Header": "control characters in header fields",
    "Some-Header: \\x01value": "control characters in header fields",
    "Some-Header: value\\x01": "control characters in header fields",
    "Extra spaces in version": "a malformed request line",
    "[space] in URI": "a space in the request target",
}


def _bytes(value: object) -> bytes:
    text = str(value)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def corpus_cases() -> list[tuple[str, str, bytes]]:
    cases = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.yaml"))):
        with open(path) as f:
            for case in yaml.safe_load(f) or []:
                headers = case.get("headers") or []
                lines = [b" ".join(_bytes(case.get(k, d)) for k, d in
                                   (("method", "GET"), ("uri", "/"), ("version", "HTTP/1.1")))]
                if not any(str(h["name"]).strip().lower() == "host" for h in headers):
                    lines.append(b"Host: example.com")
                lines += [_bytes(h["name"]) + b": " + _bytes(h["value"]) for h in headers]
                cases.append((case["name"], case["expected"]["tier"], b"\r\n".join(lines) + b"\r\n\r\n"))
    return cases


class DesyncCorpusTests(SynchronousTestCase):
    """
    Every case of aws/http-desync-guardian's test suite, at the parser.
    """

    def setUp(self) -> None:
        self.cases = corpus_cases()
        if not self.cases:
            raise SkipTest(f"corpus not found at {CORPUS}")

    def outcome(self, raw: bytes) -> RequestHead | HTTPError:
        try:
            events = RequestReader().feed(raw)
        except HTTPError as e:
            return e
        heads = [e for e in events if isinstance(e, RequestHead)]
        self.assertEqual(len(heads), 1)
        return heads[0]

    def test_severe_refused(self) -> None:
        """Every Severe case is refused with 400."""
        severe = [(n, raw) for n, tier, raw in self.cases if tier == "Severe"]
        self.assertGreaterEqual(len(severe), 50)
        for name, raw in severe:
            result = self.outcome(raw)
            self.assertIsInstance(result, HTTPError, name)
            self.assertEqual(result.status, 400, name)  # type: ignore[union-attr]

    def test_ambiguous_refused_or_flagged(self) -> None:
        """
        Ambiguous cases are refused, or accepted with one unambiguous framing
        and, for bodies on GET/HEAD, flagged so the proxy will not reuse the
        upstream connection.
        """
        for name, tier, raw in self.cases:
            if tier != "Ambiguous":
                continue
            result = self.outcome(raw)
            if isinstance(result, HTTPError):
                continue
            framing = [k for k, _ in result.headers if k.lower() in (b"content-length", b"transfer-encoding")]
            self.assertLessEqual(len(framing), 1, name)
            if result.has_body:
                self.assertTrue(result.suspicious_body, name)

    def test_compliant_accepted(self) -> None:
        """Compliant and Acceptable cases are accepted, but for the listed strict choices."""
        refused = []
        for name, tier, raw in self.cases:
            if tier not in ("Compliant", "Acceptable"):
                continue
            result = self.outcome(raw)
            if isinstance(result, HTTPError):
                refused.append(name)
        self.assertEqual(sorted(refused), sorted(DELIBERATELY_STRICT))


def _kinds(events: list[Any]) -> list[tuple[Any, ...]]:
    return [(type(e).__name__, getattr(e, "target", getattr(e, "data", getattr(e, "rest", None))),
             getattr(e, "upgrade", None)) for e in events]


class UpgradeDeclinedTests(SynchronousTestCase):
    """
    Upgrades to h2c and upgrade requests with a body are read as plain
    requests, and what follows them as the next requests.
    """

    def feed(self, data: bytes, cut: int | None = None) -> list[Any]:
        reader = RequestReader(bodiless_end=False)
        if cut is None:
            return reader.feed(data)
        return reader.feed(data[:cut]) + reader.feed(data[cut:])

    def test_h2c_declined(self) -> None:
        """curl --http2's request: no upgrade, and the next request is read."""
        data = (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        for cut in (None, 40, len(data) - 5):
            self.assertEqual(_kinds(self.feed(data, cut)), [
                ("RequestHead", b"/", False), ("RequestHead", b"/next", False)], cut)

    def test_h2c_with_body_declined(self) -> None:
        """curl --http2 -d: the body is read as the body (length or chunked)."""
        for framing, body in ((b"Content-Length: 3", b"abc"), (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n")):
            data = (b"POST /p HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    + framing + b"\r\n\r\n" + body + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            for cut in (None, 90, len(data) - 30):
                self.assertEqual(_kinds(self.feed(data, cut)), [
                    ("RequestHead", b"/p", False), ("Body", b"abc", None), ("EndOfMessage", None, None),
                    ("RequestHead", b"/next", False)], (framing, cut))

    def test_upgrade_with_body_declined(self) -> None:
        """Any upgrade request with a body; a bodiless upgrade after it is one."""
        data = (b"POST /p HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Content-Length: 3\r\n\r\nabc"
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes")
        self.assertEqual(_kinds(self.feed(data)), [
            ("RequestHead", b"/p", False), ("Body", b"abc", None), ("EndOfMessage", None, None),
            ("RequestHead", b"/ws", True), ("Upgrade", b"frames", None)])

    def test_websocket_upgrade_kept(self) -> None:
        """A bodiless WebSocket upgrade is one; the bytes after it are its rest."""
        data = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /x"
        self.assertEqual(_kinds(self.feed(data)), [("RequestHead", b"/ws", True), ("Upgrade", b"GET /x", None)])

    def test_later_bytes_after_upgrade(self) -> None:
        """Bytes read after an upgrade request's are the new protocol's too, not a request."""
        reader = RequestReader(bodiless_end=False)
        reader.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual(reader.feed(b"not http"), [Upgrade(b"not http")])

    def test_declined_upgrade_drops_its_fields_upstream(self) -> None:
        """Upstream, a declined h2c request has no Upgrade, Connection or HTTP2-Settings."""
        head = self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                         b"Upgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n")[0]
        sent = request_head(head.method, head.target, head.headers, b"10.0.0.1", b"http", head.chunked,
                            head.content_length, head.upgrade).lower()
        for field in (b"upgrade:", b"connection:", b"http2-settings:"):
            self.assertNotIn(field, sent)


class TransferCodingTests(SynchronousTestCase):
    def status(self, *fields: bytes) -> int | None:
        data = b"POST / HTTP/1.1\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n0\r\n\r\n"
        try:
            RequestReader().feed(data)
        except HTTPError as e:
            return e.status
        return None

    def test_other_codings_not_implemented(self) -> None:
        """A coding before chunked gets 501 (as nginx): rproxy's re-framing would drop it."""
        self.assertEqual(self.status(b"Transfer-Encoding: gzip, chunked"), 501)
        self.assertEqual(self.status(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), 501)

    def test_chunked_accepted(self) -> None:
        """chunked alone, in any case, or after the no-op identity, is read."""
        self.assertIsNone(self.status(b"Transfer-Encoding: chunked"))
        self.assertIsNone(self.status(b"Transfer-Encoding: Chunked"))
        self.assertIsNone(self.status(b"Transfer-Encoding: identity, chunked"))

    def test_no_final_chunked_bad_request(self) -> None:
        """No final chunked: the body has no framing, 400."""
        self.assertEqual(self.status(b"Transfer-Encoding: gzip"), 400)
        self.assertEqual(self.status(b"Transfer-Encoding: chunked, gzip"), 400)


class ReaderTests(SynchronousTestCase):
    def test_pipelined_requests(self) -> None:
        """Several requests in one feed come out in order with their bodies."""
        events = RequestReader().feed(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        kinds = [(type(e).__name__, getattr(e, "target", getattr(e, "data", None))) for e in events]
        self.assertEqual(kinds, [
            ("RequestHead", b"/a"), ("Body", b"abc"), ("EndOfMessage", None),
            ("RequestHead", b"/b"), ("Body", b"de"), ("EndOfMessage", None),
            ("RequestHead", b"/c"), ("EndOfMessage", None),
        ])

    def test_no_end_for_bodiless(self) -> None:
        """
        With bodiless_end false, a request without a body is its head
        alone; one with a body (even an empty chunked one, even fed a byte
        at a time) still ends with EndOfMessage.
        """
        raw = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz"
               b"GET /d HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        expected = [("RequestHead", b"/a"), ("RequestHead", b"/b"), ("EndOfMessage", None),
                    ("RequestHead", b"/c"), ("Body", b"z"), ("EndOfMessage", None), ("RequestHead", b"/d")]
        for step in (len(raw), 1):
            reader = RequestReader(bodiless_end=False)
            events = []
            for i in range(0, len(raw), step):
                events += reader.feed(raw[i:i + step])
            kinds = [(type(e).__name__, getattr(e, "target", getattr(e, "data", None))) for e in events]
            self.assertEqual(kinds, expected, step)

    def test_byte_at_a_time(self) -> None:
        """A request fed one byte at a time gives the same events."""
        raw = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        reader = RequestReader()
        events = []
        for i in range(len(raw)):
            events += reader.feed(raw[i : i + 1])
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, Body)), b"hi")
        self.assertIsInstance(events[-1], EndOfMessage)

    def test_upgrade(self) -> None:
        """An upgrade request yields its head, then the bytes after it."""
        events = RequestReader().feed(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"
        )
        self.assertTrue(events[0].upgrade)
        self.assertEqual(events[-1], Upgrade(b"\x81\x05hello"))

    def test_limits(self) -> None:
        """Target, head and body limits answer 414, 431 and 413."""
        cases = [
            (RequestReader(max_target=16), b"GET /" + b"a" * 20 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (RequestReader(max_head=100), b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200 + b"\r\n\r\n", 431),
            (RequestReader(max_headers=3), b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", 431),
            (RequestReader(max_body=10), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", 413),
            (RequestReader(max_body=3),
             b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n", 413),
        ]
        for reader, raw, status in cases:
            exc = self.assertRaises(HTTPError, reader.feed, raw)
            self.assertEqual(exc.status, status, raw[:40])

    def test_slow_head_is_bounded(self) -> None:
        """A head trickling in never grows past max_head (slowloris)."""
        reader = RequestReader(max_head=1024)
        reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with self.assertRaises(HTTPError) as caught:
            for _ in range(2000):
                reader.feed(b"a")
        self.assertEqual(caught.exception.status, 431)


    def test_many_fields_across_reads(self) -> None:
        """
        Fields arriving over many reads are refused as soon as there are
        more than max_headers of them, not when the head ends.
        """
        reader = RequestReader(max_headers=10)
        reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
        with self.assertRaises(HTTPError) as caught:
            for i in range(1000):
                reader.feed(b"X-%d: y\r\n" % i)
        self.assertEqual((caught.exception.status, i), (431, 10))

MALFORMED = [
    # (description, raw request); each must be refused with 400
    ("CL and TE together", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE and CL together", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
    ("differing CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd"),
    ("repeated equal CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"),
    ("CL list", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd"),
    ("CL with sign", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd"),
    ("CL negative", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("CL hex", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x4\r\n\r\nabcd"),
    ("CL empty", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n"),
    ("TE gzip only", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("TE chunked not last", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("TE xchunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"),
    ("TE on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE_ underscore", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("CL_ underscore", b"POST / HTTP/1.1\r\nHost: x\r\nContent_Length: 4\r\n\r\nabcd"),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
    ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"),
    ("chunk extension unterminated quote", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;a=\"b\r\nx\r\n0\r\n\r\n"),
    ("chunk without CRLF after data", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy0\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: x\n\n"),
    ("bare CR", b"GET / HTTP/1.1\rHost: x\r\n\r\n"),
    ("bare LF after header", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
    ("tab before colon", b"GET / HTTP/1.1\r\nHost\t: x\r\n\r\n"),
    ("NUL in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("NUL in name", b"GET / HTTP/1.1\r\nHost: x\r\nX\x00A: b\r\n\r\n"),
    ("invalid header name", b"GET / HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n"),
    ("empty header name", b"GET / HTTP/1.1\r\nHost: x\r\n: b\r\n\r\n"),
    ("missing Host on 1.1", b"GET / HTTP/1.1\r\n\r\n"),
    ("repeated Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("Host with path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
    ("Host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ("header line without colon", b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
    ("lowercase version", b"GET / http/1.1\r\nHost: x\r\n\r\n"),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("control char in target", b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("method with invalid char", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
]


class MalformedTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Each malformed or ambiguous request is refused with 400."""
        self.assertGreaterEqual(len(MALFORMED), 30)
        accepted = []
        for description, raw in MALFORMED:
            try:
                RequestReader().feed(raw)
            except HTTPError as e:
                self.assertEqual(e.status, 400, description)
            else:
                accepted.append(description)
        self.assertEqual(accepted, [])

    def test_unknown_versions(self) -> None:
        """
        HTTP versions other than 1.0 and 1.1 are refused: 505 for the ones
        llhttp knows (0.9, 2.0), 400 for the ones it calls invalid.
        """
        for version, status in ((b"HTTP/2.0", 505), (b"HTTP/0.9", 505), (b"HTTP/1.2", 400), (b"HTTP/3.0", 400)):
            exc = self.assertRaises(HTTPError, RequestReader().feed, b"GET / " + version + b"\r\nHost: x\r\n\r\n")
            self.assertEqual(exc.status, status, version)
        exc = self.assertRaises(HTTPError, RequestReader().feed, b"GET /\r\n\r\n")
        self.assertEqual(exc.status, 505)
