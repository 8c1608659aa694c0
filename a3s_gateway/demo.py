# -*- test-case-name: tests.test_demo -*-
"""
The newcomer demo: four small upstreams for the gateway's embedded default configuration.

Run with no ``--config``, a3s-gateway serves its packaged ``conf/gateway.hcl``, whose services
point at exactly these four loopback URLs, and starts :class:`DemoUpstreams` in the same process,
so that a first try on a fresh machine, with nothing else running, gets real answers:

- ``http://127.0.0.1:18081`` and ``http://127.0.0.1:18082``: ``echo-1`` and ``echo-2``
  (:class:`~a3s_gateway.testing.EchoResource`), which describe the request they received, so a
  newcomer can see the headers the gateway added and round-robin at work;
- ``http://127.0.0.1:18091`` and ``http://127.0.0.1:18092``: ``chat-1`` and ``chat-2``
  (:class:`~a3s_gateway.testing.StreamingChatResource`), OpenAI-style chat completion servers
  that stream their answer token by token with ``"stream": true``.

The demo is a plain ``MultiService`` and can be started on its own; tests pass port ``0`` and read
the bound ports from :attr:`DemoUpstreams.ports`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.web.resource import IResource
from zope.interface import implementer

from a3s_gateway.testing import EchoResource, StreamingChatResource, quiet_site

DEFAULT_ECHO_PORTS: Tuple[int, ...] = (18081, 18082)
DEFAULT_CHAT_PORTS: Tuple[int, ...] = (18091, 18092)


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """Listens through another endpoint and keeps the listening port, to report port 0's pick."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self.listening: Optional[IListeningPort] = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def record(listening: IListeningPort) -> IListeningPort:
            self.listening = listening
            return listening

        return self._endpoint.listen(protocolFactory).addCallback(record)


class DemoUpstreams(MultiService):
    """
    The demo upstreams: ``echo-1``, ``echo-2`` on ``echo_ports`` and ``chat-1``, ``chat-2`` on
    ``chat_ports``, all on ``interface``, one ``StreamServerEndpointService`` each (named after
    its upstream).

    They listen in ``privilegedStartService`` (or ``startService`` when started directly). A port
    that cannot be bound raises there, after closing the ones already bound, so a taken demo port
    stops startup with a clear error rather than leaving a gateway whose demo answers 502.
    ``stopService`` stops listening; responses in flight are left to finish.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        echo_ports: Tuple[int, ...] = DEFAULT_ECHO_PORTS,
        chat_ports: Tuple[int, ...] = DEFAULT_CHAT_PORTS,
        interface: str = "127.0.0.1",
        token_interval: float = 0.02,
    ) -> None:
        """
        ``reactor`` must also provide ``IReactorTime``: the chat streams and the connections'
        timeouts run on it.
        """
        super().__init__()
        self._endpoints: Dict[str, _RecordingEndpoint] = {}
        self._interface = interface
        self._listened = False
        clock = IReactorTime(reactor)
        for number, port in enumerate(echo_ports, 1):
            name = f"echo-{number}"
            self._add(reactor, clock, name, port, interface, EchoResource(name))
        for number, port in enumerate(chat_ports, 1):
            name = f"chat-{number}"
            chat = StreamingChatResource(name, clock, token_interval=token_interval)
            self._add(reactor, clock, name, port, interface, chat)

    def _add(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        name: str,
        port: int,
        interface: str,
        resource: IResource,
    ) -> None:
        endpoint = _RecordingEndpoint(TCP4ServerEndpoint(reactor, port, interface=interface))
        self._endpoints[name] = endpoint
        service = StreamServerEndpointService(endpoint, quiet_site(resource, clock))
        service.setName(name)
        service.setServiceParent(self)

    @property
    def ports(self) -> Dict[str, int]:
        """Upstream name to the port it is bound to, for the upstreams listening now."""
        bound = {}
        for name, endpoint in self._endpoints.items():
            if endpoint.listening is not None:
                address = endpoint.listening.getHost()
                if isinstance(address, IPv4Address):
                    bound[name] = address.port
        return bound

    @property
    def urls(self) -> Dict[str, str]:
        """Upstream name to ``http://<interface>:<port>``, for the upstreams listening now."""
        return {name: f"http://{self._interface}:{port}" for name, port in self.ports.items()}

    def privilegedStartService(self) -> None:
        # Not MultiService's: StreamServerEndpointService.privilegedStartService listens
        # unconditionally, so it must run once per child, here.
        Service.privilegedStartService(self)
        self._listen_all()

    def startService(self) -> None:
        if not self._listened:
            self._listen_all()
        super().startService()

    def stopService(self) -> Deferred[None]:
        for endpoint in self._endpoints.values():
            endpoint.listening = None
        self._listened = False
        return super().stopService()

    def _listen_all(self) -> None:
        # Each child listens here, once: its own startService, called by MultiService.startService,
        # skips listening when it already has.
        started: List[StreamServerEndpointService] = []
        try:
            for service in self:
                # As strports.service does: a bind error raises from privilegedStartService
                # instead of being logged while startup carries on. Twisted resets the flag
                # after each start, so it is set before every one.
                service._raiseSynchronously = True
                service.privilegedStartService()
                started.append(service)
        except BaseException:
            for service in started:
                service.stopService()
            for endpoint in self._endpoints.values():
                endpoint.listening = None
            raise
        self._listened = True
