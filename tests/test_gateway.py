"""
Tests for L{a3s_gateway.gateway}'s listening endpoints (the service tree itself is exercised
end to end in C{tests.test_gateway_e2e}).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config.schema import EntrypointConfig
from a3s_gateway.gateway import server_endpoint
from a3s_gateway.transport import TCPServerEndpoint


class ServerEndpointTests(SynchronousTestCase):
    def test_default(self) -> None:
        """
        An entrypoint listens on its address's interface and port, without C{SO_REUSEPORT}.
        """
        endpoint = server_endpoint(reactor, EntrypointConfig("web", "127.0.0.1:8080"))
        self.assertEqual(endpoint, TCPServerEndpoint(reactor, 8080, "127.0.0.1", backlog=1024))

    def test_all_interfaces(self) -> None:
        """An address without a host (``:8080``) listens on every IPv4 interface."""
        endpoint = server_endpoint(reactor, EntrypointConfig("web", ":8080"))
        self.assertEqual(endpoint, TCPServerEndpoint(reactor, 8080, "", backlog=1024))

    def test_reuse_port(self) -> None:
        """
        With C{reuse_port} the endpoint sets C{SO_REUSEPORT}, on the entrypoint's interface.
        """
        endpoint = server_endpoint(reactor, EntrypointConfig("web", "[::1]:8080"), True)
        self.assertEqual(
            endpoint, TCPServerEndpoint(reactor, 8080, "::1", backlog=1024, reuse_port=True)
        )
