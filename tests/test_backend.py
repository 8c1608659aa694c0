# -*- test-case-name: tests.test_backend -*-
"""Tests for L{a3s_gateway.service.backend}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config.schema import ServerConfig
from a3s_gateway.service.backend import Backend


def backend(url: str, weight: int = 1) -> Backend:
    return Backend.from_config(ServerConfig(url=url, weight=weight))


class FromConfigTests(SynchronousTestCase):
    """L{Backend.from_config} parses every URL form a service may list."""

    def test_http(self) -> None:
        """An C{http} URL gives scheme, host, explicit port, path and weight."""
        b = backend("http://api.internal:8001/v1/", weight=3)
        self.assertEqual(
            (b.url, b.scheme, b.host, b.port, b.base_path, b.weight),
            ("http://api.internal:8001/v1/", "http", "api.internal", 8001, b"/v1", 3),
        )

    def test_default_ports(self) -> None:
        """Without a port, http/h2c/ws default to 80 and https/wss to 443."""
        ports = {
            url: backend(url).port
            for url in ("http://h", "https://h", "h2c://h", "ws://h", "wss://h")
        }
        self.assertEqual(
            ports,
            {"http://h": 80, "https://h": 443, "h2c://h": 80, "ws://h": 80, "wss://h": 443},
        )

    def test_schemes_stored(self) -> None:
        """Each scheme is stored lower-cased; C{tcp://} and bare C{host:port} give C{tcp}."""
        self.assertEqual(
            [
                backend(u).scheme
                for u in ("HTTPS://h", "h2c://h:1", "wss://h", "tcp://h:5", "127.0.0.1:9000")
            ],
            ["https", "h2c", "wss", "tcp", "tcp"],
        )

    def test_bare_host_port(self) -> None:
        """A bare C{host:port} gives its host and port."""
        b = backend("10.0.0.5:6379")
        self.assertEqual((b.host, b.port, b.base_path), ("10.0.0.5", 6379, b""))

    def test_ipv6(self) -> None:
        """IPv6 brackets are removed from the host, in URLs and bare addresses."""
        self.assertEqual(
            [(b.host, b.port) for b in (backend("http://[::1]:8080"), backend("[fe80::1]:53"))],
            [("::1", 8080), ("fe80::1", 53)],
        )

    def test_base_path(self) -> None:
        """The path loses its trailing C{/}; a root or missing path is empty."""
        self.assertEqual(
            [
                backend(u).base_path
                for u in ("http://h/", "http://h", "http://h/a/b", "http://h/a/")
            ],
            [b"", b"", b"/a/b", b"/a"],
        )

    def test_base_path_percent_encoded(self) -> None:
        """A configured path with spaces or non-ASCII is percent-encoded, escapes kept."""
        self.assertEqual(backend("http://h/a b/é/%2F").base_path, b"/a%20b/%C3%A9/%2F")

    def test_tcp_without_port(self) -> None:
        """A TCP address needs a port: there is no default to fall back on."""
        self.assertRaises(ValueError, backend, "tcp://h")
        self.assertRaises(ValueError, backend, "localhost")

    def test_unknown_scheme(self) -> None:
        """An unsupported scheme is refused."""
        self.assertRaises(ValueError, backend, "ftp://h")

    def test_no_host(self) -> None:
        """A URL without a host is refused."""
        self.assertRaises(ValueError, backend, "http:///path")


class StateTests(SynchronousTestCase):
    """Runtime state: connections, active health and passive ejection."""

    def test_initial_state(self) -> None:
        """A new backend is healthy with no connections and no ejection."""
        b = backend("http://h")
        self.assertEqual((b.healthy, b.active_connections, b.ejected_until), (True, 0, None))

    def test_active_unhealthy(self) -> None:
        """The active checker's verdict makes the backend unhealthy."""
        b = backend("http://h")
        b.active_healthy = False
        self.assertFalse(b.healthy)

    def test_ejection_ends_by_itself(self) -> None:
        """An ejection holds until its end on the clock, then the backend is healthy again."""
        clock = Clock()
        b = backend("http://h")
        b.eject(30.0, clock)
        self.assertFalse(b.healthy)
        clock.advance(29.9)
        self.assertFalse(b.healthy)
        clock.advance(0.1)
        self.assertTrue(b.healthy)
        self.assertEqual(b.ejected_until, 30.0)

    def test_readmit(self) -> None:
        """L{Backend.readmit} ends an ejection at once."""
        b = backend("http://h")
        b.eject(30.0, Clock())
        b.readmit()
        self.assertEqual((b.healthy, b.ejected_until), (True, None))

    def test_both_states_needed(self) -> None:
        """An expired ejection does not override an active-check failure."""
        clock = Clock()
        b = backend("http://h")
        b.eject(1.0, clock)
        b.active_healthy = False
        clock.advance(5)
        self.assertFalse(b.healthy)

    def test_identity(self) -> None:
        """Backends compare and hash by identity: two servers with one URL stay distinct."""
        a, b = backend("http://h"), backend("http://h")
        self.assertNotEqual(a, b)
        self.assertEqual(len({a, b}), 2)

    def test_repr(self) -> None:
        """The repr names the URL and the runtime state."""
        self.assertEqual(
            repr(backend("http://h:1", weight=2)),
            "<Backend http://h:1 weight=2 healthy=True active_connections=0>",
        )
