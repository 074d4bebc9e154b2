"""
Tests for L{rproxy.httpclient.fetch} against real servers on loopback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from rproxy.httpclient import fetch
from tests.support import async_test, listen, reactor


class OneAnswer(protocol.Protocol):
    """
    Reads a request head, sends the factory's raw answer, and closes.
    """

    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.buffer = b""
            self.transport.write(self.factory.answer)  # type: ignore[attr-defined]
            self.transport.loseConnection()  # type: ignore[union-attr]


class FetchTests(TestCase):
    async def fetch_from(self, answer: bytes, limit: int = 1024) -> tuple[int, bytes]:
        factory = protocol.Factory.forProtocol(OneAnswer)
        factory.answer = answer  # type: ignore[attr-defined]
        port = await listen(factory)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        url = f"http://127.0.0.1:{port.getHost().port}/login".encode()
        return await fetch(agent, b"POST", url, {b"content-type": b"application/json"}, b"{}", limit)

    @async_test
    async def test_close_delimited_answer(self) -> None:
        """
        An answer with no length that ends when the server closes (Twisted
        calls it PotentialDataLoss) is a whole answer.
        """
        answer = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"token": "abc"}'
        self.assertEqual(await self.fetch_from(answer), (200, b'{"token": "abc"}'))

    @async_test
    async def test_http10_answer(self) -> None:
        """An HTTP/1.0 answer without Content-Length is read to the close."""
        self.assertEqual(await self.fetch_from(b"HTTP/1.0 200 OK\r\n\r\nfine"), (200, b"fine"))

    @async_test
    async def test_cut_answer_fails(self) -> None:
        """An answer shorter than its Content-Length is refused."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"
        with self.assertRaises(ValueError) as caught:
            await self.fetch_from(answer)
        self.assertTrue(str(caught.exception).startswith("answer cut short"), caught.exception)

    @async_test
    async def test_close_delimited_answer_over_the_limit(self) -> None:
        """The limit holds for answers without a length too."""
        answer: Any = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 2000
        with self.assertRaises(ValueError) as caught:
            await self.fetch_from(answer, limit=1000)
        self.assertEqual(str(caught.exception), "answer larger than 1000 bytes")
