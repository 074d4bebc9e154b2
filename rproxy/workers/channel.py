"""
The control channel's protocol, the same at both ends: messages in and
out (L{rproxy.workers.wire}), listening sockets received as descriptors,
and requests that wait for their answer (matched by C{id}).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy.workers.wire import Decoder, WireError, encode

__all__ = ["Channel"]


@implementer(IFileDescriptorReceiver)
class Channel(protocol.Protocol):
    """
    One end of a control channel; C{handle(message)} gets every message
    that is not the answer to a L{request}.
    """

    log = Logger()

    def __init__(self, handle: Callable[[dict[str, Any]], None], lost: Callable[[Failure], None]) -> None:
        self._handle = handle
        self._lost = lost
        self._decoder = Decoder()
        self._ids = itertools.count(1)
        self._waiting: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self.descriptors: collections.deque[int] = collections.deque()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.descriptors.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except WireError as e:
            self.log.error("control channel: {why}; closing it", why=str(e))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for message in messages:
            if "reply_to" in message:
                answer = self._waiting.pop(message["reply_to"], None)
                if answer is not None:  # (else it came after its timeout)
                    answer.callback(message)
                continue
            try:
                self._handle(message)
            except Exception:  # noqa: BLE001 - one bad message must not end the channel
                self.log.failure("control channel: cannot handle {op}", op=message.get("op"))

    def send(self, message: dict[str, Any], descriptors: tuple[int, ...] = ()) -> None:
        if not self.connected:
            return
        for descriptor in descriptors:
            self.transport.sendFileDescriptor(descriptor)  # type: ignore[union-attr]
        self.transport.write(encode(message))  # type: ignore[union-attr]

    def request(self, message: dict[str, Any], timeout: float, clock: Any) -> defer.Deferred[dict[str, Any]]:
        """
        Send C{message} with a fresh C{id}; fires with the message whose
        C{reply_to} is that id, or fails with a timeout.
        """
        ident = next(self._ids)
        def forget(_: object) -> None:
            self._waiting.pop(ident, None)

        d: defer.Deferred[dict[str, Any]] = defer.Deferred(forget)
        self._waiting[ident] = d
        self.send(dict(message, id=ident))
        d.addTimeout(timeout, clock)
        return d

    def reply(self, request: dict[str, Any], message: dict[str, Any]) -> None:
        self.send(dict(message, reply_to=request.get("id", 0)))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = False
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(ConnectionError("control channel closed"))
        while self.descriptors:
            _close(self.descriptors.popleft())
        self._lost(reason)


def _close(descriptor: int) -> None:
    import os

    try:
        os.close(descriptor)
    except OSError:
        pass
