"""
Tests for L{rproxy.tunnel.wire}.
"""

from __future__ import annotations

import json
import struct

from twisted.trial.unittest import SynchronousTestCase

from rproxy.tunnel.wire import (
    VERSION,
    FrameDecoder,
    Heartbeat,
    Login,
    LoginResult,
    ModelsUpdate,
    NewProxyConn,
    ProtocolError,
    RequestNewProxyConn,
    encode,
)


def raw(body: object) -> bytes:
    data = json.dumps(body).encode()
    return struct.pack(">I", len(data)) + data


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Every message survives encode and decode."""
        messages = [
            Login(agent_id="gpu-01", api_key="k", system_info={"os": "linux"}, devices=({"gpu": "a"},),
                  models=("llama3",)),
            LoginResult(ok=True, agent_id="gpu-01", heartbeat_interval=10.0),
            Heartbeat(cpu=12.5, memory=40.0, disk=3.0, load=0.5, active_streams=2),
            RequestNewProxyConn(conn_id="c1", secret="s"),
            NewProxyConn(conn_id="c1", secret="s"),
            ModelsUpdate(models=("a", "b")),
        ]
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"".join(encode(m) for m in messages)), messages)

    def test_byte_at_a_time(self) -> None:
        """Frames split anywhere are reassembled."""
        data = encode(Heartbeat(cpu=1.0)) + encode(ModelsUpdate(models=("m",)))
        decoder = FrameDecoder()
        out = []
        for i in range(len(data)):
            out += decoder.feed(data[i : i + 1])
        self.assertEqual(out, [Heartbeat(cpu=1.0), ModelsUpdate(models=("m",))])

    def test_rest_after_first_frame(self) -> None:
        """A proxy connection's stream bytes after its first frame are kept."""
        decoder = FrameDecoder()
        messages = decoder.feed(encode(NewProxyConn(conn_id="c", secret="s")) + b"GET / HTTP/1.1\r\n", limit=1)
        self.assertEqual(messages, [NewProxyConn(conn_id="c", secret="s")])
        self.assertEqual(decoder.rest(), b"GET / HTTP/1.1\r\n")

    def test_openai_model_objects(self) -> None:
        """Models may be given as OpenAI {"id": ...} objects."""
        body = {"type": "models_update", "models": [{"id": "llama3", "object": "model"}, "qwen"]}
        self.assertEqual(FrameDecoder().feed(raw(body)), [ModelsUpdate(models=("llama3", "qwen"))])


class MalformedTests(SynchronousTestCase):
    def check(self, data: bytes, message: str) -> None:
        exc = self.assertRaises(ProtocolError, FrameDecoder(max_frame=1024).feed, data)
        self.assertEqual(str(exc), message)

    def test_oversized(self) -> None:
        """A frame over the limit is refused from its header alone."""
        self.check(struct.pack(">I", 1025), "frame of 1025 bytes exceeds the limit of 1024")

    def test_not_json(self) -> None:
        """Bytes that are not JSON."""
        self.check(struct.pack(">I", 3) + b"\xff\x00{", "frame is not UTF-8 JSON")

    def test_not_object(self) -> None:
        """JSON that is not an object."""
        self.check(raw([1, 2]), "frame is not a JSON object")

    def test_unknown_type(self) -> None:
        """Unknown message types."""
        self.check(raw({"type": "rm -rf"}), "unknown message type 'rm -rf'")
        self.check(raw({"kind": "login"}), "unknown message type 'None'")

    def test_bad_fields(self) -> None:
        """Fields of the wrong type or size."""
        self.check(raw({"type": "heartbeat", "cpu": "lots"}), "cpu: expected a number")
        self.check(raw({"type": "new_proxy_conn", "conn_id": 5, "secret": "s"}),
                   "conn_id: expected a string of at most 256 characters")
        self.check(raw({"type": "models_update", "models": [""]}), "models: every model must be a non-empty string")
        self.check(raw({"type": "login", "version": VERSION, "agent_id": "a"}), "login needs api_key or token")
        self.check(raw({"type": "login", "version": 99, "agent_id": "a", "api_key": "k"}),
                   "version: this server speaks version 1, not 99")
        self.check(raw({"type": "login_result", "ok": "yes"}), "ok: expected true or false")


class OutOfRangeTests(SynchronousTestCase):
    """
    JSON that Python's parser takes, or chokes on with another exception,
    is a protocol error like any malformed frame.
    """

    def check(self, body: bytes, message: str) -> None:
        data = struct.pack(">I", len(body)) + body
        exc = self.assertRaises(ProtocolError, FrameDecoder().feed, data)
        self.assertEqual(str(exc), message)

    login = b'{"type": "login", "version": 1, "agent_id": "a", "api_key": "k", "pool_count": '

    def test_float_overflow(self) -> None:
        """1e400 (infinite as a float) is refused."""
        self.check(self.login + b"1e400}", "number 1e400 is out of range")

    def test_nan_and_infinity(self) -> None:
        """NaN, Infinity and -Infinity are not JSON."""
        self.check(self.login + b"NaN}", "frame holds NaN, which is not JSON")
        self.check(b'{"type": "heartbeat", "cpu": -Infinity}', "frame holds -Infinity, which is not JSON")

    def test_long_integer(self) -> None:
        """An integer of 401 digits is refused before anything converts it."""
        self.check(self.login + b"1" + b"0" * 400 + b"}", "integer of 401 digits is out of range")
        heartbeat = b'{"type": "heartbeat", "active_streams": 123456789012345678901}'
        self.check(heartbeat, "integer of 21 digits is out of range")

    def test_deep_nesting(self) -> None:
        """5000 nested arrays are refused without a RecursionError."""
        self.check(b"[" * 5000 + b"]" * 5000, "frame nests deeper than 32 levels")
        self.check(b'{"type": "login", "system_info": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
                   "frame nests deeper than 32 levels")

    def test_brackets_in_strings_do_not_count(self) -> None:
        """Brackets inside strings are text, not nesting."""
        body = {"type": "heartbeat", "cpu": 1.5, "note": "[[[{{{" * 20 + '\\"['}
        self.assertEqual(FrameDecoder().feed(raw(body)), [Heartbeat(cpu=1.5)])

    def test_ordinary_numbers(self) -> None:
        """Floats, negative and 20-digit integers still parse."""
        for text, value in ((b"1.5e2", 150.0), (b"-3", -3.0), (b"12345678901234567890", 12345678901234567890.0)):
            body = b'{"type": "login_result", "ok": true, "heartbeat_interval": ' + text + b"}"
            [result] = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
            assert isinstance(result, LoginResult)
            self.assertEqual(result.heartbeat_interval, value)

    def test_heartbeat_ranges(self) -> None:
        """
        A heartbeat's percentages are brought into 0 to 100 (an agent's
        CPU figure may step past when a kernel counter goes back) and
        refused far out; its load is from 0 to a million, its stream count
        a whole number a PostgreSQL integer holds: past them it is refused
        (cpu 1e39, finite, jammed the writers: the heartbeats table's real
        column refuses it).
        """
        for field, value, message in (
            ("cpu", 1e39, "cpu: expected a number from -1000 to 1000"),
            ("memory", 1000.5, "memory: expected a number from -1000 to 1000"),
            ("disk", -1001, "disk: expected a number from -1000 to 1000"),
            ("load", -0.5, "load: expected a number from 0 to 1e+06"),
            ("load", 2e6, "load: expected a number from 0 to 1e+06"),
            ("active_streams", 2**31, "active_streams: expected a number from 0 to 2.14748e+09"),
            ("active_streams", -1, "active_streams: expected a number from 0 to 2.14748e+09"),
            ("active_streams", 1.5, "active_streams: expected a whole number"),
        ):
            self.check(json.dumps({"type": "heartbeat", field: value}).encode(), message)
        body = {"type": "heartbeat", "cpu": 100, "memory": 0, "disk": 99.5, "load": 1e6, "active_streams": 2**31 - 1}
        self.assertEqual(FrameDecoder().feed(raw(body)),
                         [Heartbeat(cpu=100.0, memory=0.0, disk=99.5, load=1e6, active_streams=2**31 - 1)])
        body = {"type": "heartbeat", "cpu": 100.4, "memory": -0.2}
        self.assertEqual(FrameDecoder().feed(raw(body)), [Heartbeat(cpu=100.0, memory=0.0)])
