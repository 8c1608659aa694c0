"""
The twistd plugin ``a3s-gateway``: ``twistd -n a3s-gateway [--config PATH] [--listen ADDR]``, and
the reactor ``a3s`` (``twistd --reactor=a3s ...``, ``trial --reactor=a3s ...``).

Only pointers, to L{a3s_gateway.tap} and L{a3s_gateway.reactor}, imported lazily so that building
the plugin cache stays cheap and never installs a reactor.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

a3s_gateway = ServiceMaker(
    "a3s-gateway",
    "a3s_gateway.tap",
    "An API gateway for AI-era traffic (A3S Gateway compatible)",
    "a3s-gateway",
)

a3s_reactor = Reactor(
    "a3s",
    "a3s_gateway.reactor",
    "epoll reactor without the legacy log context per event (a3s-gateway's own)",
)
