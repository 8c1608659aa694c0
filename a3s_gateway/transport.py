# -*- test-case-name: tests.test_transport -*-
"""
TCP transports that send what a turn of the reactor wrote at the end of that turn, for the
gateway's listening ports and its upstream connections.

Why: a Twisted TCP transport buffers every C{write} and registers itself with the reactor to be
told when the socket is writable (an C{epoll_ctl} call), sends on the next turn, then
unregisters (another C{epoll_ctl}). A proxy writes twice per request (the request upstream, the
response downstream), so those four system calls cost more than the two C{send}s they wrap:
measured at about a sixth of the gateway's CPU time per request. Here a write instead queues the
transport on its reactor's L{TurnFlusher}, which sends every queued transport's buffer from one
C{callLater(0)}: after the turn's handlers ran (so a response's head and body still leave in one
C{send}) and before the reactor waits again. Only when the kernel does not take everything (a
slow reader, a full socket buffer) does the transport fall back to Twisted's own
wait-until-writable path, with its backpressure (producers paused and resumed) unchanged.

Anything but a real file-descriptor reactor (the test fakes, for instance) gets the reactor's own
C{listenTCP}/C{connectTCP} and transports.
"""

from __future__ import annotations

import errno
import socket
import weakref
from typing import Any, Iterable, List, Optional, Union, cast

import attr
from twisted.internet import defer, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

# send() errors after which the socket is still good: try again once it is writable.
_TRY_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS})


class TurnFlusher:
    """
    The transports of one reactor that wrote during the current turn, sent together from a
    single C{callLater(0)} before the reactor next waits for events.
    """

    def __init__(self, reactor: Any) -> None:
        # Weakly: the flusher is the reactor's value in a weak-keyed table, and a value that
        # held its key would keep every reactor that ever wrote alive.
        self._reactor: weakref.ref[Any] = weakref.ref(reactor)
        self._queued: List[_TurnFlushing] = []
        self._call: Optional[IDelayedCall] = None

    def queue(self, transport: _TurnFlushing) -> None:
        """Send C{transport}'s buffer at the end of this turn."""
        self._queued.append(transport)
        call = self._call
        # A call cancelled by someone else (trial does so with the calls a test left pending)
        # must not leave every later write waiting.
        if call is None or not call.active():
            # The reactor is alive: its transport is writing.
            self._call = self._reactor().callLater(0, self.flush)  # type: ignore[union-attr]

    def flush(self) -> None:
        """
        Send each queued transport's buffer; one that could not send everything (or whose
        socket failed) waits for writability the Twisted way, which also reports the failure.
        """
        self._call = None
        self.send()

    def send(self) -> None:
        """
        Send what is queued now, the pending call (if any) staying for later writes: for a
        reactor that sends during a long turn (L{a3s_gateway.reactor}).
        """
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        for transport in queued:
            transport._flush_queued = False
            if not transport.connected or transport._writeDisconnected:
                continue
            if transport.disconnecting or transport._writeDisconnecting:
                # Closed after writing in this turn (loseConnection queues before it marks the
                # transport as closing): Twisted's path sends the rest, then closes.
                FileDescriptor.startWriting(transport)
                continue
            try:
                transport._send_queued()
            except Exception:
                # As the reactor does with a handler that raises: log, then drop the connection.
                failure = Failure()
                _log.failure("sending on {transport}", failure, transport=transport)
                transport.connectionLost(failure)


_flushers: weakref.WeakKeyDictionary[Any, TurnFlusher] = weakref.WeakKeyDictionary()


def flusher_for(reactor: Any) -> TurnFlusher:
    """The reactor's L{TurnFlusher}, made on first use."""
    flusher = _flushers.get(reactor)
    if flusher is None:
        flusher = _flushers[reactor] = TurnFlusher(reactor)
    return flusher


class _TurnFlushing(tcp.Connection):
    """
    A TCP connection whose writes wait for the end of the reactor turn (L{TurnFlusher}) instead
    of registering for writability; connecting (a client learns its connection is made by
    writability), closing and half-closing keep Twisted's path.
    """

    _flush_queued = False
    _flusher: Optional[TurnFlusher] = None

    def startWriting(self) -> None:
        if not self.connected or self.disconnecting or self._writeDisconnecting:
            FileDescriptor.startWriting(self)
        elif not self._flush_queued:
            self._flush_queued = True
            flusher = self._flusher
            if flusher is None:
                flusher = self._flusher = flusher_for(self.reactor)
            flusher.queue(self)

    # write and writeSequence are FileDescriptor's without the layers a plain TCP connection
    # does not need on every call (the TLS check of Twisted's startTLS mixin, a type check per
    # piece, the producer check when there is no producer): a proxy writes at least twice per
    # request.
    def write(self, data: bytes) -> None:
        if type(data) is not bytes or self.TLS or not self.connected or self._writeDisconnected:
            super().write(data)
        elif data:
            self._tempDataBuffer.append(data)
            self._tempDataLen += len(data)
            if self.producer is not None:
                self._maybePauseProducer()
            self.startWriting()

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS or not self.connected or self._writeDisconnected:
            super().writeSequence(iovec)
        else:
            # b"".join refuses str pieces as FileDescriptor.writeSequence does.
            self.write(b"".join(iovec))

    def _send_queued(self) -> None:
        """
        Send what this turn wrote. The common case (nothing left from an earlier send, less
        than Twisted sends at once) calls C{send} directly, skipping the bookkeeping of
        C{doWrite}; anything else, and whatever the kernel does not take, goes Twisted's way.
        """
        if self.dataBuffer or self._tempDataLen > self.SEND_LIMIT:
            result = self.doWrite()
            if result is not None or self._tempDataLen or self.dataBuffer:
                FileDescriptor.startWriting(self)
            return
        pieces = self._tempDataBuffer
        if not pieces:
            # Already sent by Twisted's path (the socket was registered for writability).
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._tempDataBuffer = []
        self._tempDataLen = 0
        try:
            sent = self.socket.send(data)
        except OSError as error:
            if error.errno not in _TRY_AGAIN:
                # A failed socket: doWrite meets the error again and reports the loss.
                self.dataBuffer = data
                self.offset = 0
                FileDescriptor.startWriting(self)
                return
            sent = 0
        if sent < len(data):
            self.dataBuffer = data
            self.offset = sent
            FileDescriptor.startWriting(self)
            return
        producer = cast(Union[IPullProducer, IPushProducer, None], self.producer)
        if producer is not None and (not self.streamingProducer or self.producerPaused):
            # As doWrite does once its buffer is empty: a pull producer is asked for more, a
            # paused push producer resumed.
            self.producerPaused = False
            producer.resumeProducing()


class Server(_TurnFlushing, tcp.Server):
    """An accepted connection of a L{Port}."""


class Client(_TurnFlushing, tcp.Client):
    """An outgoing connection made by a L{Connector}."""


class Port(tcp.Port):
    """
    A listening TCP port whose connections are L{Server}s; with C{reuse_port}, its socket sets
    C{SO_REUSEPORT} before binding, so other processes (the other workers) may bind it too.
    """

    transport = Server

    _reuse_port = False

    def createInternetSocket(self) -> socket.socket:
        # Overridden rather than Twisted 26.10's makeBinding(reusePort=True), which the older
        # Twisted releases PyPy runs lack.
        s: socket.socket = super().createInternetSocket()
        if self._reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


class Connector(tcp.Connector):
    """A TCP connector whose connections are L{Client}s."""

    def _makeTransport(self) -> Client:
        return Client(self.host, self.port, self.bindAddress, self, self.reactor)


def _flushes(reactor: Any) -> bool:
    # Only reactors of real file descriptors have the transports this module builds on.
    return isinstance(reactor, PosixReactorBase)


def connect_tcp(
    reactor: Any,
    host: str,
    port: int,
    factory: Any,
    timeout: Optional[float] = 30,
    bindAddress: Optional[Any] = None,
) -> IConnector:
    """
    Connect to C{host} and C{port} as C{reactor.connectTCP} does, with a L{Client} transport
    where the reactor allows.
    """
    if not _flushes(reactor):
        connector: IConnector = reactor.connectTCP(
            host, port, factory, timeout=timeout, bindAddress=bindAddress
        )
        return connector
    # None (no reactor timeout) is accepted at run time, as by connectTCP; the stubs say float.
    made = Connector(host, port, factory, timeout, bindAddress, reactor)  # type: ignore[arg-type]
    made.connect()
    return made


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class _ClientConnects:
    """
    A reactor as seen by an endpoint that connects through the reactor it is given (Twisted's
    C{HostnameEndpoint}): its C{connectTCP} makes L{Client} transports; everything else (timers,
    the name resolver) is the reactor's own.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: Optional[float] = 30,
        bindAddress: Optional[Any] = None,
    ) -> IConnector:
        return connect_tcp(self._reactor, host, port, factory, timeout, bindAddress)

    def __getattr__(self, name: str) -> Any:
        # Never the reactor's special attributes (zope.interface reads __provides__ this way):
        # this view declares its own interfaces.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._reactor, name)


def client_connects(reactor: Any) -> Any:
    """
    C{reactor}, or where it allows, a view of it whose C{connectTCP} makes L{Client} transports:
    for Twisted's client endpoints (C{HostnameEndpoint} resolves a name, then connects to each
    address through the reactor it was given).
    """
    return _ClientConnects(reactor) if _flushes(reactor) else reactor


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True, auto_attribs=True)
class TCPServerEndpoint:
    """
    A TCP (or, with C{tls_options}, TLS) server endpoint on C{interface} (an IP literal, IPv6
    included; ``""`` for every IPv4 interface) whose connections are L{Server}s, optionally
    with C{SO_REUSEPORT} (L{Port}). A reactor without file descriptors listens its own way.
    """

    reactor: Any
    port: int
    interface: str = ""
    backlog: int = 1024
    tls_options: Optional[Any] = None
    reuse_port: bool = False

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        """
        Bind and listen now; a bind error fails the returned Deferred at once.
        """
        if self.tls_options is not None:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
        if not _flushes(self.reactor):
            # No file descriptors (a test fake): nothing to flush and no socket option to set.
            return defer.execute(
                self.reactor.listenTCP, self.port, factory, self.backlog, self.interface
            )
        port = Port(self.port, factory, self.backlog, self.interface, self.reactor)
        port._reuse_port = self.reuse_port
        if self.tls_options is not None:
            port._type = "TLS"

        def start() -> IListeningPort:
            port.startListening()
            return port

        return defer.execute(start)
