"""
A traced HTTP request as the tracing filter hands it to the batch
processor once it has ended (L{RequestTrace}): its SERVER span and the
CLIENT span of each upstream attempt, kept as the values they are made
of (ids, times, the request head's fields, the outcome), not as SDK
spans with attribute dictionaries.

The reactor thread only records those values and hands the processor
one object per request; what the spans are is worked out on the
processor's thread, by whoever reads them:

  - rproxy's encoder writes their OTLP bytes straight from these values
    (L{rproxy.telemetry.encoder.encode_spans}, with caches of the
    encoded attributes of recent values);
  - any other exporter (the official OTLP exporter with C{encoder:
    official}, the SDK's in-memory exporter of the tests) is handed the
    spans of L{RequestTrace.spans}: L{rproxy.telemetry.record.SpanRecord}s,
    the fields of the SDK's C{ReadableSpan}, attributes as dictionaries.

Both describe the same spans, attribute for attribute and in the same
order (C{tests.test_telemetry_encoder} compares the two encodings): the
attributes of a span are set out once, in L{server_attributes} and
L{client_attributes}, which the encoder follows part by part.
"""

from __future__ import annotations

from binascii import hexlify
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

from rproxy.telemetry.record import Context, SpanRecord

__all__ = ["RequestTrace", "Site", "ABORTED", "server_attributes", "ended_attributes", "client_attributes",
           "outcome_status"]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)
# a request span's status when its client went away before the response ended
ABORTED = Status(StatusCode.ERROR, "the client closed the connection before the response ended")
_VERSIONS = {(1, 1): "1.1", (1, 0): "1.0"}


class Site:
    """
    What the spans of one frontend's requests share: the resource and
    scope they are exported under, the frontend's name and scheme, and
    the encoder's caches (used on the processor's thread only).
    """

    def __init__(self, resource: Any, scope: Any, frontend: str, scheme: str) -> None:
        self.resource = resource
        self.scope = scope
        self.frontend = frontend
        self.scheme = scheme
        # the encoder's formats of recent attempt spans, request spans and
        # path attributes, by what they are made of
        self.clients: dict[Any, Any] = {}
        self.servers: dict[Any, Any] = {}
        self.paths: dict[bytes, bytes] = {}
        # ... and of both spans of a request of one attempt (most)
        self.pairs: dict[Any, Any] = {}


class RequestTrace:
    """
    One sampled request's trace: made by the request phase, filled in
    by later phases on the reactor thread, read on the processor's
    thread once handed over (then no longer changed).  Its values are
    kept in few fields (tuples made in one step), so that recording them
    costs the reactor thread little; the encoder caches its formats by
    two of those tuples (C{shape}, C{ended}) as they are.

    @ivar ids: the trace's id (16 bytes), the request span's (8) and its
        first attempt's (8), as they are sent (big-endian).
    @ivar hexed: C{ids} in hex (C{traceparent}'s, the access log's).
    @ivar shape: what the request came with: (method, HTTP version, the
        client's address, C{Host} or None, C{User-Agent} or None).
    @ivar target: the request's target (path and query).
    @ivar parent: the client's span (a remote L{Context}), or None.
    @ivar state: the client's C{tracestate} (a C{TraceState}), or None.
    @ivar attempt: the attempt in progress (its CLIENT span), or None: a
        tuple (span id: 8 bytes, start, the server's config, the backend's name or
        None, resend count).
    @ivar attempts: the attempts that have ended, in order: each its
        C{attempt} tuple with two more values, its end and outcome (the
        response's status, an int; or what went wrong, a str such as
        C{"connect: refused"}).
    @ivar start: when the request came (the clock's seconds), set at its end.
    @ivar end: when it ended.
    @ivar ended: how it ended: (status, route prefix or None, backend,
        attempts, whether C{parent} is set, whether the client went away
        first).
    @ivar extra: attributes of a few requests only (the token wait, a
        tunnel's model, key and agent), in their order, or None.
    @ivar spans_count: how many spans this is, once ended.
    @ivar exchange: the request's exchange, until ended (the reactor
        thread's, as the next two).
    @ivar remove: the client's fields replaced upstream.
    @ivar routed: when the token wait ended (the tracing filter's
        C{TokenWaitMark}), or 0.
    """

    __slots__ = ("site", "ids", "hexed", "shape", "target", "parent", "state", "attempt", "attempts", "start",
                 "end", "ended", "extra", "spans_count", "exchange", "remove", "routed")

    # what the SDK's BatchSpanProcessor.on_end reads (a sampled span)
    context = Context(1, 1, False, None)
    inject = None  # (the tracing filter's: sampled, its attempts' traceparent is sent)

    def __init__(self, site: Site, ids: bytes, head: Any, peer: str, exchange: Any, remove: frozenset[bytes]) -> None:
        self.site = site
        self.ids = ids
        self.hexed = hexlify(ids)
        self.shape = (head.method, head.version, peer, head.host, head.header(b"user-agent"))
        self.target = head.target
        self.parent: Context | None = None
        self.state: Any = None
        self.attempt: tuple[Any, ...] | None = None
        self.attempts: list[tuple[Any, ...]] = []
        self.extra: list[tuple[str, Any]] | None = None
        self.exchange = exchange
        self.remove = remove
        self.routed = 0.0
        # (start, end, ended and spans_count are set when the request
        # ends, before anything reads them)

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.ids[:16], "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.ids[16:24], "big")

    def spans(self) -> list[SpanRecord]:
        """
        The spans: each attempt's, then the request's.
        """
        site = self.site
        trace_id, state = self.trace_id, self.state
        server = Context(trace_id, self.span_id, False, state)
        method = self.shape[0].decode("latin-1")
        out = []
        for span_id, start, config, backend, resend, end, outcome in self.attempts:
            attributes = dict(client_attributes(method, config, backend))
            if resend > 0:
                attributes["http.request.resend_count"] = resend
            ended, status = outcome_status(outcome)
            attributes.update(ended)
            out.append(SpanRecord(method, Context(trace_id, int.from_bytes(span_id, "big"), False, state), server,
                                  site.resource,
                                  attributes, SpanKind.CLIENT, status, int(start * 1e9), int(end * 1e9), site.scope))
        attributes = dict(server_attributes(site, *self.shape))
        status_code, route, backend, tries, _, aborted = self.ended
        if aborted:
            attributes["error.type"] = "aborted"
            name, status = method, ABORTED
        else:
            name, ended, status = ended_attributes(method, status_code, route, backend, tries)
            attributes.update(ended)
            if self.extra:
                attributes.update(self.extra)
        attributes["url.path"] = self.target.split(b"?", 1)[0].decode("latin-1")
        out.append(SpanRecord(name, server, self.parent, site.resource, attributes, SpanKind.SERVER, status,
                              int(self.start * 1e9), int(self.end * 1e9), site.scope))
        return out


# The attributes of a span in parts, as the encoder caches them: each
# part is a function of a few values (its cache key).

def server_attributes(site: Site, method: bytes, version: tuple[int, int], peer: str, host: bytes | None,
                      user_agent: bytes | None) -> list[tuple[str, Any]]:
    """
    A request span's attributes known when the request came.
    """
    out: list[tuple[str, Any]] = [
        ("http.request.method", method.decode("latin-1")),
        ("url.scheme", site.scheme),
        ("network.protocol.version", _VERSIONS.get(version) or f"{version[0]}.{version[1]}"),
        ("network.peer.address", peer),
        ("client.address", peer),
        ("rproxy.frontend", site.frontend),
    ]
    if host:
        name, _, port = host.decode("latin-1").rpartition(":") if not host.endswith(b"]") else ("", "", "")
        if name and port.isdigit():
            out += [("server.address", name), ("server.port", int(port))]
        else:
            out.append(("server.address", host.decode("latin-1")))
    if user_agent is not None:
        out.append(("user_agent.original", user_agent.decode("latin-1")))
    return out


def ended_attributes(method: str, status: int, route: bytes | None, backend: str,
                     tries: int) -> tuple[str, list[tuple[str, Any]], Status]:
    """
    A request span's name, the attributes known when it ended (but the
    few of C{extra}), and its status.
    """
    name = method
    out: list[tuple[str, Any]] = [("http.response.status_code", status)]
    if route:
        text = route.decode("latin-1")
        out.append(("http.route", text))
        name = f"{method} {text}"
    out += [("rproxy.backend", backend), ("rproxy.attempts", tries)]
    if status >= 500:
        out.append(("error.type", str(status)))
        return name, out, _ERROR
    return name, out, _UNSET


def client_attributes(method: str, server: Any, backend: str | None) -> list[tuple[str, Any]]:
    """
    An attempt span's attributes known when it started (but its resend
    count).
    """
    out: list[tuple[str, Any]] = [("http.request.method", method), ("rproxy.server", server.name)]
    host = getattr(server, "host", None)
    if host is not None:
        out += [("server.address", host), ("network.peer.address", host), ("server.port", server.port),
                ("network.peer.port", server.port)]
    else:
        out.append(("rproxy.tunnel.agent", server.name))  # a tunnel's agent
    if backend is not None:
        out.append(("rproxy.backend", backend))
    return out


def outcome_status(outcome: int | str | None) -> tuple[list[tuple[str, Any]], Status]:
    """
    An attempt span's attributes of its outcome, and its status.
    """
    if type(outcome) is int:
        if outcome >= 500:
            return [("http.response.status_code", outcome), ("error.type", str(outcome))], _ERROR
        return [("http.response.status_code", outcome)], _UNSET
    return [("error.type", str(outcome).split(":", 1)[0])], Status(StatusCode.ERROR, str(outcome))
