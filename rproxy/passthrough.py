"""
TLS passthrough by SNI for TCP frontends (HAProxy's C{req.ssl_sni}):
the backend is chosen from the server name of the client's ClientHello,
read (L{rproxy.clienthello}) from the bytes the connection keeps before
the splice and then passed on untouched, so TLS is not terminated and the
client sees the server's own certificate.

L{SNIRouting} is the part of L{rproxy.tcp.ClientConnection} that waits for
the ClientHello (at most C{max_hello} bytes, C{timeout} seconds) and
routes: the SNI table, else C{default}, else the connection is closed with
one line (termination C{no-route}, or C{bad-hello} when no ClientHello
could be read).

The ClientHello may come in many reads (a client may even send it as
one-byte records): L{HelloProgress} follows its record headers as bytes
arrive, looking at each byte once, and the whole ClientHello is parsed
once, when its records are all in (or something is wrong), so the work
per connection grows with its size, not with its square.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from rproxy.clienthello import MalformedHello, read_client_hello

__all__ = ["SNIRouting", "HelloProgress"]

_HANDSHAKE = 0x16
_MAX_RECORD = 2**14 + 2048  # (as rproxy.clienthello)


class HelloProgress:
    """
    How far the records of a ClientHello have come, kept between reads:
    L{feed} takes the bytes of one read and says whether the ClientHello
    is worth parsing now (its records are all in, or something about them
    is wrong or too long, which the parser will name).

    @ivar pending: the bytes of the record under way (at most one record).
    @ivar length: the bytes of the whole records seen.
    @ivar payload: their handshake bytes.
    @ivar needed: the handshake message's length, once its first 4 bytes
        are in (-1 before).
    """

    __slots__ = ("limit", "pending", "length", "payload", "first", "needed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.length = 0
        self.payload = 0
        self.first = bytearray()  # the message's first 4 bytes
        self.needed = -1

    def feed(self, data: bytes) -> bool:
        pending = self.pending
        pending += data
        while len(pending) >= 5:
            kind, major, size = pending[0], pending[1], int.from_bytes(pending[3:5], "big")
            if kind != _HANDSHAKE or major != 3 or size == 0 or size > _MAX_RECORD:
                return True
            if self.length + 5 + size > self.limit:
                return True
            if len(pending) < 5 + size:
                return False
            if len(self.first) < 4:
                self.first += pending[5: 5 + min(size, 4 - len(self.first))]
            self.payload += size
            self.length += 5 + size
            del pending[: 5 + size]
            if self.needed < 0 and len(self.first) == 4:
                self.needed = 4 + int.from_bytes(self.first[1:4], "big")
                if self.first[0] != 0x01 or self.needed > self.limit:
                    return True
            if self.needed >= 0 and self.payload >= self.needed:
                return True
        return bool(pending) and (pending[0] != _HANDSHAKE or (len(pending) > 1 and pending[1] != 3))


class SNIRouting:
    """
    A mixin of the TCP frontend's client connection (which provides
    C{frontend}, C{_early}, C{lost}, C{termination}, C{peer_name},
    C{_abort} and C{_acquire}).

    @ivar routed_pool: the pool the SNI chose (None: not routed yet).
    @ivar hello_timer: the ClientHello's deadline while it is awaited.
    """

    routed_pool: Any = None
    hello_timer: IDelayedCall | None = None
    hello_progress: HelloProgress | None = None

    def await_hello(self, passthrough: Any) -> None:
        """
        Route now if the ClientHello is here already, else wait for it.
        """
        self.hello_progress = HelloProgress(passthrough.max_hello)
        early = b"".join(self._early or ())  # type: ignore[attr-defined]
        if not self._hello_read(passthrough, early) and not self.lost:  # type: ignore[attr-defined]
            self.hello_timer = self.frontend.clock.callLater(  # type: ignore[attr-defined]
                passthrough.timeout, self._hello_late, passthrough)

    def unspliced_data(self, data: bytes) -> None:
        super().unspliced_data(data)  # type: ignore[misc]
        if self.hello_timer is not None:
            self._hello_read(self.frontend.config.tls_passthrough, data)  # type: ignore[attr-defined]

    def _hello_read(self, passthrough: Any, new: bytes) -> bool:
        """
        Take C{new}, the bytes just read; route by the ClientHello if it is
        all there; whether it was.
        """
        progress = self.hello_progress
        if progress is not None and not progress.feed(new):
            return False
        data = b"".join(self._early or ())
        try:
            hello = read_client_hello(data, passthrough.max_hello)
        except MalformedHello as e:
            self.hello_progress = None
            self._stop_hello_timer()
            self._route(passthrough, None, f"not a TLS ClientHello: {e}")
            return True
        if hello is None:
            return False
        self.hello_progress = None
        self._stop_hello_timer()
        self._route(passthrough, hello.server_name, None)
        return True

    def _hello_late(self, passthrough: Any) -> None:
        self.hello_timer = None
        self._route(passthrough, None, f"no complete ClientHello within {passthrough.timeout:g}s")

    def _stop_hello_timer(self) -> None:
        if self.hello_timer is not None:
            if self.hello_timer.active():
                self.hello_timer.cancel()
            self.hello_timer = None

    def _route(self, passthrough: Any, name: str | None, problem: str | None) -> None:
        """
        Choose the backend for server name C{name} (None: no SNI, or
        C{problem} says why it could not be read): the SNI table, else the
        default; without one the connection is closed, one line.
        """
        frontend = self.frontend
        backend = passthrough.backend_for(name) if problem is None else passthrough.default
        pool = frontend.pools.get(backend) if backend is not None else None
        frontend.routed[backend or "-"] += 1
        if pool is None:
            why = problem or (f"no backend for server name {name!r}" if name else "no server name (SNI)")
            self.termination = "bad-hello" if problem else "no-route"
            frontend.log.info("frontend {frontend}: closing {peer}: {why}", frontend=frontend.name,
                              peer=self.peer_name(), why=why)
            self._abort()
            return
        self.routed_pool = pool
        self._acquire()
