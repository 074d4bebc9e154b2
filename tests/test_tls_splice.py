"""
A spliced pair on the real reactor, where one connection is reset and the
other sends its FIN in the same reactor turn: the case that logged
C{file descriptor cannot be a negative integer} on TLS tunnels, where the
agent and the public client often close together.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet import protocol
from twisted.trial.unittest import TestCase

from rproxy.splice import SpliceEnd, splice
from rproxy.transport import server_endpoint
from tests.support import async_test, reactor, turn, wait_for


class Pairing(protocol.Factory):
    """
    Splices the first two connections it accepts.
    """

    noisy = False

    def __init__(self) -> None:
        self.ends: list[SpliceEnd] = []

    def buildProtocol(self, addr: Any) -> SpliceEnd:
        end = SpliceEnd()
        self.ends.append(end)
        return end


class SameTurnCloseTests(TestCase):
    """
    Closes that reach rproxy in one reactor turn, on real sockets.
    """

    timeout = 30

    @async_test
    async def test_fin_in_the_turn_the_peer_is_reset(self) -> None:
        """
        One poll returns the reset of B and the FIN of A (whose transport
        still holds bytes for its client, so it stays registered): B's loss
        closes A, then A's FIN is read; it must not shut down writing on
        B's closed socket, and both connections end.
        """
        factory = Pairing()
        port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        address = ("127.0.0.1", port.getHost().port)
        client_a = socket.socket()
        self.addCleanup(client_a.close)
        client_a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client_a.connect(address)
        await wait_for(lambda: len(factory.ends) == 1)
        client_b = socket.create_connection(address)
        self.addCleanup(client_b.close)
        await wait_for(lambda: len(factory.ends) == 2)
        a, b = factory.ends
        a.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for end in (a, b):
            end.transport.pauseProducing()
        splice(a, b)

        # B's client sends more than the kernel holds for A's client (which
        # does not read), less than would pause B: A's transport keeps the
        # rest and is registered for writing; B still reads.
        client_b.sendall(b"x" * 32768)
        await wait_for(lambda: b.received == 32768)
        await turn()
        self.assertFalse(a.transport.producerPaused)

        # A reset of B (SO_LINGER 0), then A's FIN, both before the next poll.
        client_b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client_b.close()
        client_a.shutdown(socket.SHUT_WR)
        await turn()
        self.assertTrue(b.lost)
        self.assertEqual(self.flushLoggedErrors(), [])
        # A's client takes the rest; then A closes too
        client_a.setblocking(False)
        eof = False
        while not eof:
            try:
                eof = client_a.recv(1 << 20) == b""
            except BlockingIOError:
                await turn(delay=0.001)
        await wait_for(lambda: a.lost)

