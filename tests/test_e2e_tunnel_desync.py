"""
aws/http-desync-guardian's cases (written by others, in ../shared/corpora)
through a C{mode: http} tunnel: each request, with the body its framing
calls for and a second request smuggled after it, on its own public
connection to an agent whose local service records every byte.  The
tunnel keeps connections alive, so a second request the reader parses as
one is served; what must never happen is a request the service sees and
the reader did not.
"""

from __future__ import annotations

from functools import partial

from twisted.trial.unittest import SkipTest, TestCase

from rproxy.http.reader import HTTPError, RequestHead, RequestReader
from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests.support import Client, ServiceMixin, async_test, connect, listen, reactor, wait_for
from tests.test_e2e_tunnel_http import RecorderFactory
from tests.test_http_reader import CORPUS, corpus_cases

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n"


def framed(raw: bytes) -> tuple[bytes, bool]:
    """
    C{raw} with the body its framing calls for (as the strict reader
    reads it), and whether the reader refuses it.
    """
    try:
        events = RequestReader().feed(raw)
    except HTTPError:
        return raw + b"0\r\n\r\n", True
    [head] = [e for e in events if isinstance(e, RequestHead)]
    if head.chunked:
        return raw + b"5\r\nhello\r\n0\r\n\r\n", False
    return raw + b"x" * (head.content_length or 0), False


def answered_all(client: Client, n: int) -> bool:
    return client.lost or bytes(client.data).count(b"HTTP/1.1 ") >= n


def accepted_targets(data: bytes) -> list[bytes]:
    """
    The targets of the requests the strict reader parses in C{data}, fed a
    byte at a time (as reads may split it), up to its first refusal.
    """
    reader = RequestReader(max_body=None)
    targets = []
    for i in range(len(data)):
        try:
            events = reader.feed(data[i : i + 1])
        except HTTPError:
            break
        targets += [e.target for e in events if isinstance(e, RequestHead)]
    return targets


class TunnelDesyncTests(ServiceMixin, TestCase):
    timeout = 120

    @async_test
    async def test_nothing_smuggled_through_the_tunnel(self) -> None:
        """
        No case gets a request to the service that the strict reader did
        not parse as one: the service sees, in order, requests the reader
        accepted (the second one too when the reader took it as a second
        request: keep-alive), and nothing of the refused ones (400, or 505
        for versions).
        """
        cases = corpus_cases()
        if not cases:
            raise SkipTest(f"corpus not found at {CORPUS}")
        service = await self.start_service({
            "api_keys": [{"key": "good-key"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
                         "public": "tcp:0:interface=127.0.0.1", "mode": "http", "open_timeout": "5s",
                         "model_body_limit": "60k"}],
        })
        tunnel = service.tunnels["gpu"]
        recorder = RecorderFactory()
        port = await listen(recorder)
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in recorder.connections])
        agent = AgentService(parse_agent_config({
            "server": {"control": f"127.0.0.1:{tunnel.port_of('control')}",
                       "proxy": f"127.0.0.1:{tunnel.port_of('proxy')}"},
            "api_key": "good-key", "agent_id": "rec",
            "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
        }), reactor)
        agent.startService()
        self.addCleanup(agent.stopService)
        await wait_for(lambda: "rec" in tunnel.registry.agents)
        smuggled: list[str] = []
        refused_seen: list[str] = []
        forwarded = 0
        for name, tier, raw in cases:
            data, refused = framed(raw)
            accepted = accepted_targets(data + SMUGGLED)
            before = len(recorder.received)
            client = await connect(tunnel.port_of("public"))
            self.client_cleanup(client)
            client.transport.write(data + SMUGGLED)  # type: ignore[union-attr]
            # (keep-alive: the connection ends on an error, else stays open)
            await wait_for(partial(answered_all, client, max(1, len(accepted))))
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed
            received = recorder.received[before:]
            answered = bytes(client.data)[:13]
            if refused:
                self.assertRegex(answered, rb"^HTTP/1\.1 [45]\d\d", name)
            heads = [e.target for e in RequestReader(require_host=False).feed(received) if isinstance(e, RequestHead)]
            if heads != accepted[:len(heads)]:
                smuggled.append(f"{tier}: {name}: the service saw {heads}, the reader {accepted}")
            if refused and heads:
                refused_seen.append(name)
            if heads:
                forwarded += 1
        self.assertEqual((smuggled, refused_seen), ([], []))
        self.assertGreaterEqual(forwarded, 25)  # the cases the strict reader accepts (26: codings before chunked get 501)
