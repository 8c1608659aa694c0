# -*- test-case-name: tests.test_backend -*-
"""
L{Backend}: the mutable runtime state of one server of a service.

Built once per C{load_balancer.servers} entry by the service registry; read on every request by
the load balancer and the sticky table (L{Backend.healthy}), counted by the proxy
(L{Backend.active_connections}), written by the active health checker
(L{Backend.active_healthy}) and by passive health (L{Backend.eject}, L{Backend.readmit}).
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote, urlsplit

import attr
from twisted.internet.interfaces import IReactorTime

from a3s_gateway.config.schema import ServerConfig

DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80, "ws": 80, "wss": 443}
"""Default port per URL scheme; C{tcp} (and a bare C{host:port}) has none."""

HTTP_SCHEMES = frozenset({"http", "https"})
"""The schemes an HTTP client (the proxy, the active health checker) can talk to."""

# Characters allowed unescaped in a URL path (RFC 3986 pchar, "/" and existing escapes):
# anything else in a configured path (spaces, non-ASCII) is percent-encoded once.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


@attr.s(frozen=True, auto_attribs=True, slots=True)
class _Ejection:
    """A passive ejection: the backend is out until C{clock.seconds() >= until}."""

    until: float
    clock: IReactorTime


class Backend:
    """
    One upstream server and its health and load.

    @ivar url: The server URL exactly as configured.
    @ivar weight: The configured weight (used by the C{weighted} strategy only).
    @ivar scheme: C{"http"}, C{"https"}, C{"h2c"}, C{"ws"}, C{"wss"} or C{"tcp"} (a bare
        C{host:port} is stored as C{"tcp"}).
    @ivar host: The host name or address, IPv6 brackets removed.
    @ivar port: The port, defaulted from the scheme.
    @ivar base_path: The URL path without its trailing C{/}, percent-encoded (C{b""} for none).
    @ivar active_connections: Requests and sessions in flight; exact, maintained by the proxy.
    @ivar active_healthy: The active health checker's verdict (C{True} until it says otherwise).
    """

    __slots__ = (
        "_ejection",
        "active_connections",
        "active_healthy",
        "base_path",
        "host",
        "port",
        "scheme",
        "url",
        "weight",
    )

    def __init__(
        self,
        url: str,
        scheme: str,
        host: str,
        port: int,
        base_path: bytes = b"",
        weight: int = 1,
    ) -> None:
        self.url = url
        self.scheme = scheme
        self.host = host
        self.port = port
        self.base_path = base_path
        self.weight = weight
        self.active_connections = 0
        self.active_healthy = True
        self._ejection: Optional[_Ejection] = None

    @classmethod
    def from_config(cls, server: ServerConfig) -> Backend:
        """
        Build a backend from a C{servers} entry.

        @raise ValueError: The URL has an unknown scheme, no host, or no port where the scheme
            has no default. Validation rejects such URLs before the registry is built.
        """
        url = server.url.strip()
        if "://" not in url:
            # A bare "host:port" (TCP and UDP services): parse it as the authority of a URL.
            scheme = "tcp"
            parts = urlsplit("//" + url)
        else:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in DEFAULT_PORTS and scheme != "tcp":
                raise ValueError(f"Unsupported backend URL scheme in {server.url!r}")
        host = parts.hostname
        if not host:
            raise ValueError(f"Backend URL {server.url!r} has no host")
        port = parts.port
        if port is None:
            if scheme not in DEFAULT_PORTS:
                raise ValueError(f"Backend address {server.url!r} has no port")
            port = DEFAULT_PORTS[scheme]
        base_path = quote(parts.path.rstrip("/"), safe=_PATH_SAFE).encode("ascii")
        return cls(server.url, scheme, host, port, base_path, server.weight)

    @property
    def healthy(self) -> bool:
        """
        Whether selectors may choose this backend: the active checker's verdict and no passive
        ejection in force. An ejection ends by itself when its time is up (probation).
        """
        if not self.active_healthy:
            return False
        ejection = self._ejection
        return ejection is None or ejection.clock.seconds() >= ejection.until

    @property
    def ejected_until(self) -> Optional[float]:
        """
        When the current passive ejection ends, or C{None}. A time in the past means the backend
        is readmitted on probation: passive health ends it with L{readmit} on the next success.
        """
        ejection = self._ejection
        return None if ejection is None else ejection.until

    def eject(self, until: float, clock: IReactorTime) -> None:
        """
        Take the backend out of selection until C{clock.seconds() >= until}.

        The clock is kept so that L{healthy} readmits the backend lazily, with no timer to
        cancel.
        """
        self._ejection = _Ejection(until, clock)

    def readmit(self) -> None:
        """End a passive ejection (or its probation) at once."""
        self._ejection = None

    def __repr__(self) -> str:
        return (
            f"<Backend {self.url} weight={self.weight} healthy={self.healthy} "
            f"active_connections={self.active_connections}>"
        )
