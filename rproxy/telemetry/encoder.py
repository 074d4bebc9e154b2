"""
OTLP's protobuf encoding of spans, written by hand: the bytes of an
C{ExportTraceServiceRequest} (OTLP/HTTP's body) for a batch of the SDK's
ended spans (C{ReadableSpan}, or any object with the same attributes) and
of the tracing filter's traced requests
(L{rproxy.telemetry.request.RequestTrace}).

The official exporter builds a message object per span, attribute and
value (C{encode_spans} of C{opentelemetry-exporter-otlp-proto-common}) and
hashes each span's C{Resource} (a JSON dump of its attributes) to group
them: about 300k instructions a span, more than an HTTP request costs
the proxy.  This writes the same fields straight to bytes (a varint and
length-delimited writer), groups spans by their resource and scope
objects, encodes each resource and scope once, and keeps the encoding of
recent (key, value) attributes.  A traced request's spans are written
from its values (L{_requests}): each span from a C{%} format of its
constant parts (name, kind, status, most attributes), cached by the
values those are made of, with its ids and times filled in (~8k
instructions a span; README, "Tracing").  What it writes decodes to the
same message as the official encoder's (C{tests.test_telemetry_encoder}
compares them field by field); C{telemetry: {encoder: official}} uses
the official one.

The wire format (opentelemetry-proto, C{collector/trace/v1} and
C{trace/v1}): ExportTraceServiceRequest{1: ResourceSpans*},
ResourceSpans{1: Resource, 2: ScopeSpans*, 3: schema_url},
ScopeSpans{1: InstrumentationScope, 2: Span*, 3: schema_url}.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.trace import SpanKind, StatusCode

from rproxy.telemetry.request import (
    ABORTED,
    RequestTrace,
    client_attributes,
    ended_attributes,
    outcome_status,
    server_attributes,
)

__all__ = ["encode_spans"]

_BYTE = [bytes((i,)) for i in range(128)]
_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_TIMES = struct.Struct("<BQBQ").pack  # a span's start (field 7) and end (8), fixed64 each
_INT64 = 1 << 63
_MASK64 = (1 << 64) - 1
# Span.flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, and _IS_REMOTE_MASK
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
# recent attributes' encodings, by (key, value, type): most values repeat
# (methods, addresses, statuses, names); fields under 256 bytes only; a
# site's span formats and paths under _CACHED_SIZE bytes only; each dict
# cleared at _CACHE_SIZE entries (a few MiB at most)
_CACHE_SIZE = 4096
_CACHED_SIZE = 1024
# a Span's kind field (OTLP counts from 1, the SDK from 0), and its status
# field without a description, by the SDK's enums
_KINDS = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}
_STATUS = {code: b"\x7a\x02\x18" + bytes((code.value,)) if code.value else b"\x7a\x00" for code in StatusCode}
# (one dict per field tag: the whole field is kept)
_caches: dict[bytes, dict[tuple[str, Any, type], bytes]] = {}


def _varint(n: int) -> bytes:
    if n < 128:
        return _BYTE[n]
    out = bytearray()
    while n > 127:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """
    A length-delimited field: its tag, length and bytes.
    """
    n = len(payload)
    return tag + (_BYTE[n] if n < 128 else _varint(n)) + payload


def _any(value: Any) -> bytes:
    """
    An C{AnyValue}'s body, as the official encoder types the value (a
    bool before an int; a sequence is an array, a mapping a list of
    key-values); ValueError for an int out of int64 or another type.
    """
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode("utf-8"))
    if kind is int:
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{value} is out of int64")
        return b"\x18" + _varint(value & _MASK64)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", str(value).encode("utf-8"))
    if isinstance(value, int):
        return _any(int(value))
    if isinstance(value, float):
        return _any(float(value))
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise ValueError(f"invalid type {kind.__name__} of an attribute value")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode("utf-8")) + _field(b"\x12", _any(value))


def _attributes_of(tag: bytes, attributes: Any) -> list[bytes]:
    """
    The fields (tag C{tag}) of C{attributes}' KeyValues; one that cannot be
    encoded is left out, as the official encoder does.
    """
    out = []
    cache = _caches.get(tag)
    if cache is None:
        cache = _caches[tag] = {}
    for key, value in attributes.items():
        try:
            cached = (key, value, type(value))
            field = cache.get(cached)
        except TypeError:  # unhashable: a list
            cached, field = None, None
        if field is None:
            try:
                field = _field(tag, _key_value(key, value))
            except (ValueError, UnicodeError, AttributeError):
                continue
            if cached is not None and len(field) < 256:  # (a long value is seldom seen twice)
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[cached] = field
        out.append(field)
    return out


def _trace_state(state: Any) -> bytes:
    if not state:
        return b""
    value = ",".join([f"{key}={value}" for key, value in state.items()])
    return _field(b"\x1a", value.encode("utf-8")) if value else b""


def _status(status: Any) -> bytes:
    if status is None:
        return b""
    description = status.description
    if not description:
        return _STATUS[status.status_code]
    return _field(b"\x7a", _field(b"\x12", description.encode("utf-8")) + _STATUS[status.status_code][2:])


def _event(event: Any) -> bytes:
    parts = []
    if event.timestamp:
        parts.append(b"\x09" + _FIXED64(event.timestamp))
    if event.name:
        parts.append(_field(b"\x12", event.name.encode("utf-8")))
    if event.attributes:
        parts.extend(_attributes_of(b"\x1a", event.attributes))
    if event.dropped_attributes:
        parts.append(b"\x20" + _varint(event.dropped_attributes))
    return _field(b"\x5a", b"".join(parts))


def _link(link: Any) -> bytes:
    context = link.context
    parts = [b"\x0a\x10" + context.trace_id.to_bytes(16, "big"), b"\x12\x08" + context.span_id.to_bytes(8, "big")]
    if link.attributes:
        parts.extend(_attributes_of(b"\x22", link.attributes))
    if link.dropped_attributes:
        parts.append(b"\x28" + _varint(link.dropped_attributes))
    parts.append(b"\x35" + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if context.is_remote else 0)))
    return _field(b"\x6a", b"".join(parts))


def _span(span: Any) -> bytes:
    """
    A C{Span} message's body.
    """
    context = span.context
    parent = span.parent
    parts = [b"\x0a\x10" + context.trace_id.to_bytes(16, "big"), b"\x12\x08" + context.span_id.to_bytes(8, "big")]
    state = context.trace_state
    if state:
        parts.append(_trace_state(state))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    name = span.name
    if name:
        parts.append(_field(b"\x2a", name.encode("utf-8")))
    parts.append(_KINDS[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    attributes = span.attributes
    if attributes:
        parts += _attributes_of(b"\x4a", attributes)
    dropped = span.dropped_attributes
    if dropped:
        parts.append(b"\x50" + _varint(dropped))
    events = span.events
    if events:
        parts.extend([_event(e) for e in events])
    dropped = span.dropped_events
    if dropped:
        parts.append(b"\x60" + _varint(dropped))
    links = span.links
    if links:
        parts.extend([_link(link) for link in links])
    dropped = span.dropped_links
    if dropped:
        parts.append(b"\x70" + _varint(dropped))
    parts.append(_status(span.status))
    parts.append(b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)))
    return b"".join(parts)


def _resource(resource: Any) -> bytes:
    """
    The C{resource} field of a ResourceSpans.
    """
    attributes = resource.attributes if resource is not None else None
    return _field(b"\x0a", b"".join(_attributes_of(b"\x0a", attributes)) if attributes else b"")


def _scope(scope: Any) -> bytes:
    """
    The C{scope} field of a ScopeSpans.
    """
    if scope is None:
        return b"\x0a\x00"
    parts = []
    if scope.name:
        parts.append(_field(b"\x0a", scope.name.encode("utf-8")))
    if scope.version:
        parts.append(_field(b"\x12", scope.version.encode("utf-8")))
    if scope.attributes:
        parts.extend(_attributes_of(b"\x1a", scope.attributes))
    return _field(b"\x0a", b"".join(parts))


def _pairs(tag: bytes, pairs: Any) -> bytes:
    """
    The fields (tag C{tag}) of the KeyValues of C{pairs}, (key, value)s.
    """
    return b"".join(_attributes_of(tag, dict(pairs)))


def _path(paths: dict[bytes, bytes], target: bytes) -> bytes:
    """
    The encoded url.path attribute of a request C{target} (its query left
    out), kept in C{paths} (a cache miss: the hit is the caller's get).
    """
    path = _pairs(b"\x4a", (("url.path", target.split(b"?", 1)[0].decode("latin-1")),))
    return _store(paths, target, path, len(path))


def _store(cache: dict[Any, Any], key: Any, value: Any, size: int) -> Any:
    """
    C{value} (for a format: C{size} bytes once filled), kept in C{cache}
    under C{key} unless it is large: the keys are made of what clients,
    agents and servers send (User-Agent, Host, paths, errors), and a
    large value is seldom seen twice, so that only small ones are kept
    (with their keys, which are smaller), a bounded few MiB a site.
    """
    if size < _CACHED_SIZE:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[key] = value
    return value


def _template(*parts: bytes | int) -> tuple[bytes, int]:
    """
    A span body as a C{%} format (its constant bytes, and a C{%b} hole
    of each int's size), with the body's size when filled.
    """
    size = sum(p if type(p) is int else len(p) for p in parts)  # type: ignore[misc]
    return b"".join([b"%b" if type(p) is int else p.replace(b"%", b"%%") for p in parts]), size  # type: ignore[union-attr]


# the varints of lengths under 2048 (most spans')
_LENGTHS = _BYTE + [bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(128, 2048)]


_SERVER_KIND = _KINDS[SpanKind.SERVER]
_CLIENT_KIND = _KINDS[SpanKind.CLIENT]
_LOCAL_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)
_REMOTE_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)


def _client_template(method: bytes, server: Any, backend: str | None, outcome: Any, resend: int) -> tuple[Any, ...]:
    """
    An attempt span's format (holes: the trace id, its span id, its
    parent's, the times) and the same with its Span field's tag and size.
    """
    text = method.decode("latin-1")
    attributes = client_attributes(text, server, backend)
    if resend > 0:
        attributes.append(("http.request.resend_count", resend))
    pairs, status = outcome_status(outcome)
    body, size = _template(b"\x0a\x10", 16, b"\x12\x08", 8, b"\x22\x08", 8, _field(b"\x2a", text.encode("utf-8")),
                           _CLIENT_KIND, 18, _pairs(b"\x4a", attributes + pairs), _status(status), _LOCAL_PARENT)
    # (the prefix is part of a format: a varint byte can be b"%")
    return server, body, size, b"\x12" + _varint(size).replace(b"%", b"%%") + body


def _server_template(site: Any, shape: tuple[Any, ...], ended: tuple[Any, ...]) -> tuple[bytes, int]:
    """
    A request span's format, but its path, C{extra} and tracestate
    (holes: the trace id, its span id, its parent's if remote, the
    times), and its size filled: of a L{RequestTrace}'s C{shape} and
    C{ended}.
    """
    status, route, backend, tries, remote, aborted = ended
    text = shape[0].decode("latin-1")
    attributes = server_attributes(site, *shape)
    if aborted:
        name, span_status = text, ABORTED
        attributes.append(("error.type", "aborted"))
    else:
        name, more, span_status = ended_attributes(text, status, route, backend, tries)
        attributes += more
    return _template(b"\x0a\x10", 16, b"\x12\x08", 8, *((b"\x22\x08", 8) if remote else ()),
                     _field(b"\x2a", name.encode("utf-8")), _SERVER_KIND, 18, _pairs(b"\x4a", attributes),
                     _status(span_status), _REMOTE_PARENT if remote else _LOCAL_PARENT)


def _pair_template(site: Any, shape: tuple[Any, ...], ended: tuple[Any, ...], server: Any, backend: str | None,
                   outcome: Any, resend: int) -> tuple[Any, bytes, int]:
    """
    The Span fields of a request of one attempt and no tracestate as one
    format: the attempt's (L{_client_template}) and the request's
    (L{_server_template}) with holes for its length and its path (and
    C{extra}) at its end; and the request span's size but those.
    """
    client = _client_template(shape[0], server, backend, outcome, resend)
    body, size = _server_template(site, shape, ended)
    return server, client[3] + b"\x12%b" + body + b"%b", size


def _requests(spans: Sequence[Any], i: int, out: list[bytes]) -> int:
    """
    Append to C{out} the Span fields (of a ScopeSpans) of the spans of
    the traced requests from C{spans[i]} on (L{RequestTrace}s of the
    site of C{spans[i]}: the same resource and scope) and return the
    index of the first span after them.  A trace's spans are those of
    L{RequestTrace.spans}, each filled in from a format of its constant
    parts (name, kind, status, most attributes), cached by the values
    those are made of (recent ones: most repeat), with the ids and times
    (and the request's path, its C{extra} and a tracestate) of this
    request.  (A span's fields in another order than their numbers'
    where that is cheaper: protobuf's readers take fields in any order.)
    """
    site = spans[i].site
    clients, servers, paths, pairs = site.clients, site.servers, site.paths, site.pairs
    for j in range(i, len(spans)):
        trace = spans[j]
        if type(trace) is not RequestTrace or trace.site is not site:
            return j
        ids = trace.ids
        trace_id = ids[:16]
        server_id = ids[16:24]
        state = trace.state
        attempts = trace.attempts
        if len(attempts) == 1 and not state:
            # (most requests: both spans from one format)
            span_id, start, server, backend, resend, end, outcome = attempts[0]
            shape, ended = trace.shape, trace.ended
            key = (shape, ended, id(server), backend, outcome, resend)
            template = pairs.get(key)
            if template is None or template[0] is not server:
                template = _pair_template(site, shape, ended, server, backend, outcome, resend)
                _store(pairs, key, template, len(template[1]))
            target = trace.target
            path = paths.get(target)
            if path is None:
                path = _path(paths, target)
            extra = trace.extra
            if extra:
                path = _pairs(b"\x4a", extra) + path
            n = template[2] + len(path)
            parent = trace.parent
            ctimes = _TIMES(0x39, int(start * 1e9), 0x41, int(end * 1e9))
            stimes = _TIMES(0x39, int(trace.start * 1e9), 0x41, int(trace.end * 1e9))
            length = _LENGTHS[n] if n < 2048 else _varint(n)
            out.append(template[1] % (
                (trace_id, span_id, server_id, ctimes, length, trace_id, server_id, parent.span_id.to_bytes(8, "big"),
                 stimes, path) if parent is not None else
                (trace_id, span_id, server_id, ctimes, length, trace_id, server_id, stimes, path)))
            continue
        state = _trace_state(state) if state else b""
        if trace.attempts:
            method = trace.shape[0]
            for span_id, start, server, backend, resend, end, outcome in trace.attempts:
                key = (id(server), method, backend, outcome, resend)
                template = clients.get(key)
                if template is None or template[0] is not server:
                    template = _client_template(method, server, backend, outcome, resend)
                    _store(clients, key, template, template[2])
                filled = (trace_id, span_id, server_id,
                          _TIMES(0x39, int(start * 1e9), 0x41, int(end * 1e9)))
                if state:
                    body = template[1] % filled + state
                    n = len(body)
                    out.append(b"\x12" + (_LENGTHS[n] if n < 2048 else _varint(n)) + body)
                else:
                    out.append(template[3] % filled)
        parent = trace.parent
        shape, ended = key = (trace.shape, trace.ended)
        template = servers.get(key)
        if template is None:
            template = _server_template(site, shape, ended)
            _store(servers, key, template, template[1])
        times = _TIMES(0x39, int(trace.start * 1e9), 0x41, int(trace.end * 1e9))
        body = template[0] % ((trace_id, server_id, parent.span_id.to_bytes(8, "big"), times) if parent is not None
                              else (trace_id, server_id, times))
        target = trace.target
        path = paths.get(target)
        if path is None:
            path = _path(paths, target)
        extra = trace.extra
        if extra or state:
            path = b"".join((_pairs(b"\x4a", extra) if extra else b"", path, state))
        n = template[1] + len(path)
        out.append(b"".join((b"\x12", _LENGTHS[n] if n < 2048 else _varint(n), body, path)))
    return len(spans)


def encode_spans(spans: Sequence[Any]) -> bytes:
    """
    The serialized C{ExportTraceServiceRequest} of C{spans}: grouped by
    resource, then by instrumentation scope, each in the order first seen.
    """
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    last_resource = last_scope = out = None
    i, count = 0, len(spans)
    while i < count:
        span = spans[i]
        request = type(span) is RequestTrace
        if request:
            resource, scope = span.site.resource, span.site.scope
        else:
            resource = span.resource
            scope = span.instrumentation_scope
        if resource is not last_resource or scope is not last_scope or out is None:
            group = groups.get(id(resource))
            if group is None:
                group = groups[id(resource)] = (resource, {})
            scopes = group[1]
            encoded = scopes.get(id(scope))
            if encoded is None:
                encoded = scopes[id(scope)] = (scope, [])
            out = encoded[1]
            last_resource, last_scope = resource, scope
        if request:
            i = _requests(spans, i, out)
            continue
        body = _span(span)
        n = len(body)
        out.append(b"\x12" + (_BYTE[n] if n < 128 else _varint(n)) + body)
        i += 1
    # (the message's parts in one list, joined once: a batch is hundreds
    # of KiB, and each join of a nested field's bytes copied all of it)
    request: list[bytes] = []
    for resource, scopes in groups.values():
        parts = [_resource(resource)]
        for scope, encoded in scopes.values():
            head = _scope(scope)
            schema = getattr(scope, "schema_url", None)
            tail = _field(b"\x1a", schema.encode("utf-8")) if schema else b""
            parts += [b"\x12", _varint(len(head) + sum(map(len, encoded)) + len(tail)), head]
            parts += encoded
            parts.append(tail)
        schema = getattr(resource, "schema_url", None)
        if schema:
            parts.append(_field(b"\x1a", schema.encode("utf-8")))
        request += [b"\x0a", _varint(sum(map(len, parts)))]
        request += parts
    return b"".join(request)
