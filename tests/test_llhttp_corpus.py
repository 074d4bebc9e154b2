"""
The request reader held against llhttp's own request tests
(../shared/corpora/llhttp/request, MIT, from nodejs/llhttp): each case is a
raw request and the log llhttp's parser writes for it.  A case whose log
ends in an error must be refused (HTTPError); any other must come out as
exactly the messages the log lists (method, target, header fields, body).
The cases of the lenient-* files describe what only a lenient parser
accepts: a strict proxy refuses them.

The input rules are llhttp's (test/md-test.ts): the block's newlines become
CRLF, a backslash before a newline joins the lines, and \\r \\n \\t \\f
\\xHH and octal escapes stand for those bytes.  The reader runs with
require_host=False here (llhttp's cases mostly carry no Host; rproxy's
own rule, RFC 9112's 400 for an HTTP/1.1 request without one, is tested in
test_http_reader).

rproxy refuses more than llhttp in a few places, each allowed or asked for
by RFC 9112 for a proxy; those cases are listed in STRICTER with the
reason, and the test checks that they are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from rproxy.http.reader import Body, EndOfMessage, HTTPError, RequestHead, RequestReader, Upgrade

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "corpora", "llhttp",
                      "request")

# (file, case title) -> why rproxy refuses what llhttp accepts
STRICTER: dict[tuple[str, str], str] = {
    ("sample.md", "No HTTP version"): "an HTTP/0.9 request (no version) gets 505: its answer could carry no "
                                      "status or headers, and no proxy should speak it",
    ("transfer-encoding.md", "POST with `chunked` as last transfer-encoding"):
        "501, as nginx answers: a transfer coding other than chunked, which rproxy's re-framing would drop",
    ("transfer-encoding.md", "POST with `chunked` as last transfer-encoding (multiple headers)"):
        "501, as nginx answers: a transfer coding other than chunked, which rproxy's re-framing would drop",
    ("connection.md", "Upgrade POST request"):
        "an upgrade request with a body is declined (read as a plain request: llhttp leaves its body unread, "
        "so it would be forwarded unchecked); what follows its body is then read as HTTP, and is not",
    ("connection.md", "Emitting part of body and pausing"):
        "an upgrade request with a body is declined (read as a plain request: llhttp leaves its body unread, "
        "so it would be forwarded unchecked); what follows its body is then read as HTTP, and is not",
}


def load_cases(path: str) -> list[dict[str, Any]]:
    """
    The cases of one markdown file: title, meta, raw input lines, log lines.
    """
    cases: list[dict[str, Any]] = []
    title, meta = "", None
    block: list[str] | None = None
    kind = ""
    current: dict[str, Any] | None = None
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line in lines:
        if block is not None:
            if line == "```":
                if kind == "http":
                    current = {"title": title, "meta": meta or {}, "http": block}
                elif kind == "log" and current is not None:
                    current["log"] = block
                    cases.append(current)
                    current = None
                block = None
            else:
                block.append(line)
            continue
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line.startswith("<!-- meta="):
            meta = json.loads(line[len("<!-- meta="):].rsplit("-->", 1)[0])
        elif line.startswith("```http"):
            block, kind = [], "http"
        elif line.startswith("```log"):
            block, kind = [], "log"
    return cases


def corpus_cases(directory: str, side: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """
    (file name, case) for the cases of C{side} ("request" or "response")
    that describe parsing: not loose-only, not about the parser's API
    (pausing, skipping bodies, finishing), the strict ones and the
    lenient-* ones.
    """
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".md"):
            continue
        for case in load_cases(os.path.join(directory, name)):
            meta = case["meta"]
            kind = meta.get("type", "")
            if meta.get("mode") == "loose" or "pause" in meta or "skipBody" in meta:
                continue
            if kind == side or kind.startswith(f"{side}-lenient"):
                yield name, case


def raw_input(lines: list[str]) -> bytes:
    text = "\n".join(lines)
    text = re.sub(r"\\(\r\n|\r|\n)", "", text)
    text = re.sub(r"\r\n|\r|\n", "\r\n", text)
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            simple = {"r": 13, "n": 10, "t": 9, "f": 12}
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            hexa = re.match(r"x([0-9a-fA-F]+)", text[i + 1:])
            if hexa:  # (llhttp's harness writes the character as UTF-8)
                out += chr(int(hexa.group(1), 16)).encode("utf-8")
                i += 1 + len(hexa.group(0))
                continue
            octal = re.match(r"[0-7]{1,3}", text[i + 1:])
            if octal:
                out += chr(int(octal.group(0), 8)).encode("utf-8")
                i += 1 + len(octal.group(0))
                continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def unescape(value: str) -> bytes:
    return value.replace("\\t", "\t").replace("\\f", "\f").encode("utf-8")


def span_of(line: str) -> tuple[str, bytes] | None:
    """
    A log line's span: C{span[kind]="text"}, or C{span[kind]=cr} / C{=lf}
    for a lone control byte.
    """
    quoted = re.match(r'off=\d+ len=\d+ span\[(\w+)\]="(.*)"$', line)
    if quoted:
        return quoted.group(1), unescape(quoted.group(2))
    bare = re.match(r"off=\d+ len=\d+ span\[(\w+)\]=(cr|lf)$", line)
    if bare:
        return bare.group(1), b"\r" if bare.group(2) == "cr" else b"\n"
    return None


def add_span(message: dict[str, Any], span: tuple[str, bytes], last: str | None) -> str:
    """
    Add a log span to the message being read (a header field's pieces
    join; a value follows its field); return the span's kind.
    """
    kind, value = span
    if kind == "header_field":
        if last == "header_field":
            message["headers"][-1][0] += value
        else:
            message["headers"].append([value, b""])
    elif kind == "header_value":
        message["headers"][-1][1] += value
    elif kind in ("method", "url", "body") and kind in message:
        message[kind] += value
    return kind


def expected_messages(log: list[str]) -> tuple[list[dict[str, Any]], bool]:
    """
    The complete messages of a log, and whether it ends in an error.
    """
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    last_span = None
    error = False
    for line in log:
        if line.startswith("/"):
            continue
        if " message begin" in line:
            current = {"method": b"", "url": b"", "headers": [], "body": b""}
            last_span = None
            continue
        span = span_of(line)
        if span and current is not None:
            last_span = add_span(current, span, last_span)
            continue
        if " message complete" in line and current is not None:
            messages.append(current)
            current = None
        elif re.match(r"off=\d+ error code=", line) and "Pause on CONNECT/Upgrade" not in line:
            error = True  # (code 22 is llhttp pausing after an upgrade request, not an error)
    return messages, error


def actual_messages(data: bytes) -> tuple[list[dict[str, Any]], HTTPError | None, bool]:
    reader = RequestReader(max_target=1 << 20, max_head=1 << 20, max_headers=1000, require_host=False)
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    try:
        events = reader.feed(data)
    except HTTPError as e:
        return messages, e, False
    upgraded = False
    for event in events:
        if isinstance(event, RequestHead):
            current = {"method": event.method, "url": event.target,
                       "headers": [[n, v] for n, v in event.headers], "body": b"", "length": event.content_length}
        elif isinstance(event, Body) and current is not None:
            current["body"] += event.data
        elif isinstance(event, EndOfMessage) and current is not None:
            messages.append(current)
            current = None
        elif isinstance(event, Upgrade):
            upgraded = True
            if current is not None:
                messages.append(current)
            # httptools ends an upgrade request at its head; the proxy sends
            # the head (Content-Length kept) and then these bytes as they
            # are, so a declared body reaches the server as its first bytes
            last = messages[-1] if messages else None
            if last is not None and last["length"] and not last["body"] and last["method"] != b"CONNECT":
                last["body"] = event.rest[: last["length"]]
            break
    return messages, None, upgraded


def normal(messages: list[dict[str, Any]]) -> list[Any]:
    return [(m["method"], m["url"], [(n.lower(), v.strip(b" \t")) for n, v in m["headers"]], m["body"])
            for m in messages]


class LLHTTPRequestCorpusTests(SynchronousTestCase):
    def test_corpus(self) -> None:
        """
        Every request case of llhttp's corpus: refused where llhttp errors
        (or where only a lenient parser accepts), else the same messages.
        """
        if not os.path.isdir(CORPUS):
            self.fail(f"the llhttp corpus is not at {CORPUS}")
        checked, problems = 0, []
        for name, case in corpus_cases(CORPUS, "request"):
            kind = case["meta"].get("type", "")
            data = raw_input(case["http"])
            expected, errors = expected_messages(case["log"])
            got, refused, upgraded = actual_messages(data)
            where = f"{name}: {case['title']}"
            checked += 1
            lenient = kind.startswith("request-lenient")
            if errors or lenient or (name, case["title"]) in STRICTER:
                if refused is None:
                    why = "llhttp refuses it" if errors else (
                        "only a lenient parser should" if lenient else STRICTER[(name, case["title"])])
                    problems.append(f"{where}: accepted; {why}")
                continue
            if refused is not None:
                problems.append(f"{where}: refused ({refused}), llhttp accepts it")
                continue
            if normal(got) != normal(expected[: len(got)]) or (not upgraded and len(got) != len(expected)):
                problems.append(f"{where}: got {normal(got)!r}, expected {normal(expected)!r}")
        self.assertGreater(checked, 100)
        self.assertEqual(problems, [], "\n".join(problems))
