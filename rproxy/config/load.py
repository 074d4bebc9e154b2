"""
From a file to a L{Config}: read the file, parse YAML within limits, read
what the document names (files, environment), validate (pure), then load
the certificates.

The limits bound what one file can cost whoever parses it: its size
(L{MAX_FILE}), the nesting depth (L{MAX_DEPTH}), the number of aliases
(L{MAX_ALIASES}) and the number of nodes once aliases are expanded
(L{MAX_NODES}), so that a "billion laughs" document is refused while it is
composed, before anything walks it.  Reloads run all of this in a thread
(L{rproxy.service}); the limits keep that thread short too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from yaml.composer import ComposerError

from rproxy.config.document import validate
from rproxy.config.model import Config
from rproxy.config.reader import Sources
from rproxy.config.values import ConfigError, kind

__all__ = [
    "load_config",
    "parse_config",
    "config_from_mapping",
    "load_yaml",
    "read_sources",
    "check_certificates",
    "MAX_FILE",
    "MAX_DEPTH",
    "MAX_ALIASES",
    "MAX_NODES",
]

MAX_FILE = 1024 * 1024
MAX_DEPTH = 64
MAX_ALIASES = 1000
MAX_NODES = 200_000
ENVIRONMENT = ("DATABASE_URL", "REDIS_URL")

# where a document names a file: key paths, "*" for every element of a list
FILE_KEYS: tuple[tuple[str, ...], ...] = (
    ("backends", "*", "tls", "ca"),
    ("frontends", "*", "tls", "cert"),
    ("frontends", "*", "tls", "key"),
    ("frontends", "*", "tls", "sni", "*", "cert"),
    ("frontends", "*", "tls", "sni", "*", "key"),
    ("frontends", "*", "auth", "basic", "users_file"),
    ("frontends", "*", "routes", "*", "auth", "basic", "users_file"),
    ("token_pools", "*", "upstream", "tls", "ca"),
    ("token_pools", "*", "credentials_file"),
    ("tunnels", "*", "tls", "cert"),
    ("tunnels", "*", "tls", "key"),
)


class _LimitedLoader(yaml.SafeLoader):
    """
    PyYAML's safe loader, refusing documents past the limits above while
    it composes them (each node's expanded size is known when it is
    complete, since an alias reuses a node whose size is already known).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}

    def _refuse(self, problem: str) -> None:
        raise ComposerError(None, None, problem, self.peek_event().start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                self._refuse(f"more than {MAX_ALIASES} aliases")
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise ComposerError(None, None, "an alias inside the node it refers to", mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            self._refuse(f"nested more than {MAX_DEPTH} deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
        if size > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} values once aliases are expanded",
                                node.start_mark)
        self._sizes[id(node)] = size
        return node


def load_yaml(text: bytes, where: str) -> Any:
    """
    Parse one YAML document within the limits.

    @raise ConfigError: it is not YAML, or is past a limit.
    """
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        at = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            at = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}: invalid YAML{at}: {problem}"]) from None
    except (ValueError, RecursionError) as e:
        # e.g. an integer of more digits than Python converts
        raise ConfigError([f"{where}: invalid YAML: {str(e)[:200]}"]) from None
    finally:
        loader.dispose()


def read_file(path: str, limit: int = MAX_FILE) -> bytes:
    """
    The content of C{path}, refusing more than C{limit} bytes.

    @raise OSError: it cannot be read; C{args[0]} says why.
    """
    with open(path, "rb") as f:
        content = f.read(limit + 1)
    if len(content) > limit:
        raise OSError(f"larger than {limit / 1048576:g} MiB, the most rproxy reads")
    return content


def _named(node: object, keys: tuple[str, ...]) -> Iterator[str]:
    if not keys:
        if isinstance(node, str) and node:
            yield node
        return
    first, rest = keys[0], keys[1:]
    if first == "*":
        if isinstance(node, list):
            for item in node:
                yield from _named(item, rest)
    elif isinstance(node, dict) and first in node:
        yield from _named(node[first], rest)


def read_sources(data: object, file_keys: tuple[tuple[str, ...], ...] = FILE_KEYS,
                 environ: Mapping[str, str] | None = None) -> Sources:
    """
    Read what validation of C{data} needs from outside the document: the
    files it names and the environment variables that override it.
    """
    environ = os.environ if environ is None else environ
    files: dict[str, bytes | str] = {}
    for keys in file_keys:
        for path in _named(data, keys):
            if path in files:
                continue
            try:
                files[path] = read_file(path)
            except OSError as e:
                files[path] = e.strerror or str(e.args[0] if e.args else e)
    return Sources(environ={k: environ[k] for k in ENVIRONMENT if k in environ}, files=files)


def check_certificates(config: Config) -> None:
    """
    Load every frontend certificate and key, once the document is valid.

    @raise ConfigError: one line per pair that does not load.
    """
    from rproxy.tls import load_pair

    errors = []
    for i, frontend in enumerate(config.frontends):
        for cert, key in frontend.tls:
            try:
                load_pair(cert, key)
            except Exception as e:  # noqa: BLE001 - any load failure is a config error
                errors.append(f"frontends[{i}].tls: cannot load {cert} / {key}: {str(e)[:200]}")
    if errors:
        raise ConfigError(errors)


def parse_config(data: object) -> Config:
    """
    Build a L{Config} from a parsed document: read what it names, validate,
    load the certificates.

    @raise ConfigError: listing every problem found, each with its key path.
    """
    config = validate(data, read_sources(data))
    check_certificates(config)
    return config


def load_config(path: str) -> Config:
    """
    Read and validate the YAML file at C{path}.  Blocking (file reads,
    parsing): the service calls it in a thread.

    @raise ConfigError: the file cannot be read, is not YAML, is empty or
        not a mapping, or is invalid.
    """
    try:
        text = read_file(path)
    except OSError as e:
        why = e.strerror or (e.args[0] if e.args else e)
        raise ConfigError([f"{path}: cannot read: {why}"]) from None
    data = load_yaml(text, path)
    if data is None:
        raise ConfigError([f"{path}: holds no configuration (the file is empty or only comments); "
                           "a configuration is a mapping of sections (global, admin, backends, frontends, ...)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections (global, admin, backends, frontends, ...), "
                           f"got {kind(data)}"])
    return parse_config(data)


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    """
    Build a L{Config} from a Python mapping (for tests and embedding).
    """
    return parse_config(dict(data))
