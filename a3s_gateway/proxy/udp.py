# -*- test-case-name: tests.test_udp -*-
"""
UDP entrypoints (spec 1.13.7): a datagram relay with one upstream socket per client address.

For the gateway, which builds a :class:`UdpEntrypoint` per ``protocol = "udp"`` entrypoint,
calls :meth:`UdpEntrypoint.listen` at start (a ``ValueError`` there is a configuration error)
and :meth:`UdpEntrypoint.stop` at shutdown.

As in the reference, the upstream is chosen once, at start: the HTTP route table is asked with a
synthetic request (method ``UDP``, path ``/``, no host, no headers) and the service's strategy
picks one backend. Unlike the reference, a session is kept alive by traffic in either direction
(the reference counts only replies, so a client that only sends loses its session every
``udp_session_timeout_secs``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from typing import Any, List, Mapping, Optional, Tuple, Union, cast

from twisted.internet import defer
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from a3s_gateway.config import parse_address
from a3s_gateway.config.schema import EntrypointConfig
from a3s_gateway.router.rule import RequestFacts
from a3s_gateway.router.table import RouteTable
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.registry import Service

DEFAULT_SESSION_TIMEOUT = 30.0
"""``udp_session_timeout_secs`` when unset: seconds without traffic before a session ends."""

DEFAULT_MAX_SESSIONS = 10000
"""``udp_max_sessions`` when unset."""

MAX_DATAGRAM = 65535
"""The largest datagram relayed, either way."""

_Address = Tuple[str, int]

_log = Logger()


def _ip_literal(host: str, port: int) -> str:
    """
    ``host`` if it is an IP literal, else the address it resolves to, IPv4 first (as the
    reference's IPv4 sockets end up using): once, at start, as the reference does. Twisted's UDP
    sockets take IP literals only.

    @raise OSError: the name does not resolve.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        ipv4 = [info for info in found if info[0] == socket.AF_INET]
        return str((ipv4 or found)[0][4][0])
    return host


def _stop_listening(port: Union[IListeningPort, IUDPTransport]) -> defer.Deferred[None]:
    """Close a UDP socket; fire when it is closed."""
    closed = port.stopListening()
    return closed if closed is not None else defer.succeed(None)


class _Listener(DatagramProtocol):
    """The entrypoint's listening socket: every client datagram goes to its session."""

    noisy = False

    def __init__(self, entrypoint: UdpEntrypoint) -> None:
        self.entrypoint = entrypoint

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.entrypoint._from_client(datagram, addr)


class _Session(DatagramProtocol):
    """
    One client's upstream socket, connected to the upstream: what it receives goes back to the
    client from the listening socket.

    @ivar client: The client's address.
    @ivar last_active: When traffic last passed, either way (reactor seconds).
    @ivar port: The upstream socket, once bound.
    """

    noisy = False

    def __init__(self, entrypoint: UdpEntrypoint, client: _Address, now: float) -> None:
        self.entrypoint = entrypoint
        self.client = client
        self.last_active = now
        self.port: Optional[IUDPTransport] = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.entrypoint._from_upstream(self, datagram)


class UdpEntrypoint:
    """
    One UDP entrypoint: the listening socket and its client sessions.

    Sessions are kept in order of last activity, so that expiry (one timer for the whole
    table, due when the least recently active session would expire) and eviction at the limit
    only ever look at the oldest sessions.

    @ivar name: The entrypoint's name.
    @ivar config: Its configuration (``udp_session_timeout_secs``, ``udp_max_sessions``).
    @ivar reactor: Binds the sockets (``IReactorUDP``) and times the sessions
        (``IReactorTime``).
    @ivar session_timeout: Seconds without traffic after which a session ends.
    @ivar max_sessions: The most sessions at once; a new client beyond it is dropped.
    @ivar backend: The upstream chosen at start (None before :meth:`listen`).
    """

    def __init__(
        self,
        name: str,
        config: EntrypointConfig,
        routes: RouteTable,
        services: Mapping[str, Service],
        reactor: Any,
    ) -> None:
        self.name = name
        self.config = config
        self.routes = routes
        self.services = services
        self.reactor = reactor
        self.session_timeout = float(
            config.udp_session_timeout_secs
            if config.udp_session_timeout_secs is not None
            else DEFAULT_SESSION_TIMEOUT
        )
        self.max_sessions = (
            config.udp_max_sessions if config.udp_max_sessions is not None else DEFAULT_MAX_SESSIONS
        )
        self.backend: Optional[Backend] = None
        self._upstream: _Address = ("", 0)
        self._session_interface = ""
        self._listener = _Listener(self)
        self._port: Optional[IListeningPort] = None
        self._sessions: OrderedDict[_Address, _Session] = OrderedDict()
        self._expiry: Optional[IDelayedCall] = None

    @property
    def active_sessions(self) -> int:
        """The client sessions open now."""
        return len(self._sessions)

    def listen(self) -> IListeningPort:
        """
        Choose the upstream and bind the entrypoint's address.

        @raise ValueError: no router matches the synthetic request, its service does not
            exist or has no healthy backend, the backend's name does not resolve, or the
            address is malformed.
        @raise twisted.internet.error.CannotListenError: the address cannot be bound.
        """
        backend = self._choose_backend()
        try:
            upstream_ip = _ip_literal(backend.host, backend.port)
        except OSError as e:
            raise ValueError(
                f"UDP entrypoint '{self.name}': cannot resolve backend '{backend.host}': {e}"
            ) from None
        try:
            host, port = parse_address(self.config.address)
            interface = _ip_literal(host, port) if host else ""
        except (ValueError, OSError) as e:
            raise ValueError(
                f"Invalid address '{self.config.address}' for entrypoint '{self.name}': {e}"
            ) from None
        self.backend = backend
        self._upstream = (upstream_ip, backend.port)
        # Each session's socket must be of the upstream's address family.
        self._session_interface = "::" if ":" in upstream_ip else ""
        listening: IListeningPort = self.reactor.listenUDP(
            port, self._listener, interface=interface, maxPacketSize=MAX_DATAGRAM
        )
        self._port = listening
        return listening

    def stop(self) -> defer.Deferred[None]:
        """Close every session's socket and the listening socket; fire when all are closed."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        closing: List[defer.Deferred[None]] = [
            self._close(session) for session in list(self._sessions.values())
        ]
        if self._port is not None:
            closing.append(_stop_listening(self._port))
            self._port = None
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def _choose_backend(self) -> Backend:
        facts = RequestFacts(
            method=b"UDP", host=None, path=b"/", query=b"", headers=Headers(), client_ip=""
        )
        route = self.routes.match(self.name, facts)
        service = self.services.get(route.service) if route is not None else None
        backend = service.balancer.next_backend() if service is not None else None
        if backend is None:
            raise ValueError(
                f"UDP entrypoint '{self.name}' has no matching router/service "
                f"with a healthy backend"
            )
        return backend

    def _from_client(self, datagram: bytes, client: _Address) -> None:
        now = self.reactor.seconds()
        session = self._sessions.get(client)
        if session is None:
            session = self._open(client, now)
            if session is None:
                return
        else:
            session.last_active = now
            self._sessions.move_to_end(client)
        try:
            cast(IUDPTransport, session.port).write(datagram, None)
        except (OSError, MessageLengthError) as e:
            # Datagrams may be lost; a full socket buffer or a refusal loses this one.
            _log.debug("UDP entrypoint {name}: datagram dropped: {e}", name=self.name, e=e)

    def _from_upstream(self, session: _Session, datagram: bytes) -> None:
        if self._sessions.get(session.client) is not session:
            # Closed while this datagram was being read.
            return
        session.last_active = self.reactor.seconds()
        self._sessions.move_to_end(session.client)
        try:
            cast(IUDPTransport, self._listener.transport).write(datagram, session.client)
        except (OSError, MessageLengthError) as e:
            _log.debug("UDP entrypoint {name}: reply dropped: {e}", name=self.name, e=e)

    def _open(self, client: _Address, now: float) -> Optional[_Session]:
        if len(self._sessions) >= self.max_sessions:
            self._expire(now)
            if len(self._sessions) >= self.max_sessions:
                _log.debug(
                    "UDP entrypoint {name}: udp_max_sessions ({limit}) reached, datagram dropped",
                    name=self.name,
                    limit=self.max_sessions,
                )
                return None
        session = _Session(self, client, now)
        try:
            port = self.reactor.listenUDP(
                0, session, interface=self._session_interface, maxPacketSize=MAX_DATAGRAM
            )
        except CannotListenError as e:
            _log.warn(
                "UDP entrypoint {name}: cannot open a session socket: {e}", name=self.name, e=e
            )
            return None
        port.connect(*self._upstream)
        session.port = port
        self._sessions[client] = session
        cast(Backend, self.backend).active_connections += 1
        if self._expiry is None:
            self._expiry = self.reactor.callLater(self.session_timeout, self._expire_due)
        return session

    def _expire_due(self) -> None:
        self._expiry = None
        now = self.reactor.seconds()
        self._expire(now)
        if self._sessions:
            oldest = next(iter(self._sessions.values()))
            delay = max(0.0, oldest.last_active + self.session_timeout - now)
            self._expiry = self.reactor.callLater(delay, self._expire_due)

    def _expire(self, now: float) -> None:
        """End the sessions idle for the timeout or longer (the oldest come first)."""
        sessions = self._sessions
        while sessions:
            oldest = next(iter(sessions.values()))
            if now - oldest.last_active < self.session_timeout:
                return
            self._close(oldest)

    def _close(self, session: _Session) -> defer.Deferred[None]:
        del self._sessions[session.client]
        cast(Backend, self.backend).active_connections -= 1
        return _stop_listening(cast(IUDPTransport, session.port))
