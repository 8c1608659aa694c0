"""
The twistd plugin ``a3s-gateway``: ``twistd -n a3s-gateway [--config PATH] [--listen ADDR]``.

Only a pointer to L{a3s_gateway.tap}, imported lazily so that building the plugin cache stays cheap
and never installs a reactor.
"""

from twisted.application.service import ServiceMaker

a3s_gateway = ServiceMaker(
    "a3s-gateway",
    "a3s_gateway.tap",
    "An API gateway for AI-era traffic (A3S Gateway compatible)",
    "a3s-gateway",
)
