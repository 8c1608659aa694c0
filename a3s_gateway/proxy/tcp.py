# -*- test-case-name: tests.test_tcp -*-
"""
TCP entrypoints (spec 1.13.6): a byte relay between each accepted client and one backend.

For the gateway, which listens on a ``protocol = "tcp"`` entrypoint's address with a
:class:`TcpEntrypointFactory`, and on shutdown waits for :meth:`TcpEntrypointFactory.drain` up to
its deadline, then calls :meth:`TcpEntrypointFactory.abort_all`.

Per connection, in the reference's order: the ``tcp_allowed_ips`` and ``max_connections``
filters, then the HTTP route table with a synthetic request (method ``TCP``, path ``/``, no host,
no headers), then the service's plain strategy. Where the reference differs, we do better: the
relay keeps backpressure in both directions and passes a half-close on (a client that shuts its
write side still gets the response), and the backend's connection count is exact.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Protocol, Set, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import UserError
from twisted.internet.interfaces import IAddress, IConnector, IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, ServerFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from a3s_gateway.addresses import Networks
from a3s_gateway.config import check_ip_or_cidr
from a3s_gateway.config.schema import EntrypointConfig
from a3s_gateway.router.rule import RequestFacts
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.registry import Service
from a3s_gateway.transport import connect_tcp

_log = Logger()


def parse_allowed_ips(entries: Iterable[str]) -> Networks:
    """
    Parse ``tcp_allowed_ips`` (IPs and CIDRs, v4 and v6) into networks.

    @raise ValueError: ``Invalid CIDR '<x>': ...`` or ``Invalid IP address '<x>': ...``.
    """
    entries = list(entries)
    for entry in entries:
        check_ip_or_cidr(entry)
    return Networks.parse(entries)


class _Stream(Protocol):
    """What the relay needs of a connected TCP transport (``tcp.Server``/``tcp.Client``)."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def loseWriteConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


@implementer(IHalfCloseableProtocol)
class _Side(TwistedProtocol):
    """
    One socket of a session: the client's or the upstream's. Bytes read go to the peer's socket;
    an end of stream is passed on to the peer as a half-close.

    @ivar peer: The other socket of the session (set by the session).
    @ivar stream: The connected transport, once connected.
    @ivar open: Connected and not yet lost.
    @ivar read_done: The far end of this socket sent its end of stream.
    """

    peer: _Side

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.stream: Optional[_Stream] = None
        self.open = False
        self.read_done = False

    def connectionMade(self) -> None:
        self.stream = cast(_Stream, self.transport)
        self.open = True
        self.session.side_connected(self)

    def dataReceived(self, data: bytes) -> None:
        # Reading starts only once both sockets are connected, so the peer's stream exists.
        cast(_Stream, self.peer.stream).write(data)

    def readConnectionLost(self) -> None:
        """
        The far end shut its write side: shut the peer's write side once what was relayed is
        flushed, and keep the other direction flowing. When both directions are done, close.
        """
        self.read_done = True
        peer = self.peer
        # A peer already gone means this socket is closing too (a read can still be delivered
        # in the poll round that closed it).
        if peer.read_done or not peer.open:
            self.session.close()
            return
        peer_stream = cast(_Stream, peer.stream)
        # This socket will produce nothing more, and a transport whose producer is paused
        # waits for it instead of finishing its write-side shutdown.
        peer_stream.unregisterProducer()
        peer_stream.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        """
        Our write side is shut (we passed the peer's end of stream on): nothing more to do; the
        session closes when this socket's own end of stream arrives.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self.session.side_lost(self)


class _UpstreamConnector(ClientFactory):
    """Connects one session's upstream socket and reports a failure to connect."""

    noisy = False

    def __init__(self, session: _Session) -> None:
        self.session = session

    def buildProtocol(self, addr: Optional[IAddress]) -> _Side:
        return self.session.upstream

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.session.upstream_failed(reason)


class _Session:
    """
    One client connection and its upstream connection.

    The client is read only once the upstream is connected; from then on each socket is the
    other's streaming producer, so a slow reader on either side pauses the other (nothing is
    buffered beyond the transports' own write buffers). The backend's connection count is held
    from the client's arrival until both sockets are gone.

    @ivar pending: The client socket and the upstream (attempt, then socket) still alive; the
        session ends when it reaches 0.
    """

    def __init__(self, factory: TcpEntrypointFactory, backend: Backend, timeout: float) -> None:
        self.factory = factory
        self.backend = backend
        self.timeout = timeout
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.connector: Optional[IConnector] = None
        self.pending = 0

    def side_connected(self, side: _Side) -> None:
        if side is self.client:
            self._start()
        else:
            self._link()

    def _start(self) -> None:
        self.pending = 2
        self.backend.active_connections += 1
        self.factory._session_started(self)
        cast(_Stream, self.client.stream).pauseProducing()
        backend = self.backend
        self.connector = connect_tcp(
            self.factory.reactor,
            backend.host,
            backend.port,
            _UpstreamConnector(self),
            # A service's connect timeout of 0 means none.
            timeout=self.timeout or None,
        )

    def _link(self) -> None:
        self.connector = None
        client = cast(_Stream, self.client.stream)
        upstream = cast(_Stream, self.upstream.stream)
        upstream.registerProducer(client, True)
        client.registerProducer(upstream, True)
        client.resumeProducing()

    def upstream_failed(self, reason: Failure) -> None:
        self.connector = None
        if not reason.check(UserError):
            # UserError: we stopped connecting because the client went away.
            _log.warn(
                "TCP entrypoint {entrypoint}: cannot connect to backend {url}: {error}",
                entrypoint=self.factory.name,
                url=self.backend.url,
                error=reason.getErrorMessage(),
            )
        if self.client.open:
            cast(_Stream, self.client.stream).loseConnection()
        self._release()

    def side_lost(self, side: _Side) -> None:
        if side is self.client and self.connector is not None:
            # Calls upstream_failed with a UserError.
            self.connector.stopConnecting()
        other = side.peer
        if other.open:
            # Close the other once its buffered bytes are written; it must not wait on the lost
            # transport as its (possibly paused) producer.
            stream = cast(_Stream, other.stream)
            stream.unregisterProducer()
            stream.loseConnection()
        self._release()

    def close(self) -> None:
        """Close both sockets once their buffered bytes are written."""
        for side in (self.client, self.upstream):
            if side.open:
                stream = cast(_Stream, side.stream)
                stream.unregisterProducer()
                stream.loseConnection()

    def abort(self) -> None:
        """Drop both sockets now, buffered bytes included."""
        for side in (self.client, self.upstream):
            if side.open:
                cast(_Stream, side.stream).abortConnection()

    def _release(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.backend.active_connections -= 1
            self.factory._session_ended(self)


class TcpEntrypointFactory(ServerFactory):
    """
    The protocol factory of one TCP entrypoint: listen on the entrypoint's address with it.

    A refused connection (filtered, over the limit, no route, no service, no healthy backend)
    is closed at once without a byte. An upstream that cannot be connected to (within the
    service's ``timeouts.connect``, 5 s by default) closes the client's connection.

    @ivar name: The entrypoint's name (what routers list in ``entrypoints``).
    @ivar config: Its configuration (``max_connections``, ``tcp_allowed_ips``).
    @ivar routes: The gateway's HTTP route table.
    @ivar services: The services by name.
    @ivar reactor: Connects to backends (``IReactorTCP``).
    """

    noisy = False

    def __init__(
        self,
        name: str,
        config: EntrypointConfig,
        routes: RouteTable,
        services: Mapping[str, Service],
        reactor: Any,
    ) -> None:
        """
        @raise ValueError: an entry of ``tcp_allowed_ips`` is neither an IP nor a CIDR.
        """
        self.name = name
        self.config = config
        self.routes = routes
        self.services = services
        self.reactor = reactor
        self._allowed = parse_allowed_ips(config.tcp_allowed_ips)
        self._sessions: Set[_Session] = set()
        self._drained: List[defer.Deferred[None]] = []

    @property
    def active_sessions(self) -> int:
        """The connections admitted and not yet fully closed."""
        return len(self._sessions)

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[TwistedProtocol]:
        """
        Admit a connection, or return None, which makes the listening port close it at once.
        """
        peer = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else ""
        facts = RequestFacts(
            method=b"TCP", host=None, path=b"/", query=b"", headers=Headers(), client_ip=peer
        )
        if self._allowed:
            if not self._allowed.contains(facts.client_address()):
                _log.debug(
                    "TCP entrypoint {entrypoint}: {peer} is not allowed",
                    entrypoint=self.name,
                    peer=peer,
                )
                return None
        limit = self.config.max_connections
        if limit is not None and len(self._sessions) >= limit:
            _log.debug(
                "TCP entrypoint {entrypoint}: max_connections ({limit}) reached",
                entrypoint=self.name,
                limit=limit,
            )
            return None
        route = self.routes.match(self.name, facts)
        if route is None:
            _log.warn("TCP entrypoint {entrypoint}: no route matched", entrypoint=self.name)
            return None
        service = self.services.get(route.service)
        backend = service.balancer.next_backend() if service is not None else None
        if service is None or backend is None:
            _log.warn(
                "TCP entrypoint {entrypoint}: no healthy backend for service {service}",
                entrypoint=self.name,
                service=route.service,
            )
            return None
        return _Session(self, backend, service.timeouts.connect).client

    def drain(self) -> defer.Deferred[None]:
        """
        Fire once every session has ended by itself (the relay cannot end them gracefully).
        Stop listening first, or new sessions keep it waiting.
        """
        if not self._sessions:
            return defer.succeed(None)
        drained: defer.Deferred[None] = defer.Deferred()
        self._drained.append(drained)
        return drained

    def abort_all(self) -> None:
        """Drop every session now, both sockets (the drain deadline passed)."""
        for session in list(self._sessions):
            session.abort()

    def _session_started(self, session: _Session) -> None:
        self._sessions.add(session)

    def _session_ended(self, session: _Session) -> None:
        self._sessions.discard(session)
        if not self._sessions and self._drained:
            waiting, self._drained = self._drained, []
            for drained in waiting:
                drained.callback(None)
