"""
A small HTTP client call on twisted.web's Agent for rproxy's own requests
(token-pool logins, an agent's model list): the whole answer, bounded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["fetch"]


async def fetch(
    agent: Any, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes | None, limit: int
) -> tuple[int, bytes]:
    """
    Send a request through C{agent}; return its status and body.

    @raise ValueError: the body is larger than C{limit} bytes, or was cut.
    """
    producer = _BytesProducer(body) if body is not None else None
    raw = Headers({name: [value] for name, value in headers.items()})
    response = await agent.request(method, url, raw, producer)
    finished: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_BoundedBody(finished, limit))
    return response.code, await finished


class _BoundedBody(protocol.Protocol):
    """
    Collects a response body of at most C{limit} bytes.
    """

    def __init__(self, finished: defer.Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(ValueError(f"answer larger than {self.limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        # PotentialDataLoss: the answer had no length and ended when the
        # server closed (HTTP/1.0 style), which is how such an answer ends;
        # a cut one fails to parse (the callers read JSON)
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(ValueError(f"answer cut short: {reason.getErrorMessage()}"))


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
