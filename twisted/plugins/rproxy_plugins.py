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
