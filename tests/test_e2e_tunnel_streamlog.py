"""
The access log of mode tcp tunnel streams: one line per stream, in a file
of its own, with the agent, client, bytes both ways, duration and why it
ended.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from rproxy.config import ConfigError
from rproxy.config.load import config_from_mapping
from rproxy.tunnel.streamlog import StreamLog
from tests import test_e2e_tunnel
from tests.support import ServiceMixin, async_test, wait_for


class StreamLogTests(ServiceMixin, TestCase):
    timeout = 60
    # the tunnel tests' helpers, not their tests
    start_tunnel = test_e2e_tunnel.TunnelTests.start_tunnel
    start_agent = test_e2e_tunnel.TunnelTests.start_agent
    public = test_e2e_tunnel.TunnelTests.public
    def lines(self) -> list[dict[str, Any]]:
        self.tunnel.stream_log.file.flush()
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    @async_test
    async def test_one_json_line_per_stream(self) -> None:
        self.path = self.mktemp()
        await self.start_tunnel(access_log={"format": "json", "path": self.path})
        await self.start_agent("a")
        client = await self.public()
        self.assertEqual(await client.read_until(b"\n"), b"a\n")
        client.transport.write(b"hello\n")
        await client.read_until(b"hello\n")
        client.transport.loseWriteConnection()
        await client.closed
        await wait_for(lambda: not self.tunnel.public_connections)
        [line] = self.lines()
        self.assertEqual({k: v for k, v in line.items() if k not in ("client", "duration")}, {
            "tunnel": "gpu", "agent": "a", "node": None, "model": None, "bytes_in": 6,
            "bytes_out": len(b"a\nhello\nbye"), "end": "client_closed"})
        self.assertTrue(line["client"].startswith("127.0.0.1:"))
        self.assertGreater(line["duration"], 0)

    @async_test
    async def test_no_agent(self) -> None:
        self.path = self.mktemp()
        await self.start_tunnel(access_log={"format": "json", "path": self.path})
        client = await self.public()
        await client.closed
        await wait_for(lambda: not self.tunnel.public_connections)
        [line] = self.lines()
        self.assertEqual((line["agent"], line["bytes_in"], line["bytes_out"], line["end"]),
                         (None, 0, 0, "no_agent"))

    @async_test
    async def test_agent_dropped(self) -> None:
        """A stream cut because its agent went away says so."""
        self.path = self.mktemp()
        await self.start_tunnel(access_log={"format": "json", "path": self.path})
        agent, _ = await self.start_agent("a")
        client = await self.public()
        await client.read_until(b"\n")
        session = self.tunnel.registry.agents["a"]
        self.tunnel.drop_session(session, "test")
        await client.closed
        await wait_for(lambda: not self.tunnel.public_connections)
        self.assertEqual([line["end"] for line in self.lines()], ["aborted"])


class StreamLogFormatTests(SynchronousTestCase):
    def test_text(self) -> None:
        log = StreamLog(False, None, None)
        self.assertEqual(log.line("gpu", "10.0.0.1:5000", "a1", "edge-2", None, 10, 20, 1.5, "agent_closed"),
                         "10.0.0.1:5000 tunnel=gpu agent=a1 node=edge-2 model=- bytes_in=10 bytes_out=20 "
                         "duration=1.500000 end=agent_closed")

    def test_config(self) -> None:
        base = {"api_keys": [{"key": "k"}]}
        tunnel = {"name": "gpu", "control": "tcp:0", "proxy": "tcp:0", "public": "tcp:0"}
        config = config_from_mapping(dict(base, tunnels=[dict(tunnel, access_log="text")]))
        self.assertEqual((config.tunnels[0].access_log, config.tunnels[0].access_log_path), ("text", None))
        # (the same key logs a mode http tunnel's requests, in the HTTP
        # frontends' formats)
        config = config_from_mapping(dict(base, tunnels=[dict(tunnel, mode="http", access_log={"format": "json"})]))
        self.assertEqual(config.tunnels[0].access_log, "json")
        with self.assertRaises(ConfigError) as caught:
            config_from_mapping(dict(base, tunnels=[dict(tunnel, mode="http", access_log="text"),
                                                    dict(tunnel, name="b", access_log={"format": "xml"})]))
        self.assertEqual(caught.exception.errors, [
            "tunnels[0].access_log: 'text' is not one of off, combined, json",
            "tunnels[1].access_log.format: 'xml' is not one of off, text, json",
        ])
