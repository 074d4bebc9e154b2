"""
The HTTP frontend held against llhttp's response tests
(../shared/corpora/llhttp/response, MIT, from nodejs/llhttp): a scripted
backend answers a GET with each case's raw bytes and closes; the client
must then get

  - 502, when llhttp refuses the response before its head is complete;
  - a response that does not complete (the connection is cut), or 502,
    when llhttp refuses it later (the head may already be on its way);
  - otherwise the same status, end-to-end header fields and body as
    llhttp read (only the first response: rproxy asked for one).

Input bytes follow llhttp's rules (see tests/test_llhttp_corpus.py).
Where rproxy refuses what llhttp reads, STRICTER says why.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httptools
from twisted.internet import protocol
from twisted.trial.unittest import TestCase

from tests.support import ServiceMixin, async_test, connect, listen
from tests.test_llhttp_corpus import add_span, corpus_cases, raw_input, span_of

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "corpora", "llhttp",
                      "response")

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade", b"te", b"trailer",
       b"proxy-connection", b"via"}

# (file, case title) -> why rproxy answers 502 where llhttp reads a response
STRICTER: dict[tuple[str, str], str] = {
    ("connection.md", "HTTP 101 response with Upgrade and Content-Length header"):
        "a 101 to a request that asked for no upgrade is invalid (RFC 9110 15.2.2)",
    ("connection.md", "HTTP 101 response with Upgrade and Transfer-Encoding header"):
        "a 101 to a request that asked for no upgrade is invalid (RFC 9110 15.2.2)",
    **{("transfer-encoding.md", title): "a transfer coding other than chunked alone: rproxy re-frames a body "
       "and would drop the coding (nginx answers 502 too)" for title in (
        "`chunked` before other transfer-encoding",
        "multiple transfer-encoding where chunked is not the last one",
        "`chunkedchunked` transfer-encoding does not enable chunked enconding")},
}
# (file, case title) -> what the client gets instead of llhttp's first message, and why
DIFFERENT: dict[tuple[str, str], tuple[int, str]] = {
    ("connection.md", "HTTP 100 first, then 400"):
        (404, "rproxy answers Expect: 100-continue itself and so drops a server's 100; the final answer follows"),
}


def expected_response(log: list[str]) -> dict[str, Any]:
    """
    What llhttp read of the first response: status, headers, body, whether
    its head completed, and whether the log ends in an error (and where).
    """
    out: dict[str, Any] = {"status": None, "headers": [], "body": b"", "head_done": False, "error": False,
                           "error_in_head": False, "messages": 0}
    last = None
    for line in log:
        if line.startswith("/"):
            continue
        if " message begin" in line and out["messages"] >= 1:
            break  # only the first response counts
        span = span_of(line)
        if span:
            last = add_span(out, span, last)
            continue
        head = re.search(r"headers complete status=(\d+)", line)
        if head:
            out["status"] = int(head.group(1))
            out["head_done"] = True
        elif " message complete" in line:
            out["messages"] += 1
        elif re.match(r"off=\d+ error code=", line) and "Pause on CONNECT/Upgrade" not in line:
            if out["messages"]:
                break  # after the first response: not about it (rproxy reads one)
            out["error"] = True
            out["error_in_head"] = not out["head_done"]
            break
    return out


class _Scripted(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.buffer is not None:
            self.buffer = b""
            self.transport.write(self.factory.script)  # type: ignore[attr-defined]
            self.transport.loseConnection()  # type: ignore[union-attr]


class _Parsed:
    """
    The first response the client read.
    """

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.status: int | None = None
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.status is None:
            self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if not self.complete:
            self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


def parse_client_side(data: bytes) -> tuple[int | None, _Parsed]:
    parsed = _Parsed()
    parser = httptools.HttpResponseParser(parsed)
    parsed.parser = parser
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return None, parsed
    return parsed.status, parsed


def end_to_end(headers: list[Any]) -> list[tuple[bytes, bytes]]:
    return [(bytes(n).lower(), bytes(v).strip(b" \t")) for n, v in headers if bytes(n).lower() not in HOP]


class LLHTTPResponseCorpusTests(ServiceMixin, TestCase):
    timeout = 120

    @async_test
    async def test_corpus(self) -> None:
        """
        Every response case of llhttp's corpus, replayed by a backend
        through the HTTP frontend.
        """
        factory = protocol.Factory.forProtocol(_Scripted)
        factory.noisy = False
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        service = await self.start_service({
            "backends": [{"name": "b", "servers": [f"127.0.0.1:{port.getHost().port}"],
                          "health_check": {"type": "none"},
                          "passive": {"consecutive_failures": 1000000}}],
            "frontends": [{"name": "f", "protocol": "http", "listen": "tcp:0:interface=127.0.0.1", "backend": "b",
                           "http": {"retries": 0, "response_timeout": "2s"}}],
        })
        problems, checked = [], 0
        for name, case in corpus_cases(CORPUS, "response"):
            kind = case["meta"].get("type", "")
            factory.script = raw_input(case["http"])  # type: ignore[attr-defined]
            expected = expected_response(case["log"])
            client = await connect(service.port_of("f"))
            client.transport.write(b"GET /case HTTP/1.1\r\nHost: corpus\r\nConnection: close\r\n\r\n")  # type: ignore[attr-defined]
            await client.closed
            status, parsed = parse_client_side(bytes(client.data))
            where = f"{name}: {case['title']}"
            checked += 1
            # leniencies about what follows a response, which rproxy never reads
            lenient = kind.startswith("response-lenient") and kind not in (
                "response-lenient-data-after-close", "response-lenient-keep-alive")
            if (name, case["title"]) in STRICTER or lenient or expected["error"] and expected["error_in_head"]:
                if status != 502:
                    problems.append(f"{where}: got {status}, expected 502")
                continue
            if expected["error"]:
                # refused after its head: 502, or a cut the client can see
                if status != 502 and parsed.complete:
                    problems.append(f"{where}: a refused response reached the client complete")
                continue
            if (name, case["title"]) in DIFFERENT:
                if status != DIFFERENT[(name, case["title"])][0]:
                    problems.append(f"{where}: got {status}, expected {DIFFERENT[(name, case['title'])][0]}")
                continue
            if status != expected["status"]:
                problems.append(f"{where}: got status {status}, expected {expected['status']}")
                continue
            if end_to_end(parsed.headers) != end_to_end(expected["headers"]):
                problems.append(f"{where}: headers {end_to_end(parsed.headers)} != {end_to_end(expected['headers'])}")
            if parsed.body != expected["body"]:
                problems.append(f"{where}: body {parsed.body[:80]!r} != {expected['body'][:80]!r}")
        self.assertGreater(checked, 40)
        self.assertEqual(problems, [], "\n".join(problems))
