"""
The benchmark's twisted.web hello-world: a fixed body from a leaf resource, with nothing else.

It is the ceiling of any twisted.web resource on this interpreter (the gateway is one), and the
benchmark's backend when nginx is not installed. Access logging is off, as in the gateway without
an ``access_log`` block, so that the rows compare the work of serving, not of logging.

usage: hello.py PORT   (listens on 127.0.0.1)
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.task import react
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

BODY = b"hello from backend\n"


class Hello(Resource):
    """Answers every GET with :data:`BODY` as text/plain."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return BODY


class QuietSite(Site):
    """A Site without access log lines."""

    def log(self, request: HTTPRequest) -> None:
        """Access logging is off: see the module docstring."""


def serve(reactor: IReactorTCP, port: int) -> Deferred[None]:
    """Listen on 127.0.0.1:``port``, then serve until the process is stopped."""
    endpoint = TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1")
    forever: Deferred[None] = Deferred()
    return endpoint.listen(QuietSite(Hello())).addCallback(lambda _: forever)


if __name__ == "__main__":
    react(serve, [int(sys.argv[1])])
