"""
W3C Trace Context's C{traceparent} header (version 00), parsed and made
without the SDK: the tracing filter reads and writes it on every request,
sampled or not, and must stay cheap.

    traceparent: 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>

What is not a valid value is None: the caller starts a trace of its own
(and, as the specification says, does not read that request's
C{tracestate} either).  A version above 00 is read by its first four
fields, as the specification asks of a version 00 reader.
"""

from __future__ import annotations

import re

__all__ = ["parse", "format_traceparent", "SAMPLED"]

SAMPLED = 0x01

_HEX = re.compile(rb"[0-9a-f]+\Z")


def _hex(field: bytes, size: int) -> int | None:
    if len(field) != size or _HEX.match(field) is None:
        return None
    return int(field, 16)


def parse(value: bytes | None) -> tuple[int, int, int] | None:
    """
    (trace id, parent id, flags) of a C{traceparent} value, or None when
    it is absent or malformed: a wrong length, upper-case or non-hex
    digits, version ff, an all-zero trace or parent id, or a version 00
    value with anything after its flags.
    """
    if value is None:
        return None
    value = value.strip(b" \t")
    if len(value) < 55:
        return None
    version = _hex(value[:2], 2)
    if version is None or version == 0xFF:
        return None
    if version == 0 and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":
        return None  # a later version: its own fields follow, after a dash
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    trace_id = _hex(value[3:35], 32)
    span_id = _hex(value[36:52], 16)
    flags = _hex(value[53:55], 2)
    if not trace_id or not span_id or flags is None:
        return None
    return trace_id, span_id, flags


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    """
    The C{traceparent} value (version 00) naming C{span_id} of
    C{trace_id} as the parent, with the sampled flag alone set or not.
    """
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")
