"""
Tests for L{a3s_gateway.transport}: writes sent at the end of the reactor turn, over real
loopback sockets, with Twisted's wait-until-writable path (and its backpressure) kept for what
the kernel does not take at once, for closing and for failures; the C{SO_REUSEPORT} port; and
the fallback to the reactor's own transports for reactors without file descriptors.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from a3s_gateway.reactor import GatewayReactor
from a3s_gateway.testing import unused_tcp_port
from a3s_gateway.transport import (
    Client,
    Server,
    TCPServerEndpoint,
    client_connects,
    connect_tcp,
    flusher_for,
)

_DONE = Failure(ConnectionDone())


class _Peer(Protocol):
    """Records what arrives and the loss of the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.made: defer.Deferred[_Peer] = defer.Deferred()
        self.lost: defer.Deferred[BaseException] = defer.Deferred()
        self.waiting: Optional[tuple[int, defer.Deferred[bytes]]] = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            done = self.waiting[1]
            self.waiting = None
            done.callback(self.received)

    def received_at_least(self, size: int) -> defer.Deferred[bytes]:
        if len(self.received) >= size:
            return defer.succeed(self.received)
        done: defer.Deferred[bytes] = defer.Deferred()
        self.waiting = (size, done)
        return done

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self.lost.called:
            self.lost.callback(reason.value)


@implementer(IHalfCloseableProtocol)
class _HalfClosingPeer(_Peer):
    """A peer that is told of the end of the other side's stream, the connection still open."""

    def __init__(self) -> None:
        super().__init__()
        self.eof: defer.Deferred[None] = defer.Deferred()

    def readConnectionLost(self) -> None:
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        pass


class _PeerFactory(ClientFactory):
    def __init__(self, half_closing: bool = False) -> None:
        self.peers: List[_Peer] = []
        self.half_closing = half_closing

    def buildProtocol(self, addr: Any) -> _Peer:
        peer = _HalfClosingPeer() if self.half_closing else _Peer()
        peer.factory = self
        self.peers.append(peer)
        return peer


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.events: List[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class _FailingPullProducer:
    """A pull producer whose second C{resumeProducing} (after a drained buffer) raises."""

    calls = 0

    def resumeProducing(self) -> None:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("producer bug")

    def stopProducing(self) -> None:
        pass


class TurnFlushTests(TestCase):
    # A write that is never sent shows as a hang: fail it in seconds, not trial's two minutes.
    timeout = 15

    @defer.inlineCallbacks
    def pair(self, half_closing: bool = False) -> Any:
        """A L{Server} and a L{Client} connected over loopback: (server peer, client peer)."""
        servers = _PeerFactory(half_closing)
        port = yield TCPServerEndpoint(reactor, 0, "127.0.0.1").listen(servers)
        self.addCleanup(port.stopListening)
        clients = _PeerFactory()
        connector = connect_tcp(reactor, "127.0.0.1", port.getHost().port, clients)
        self.addCleanup(connector.disconnect)
        while not clients.peers or not servers.peers:
            yield deferLater(reactor, 0.01, lambda: None)
        client = clients.peers[0]
        server = servers.peers[0]
        yield client.made
        yield server.made
        self.assertIsInstance(server.transport, Server)
        self.assertIsInstance(client.transport, Client)
        return server, client

    @defer.inlineCallbacks
    def test_turn_writes_sent_without_waiting_for_writability(self) -> None:
        """
        Writes made in one turn are sent at its end, in order, both ways, without the
        transport ever registering with the reactor for writability.
        """
        server, client = yield self.pair()
        client.transport.write(b"GET ")
        client.transport.writeSequence([b"/ ", b"HTTP/1.1"])
        server.transport.write(b"hello")
        self.assertNotIn(client.transport, reactor.getWriters())
        self.assertEqual(server.received, b"")
        got = yield server.received_at_least(14)
        self.assertEqual(got, b"GET / HTTP/1.1")
        got = yield client.received_at_least(5)
        self.assertEqual(got, b"hello")
        self.assertNotIn(client.transport, reactor.getWriters())
        self.assertNotIn(server.transport, reactor.getWriters())

    @defer.inlineCallbacks
    def test_full_socket_falls_back_with_backpressure(self) -> None:
        """
        What the kernel does not take waits for writability the Twisted way: a registered
        streaming producer is paused, and resumed once the reader has taken the data.
        """
        server, client = yield self.pair()
        producer = _Producer()
        server.transport.registerProducer(producer, True)
        client.transport.pauseProducing()
        block = b"x" * (8 * 1024 * 1024)
        server.transport.write(block)
        self.assertEqual(producer.events, ["pause"])
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn(server.transport, reactor.getWriters())
        client.transport.resumeProducing()
        yield client.received_at_least(len(block))
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertNotIn(server.transport, reactor.getWriters())

    @defer.inlineCallbacks
    def test_partial_send_of_a_small_write(self) -> None:
        """
        A write smaller than Twisted sends at once that the kernel takes only in part: the
        rest waits for writability, the producer is paused, and everything arrives in order.
        """
        server, client = yield self.pair()
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        producer = _Producer()
        server.transport.registerProducer(producer, True)
        client.transport.pauseProducing()
        block = bytes(range(256)) * 400
        self.assertLess(len(block), server.transport.SEND_LIMIT)
        server.transport.write(block)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn(server.transport, reactor.getWriters())
        self.assertEqual(producer.events, ["pause"])
        client.transport.resumeProducing()
        got = yield client.received_at_least(len(block))
        self.assertEqual(got, block)
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertNotIn(server.transport, reactor.getWriters())

    @defer.inlineCallbacks
    def test_text_refused(self) -> None:
        """
        Writing text instead of bytes raises TypeError, as Twisted's transports do.
        """
        server, _client = yield self.pair()
        self.assertRaises(TypeError, server.transport.write, "text")
        self.assertRaises(TypeError, server.transport.writeSequence, [b"ok", "text"])

    @defer.inlineCallbacks
    def test_close_after_write(self) -> None:
        """
        A connection closed in the turn that wrote to it sends everything, then closes.
        """
        server, client = yield self.pair()
        server.transport.write(b"last words")
        server.transport.loseConnection()
        reason = yield client.lost
        self.assertEqual(client.received, b"last words")
        self.assertIsInstance(reason, ConnectionDone)

    @defer.inlineCallbacks
    def test_half_close_after_write(self) -> None:
        """
        Half-closing in the turn that wrote sends everything, then the end of the stream,
        while the other direction stays open.
        """
        server, client = yield self.pair(half_closing=True)
        client.transport.write(b"request")
        client.transport.loseWriteConnection()
        yield server.eof
        self.assertEqual(server.received, b"request")
        server.transport.write(b"answer")
        got = yield client.received_at_least(6)
        self.assertEqual(got, b"answer")

    @defer.inlineCallbacks
    def test_write_to_reset_connection(self) -> None:
        """
        A write to a connection the peer reset loses the connection, as Twisted's path does.
        """
        server, client = yield self.pair()
        client.transport.abortConnection()
        yield client.lost
        yield deferLater(reactor, 0.01, lambda: None)
        for _ in range(3):
            if server.lost.called:
                break
            server.transport.write(b"anyone there?")
            yield deferLater(reactor, 0.02, lambda: None)
        reason = yield server.lost
        self.assertIsInstance(reason, ConnectionLost)

    @defer.inlineCallbacks
    def test_failure_while_sending_is_contained(self) -> None:
        """
        An exception raised while sending one connection's buffer (here by its producer) is
        logged and drops that connection; the others queued in the same turn are still sent.
        """
        first_server, _first_client = yield self.pair()
        second_server, second_client = yield self.pair()
        first_server.transport.registerProducer(_FailingPullProducer(), False)
        first_server.transport.write(b"one")
        second_server.transport.write(b"two")
        yield first_server.lost
        got = yield second_client.received_at_least(3)
        self.assertEqual(got, b"two")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_one_flush_per_turn(self) -> None:
        """
        However many connections write in a turn, one delayed call sends them all.
        """
        first_server, first_client = yield self.pair()
        second_server, second_client = yield self.pair()
        before = len(reactor.getDelayedCalls())
        first_server.transport.write(b"a")
        second_server.transport.write(b"b")
        first_server.transport.write(b"c")
        self.assertEqual(len(reactor.getDelayedCalls()), before + 1)
        self.assertEqual((yield first_client.received_at_least(2)), b"ac")
        self.assertEqual((yield second_client.received_at_least(1)), b"b")

    @defer.inlineCallbacks
    def test_cancelled_flush_call(self) -> None:
        """
        When the pending flush call is cancelled from outside (trial cancels the calls a test
        left pending), the next write schedules a new one and everything queued is sent.
        """
        server, client = yield self.pair()
        server.transport.write(b"first ")
        flusher = flusher_for(reactor)
        call = flusher._call
        assert call is not None
        call.cancel()
        server.transport.write(b"lost? ")
        client.transport.write(b"nudge")
        self.assertEqual((yield server.received_at_least(5)), b"nudge")
        self.assertEqual((yield client.received_at_least(12)), b"first lost? ")

    @defer.inlineCallbacks
    def test_send_now(self) -> None:
        """
        C{send} sends what is queued at once; later writes of the same turn still go with the
        one pending call.
        """
        server, client = yield self.pair()
        flusher = flusher_for(reactor)
        server.transport.write(b"now ")
        pending = len(reactor.getDelayedCalls())
        flusher.send()
        self.assertEqual(client.transport.socket.recv(4, socket.MSG_PEEK), b"now ")
        flusher.send()
        server.transport.write(b"later")
        self.assertEqual(len(reactor.getDelayedCalls()), pending)
        self.assertEqual((yield client.received_at_least(9)), b"now later")

    def test_reactor_not_kept(self) -> None:
        """
        A reactor whose transports wrote is not kept alive by its flusher.
        """
        other = GatewayReactor()
        flusher_for(other)
        for selectable in other.removeAll():
            selectable.connectionLost(_DONE)  # type: ignore[attr-defined]
        other._poller.close()
        gone = weakref.ref(other)
        del other
        gc.collect()
        self.assertIsNone(gone())

    def test_one_flusher_per_reactor(self) -> None:
        """Each reactor has its own flusher."""
        self.assertIs(flusher_for(reactor), flusher_for(reactor))
        self.assertIsNot(flusher_for(reactor), flusher_for(MemoryReactorClock()))


class HostnameTests(TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_hostname_endpoint_gets_client_transport(self) -> None:
        """
        Twisted's C{HostnameEndpoint} given the L{client_connects} view resolves the name with
        the reactor's resolver, then connects with a L{Client} transport, whose turn's writes
        are sent like any other.
        """
        servers = _PeerFactory()
        port = yield TCPServerEndpoint(reactor, 0, "127.0.0.1").listen(servers)
        self.addCleanup(port.stopListening)
        endpoint = HostnameEndpoint(client_connects(reactor), "localhost", port.getHost().port)
        client = yield endpoint.connect(_PeerFactory())
        self.addCleanup(client.transport.loseConnection)
        self.assertIsInstance(client.transport, Client)
        client.transport.write(b"by name")
        while not servers.peers:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((yield servers.peers[0].received_at_least(7)), b"by name")


class FallbackTests(SynchronousTestCase):
    def test_client_connects_on_fake_reactor(self) -> None:
        """A reactor without file descriptors is used as it is by endpoints."""
        fake = MemoryReactorClock()
        self.assertIs(client_connects(fake), fake)

    def test_connect_on_fake_reactor(self) -> None:
        """
        A reactor without file descriptors (a test fake) is asked to connect the usual way.
        """
        fake = MemoryReactorClock()
        factory = ClientFactory()
        connect_tcp(fake, "127.0.0.1", 8080, factory, timeout=None)
        self.assertEqual(fake.tcpClients, [("127.0.0.1", 8080, factory, None, None)])

    def test_listen_on_fake_reactor(self) -> None:
        """
        On a reactor without file descriptors the endpoint listens the usual way.
        """
        fake = MemoryReactorClock()
        factory = Factory.forProtocol(Protocol)
        self.successResultOf(TCPServerEndpoint(fake, 8080, "127.0.0.1").listen(factory))
        self.assertEqual(fake.tcpServers, [(8080, factory, 1024, "127.0.0.1")])


class ReusePortTests(TestCase):
    def listen(self, endpoint: Any, factory: Any) -> Any:
        port = self.successResultOf(endpoint.listen(factory))
        self.addCleanup(port.stopListening)
        return port

    def test_two_ports_share(self) -> None:
        """
        Two sockets with C{SO_REUSEPORT} bind one port (as two workers do), while a plain
        bind of that port is refused.
        """
        number = unused_tcp_port()
        factory = Factory.forProtocol(Protocol)
        endpoint = TCPServerEndpoint(reactor, number, "127.0.0.1", reuse_port=True)
        first = self.listen(endpoint, factory)
        second = self.listen(endpoint, factory)
        self.assertEqual(first.getHost().port, second.getHost().port)
        for port in (first, second):
            self.assertEqual(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        self.failureResultOf(
            TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(factory),
            CannotListenError,
        )

    def test_plain_port_does_not_share(self) -> None:
        """Without C{reuse_port} the socket does not set C{SO_REUSEPORT}."""
        port = self.listen(
            TCPServerEndpoint(reactor, 0, "127.0.0.1"), Factory.forProtocol(Protocol)
        )
        self.assertEqual(port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 0)

    def test_ipv6(self) -> None:
        """An IPv6 literal interface binds an IPv6 socket."""
        listening = TCPServerEndpoint(reactor, 0, "::1").listen(Factory.forProtocol(Protocol))
        ports: List[Any] = []
        listening.addCallbacks(ports.append, lambda failure: failure.trap(CannotListenError))
        if not ports:
            raise self.skipTest("no IPv6 loopback on this machine")
        self.addCleanup(ports[0].stopListening)
        self.assertEqual(ports[0].socket.family, socket.AF_INET6)

    def test_tls(self) -> None:
        """
        With TLS options the factory is wrapped in Twisted's TLS protocol factory.
        """
        from twisted.internet.ssl import CertificateOptions

        factory = Factory.forProtocol(Protocol)
        port = self.listen(
            TCPServerEndpoint(reactor, 0, "127.0.0.1", tls_options=CertificateOptions()), factory
        )
        self.assertIsInstance(port.factory, TLSMemoryBIOFactory)
        self.assertIs(port.factory.wrappedFactory, factory)
