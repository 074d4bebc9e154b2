"""
CORS (C{http.cors}), permissive: preflights are answered here (204, any
origin, the usual methods, the requested headers), and every response
allows any origin and exposes every header.
"""

from __future__ import annotations

from typing import Any

from rproxy.http.filters import Filter

__all__ = ["CorsFilter", "CORS_HEADERS"]

CORS_HEADERS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Expose-Headers", b"*"),
]


class CorsFilter(Filter):
    def request(self, exchange: Any) -> None:
        head = exchange.head
        if (
            head.method == b"OPTIONS"
            and head.header(b"origin") is not None
            and head.header(b"access-control-request-method") is not None
        ):
            requested = head.header(b"access-control-request-headers")
            exchange.answer(204, b"No Content", [
                (b"Access-Control-Allow-Origin", b"*"),
                (b"Access-Control-Allow-Methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
                (b"Access-Control-Allow-Headers", requested or b"*"),
                (b"Access-Control-Max-Age", b"86400"),
            ])
        return None

    def response(self, exchange: Any, extra: list[tuple[bytes, bytes]]) -> None:
        extra += CORS_HEADERS
