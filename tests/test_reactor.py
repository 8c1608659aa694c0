"""
Tests for L{a3s_gateway.reactor}: a L{GatewayReactor} of its own (not trial's), driven one
iteration at a time, serving real loopback sockets; failing handlers; the poller's EINTR; the
sends during a long batch; outgoing connections first and incoming ones a batch a turn; the
C{install} that twistd and trial call.
"""

from __future__ import annotations

import errno
import select
import socket
import subprocess
import sys
import time
from typing import Any, List

from twisted.internet import tcp
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.proxy.site import GatewaySite
from a3s_gateway.reactor import INTAKE_BATCH, SEND_EVERY, GatewayReactor, _Pollers
from a3s_gateway.testing import EchoResource
from a3s_gateway.transport import TCPServerEndpoint


def _close(reactor: GatewayReactor) -> None:
    """Close what a test's own reactor still holds: its connections, ports and waker."""
    for selectable in reactor.removeAll():
        selectable.connectionLost(Failure(ConnectionError("test over")))  # type: ignore[attr-defined]
    reactor._poller.close()


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[union-attr]


class _Exploding(Protocol):
    def dataReceived(self, data: bytes) -> None:
        raise RuntimeError("handler bug")


class _ExplodingOnLoss(Protocol):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        raise RuntimeError("connectionLost bug")


class _Poller:
    """Stands in for the epoll object: hands out prepared answers or raises, once each."""

    def __init__(self, real: Any, answers: List[Any]) -> None:
        self.real = real
        self.answers = answers

    def poll(self, timeout: float, count: int) -> Any:
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return self.real.poll(timeout, count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class GatewayReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = GatewayReactor()
        self.addCleanup(self.close)

    def close(self) -> None:
        _close(self.reactor)

    def serve(self, protocol: type) -> socket.socket:
        """Listen with C{protocol} on the test's reactor; a connected client socket."""
        port = self.reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.settimeout(0)
        self.addCleanup(client.close)
        return client

    def spin(self, until: Any, turns: int = 200) -> None:
        for _ in range(turns):
            if until():
                return
            self.reactor.iterate(0.01)
        self.fail("the reactor never got there")

    def receive(self, client: socket.socket, size: int) -> bytes:
        received = b""

        def enough() -> bool:
            nonlocal received
            try:
                received += client.recv(65536)
            except BlockingIOError:
                pass
            return len(received) >= size

        self.spin(enough)
        return received

    def test_serves_connections(self) -> None:
        """
        Reads reach the protocol and its writes reach the peer, over a real socket.
        """
        client = self.serve(_Echo)
        client.sendall(b"hello")
        self.assertEqual(self.receive(client, 5), b"HELLO")

    def test_serves_the_gateway_site(self) -> None:
        """
        The gateway's own HTTP site answers a request on it.
        """
        site = GatewaySite(EchoResource("one"), self.reactor, max_request_body_bytes=1024)
        port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.settimeout(0)
        self.addCleanup(client.close)
        client.sendall(b"GET /hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = self.receive(client, 1)
        self.spin(lambda: not site.channels)
        try:
            answer += client.recv(65536)
        except BlockingIOError:
            pass
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
        self.assertIn(b'"one"', answer)
        self.assertIn(b'"/hi"', answer)

    def test_failing_handler_disconnects_and_is_logged(self) -> None:
        """
        A protocol whose C{dataReceived} raises loses its connection and the error is logged;
        the reactor goes on serving others.
        """
        bad = self.serve(_Exploding)
        bad.sendall(b"boom")

        def closed() -> bool:
            try:
                return bad.recv(1) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        self.spin(closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        good = self.serve(_Echo)
        good.sendall(b"still")
        self.assertEqual(self.receive(good, 5), b"STILL")

    def test_failure_escaping_the_handler_is_logged(self) -> None:
        """
        An error raised while the reactor disconnects a connection (its C{connectionLost}) is
        logged, and the loop goes on.
        """
        client = self.serve(_ExplodingOnLoss)
        self.reactor.iterate(0.01)
        client.close()
        self.spin(lambda: bool(self.flushLoggedErrors(RuntimeError)))
        good = self.serve(_Echo)
        good.sendall(b"next")
        self.assertEqual(self.receive(good, 4), b"NEXT")

    def test_interrupted_poll(self) -> None:
        """
        A poll interrupted by a signal (EINTR) is an empty iteration, not an error.
        """
        self.reactor._poller = _Poller(self.reactor._poller, [OSError(errno.EINTR, "EINTR")])
        self.reactor.doPoll(0)

    def test_other_poll_errors_raise(self) -> None:
        """
        Any other poll error is a bug worth stopping for, as in Twisted's epoll reactor.
        """
        self.reactor._poller = _Poller(self.reactor._poller, [OSError(errno.EBADF, "EBADF")])
        self.assertRaises(OSError, self.reactor.doPoll, 0)

    def test_event_for_a_removed_descriptor(self) -> None:
        """
        An event for a descriptor no longer registered (removed earlier in the same batch) is
        skipped.
        """
        client = self.serve(_Echo)
        self.reactor._poller = _Poller(self.reactor._poller, [[(100000, select.EPOLLIN)]])
        self.reactor.doPoll(0)
        client.sendall(b"ok")
        self.assertEqual(self.receive(client, 2), b"OK")


class _Counted(Protocol):
    """
    Echoes, and checks at the last event of a turn's intake batch how many echoes their clients
    already have.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]
        batch = self.factory.batch  # type: ignore[attr-defined]
        batch.append(self)
        if len(batch) == INTAKE_BATCH:
            arrived = 0
            for client in self.factory.clients:  # type: ignore[attr-defined]
                try:
                    client.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                arrived += 1
            self.factory.arrived_before_last = arrived  # type: ignore[attr-defined]


def _ready_clients(
    test: SynchronousTestCase, reactor: GatewayReactor, factory: Factory, count: int
) -> List[socket.socket]:
    """
    C{count} connections accepted by C{reactor} on a port serving C{factory}; each has sent
    one byte, which the reactor has not read yet.
    """
    port = test.successResultOf(TCPServerEndpoint(reactor, 0, "127.0.0.1").listen(factory))
    test.addCleanup(port.stopListening)
    clients = []
    readers = len(reactor.getReaders())
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        test.addCleanup(client.close)
        clients.append(client)
    for _ in range(200):
        if len(reactor.getReaders()) == readers + count:
            break
        reactor.iterate(0.01)
    else:
        test.fail("the connections were never accepted")
    for client in clients:
        client.send(b"x")
    time.sleep(0.05)
    return clients


class BatchSendTests(SynchronousTestCase):
    """
    The gateway's transports' writes are sent every L{SEND_EVERY} events of a batch, not only
    when the whole batch has been handled.
    """

    def test_sent_during_a_long_batch(self) -> None:
        """
        When 20 connections are ready in one poll, by the time the last of the turn's 16 is
        handled the echoes of at least the first 8 have reached their clients.
        """
        reactor = GatewayReactor()
        self.addCleanup(_close, reactor)
        factory = Factory.forProtocol(_Counted)
        factory.batch = []  # type: ignore[attr-defined]
        factory.arrived_before_last = None  # type: ignore[attr-defined]
        factory.clients = _ready_clients(self, reactor, factory, 20)  # type: ignore[attr-defined]
        reactor.doPoll(0)
        self.assertEqual(len(factory.batch), INTAKE_BATCH)  # type: ignore[attr-defined]
        self.assertGreaterEqual(factory.arrived_before_last, 8)  # type: ignore[attr-defined]
        self.assertEqual((SEND_EVERY, INTAKE_BATCH), (8, 16))


class _Recorded(Protocol):
    """Appends its factory's label to the factory's shared C{order} list on each read."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.order.append(self.factory.label)  # type: ignore[attr-defined]


class _Keeping(Factory):
    """Keeps the protocols it builds."""

    def __init__(self) -> None:
        self.protocols: List[Protocol] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Protocol()
        self.protocols.append(protocol)
        return protocol


class _Never:
    """A selectable the reactor never had, its descriptor closed."""

    def fileno(self) -> int:
        return -1


class IntakeTests(SynchronousTestCase):
    """
    Outgoing connections' events are handled before incoming connections', which are handled
    L{INTAKE_BATCH} per turn.
    """

    def setUp(self) -> None:
        self.reactor = GatewayReactor()
        self.addCleanup(_close, self.reactor)
        self.order: List[str] = []

    def factory(self, label: str) -> ClientFactory:
        factory = ClientFactory.forProtocol(_Recorded)
        factory.order = self.order  # type: ignore[attr-defined]
        factory.label = label  # type: ignore[attr-defined]
        return factory

    def outgoing(self) -> socket.socket:
        """
        An outgoing connection of the reactor (as to an upstream); the socket of its far end.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        connector = self.reactor.connectTCP(
            "127.0.0.1", listener.getsockname()[1], self.factory("outgoing")
        )
        self.addCleanup(connector.disconnect)
        accepted: List[socket.socket] = []

        def connected() -> bool:
            if not accepted:
                try:
                    accepted.append(listener.accept()[0])
                except BlockingIOError:
                    pass
            return bool(accepted) and connector.state == "connected"

        for _ in range(200):
            if connected():
                break
            self.reactor.iterate(0.01)
        else:
            self.fail("never connected")
        far = accepted[0]
        self.addCleanup(far.close)
        return far

    def test_outgoing_first(self) -> None:
        """
        With 20 incoming connections and one outgoing connection ready, a turn handles the
        outgoing one first, then 16 of the incoming ones.
        """
        far = self.outgoing()
        _ready_clients(self, self.reactor, self.factory("incoming"), 20)
        far.sendall(b"event")
        time.sleep(0.05)
        self.reactor.doPoll(0)
        self.assertEqual(self.order, ["outgoing"] + ["incoming"] * INTAKE_BATCH)

    def test_incoming_not_starved(self) -> None:
        """
        Incoming connections ready together are all handled over the next turns, 16 a turn,
        even when an outgoing connection has something to read at every turn.
        """
        far = self.outgoing()
        _ready_clients(self, self.reactor, self.factory("incoming"), 40)
        for _ in range(3):
            far.sendall(b"event")
            time.sleep(0.02)
            self.reactor.doPoll(0)
        self.assertEqual(
            self.order,
            ["outgoing"]
            + ["incoming"] * 16
            + ["outgoing"]
            + ["incoming"] * 16
            + ["outgoing"]
            + ["incoming"] * 8,
        )

    def test_removed_once_closed(self) -> None:
        """
        A connection whose descriptor is already closed (C{fileno()} is -1) is still removed,
        from whichever poller it was registered with, as Twisted's epoll reactor does; one the
        reactor never had is ignored.
        """
        self.outgoing()
        factory = _Keeping()
        _ready_clients(self, self.reactor, factory, 1)
        [outgoing] = [
            reader for reader in self.reactor.getReaders() if isinstance(reader, tcp.Client)
        ]
        [incoming] = factory.protocols
        for connection in [outgoing, incoming.transport]:
            fileno = connection.fileno  # type: ignore[union-attr]
            real = fileno()
            connection.fileno = lambda: -1  # type: ignore[union-attr]
            self.reactor.removeReader(connection)
            self.assertNotIn(connection, self.reactor.getReaders())
            self.assertNotIn(real, self.reactor._selectables)
            connection.fileno = fileno  # type: ignore[union-attr]
            connection.connectionLost(Failure(ConnectionError("test over")))  # type: ignore[union-attr]
        self.reactor.removeReader(_Never())

    def test_number_reused(self) -> None:
        """
        A descriptor number that was an incoming connection's, once unregistered, goes to the
        main epoll object when registered again for anything else.
        """
        pollers = _Pollers()
        self.addCleanup(pollers.close)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        fd = ours.fileno()
        theirs.send(b"x")
        pollers.incoming.add(fd)
        pollers.register(fd, select.EPOLLIN)
        self.assertEqual(pollers.intake.poll(0, 8), [(fd, select.EPOLLIN)])
        self.assertEqual(pollers.poll(0, 8), [(pollers.intake_fd, select.EPOLLIN)])
        pollers.unregister(fd)
        pollers.register(fd, select.EPOLLIN)
        self.assertEqual(pollers.poll(0, 8), [(fd, select.EPOLLIN)])
        self.assertEqual(pollers.intake.poll(0, 8), [])

    def test_turn_without_incoming(self) -> None:
        """
        A turn in which no incoming connection is ready handles the outgoing connection's
        event alone.
        """
        far = self.outgoing()
        far.sendall(b"event")
        time.sleep(0.02)
        self.reactor.doPoll(0)
        self.assertEqual(self.order, ["outgoing"])


class InstallTests(SynchronousTestCase):
    def test_install(self) -> None:
        """
        C{install} makes a L{GatewayReactor} the global reactor (what ``--reactor=a3s``
        does).
        """
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from a3s_gateway.reactor import install; install();"
                "from twisted.internet import reactor; print(type(reactor).__name__)",
            ],
            capture_output=True,
            check=True,
        )
        self.assertEqual(out.stdout.strip(), b"GatewayReactor")

    def test_reactor_plugin(self) -> None:
        """
        twistd and trial know the reactor as ``a3s``.
        """
        from twisted.application.reactors import getReactorTypes

        names = {installer.shortName: installer for installer in getReactorTypes()}
        self.assertIn("a3s", names)
        self.assertEqual(names["a3s"].moduleName, "a3s_gateway.reactor")
