"""
The control channel between the master and a worker: one JSON object per
line over a UNIX socket pair (the worker's descriptor 3).

Sans-I/O: L{Decoder} takes bytes and gives messages; L{encode} makes the
bytes of one.  Listening sockets travel beside the messages as
C{SCM_RIGHTS} descriptors (L{rproxy.workers.master}).  A configuration
travels as a pickle (base64 in the JSON): both ends are the same program,
the master has validated it, and the channel is private to the two
processes (a socket pair, never a path another user could open).
"""

from __future__ import annotations

import base64
import json
import pickle
from typing import Any

from rproxy.config import Config

__all__ = ["Decoder", "WireError", "encode", "pack_config", "unpack_config", "MAX_LINE"]

# a configuration is bounded by rproxy.config.load's limits (1 MiB of
# YAML); its pickle in base64 stays well under this
MAX_LINE = 64 * 1024 * 1024


class WireError(Exception):
    """
    The peer sent something that is not a message: the channel is closed.
    """


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


class Decoder:
    """
    Split a byte stream into messages (JSON objects with an C{op} string).
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """
        The messages completed by C{data}.

        @raise WireError: a line longer than the limit, or one that is not
            a JSON object with an C{op}.
        """
        self._buffer += data
        messages = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end])
            start = end + 1
            messages.append(_parse(line))
        del self._buffer[:start]
        if len(self._buffer) > self._max:
            raise WireError(f"a control message longer than {self._max} bytes")
        return messages


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WireError("not a message (a JSON object with an op)")
    return message


def pack_config(config: Config) -> str:
    return base64.b64encode(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def unpack_config(text: str) -> Config:
    config = pickle.loads(base64.b64decode(text))  # noqa: S301 - from our own master (module docstring)
    if not isinstance(config, Config):
        raise WireError(f"not a configuration: {type(config).__name__}")
    return config
