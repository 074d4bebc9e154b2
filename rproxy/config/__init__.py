"""
The configuration: YAML in, frozen attrs objects out.

Every value a user writes is checked here, once, and every problem is
reported with the path of the key that holds it, e.g.
C{frontends[1].listen: port 70000 out of range}.  Unknown keys are errors
(with a did-you-mean), because a misspelt key silently ignored is a proxy
that does something other than what its operator believes.

The package, in the order a document goes through it:
  - L{values}: durations, sizes, addresses and one-key converters;
    L{endpoints}: the one parser of listen strings (the service builds its
    listeners from the same parse);
  - L{load}: the file read and YAML parsed within limits, then the files
    and environment variables the document names read (L{reader.Sources});
  - L{reader}, L{sections}, L{frontends}, L{tokenpools}, L{document}: the
    section readers, pure, building the frozen L{model};
  - certificates loaded last, once the document is valid.

Nothing outside this package parses durations, addresses or endpoint
strings; the rest of rproxy only ever sees the typed objects of L{model}.
"""

from __future__ import annotations

from rproxy.config.document import validate
from rproxy.config.endpoints import (
    ENDPOINT_TYPES,
    Endpoint,
    normalize_listen,
    parse_endpoint,
    split_endpoint,
)
from rproxy.config.load import config_from_mapping, load_config, parse_config
from rproxy.config.model import (
    ALGORITHMS,
    HEALTH_TYPES,
    PROTOCOLS,
    AdminConfig,
    BackendConfig,
    Config,
    Credential,
    FrontendConfig,
    GlobalConfig,
    HealthCheckConfig,
    HTTPOptions,
    PassiveConfig,
    ServerConfig,
    StoresConfig,
    TokenPoolConfig,
    UpstreamTLSConfig,
)
from rproxy.config.reader import Sources
from rproxy.config.values import ConfigError, parse_duration, parse_hostport, parse_size

__all__ = [
    "ConfigError",
    "GlobalConfig",
    "AdminConfig",
    "ServerConfig",
    "HealthCheckConfig",
    "PassiveConfig",
    "UpstreamTLSConfig",
    "BackendConfig",
    "HTTPOptions",
    "FrontendConfig",
    "Credential",
    "TokenPoolConfig",
    "StoresConfig",
    "Config",
    "Endpoint",
    "Sources",
    "load_config",
    "parse_config",
    "config_from_mapping",
    "validate",
    "parse_duration",
    "parse_size",
    "parse_hostport",
    "parse_endpoint",
    "normalize_listen",
    "split_endpoint",
    "ALGORITHMS",
    "HEALTH_TYPES",
    "PROTOCOLS",
    "ENDPOINT_TYPES",
]
