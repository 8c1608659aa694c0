"""
Tests for L{a3s_gateway.proxy.udp}: the choice of upstream at start, the relay over real
loopback sockets, and session expiry and limits with a L{task.Clock} for time.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from a3s_gateway.config.schema import (
    EntrypointConfig,
    LoadBalancerConfig,
    RouterConfig,
    ServerConfig,
    ServiceConfig,
)
from a3s_gateway.proxy.udp import UdpEntrypoint
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.registry import Service

ENTRYPOINT = "dns"
START_ERROR = "UDP entrypoint 'dns' has no matching router/service with a healthy backend"

Address = Tuple[str, int]


def _entrypoint(timeout: Optional[int] = None, max_sessions: Optional[int] = None) -> Any:
    return EntrypointConfig(
        name=ENTRYPOINT,
        address="127.0.0.1:0",
        protocol="udp",
        udp_session_timeout_secs=timeout,
        udp_max_sessions=max_sessions,
    )


def _routes(
    rule: str = "Method(`UDP`)", entrypoints: Tuple[str, ...] = (ENTRYPOINT,), service: str = "svc"
) -> RouteTable:
    return RouteTable.from_config(
        {"udp": RouterConfig(name="udp", rule=rule, service=service, entrypoints=entrypoints)}
    )


def _service(clock: Any, *urls: str) -> Service:
    servers = tuple(ServerConfig(url=url) for url in urls)
    config = ServiceConfig(name="svc", load_balancer=LoadBalancerConfig(servers=servers))
    return Service.from_config(config, clock)


class _Peer(DatagramProtocol):
    """
    A test socket: records every datagram and its source, tells when it has N of them, and
    echoes each one back when C{echo} is set.
    """

    noisy = False

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: List[Tuple[bytes, Address]] = []
        self._waiting: List[Tuple[int, defer.Deferred[None]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if self.echo:
            self.send(datagram, addr)
        ready = [d for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for d in ready:
            d.callback(None)

    def send(self, datagram: bytes, addr: Address) -> None:
        transport: Any = self.transport
        transport.write(datagram, addr)

    def wait_for(self, count: int) -> defer.Deferred[None]:
        if len(self.received) >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def sources(self) -> List[Address]:
        return [addr for _, addr in self.received]

    def payloads(self) -> List[bytes]:
        return [datagram for datagram, _ in self.received]


class _RealSocketsClockTime:
    """
    A reactor for the entrypoint: real UDP sockets, time from C{clock} and timers on C{timers}
    (the same clock normally; a clock never advanced stands for timers that run late).
    """

    def __init__(self, clock: task.Clock, timers: Optional[task.Clock] = None) -> None:
        self.clock = clock
        self.timers = timers if timers is not None else clock

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        return reactor.listenUDP(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.timers.callLater(*args, **kwargs)


class RelayTests(TestCase):
    """The relay over real loopback sockets."""

    def peer(self, echo: bool = False) -> Tuple[_Peer, Address]:
        proto = _Peer(echo)
        port = reactor.listenUDP(0, proto, interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(port.stopListening)
        return proto, ("127.0.0.1", port.getHost().port)

    def start(
        self,
        upstream: Address,
        config: Optional[EntrypointConfig] = None,
        entrypoint_reactor: Any = reactor,
        url: Optional[str] = None,
    ) -> Tuple[UdpEntrypoint, Address]:
        self.service = _service(reactor, url or f"{upstream[0]}:{upstream[1]}")
        self.backend = self.service.balancer.backends[0]
        entrypoint = UdpEntrypoint(
            ENTRYPOINT,
            config if config is not None else _entrypoint(),
            _routes(),
            {"svc": self.service},
            entrypoint_reactor,
        )
        port: IListeningPort = entrypoint.listen()
        self.addCleanup(entrypoint.stop)
        return entrypoint, ("127.0.0.1", port.getHost().port)

    @defer.inlineCallbacks
    def test_relays_both_ways(self) -> Any:
        """
        A client's datagram reaches the upstream from the session's own socket (not the
        client's address), and the reply comes back to the client from the listening address.
        The session holds one connection on the backend.
        """
        upstream, upstream_address = self.peer(echo=True)
        entrypoint, gateway = self.start(upstream_address)
        client, client_address = self.peer()
        client.send(b"ping", gateway)
        yield client.wait_for(1)
        self.assertEqual(client.received, [(b"ping", gateway)])
        self.assertEqual(upstream.payloads(), [b"ping"])
        self.assertNotEqual(upstream.sources()[0], client_address)
        self.assertEqual(entrypoint.active_sessions, 1)
        self.assertEqual(self.backend.active_connections, 1)

    @defer.inlineCallbacks
    def test_large_datagram(self) -> Any:
        """
        A 60000-byte datagram goes through both ways whole (Twisted's default read size is
        8 KiB; the relay reads up to 65535).
        """
        _, upstream_address = self.peer(echo=True)
        _, gateway = self.start(upstream_address)
        client, _ = self.peer()
        payload = os.urandom(60000)
        client.send(payload, gateway)
        yield client.wait_for(1)
        self.assertEqual(client.payloads(), [payload])

    @defer.inlineCallbacks
    def test_one_session_per_client(self) -> Any:
        """
        Two clients get two sessions (two upstream source addresses) and each gets only its own
        replies; a client's next datagram uses its existing session.
        """
        upstream, upstream_address = self.peer(echo=True)
        entrypoint, gateway = self.start(upstream_address)
        first, _ = self.peer()
        second, _ = self.peer()
        first.send(b"one", gateway)
        yield first.wait_for(1)
        second.send(b"two", gateway)
        yield second.wait_for(1)
        first.send(b"three", gateway)
        yield first.wait_for(2)
        self.assertEqual(first.payloads(), [b"one", b"three"])
        self.assertEqual(second.payloads(), [b"two"])
        sources = upstream.sources()
        self.assertEqual(sources[0], sources[2])
        self.assertNotEqual(sources[0], sources[1])
        self.assertEqual(entrypoint.active_sessions, 2)
        self.assertEqual(self.backend.active_connections, 2)

    @defer.inlineCallbacks
    def test_upstream_chosen_once(self) -> Any:
        """
        The upstream is chosen once, at start: with round-robin over two backends, every
        session goes to the first.
        """
        chosen, chosen_address = self.peer()
        other, other_address = self.peer()
        urls = [f"127.0.0.1:{address[1]}" for address in (chosen_address, other_address)]
        service = _service(reactor, *urls)
        entrypoint = UdpEntrypoint(ENTRYPOINT, _entrypoint(), _routes(), {"svc": service}, reactor)
        gateway = ("127.0.0.1", entrypoint.listen().getHost().port)
        self.addCleanup(entrypoint.stop)
        self.assertIs(entrypoint.backend, service.balancer.backends[0])
        first, _ = self.peer()
        second, _ = self.peer()
        first.send(b"a", gateway)
        second.send(b"b", gateway)
        yield chosen.wait_for(2)
        self.assertEqual(sorted(chosen.payloads()), [b"a", b"b"])
        self.assertEqual(other.received, [])

    @defer.inlineCallbacks
    def test_backend_host_name_resolved(self) -> Any:
        """
        A backend given by name (C{localhost}) is resolved once at start, IPv4 first.
        """
        _, upstream_address = self.peer(echo=True)
        _, gateway = self.start(upstream_address, url=f"localhost:{upstream_address[1]}")
        client, _ = self.peer()
        client.send(b"hi", gateway)
        yield client.wait_for(1)
        self.assertEqual(client.payloads(), [b"hi"])

    @defer.inlineCallbacks
    def test_session_expiry(self) -> Any:
        """
        A session ends after C{udp_session_timeout_secs} without traffic: its socket closes and
        the backend's count drops; the client's next datagram opens a new session.
        """
        clock = task.Clock()
        upstream, upstream_address = self.peer()
        entrypoint, gateway = self.start(
            upstream_address, _entrypoint(timeout=10), _RealSocketsClockTime(clock)
        )
        client, _ = self.peer()
        client.send(b"a", gateway)
        yield upstream.wait_for(1)
        clock.advance(9.9)
        self.assertEqual(entrypoint.active_sessions, 1)
        clock.advance(0.1)
        self.assertEqual(entrypoint.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)
        client.send(b"b", gateway)
        yield upstream.wait_for(2)
        self.assertEqual(entrypoint.active_sessions, 1)

    @defer.inlineCallbacks
    def test_client_traffic_keeps_session(self) -> Any:
        """
        Datagrams from the client alone keep its session alive (the reference counts only
        upstream traffic and drops the session of a client that only sends).
        """
        clock = task.Clock()
        upstream, upstream_address = self.peer()
        entrypoint, gateway = self.start(
            upstream_address, _entrypoint(timeout=30), _RealSocketsClockTime(clock)
        )
        client, _ = self.peer()
        client.send(b"a", gateway)
        yield upstream.wait_for(1)
        clock.advance(20)
        client.send(b"b", gateway)
        yield upstream.wait_for(2)
        clock.advance(20)
        self.assertEqual(entrypoint.active_sessions, 1)
        self.assertEqual(upstream.sources()[0], upstream.sources()[1])
        clock.advance(10)
        self.assertEqual(entrypoint.active_sessions, 0)

    @defer.inlineCallbacks
    def test_upstream_traffic_keeps_session(self) -> Any:
        """
        Datagrams from the upstream alone keep the session alive too.
        """
        clock = task.Clock()
        upstream, upstream_address = self.peer()
        entrypoint, gateway = self.start(
            upstream_address, _entrypoint(timeout=30), _RealSocketsClockTime(clock)
        )
        client, _ = self.peer()
        client.send(b"subscribe", gateway)
        yield upstream.wait_for(1)
        clock.advance(20)
        upstream.send(b"push", upstream.sources()[0])
        yield client.wait_for(1)
        clock.advance(20)
        self.assertEqual(entrypoint.active_sessions, 1)
        clock.advance(10)
        self.assertEqual(entrypoint.active_sessions, 0)

    @defer.inlineCallbacks
    def test_max_sessions_drops(self) -> Any:
        """
        At C{udp_max_sessions} with no session expired, a new client's datagram is dropped;
        existing sessions go on.
        """
        upstream, upstream_address = self.peer()
        entrypoint, gateway = self.start(upstream_address, _entrypoint(max_sessions=1))
        first, _ = self.peer()
        second, _ = self.peer()
        first.send(b"first", gateway)
        yield upstream.wait_for(1)
        second.send(b"second", gateway)
        # Datagrams on one socket are read in order: once this one is through, so is the last.
        first.send(b"first again", gateway)
        yield upstream.wait_for(2)
        self.assertEqual(upstream.payloads(), [b"first", b"first again"])
        self.assertEqual(entrypoint.active_sessions, 1)

    @defer.inlineCallbacks
    def test_max_sessions_evicts_expired_first(self) -> Any:
        """
        At C{udp_max_sessions}, sessions already past their timeout (their timer has not run
        yet) are evicted to make room for a new client.
        """
        clock = task.Clock()
        late_timers = task.Clock()
        upstream, upstream_address = self.peer()
        entrypoint, gateway = self.start(
            upstream_address,
            _entrypoint(timeout=30, max_sessions=1),
            _RealSocketsClockTime(clock, late_timers),
        )
        first, _ = self.peer()
        second, _ = self.peer()
        first.send(b"first", gateway)
        yield upstream.wait_for(1)
        clock.advance(30)
        self.assertEqual(entrypoint.active_sessions, 1)
        second.send(b"second", gateway)
        yield upstream.wait_for(2)
        self.assertEqual(upstream.payloads(), [b"first", b"second"])
        self.assertEqual(entrypoint.active_sessions, 1)
        self.assertEqual(self.backend.active_connections, 1)

    @defer.inlineCallbacks
    def test_stop_closes_every_socket(self) -> Any:
        """
        L{UdpEntrypoint.stop} closes the listening socket and every session's socket.
        """
        _, upstream_address = self.peer(echo=True)
        entrypoint, gateway = self.start(upstream_address)
        client, _ = self.peer()
        client.send(b"x", gateway)
        yield client.wait_for(1)
        readers_before = set(reactor.getReaders())
        yield entrypoint.stop()
        closed = readers_before - set(reactor.getReaders())
        self.assertEqual(len(closed), 2)
        self.assertEqual(entrypoint.active_sessions, 0)
        self.assertEqual(self.backend.active_connections, 0)


class StartTests(SynchronousTestCase):
    """The choice of upstream when the entrypoint starts."""

    def entrypoint(
        self, routes: RouteTable, services: Dict[str, Service], config: Any = None
    ) -> UdpEntrypoint:
        return UdpEntrypoint(ENTRYPOINT, config or _entrypoint(), routes, services, task.Clock())

    def test_no_route(self) -> None:
        """
        No router serving this entrypoint matches the synthetic request: start fails with the
        reference's message.
        """
        service = _service(task.Clock(), "127.0.0.1:53")
        for routes in [_routes(entrypoints=("web",)), _routes(rule="Method(`TCP`)")]:
            error = self.assertRaises(ValueError, self.entrypoint(routes, {"svc": service}).listen)
            self.assertEqual(str(error), START_ERROR)

    def test_no_service(self) -> None:
        """
        The matched router names a service that does not exist: the same message.
        """
        error = self.assertRaises(ValueError, self.entrypoint(_routes(), {}).listen)
        self.assertEqual(str(error), START_ERROR)

    def test_no_healthy_backend(self) -> None:
        """
        The service has no healthy backend: the same message.
        """
        service = _service(task.Clock(), "127.0.0.1:53")
        service.balancer.backends[0].active_healthy = False
        error = self.assertRaises(ValueError, self.entrypoint(_routes(), {"svc": service}).listen)
        self.assertEqual(str(error), START_ERROR)

    def test_bad_address(self) -> None:
        """
        A malformed address fails start in the reference's family, naming the entrypoint.
        """
        service = _service(task.Clock(), "127.0.0.1:53")
        config = EntrypointConfig(name=ENTRYPOINT, address="300.1.1.1:53", protocol="udp")
        entrypoint = self.entrypoint(_routes(), {"svc": service}, config)
        error = self.assertRaises(ValueError, entrypoint.listen)
        self.assertEqual(
            str(error),
            "Invalid address '300.1.1.1:53' for entrypoint 'dns': invalid IPv4 address '300.1.1.1'",
        )

    def test_defaults(self) -> None:
        """
        Unset, the session timeout is 30 s and the session limit 10000.
        """
        entrypoint = self.entrypoint(_routes(), {})
        self.assertEqual((entrypoint.session_timeout, entrypoint.max_sessions), (30.0, 10000))
        entrypoint = self.entrypoint(_routes(), {}, _entrypoint(timeout=5, max_sessions=7))
        self.assertEqual((entrypoint.session_timeout, entrypoint.max_sessions), (5.0, 7))
