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
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from rproxy.clienthello import MalformedHello, read_client_hello

__all__ = ["SNIRouting"]


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

    def await_hello(self, passthrough: Any) -> None:
        """
        Route now if the ClientHello is here already, else wait for it.
        """
        if not self._hello_read(passthrough) and not self.lost:  # type: ignore[attr-defined]
            self.hello_timer = self.frontend.clock.callLater(  # type: ignore[attr-defined]
                passthrough.timeout, self._hello_late, passthrough)

    def unspliced_data(self, data: bytes) -> None:
        super().unspliced_data(data)  # type: ignore[misc]
        if self.hello_timer is not None:
            self._hello_read(self.frontend.config.tls_passthrough)  # type: ignore[attr-defined]

    def _hello_read(self, passthrough: Any) -> bool:
        """
        Route by the ClientHello if it is all there; whether it was.
        """
        data = b"".join(self._early or ())
        try:
            hello = read_client_hello(data, passthrough.max_hello)
        except MalformedHello as e:
            self._stop_hello_timer()
            self._route(passthrough, None, f"not a TLS ClientHello: {e}")
            return True
        if hello is None:
            return False
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
