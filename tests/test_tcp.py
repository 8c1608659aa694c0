"""
Tests for L{a3s_gateway.proxy.tcp}: admission (allowed IPs, connection limit, routing, backend
choice) and the relay, over real loopback sockets and, for the connect phase, over Twisted's
L{MemoryReactorClock} and L{StringTransport}.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Type

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, TimeoutError, UserError
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import wire
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from a3s_gateway.config.schema import (
    EntrypointConfig,
    LoadBalancerConfig,
    RouterConfig,
    ServerConfig,
    ServiceConfig,
    TimeoutsConfig,
)
from a3s_gateway.proxy.tcp import TcpEntrypointFactory, parse_allowed_ips
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.registry import Service

ENTRYPOINT = "tcp-in"


def _entrypoint(
    max_connections: Optional[int] = None, allowed: Tuple[str, ...] = ()
) -> EntrypointConfig:
    return EntrypointConfig(
        name=ENTRYPOINT,
        address="127.0.0.1:0",
        protocol="tcp",
        max_connections=max_connections,
        tcp_allowed_ips=allowed,
    )


def _routes(rule: str = "PathPrefix(`/`)", entrypoints: Tuple[str, ...] = (ENTRYPOINT,)) -> Any:
    return RouteTable.from_config(
        {"relay": RouterConfig(name="relay", rule=rule, service="svc", entrypoints=entrypoints)}
    )


def _service(url: str, clock: Any, connect: float = 5.0) -> Service:
    config = ServiceConfig(
        name="svc",
        load_balancer=LoadBalancerConfig(servers=(ServerConfig(url=url),)),
        timeouts=TimeoutsConfig(connect=connect),
    )
    return Service.from_config(config, clock)


class _Tracked(Protocol):
    """An upstream connection its factory keeps track of."""

    factory: _Upstream

    def connectionMade(self) -> None:
        self.factory.connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost(self)


class _Echo(_Tracked, wire.Echo):
    """Echoes everything back."""


@implementer(IHalfCloseableProtocol)
class _ReplyOnEof(_Tracked):
    """Reads until the client's end of stream, then answers with the byte count and closes."""

    def connectionMade(self) -> None:
        self.count = 0
        _Tracked.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.write(b"got %d" % (self.count,))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _GreetThenListen(_Tracked):
    """Sends a greeting and shuts its write side, then collects what comes until the end."""

    def connectionMade(self) -> None:
        self.received = b""
        _Tracked.connectionMade(self)
        transport: Any = self.transport
        transport.write(b"hello")
        transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class _Stall(_Tracked):
    """Reads nothing until told to; counts and checks what it then reads."""

    def connectionMade(self) -> None:
        self.received = bytearray()
        _Tracked.connectionMade(self)
        transport: Any = self.transport
        transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Upstream(Factory):
    """A factory whose connections can be waited for (made, and all gone)."""

    def __init__(self, protocol: Type[_Tracked]) -> None:
        self.protocol = protocol
        self.live: List[_Tracked] = []
        self.made: List[_Tracked] = []
        self._first: List[defer.Deferred[_Tracked]] = []
        self._idle: List[defer.Deferred[None]] = []

    def connected(self, proto: _Tracked) -> None:
        self.live.append(proto)
        self.made.append(proto)
        waiting, self._first = self._first, []
        for d in waiting:
            d.callback(proto)

    def lost(self, proto: _Tracked) -> None:
        self.live.remove(proto)
        if not self.live:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def first_connection(self) -> defer.Deferred[_Tracked]:
        if self.made:
            return defer.succeed(self.made[0])
        d: defer.Deferred[_Tracked] = defer.Deferred()
        self._first.append(d)
        return d

    def close_all(self) -> defer.Deferred[None]:
        """Drop the connections still open (a test that failed half-way); wait until gone."""
        for proto in self.live:
            transport: Any = proto.transport
            transport.abortConnection()
        return self.all_closed()

    def all_closed(self) -> defer.Deferred[None]:
        if not self.live:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


@implementer(IHalfCloseableProtocol)
class _Client(Protocol):
    """
    A test client: collects what it receives, tells when it has at least N bytes, when the
    gateway shut its write side (C{eof}) and when the connection is gone (C{lost}). It closes
    the connection once both directions are shut.
    """

    def __init__(self) -> None:
        self.write_closed = False
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.eof: defer.Deferred[None] = defer.Deferred()
        self._waiting: List[Tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(bytes(self.received))

    def wait_for(self, size: int) -> defer.Deferred[bytes]:
        if len(self.received) >= size:
            return defer.succeed(bytes(self.received))
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((size, d))
        return d

    def readConnectionLost(self) -> None:
        self.eof.callback(None)
        if self.write_closed:
            assert self.transport is not None
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.eof.called:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for _, d in self._waiting:
            d.errback(reason)
        self._waiting = []
        self.lost.callback(None)


class RelayTests(TestCase):
    """The entrypoint over real loopback sockets."""

    def listen_upstream(self, protocol: Type[_Tracked] = _Echo) -> _Upstream:
        upstream = _Upstream(protocol)
        port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # Cleanups run last-in first-out: this one, before the port stops.
        self.addCleanup(upstream.close_all)
        self.upstream_port = port.getHost().port
        return upstream

    def gateway(
        self,
        config: Optional[EntrypointConfig] = None,
        routes: Optional[RouteTable] = None,
        url: Optional[str] = None,
    ) -> TcpEntrypointFactory:
        if url is None:
            url = f"tcp://127.0.0.1:{self.upstream_port}"
        self.service = _service(url, reactor)
        self.backend = self.service.balancer.backends[0]
        factory = TcpEntrypointFactory(
            ENTRYPOINT,
            config if config is not None else _entrypoint(),
            routes if routes is not None else _routes(),
            {"svc": self.service},
            reactor,
        )
        port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.abort_gateway, factory)
        self.gateway_port = port.getHost().port
        return factory

    def abort_gateway(self, factory: TcpEntrypointFactory) -> defer.Deferred[None]:
        """Drop the sessions a test that failed half-way left open; wait until they are gone."""
        factory.abort_all()
        return factory.drain()

    def connect(self) -> defer.Deferred[_Client]:
        client = _Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway_port)
        return connectProtocol(endpoint, client)

    def close(self, client: _Client) -> defer.Deferred[None]:
        assert client.transport is not None
        client.transport.loseConnection()
        return client.lost

    @defer.inlineCallbacks
    def test_relays_both_ways(self) -> Any:
        """
        Bytes from the client reach the backend and the backend's reach the client, over
        several exchanges on one connection; the session and the backend's connection count
        are held while it lasts and released after it.
        """
        self.listen_upstream()
        factory = self.gateway()
        client = yield self.connect()
        client.transport.write(b"hello")
        received = yield client.wait_for(5)
        self.assertEqual(received, b"hello")
        client.transport.write(b" world")
        received = yield client.wait_for(11)
        self.assertEqual(received, b"hello world")
        self.assertEqual(factory.active_sessions, 1)
        self.assertEqual(self.backend.active_connections, 1)
        yield self.close(client)
        yield factory.drain()
        self.assertEqual(factory.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def test_large_transfer_intact(self) -> Any:
        """
        8 MiB of random bytes written at once come back through the relay complete and in
        order.
        """
        self.listen_upstream()
        factory = self.gateway()
        client = yield self.connect()
        payload = os.urandom(8 * 1024 * 1024)
        client.transport.write(payload)
        received = yield client.wait_for(len(payload))
        self.assertEqual(len(received), len(payload))
        self.assertTrue(received == payload)
        yield self.close(client)
        yield factory.drain()
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def test_backpressure(self) -> Any:
        """
        When the backend stops reading, the gateway stops reading the client (the upstream
        socket pauses it as its producer) rather than buffering the client's bytes; once the
        backend reads again, every byte arrives intact.
        """
        upstream = self.listen_upstream(_Stall)
        factory = self.gateway()
        client = yield self.connect()
        payload = os.urandom(8 * 1024 * 1024)
        client.transport.write(payload)
        stall = yield upstream.first_connection()
        (session,) = factory._sessions
        upstream_transport: Any = session.upstream.transport
        for _ in range(1000):
            if upstream_transport is not None and upstream_transport.producerPaused:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
            upstream_transport = session.upstream.transport
        self.assertTrue(upstream_transport.producerPaused)
        self.assertLess(len(stall.received), len(payload))
        stall.transport.resumeProducing()
        for _ in range(1000):
            if len(stall.received) >= len(payload):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(bytes(stall.received) == payload)
        yield self.close(client)
        yield factory.drain()

    @defer.inlineCallbacks
    def test_client_half_close_gets_response(self) -> Any:
        """
        A client that shuts its write side after its request still receives the response
        the backend sends after seeing the end of the request (the reference loses it).
        """
        self.listen_upstream(_ReplyOnEof)
        factory = self.gateway()
        client = yield self.connect()
        client.transport.write(b"x" * 1000)
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(bytes(client.received), b"got 1000")
        yield factory.drain()
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def test_backend_half_close_keeps_client_direction(self) -> Any:
        """
        A backend that shuts its write side shows the client an end of stream, and the client
        can still send to the backend until it ends its side too.
        """
        upstream = self.listen_upstream(_GreetThenListen)
        factory = self.gateway()
        client = yield self.connect()
        yield client.eof
        self.assertEqual(bytes(client.received), b"hello")
        client.transport.write(b"reply")
        client.transport.loseWriteConnection()
        yield client.lost
        yield factory.drain()
        yield upstream.all_closed()
        (backend_side,) = upstream.made
        self.assertEqual(backend_side.received, b"reply")
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def assert_refused(self, factory: TcpEntrypointFactory) -> Any:
        sessions = factory.active_sessions
        client = yield self.connect()
        yield client.eof
        self.assertEqual(bytes(client.received), b"")
        yield self.close(client)
        self.assertEqual(factory.active_sessions, sessions)

    @defer.inlineCallbacks
    def test_allowed_ips_deny(self) -> Any:
        """
        A peer outside a non-empty C{tcp_allowed_ips} is closed without a byte and without a
        connection to the backend.
        """
        upstream = self.listen_upstream()
        factory = self.gateway(_entrypoint(allowed=("10.0.0.0/8", "::1")))
        yield self.assert_refused(factory)
        self.assertEqual(upstream.made, [])
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def test_allowed_ips_allow(self) -> Any:
        """
        A peer inside one of the entries (a CIDR here) is relayed.
        """
        self.listen_upstream()
        factory = self.gateway(_entrypoint(allowed=("192.0.2.1", "127.0.0.0/8")))
        client = yield self.connect()
        client.transport.write(b"ping")
        received = yield client.wait_for(4)
        self.assertEqual(received, b"ping")
        yield self.close(client)
        yield factory.drain()

    @defer.inlineCallbacks
    def test_max_connections(self) -> Any:
        """
        With C{max_connections = 1}, a second connection while the first is open is closed
        silently; once the first has closed, a new one is admitted again.
        """
        upstream = self.listen_upstream()
        factory = self.gateway(_entrypoint(max_connections=1))
        first = yield self.connect()
        first.transport.write(b"one")
        yield first.wait_for(3)
        yield self.assert_refused(factory)
        self.assertEqual(len(upstream.made), 1)
        yield self.close(first)
        yield factory.drain()
        third = yield self.connect()
        third.transport.write(b"three")
        received = yield third.wait_for(5)
        self.assertEqual(received, b"three")
        yield self.close(third)
        yield factory.drain()

    @defer.inlineCallbacks
    def test_no_route_closes(self) -> Any:
        """
        A connection on an entrypoint no router serves is closed without a byte.
        """
        upstream = self.listen_upstream()
        factory = self.gateway(routes=_routes(entrypoints=("other",)))
        yield self.assert_refused(factory)
        self.assertEqual(upstream.made, [])

    @defer.inlineCallbacks
    def test_unhealthy_backend_closes(self) -> Any:
        """
        A connection whose service has no healthy backend is closed without a byte.
        """
        upstream = self.listen_upstream()
        factory = self.gateway()
        self.backend.active_healthy = False
        yield self.assert_refused(factory)
        self.assertEqual(upstream.made, [])

    @defer.inlineCallbacks
    def test_dead_backend_closes(self) -> Any:
        """
        When the backend refuses the connection, the client's connection is closed and the
        backend's connection count returns to 0.
        """
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        dead = port.getHost().port
        yield port.stopListening()
        factory = self.gateway(url=f"127.0.0.1:{dead}")
        yield self.assert_refused(factory)
        yield factory.drain()
        self.assertEqual(self.backend.active_connections, 0)

    @defer.inlineCallbacks
    def test_abort_all(self) -> Any:
        """
        L{TcpEntrypointFactory.abort_all} drops every session's two sockets; the counts
        return to 0.
        """
        self.listen_upstream()
        factory = self.gateway()
        client = yield self.connect()
        client.transport.write(b"hi")
        yield client.wait_for(2)
        drained = factory.drain()
        self.assertNoResult(drained)
        factory.abort_all()
        yield client.lost
        yield drained
        self.assertEqual(factory.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)


class ConnectPhaseTests(SynchronousTestCase):
    """The connect phase and admission, over a memory reactor and string transports."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def factory(
        self,
        config: Optional[EntrypointConfig] = None,
        routes: Optional[RouteTable] = None,
        url: str = "tcp://backend.example:7000",
        connect: float = 5.0,
    ) -> TcpEntrypointFactory:
        self.service = _service(url, self.reactor, connect)
        self.backend = self.service.balancer.backends[0]
        services: Dict[str, Service] = {"svc": self.service}
        return TcpEntrypointFactory(
            ENTRYPOINT,
            config if config is not None else _entrypoint(),
            routes if routes is not None else _routes(),
            services,
            self.reactor,
        )

    def accept(
        self, factory: TcpEntrypointFactory, peer: str = "127.0.0.1"
    ) -> Tuple[Protocol, StringTransport]:
        address = IPv6Address("TCP", peer, 4321) if ":" in peer else IPv4Address("TCP", peer, 4321)
        proto = factory.buildProtocol(address)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_client_paused_until_upstream_connected(self) -> None:
        """
        The client is not read until the upstream is connected (nothing is buffered); the
        upstream is the backend's host and port with the service's 5 s connect timeout; once
        connected, each transport is the other's streaming producer and bytes flow.
        """
        factory = self.factory()
        proto, client = self.accept(factory)
        self.assertEqual(client.producerState, "paused")
        ((host, port, connector_factory, timeout, _),) = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("backend.example", 7000, 5.0))
        self.assertEqual(self.backend.active_connections, 1)
        self.assertEqual(factory.active_sessions, 1)
        upstream_proto = connector_factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 7000))
        upstream = StringTransport()
        upstream_proto.makeConnection(upstream)
        self.assertEqual(client.producerState, "producing")
        self.assertIs(client.producer, upstream)
        self.assertIs(upstream.producer, client)
        self.assertTrue(client.streaming and upstream.streaming)
        proto.dataReceived(b"up")
        upstream_proto.dataReceived(b"down")
        self.assertEqual(upstream.value(), b"up")
        self.assertEqual(client.value(), b"down")

    def test_connect_timeout_from_service(self) -> None:
        """
        The connect timeout is the service's C{timeouts.connect}; 0 means none.
        """
        self.accept(self.factory(connect=2.5))
        self.accept(self.factory(connect=0))
        self.assertEqual([c[3] for c in self.reactor.tcpClients], [2.5, None])

    def test_connect_failure_closes_client(self) -> None:
        """
        A failed connect (a timeout here) closes the client's connection; the session ends
        when the client's socket is gone.
        """
        factory = self.factory()
        proto, client = self.accept(factory)
        connector_factory = self.reactor.tcpClients[0][2]
        connector_factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(TimeoutError())
        )
        self.assertTrue(client.disconnecting)
        self.assertEqual(factory.active_sessions, 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)

    def test_client_gone_while_connecting(self) -> None:
        """
        A client lost while the upstream is connecting stops the attempt (which then reports
        a UserError, as Twisted's connectors do) and the session ends.
        """
        factory = self.factory()
        proto, _ = self.accept(factory)
        proto.connectionLost(Failure(ConnectionDone()))
        connector = self.reactor.connectors[0]
        self.assertTrue(connector.stoppedConnecting)
        self.reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(UserError()))
        self.assertEqual(factory.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)

    def test_refusals_do_not_count(self) -> None:
        """
        With C{max_connections = 1}, a refused peer does not take the slot; an admitted
        connection does, and the next is refused.
        """
        factory = self.factory(_entrypoint(max_connections=1, allowed=("127.0.0.1",)))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)))
        self.accept(factory)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)))
        self.assertEqual(factory.active_sessions, 1)

    def test_max_connections_zero(self) -> None:
        """
        C{max_connections = 0} admits nothing.
        """
        factory = self.factory(_entrypoint(max_connections=0))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))

    def test_ipv4_mapped_peer_compared_as_ipv4(self) -> None:
        """
        A peer address C{::ffff:a.b.c.d} (a dual-stack listener) is checked as C{a.b.c.d}.
        """
        factory = self.factory(_entrypoint(allowed=("127.0.0.0/8",)))
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "::ffff:10.0.0.1", 1)))

    def test_ipv6_entries(self) -> None:
        """
        IPv6 CIDRs and addresses match IPv6 peers and not IPv4 ones; a C{::ffff:0:0/96}-style
        entry matches the IPv4 peers it stands for.
        """
        factory = self.factory(_entrypoint(allowed=("2001:db8::/32", "::ffff:10.0.0.0/104")))
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", "2001:db8::5", 1)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "2001:db9::5", 1)))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "10.2.3.4", 1)))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))

    def test_invalid_allowed_ips(self) -> None:
        """
        An entry that is neither an IP nor a CIDR fails with the reference's messages.
        """
        error = self.assertRaises(ValueError, parse_allowed_ips, ["10.0.0.0/33"])
        self.assertEqual(str(error), "Invalid CIDR '10.0.0.0/33': invalid IP address syntax")
        error = self.assertRaises(ValueError, self.factory, _entrypoint(allowed=("nope",)))
        self.assertEqual(str(error), "Invalid IP address 'nope': invalid IP address syntax")

    def test_synthetic_request(self) -> None:
        """
        Routing sees method C{TCP}, path C{/}, no host, and the peer as the client address:
        C{Method(`TCP`)} and C{ClientIP()} rules match, a C{Host()} rule never does.
        """
        for rule, peer, admitted in [
            ("Method(`TCP`)", "127.0.0.1", True),
            ("Path(`/`)", "127.0.0.1", True),
            ("Host(`example.com`)", "127.0.0.1", False),
            ("ClientIP(`192.0.2.0/24`)", "192.0.2.7", True),
            ("ClientIP(`192.0.2.0/24`)", "127.0.0.1", False),
        ]:
            factory = self.factory(routes=_routes(rule))
            proto = factory.buildProtocol(IPv4Address("TCP", peer, 1))
            self.assertEqual(proto is not None, admitted, rule)

    def test_router_without_entrypoints_serves_tcp(self) -> None:
        """
        A router with no C{entrypoints} list also serves TCP entrypoints, as in the reference.
        """
        factory = self.factory(routes=_routes(entrypoints=()))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))

    def test_drain(self) -> None:
        """
        L{TcpEntrypointFactory.drain} fires at once with no session, else when the last ends.
        """
        factory = self.factory()
        self.successResultOf(factory.drain())
        proto, _ = self.accept(factory)
        drained = factory.drain()
        self.assertNoResult(drained)
        proto.connectionLost(Failure(ConnectionDone()))
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(UserError())
        )
        self.successResultOf(drained)
