"""
One port, several protocols: a C{protocol: detect} frontend (ZProxy's
connection handler).

Each accepted connection is admitted like any other (C{max_connections},
queue, drain), then its first bytes are peeked at:

  - C{0x16 0x03} (a TLS handshake record): the C{tls} frontend;
  - an HTTP method and a space (C{GET }, C{POST }, ...): the C{http}
    frontend;
  - anything else, or nothing within C{timeout} (a protocol whose server
    speaks first): the C{default} frontend.

At most C{max_bytes} are peeked (a decision needs at most 8), and the
bytes are then given to the chosen frontend's protocol as if it had read
them itself: a frontend with C{tls:} gets them through its TLS layer, a
tcp frontend with C{tls_passthrough} reads the ClientHello's SNI from
them.  A kind with no frontend configured is closed with one log line.

C{allow}/C{deny} on the detect frontend are checked at accept, before
admission and before a byte is read: a refused client is closed with one
log line and counted (C{denied_total}, C{rproxy_frontend_denied_total});
with C{proxy_protocol} the address checked is the header's.  (The
frontend a connection is handed to applies its own lists too.)

The target frontends are looked up by name at each connection (a reload
that replaces one is seen at once); they are ordinary frontends with
their own listeners too.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rproxy.admission import Admission, AdmittedFigures, ConnectionLimit
from rproxy.clienthello import looks_like_tls
from rproxy.handoff import Deadlines, Handoff

__all__ = ["DetectFrontend", "DetectProtocol", "HTTP_METHODS", "classify"]

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ",
                b"PATCH ", b"PRI ")


def classify(data: bytes, max_bytes: int = 16) -> str | None:
    """
    C{"tls"}, C{"http"} or C{"default"} for a connection's first bytes;
    None while they could still be either (fewer than C{max_bytes}).
    """
    if not data:
        return None
    tls = looks_like_tls(data)
    if tls:
        return "tls"
    if tls is None:
        return None if len(data) < max_bytes else "default"
    undecided = False
    for method in HTTP_METHODS:
        if data.startswith(method):
            return "http"
        if method.startswith(data):
            undecided = True
    if undecided and len(data) < max_bytes:
        return None
    return "default"


class DetectProtocol(Handoff):
    """
    A connection of a detect frontend, until it is handed over.
    """

    counted = False
    quiet_ticks = 0
    last_total = -1
    queue_timer: IDelayedCall | None = None
    forgotten = False

    def __init__(self, frontend: DetectFrontend, addr: Any) -> None:
        super().__init__(frontend.clock, addr)
        self.frontend = frontend
        options = frontend.config.detect
        self.timeout = options.timeout
        self.limit = options.max_bytes
        self.deadlines = frontend.deadlines

    def connectionMade(self) -> None:
        frontend = self.frontend
        access = frontend.config.access
        if access is not None and not access.permits(getattr(self.addr, "host", "unix")):
            self.done = self.forgotten = True  # (never admitted)
            frontend.denied(self)
            return
        # nothing is read while it waits for a slot
        self.transport.pauseProducing()  # type: ignore[union-attr]
        frontend.admission.admit(self)

    # -- IAdmitted ---------------------------------------------------------

    def start(self) -> None:
        self.counted = True
        Handoff.connectionMade(self)  # the peek timer
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def activity(self) -> int | None:
        return None  # (the peek timeout bounds it)

    def idle_abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def refuse(self) -> None:
        self.done = True
        self._stop_timer()
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- peeking -----------------------------------------------------------

    def first_bytes(self, data: bytes) -> None:
        kind = classify(data, self.limit)
        if kind is not None:
            self._hand(kind, data)

    def expired(self) -> None:
        self._hand("default", self.buffer, late=True)

    def _hand(self, kind: str, data: bytes, late: bool = False) -> None:
        frontend = self.frontend
        options = frontend.config.detect
        name = options.targets().get(kind) or options.default
        target = frontend.lookup(name) if name else None
        if target is None:
            if late:
                why = f"nothing recognised within {self.timeout:g}s and no default frontend"
            elif name:
                why = f"{kind}: frontend {name} is not running"
            else:
                why = f"{kind} and no frontend for it"
            frontend.detected["closed"] += 1
            self.reject(why)
            return
        frontend.detected[kind] += 1
        factory = frontend.factory_of(target)
        self._leave()
        self.hand_to(factory, data)

    def rejected(self, why: str) -> None:
        self.frontend.log.info("frontend {frontend}: closing {peer}: {why}", frontend=self.frontend.name,
                               peer=self.peer_name(), why=why)

    def _leave(self) -> None:
        """
        Give the detect frontend's slot back (the target admits it again).
        """
        if not self.forgotten:
            self.forgotten = True
            self.frontend.admission.forget(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        self._leave()


class DetectFrontend(AdmittedFigures):
    """
    The factory of a C{protocol: detect} frontend.

    @ivar detected: connections handed over per kind (tls, http,
        default) and closed undetected (closed).
    """

    log = Logger()
    noisy = False
    pool = None

    def __init__(self, config: Any, frontends: Mapping[str, Any], clock: Any,
                 limit: ConnectionLimit | None = None) -> None:
        self.admission = Admission(config.name, config, clock, limit)
        self.frontends = frontends
        self.clock = clock
        self.connect_errors = 0
        self.detected: collections.Counter[str] = collections.Counter()
        self.denied_total = 0  # refused at accept by allow/deny
        self.proxy_protocol: Any = None
        self.deadlines = Deadlines(clock)
        self._tls: dict[str, tuple[Any, Any, Any]] = {}

    def denied(self, conn: DetectProtocol) -> None:
        """
        C{conn}'s client is refused by the allow/deny lists: closed at
        once, one line.
        """
        self.denied_total += 1
        self.log.info("frontend {frontend}: refusing {peer}: not allowed by allow/deny", frontend=self.name,
                      peer=conn.peer_name())
        conn.transport.abortConnection()  # type: ignore[union-attr]

    def lookup(self, name: str) -> Any:
        return self.frontends.get(name)

    def factory_of(self, target: Any) -> Any:
        """
        What builds a target's protocol: the frontend itself, or its TLS
        layer when it terminates TLS (its own listener's; for a target
        without one, made once per frontend object and certificate list).
        """
        tls = target.config.tls
        if not tls:
            return target
        layer = getattr(target, "proxy_protocol", None)
        if layer is not None and layer.wrapped is not target:
            # the TLS layer of the target's own listener, which a reload
            # replaces with the certificates it read again (renewed in
            # place too)
            return layer.wrapped
        cached = self._tls.get(target.name)
        if cached is not None and cached[0] is target and cached[1] == tls:
            return cached[2]
        from rproxy.tls import server_tls_factory

        factory = server_tls_factory(target, list(tls))
        self._tls[target.name] = (target, tls, factory)
        return factory

    # the Factory interface (a listener calls these)
    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def logPrefix(self) -> str:
        return f"detect {self.name}"

    def buildProtocol(self, addr: Any) -> DetectProtocol:
        p = DetectProtocol(self, addr)
        return p

    def bytes_totals(self) -> tuple[int, int]:
        return 0, 0  # (counted by the frontends connections are handed to)

    def drain(self, grace: float) -> defer.Deferred[None]:
        drained = self.admission.drain(grace)
        drained.addBoth(self._stop)
        return drained

    def _stop(self, result: Any) -> Any:
        self.deadlines.stop()
        return result
