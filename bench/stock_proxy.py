"""
Twisted's stock ``twisted.web.proxy.ReverseProxyResource`` in front of the benchmark's backend: the
proxy a Twisted user gets without a gateway: a fresh upstream connection for every request (an
HTTP/1.0 request with ``Connection: close``), no pooling, no backpressure.

Access logging is off, as in ``hello.py``.

usage: stock_proxy.py PORT BACKEND_PORT   (both on 127.0.0.1)
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.task import react
from twisted.web.http import Request as HTTPRequest
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class QuietSite(Site):
    """A Site without access log lines or traceback pages."""

    displayTracebacks = False

    def log(self, request: HTTPRequest) -> None:
        """Access logging is off: see the module docstring."""


def serve(reactor: IReactorTCP, port: int, backend_port: int) -> Deferred[None]:
    """Listen on 127.0.0.1:``port``, then proxy to ``backend_port`` until stopped."""
    site = QuietSite(ReverseProxyResource("127.0.0.1", backend_port, b""))
    endpoint = TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1")
    forever: Deferred[None] = Deferred()
    return endpoint.listen(site).addCallback(lambda _: forever)


if __name__ == "__main__":
    react(serve, [int(sys.argv[1]), int(sys.argv[2])])
