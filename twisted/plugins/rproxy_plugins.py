"""
twistd plugins for rproxy; kept tiny because twistd imports every plugin
just to list them.
"""

from twisted.application.service import ServiceMaker

rproxy = ServiceMaker(
    "rproxy",
    "rproxy.tap",
    "rproxy: TCP/HTTP load balancer, reverse tunnel and token-pool proxy",
    "rproxy",
)

rproxy_agent = ServiceMaker(
    "rproxy-agent",
    "rproxy.tunnel.agenttap",
    "rproxy tunnel agent: exposes local services through an rproxy tunnel",
    "rproxy-agent",
)

from twisted.application.reactors import Reactor  # noqa: E402

rproxy_epoll = Reactor(
    "rproxy-epoll",
    "rproxy.reactor",
    "epoll reactor with a lean dispatch loop (rproxy's default)",
)
