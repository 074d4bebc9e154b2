"""
twistd plugins for rproxy; kept tiny because twistd imports every plugin
just to list them.
"""

from rproxy.scripts import MAKERS

# the same service makers as the rproxy and rproxy-agent commands
rproxy = MAKERS["rproxy"]
rproxy_agent = MAKERS["rproxy-agent"]

from twisted.application.reactors import Reactor  # noqa: E402

rproxy_epoll = Reactor(
    "rproxy-epoll",
    "rproxy.reactor",
    "epoll reactor with a lean dispatch loop (rproxy's default)",
)
