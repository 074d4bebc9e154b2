"""
Values a user writes: durations, sizes, host:port addresses, and the small
converters the section readers apply to one key each.

Every converter raises C{ValueError} with a message fit to follow a key
path.  A value quoted in a message goes through L{brief}, so that an error
about a wrong-typed key never prints (or walks) a large structure.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "ConfigError",
    "brief",
    "parse_duration",
    "parse_size",
    "parse_hostport",
]


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar errors: one line per problem, each starting with the key path.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def lines(self, limit: int = 25) -> list[str]:
        """
        The problems to show a person: at most C{limit} lines, the last one
        saying how many more there are.
        """
        if len(self.errors) <= limit:
            return list(self.errors)
        return self.errors[: limit - 1] + [f"... and {len(self.errors) - limit + 1} more problems"]


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset"):
    setattr(_REPR, _attr, 4)
_BRIEF = 80


def brief(value: object) -> str:
    """
    A short repr of C{value}: at most 80 characters, and bounded work
    whatever its size or depth (a YAML alias bomb quoted whole would take
    minutes and gigabytes).
    """
    text = _REPR.repr(value)
    return text if len(text) <= _BRIEF else text[: _BRIEF - 3] + "..."


def kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """
    Parse a duration: a number of seconds, or a string such as C{250ms},
    C{5s}, C{2m}, C{1h}, C{1d}.

    @raise ValueError: with a message fit to follow a key path.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 5s or 250ms, got {brief(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"invalid duration {brief(value)} (use e.g. 250ms, 5s, 2m, 1h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 5s or 250ms, got {brief(value)}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {brief(value)}")
    if seconds != seconds or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number, got {brief(value)}")
    return seconds


def parse_size(value: object) -> int:
    """
    Parse a size in bytes: an integer, or a string such as C{64k}, C{10M},
    C{1GiB} (binary multiples).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 64k or 10M, got {brief(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"invalid size {brief(value)} (use e.g. 512, 64k, 10M, 1G)")
        unit = (match.group(2) or "").lower()[:1]
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size such as 64k or 10M, got {brief(value)}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {brief(value)}")
    return size


def parse_hostport(value: str, allow_zero: bool = False) -> tuple[str, int]:
    """
    Split C{host:port} or C{[v6addr]:port}.

    @raise ValueError: if there is no port or it is out of range.
    """
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"invalid address {brief(value)} (expected [ipv6]:port)")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid address {brief(value)} (expected host:port)")
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"invalid port {brief(port_text)} in {brief(value)}")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


# -- converters for one key ------------------------------------------------


def int_in(low: int | None = None, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {kind(value)} {brief(value)}")
        if low is not None and value < low:
            raise ValueError(f"{brief(value)} is below the minimum {low}")
        if high is not None and value > high:
            raise ValueError(f"{brief(value)} is above the maximum {high}")
        return value

    return convert


MAX_WORKERS = 1024


def workers(value: object) -> int | str:
    """
    C{global.workers}: a count of processes, or C{auto} (one per usable
    core, counted when rproxy starts: L{rproxy.workers.worker_count}).
    """
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected an integer from 1 to {MAX_WORKERS} or 'auto', got {kind(value)} {brief(value)}")
    return value


def text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {kind(value)} {brief(value)}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {kind(value)} {brief(value)}")
    return value


def choice(options: Iterable[str]) -> Callable[[object], str]:
    options = tuple(options)

    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{brief(value)} is not one of {', '.join(options)}{hint}")
        return value

    return convert


def duration(value: object) -> float:
    return parse_duration(value)


def positive_duration(value: object) -> float:
    """
    A duration that must pass before something gives up or comes round
    again (a connect timeout, a check interval): zero fails everything at
    once, or spins.
    """
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {brief(value)}")
    return seconds


def size(value: object) -> int:
    return parse_size(value)


def size_at_least(low: int) -> Callable[[object], int]:
    """
    A size of at least C{low} bytes: below it a limit refuses every
    request it applies to.
    """

    def convert(value: object) -> int:
        result = parse_size(value)
        if result < low:
            raise ValueError(f"{brief(value)} is below the minimum {low} byte{'s' if low != 1 else ''}")
        return result

    return convert


def name(value: object) -> str:
    result = text(value)
    if not re.match(r"^[A-Za-z0-9_.-]+\Z", result):
        raise ValueError(f"{brief(result)} may only hold letters, digits, '_', '.' and '-'")
    return result


def url_path(value: object) -> str:
    result = text(value)
    if not result.startswith("/") or any(c in result for c in " \r\n\0"):
        raise ValueError(f"{brief(result)} must start with / and hold no spaces or control characters")
    return result


def fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {brief(value)}")
    return float(value)


def hash_key(value: object) -> str:
    result = text(value)
    if result == "source_ip":
        return result
    kind_, sep, rest = result.partition(":")
    if kind_ in ("header", "cookie") and sep and rest:
        return result
    raise ValueError(f"{brief(result)} is not source_ip, header:NAME or cookie:NAME")


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def is_token(value: object) -> bool:
    """
    Whether C{value} is an HTTP token (a header or cookie name).
    """
    return isinstance(value, str) and _TOKEN.match(value) is not None


def cookie_name(value: object) -> str:
    result = text(value)
    if not is_token(result):
        raise ValueError(f"{brief(result)} is not a cookie name")
    return result


def field_path(value: object) -> str:
    result = text(value)
    if not result or any(not part for part in result.split(".")):
        raise ValueError(f"{brief(result)} is not a dotted field path such as result.0")
    return result
