# -*- test-case-name: tests.test_sticky -*-
"""Tests for L{a3s_gateway.service.sticky}."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import StickyConfig
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.balancer import LoadBalancer
from a3s_gateway.service.sticky import MAX_SESSION_ID_LENGTH, StickySessions

UUID4 = rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def make_backends(n: int) -> List[Backend]:
    return [Backend(f"http://b{i}", "http", f"b{i}", 80) for i in range(n)]


def cookie(*values: bytes) -> Headers:
    return Headers({b"Cookie": list(values)})


class StickyTests(SynchronousTestCase):
    """Session lookup, placement, rebinding and the cookie."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backends = make_backends(3)
        self.balancer = LoadBalancer(self.backends, "round-robin")
        self.sticky = StickySessions(StickyConfig(cookie="srv"), self.clock)

    def select(
        self, headers: Headers, secure: bool = False, exclude: Tuple[Backend, ...] = ()
    ) -> Tuple[Backend, Optional[bytes]]:
        choice = self.sticky.select(headers, self.balancer, secure, exclude)
        assert choice is not None
        return choice

    def new_session(self, secure: bool = False) -> Tuple[Backend, bytes]:
        backend, set_cookie = self.select(Headers(), secure)
        assert set_cookie is not None
        match = re.match(rb"srv=(" + UUID4 + rb");", set_cookie)
        assert match is not None, set_cookie
        return backend, match.group(1)

    def test_new_session_cookie(self) -> None:
        """A request without a session gets a uuid4 cookie with the reference's attributes."""
        _, set_cookie = self.select(Headers())
        assert set_cookie is not None
        self.assertRegex(
            set_cookie, rb"^srv=" + UUID4 + rb"; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax$"
        )

    def test_new_session_secure(self) -> None:
        """On a TLS entrypoint the cookie also carries C{Secure}."""
        _, set_cookie = self.select(Headers(), secure=True)
        assert set_cookie is not None
        self.assertTrue(set_cookie.endswith(b"; HttpOnly; SameSite=Lax; Secure"), set_cookie)

    def test_max_age_from_ttl(self) -> None:
        """C{Max-Age} is the configured TTL in whole seconds."""
        sticky = StickySessions(StickyConfig(cookie="s", ttl=90.5), self.clock)
        choice = sticky.select(Headers(), self.balancer, False)
        assert choice is not None and choice[1] is not None
        self.assertIn(b"; Max-Age=90;", choice[1])

    def test_new_sessions_use_strategy(self) -> None:
        """
        New sessions are placed by the service's strategy (round-robin here), not all on the
        least-loaded backend as in the reference.
        """
        placed = [self.new_session()[0] for _ in range(3)]
        self.assertEqual(placed, self.backends)

    def test_known_session_sticks(self) -> None:
        """A known session goes to its backend, with no new cookie."""
        backend, session_id = self.new_session()
        for _ in range(5):
            self.assertEqual(self.select(cookie(b"srv=" + session_id)), (backend, None))

    def test_cookie_among_others(self) -> None:
        """The id is found among other cookies, parts trimmed."""
        backend, session_id = self.new_session()
        headers = cookie(b"a=1;  srv=" + session_id + b" ; b=2")
        self.assertEqual(self.select(headers), (backend, None))

    def test_empty_value_skipped(self) -> None:
        """A part C{NAME=} with an empty value is skipped for the next one."""
        backend, session_id = self.new_session()
        self.assertEqual(self.select(cookie(b"srv=; srv=" + session_id)), (backend, None))

    def test_name_prefix_not_confused(self) -> None:
        """A cookie whose name merely starts with the session name is not the session."""
        self.new_session()
        _, set_cookie = self.select(cookie(b"srvx=abc"))
        self.assertIsNotNone(set_cookie)

    def test_first_cookie_header_only(self) -> None:
        """Only the first C{Cookie} header is read (as the reference does)."""
        _, session_id = self.new_session()
        _, set_cookie = self.select(cookie(b"other=1", b"srv=" + session_id))
        self.assertIsNotNone(set_cookie)

    def test_unknown_client_id_accepted(self) -> None:
        """An id the gateway never issued is accepted and bound, with no cookie."""
        backend, set_cookie = self.select(cookie(b"srv=my-own-id"))
        self.assertIsNone(set_cookie)
        self.assertEqual(self.select(cookie(b"srv=my-own-id")), (backend, None))
        self.assertEqual(len(self.sticky), 1)

    def test_overlong_id_ignored(self) -> None:
        """An id longer than L{MAX_SESSION_ID_LENGTH} is treated as absent."""
        _, set_cookie = self.select(cookie(b"srv=" + b"x" * (MAX_SESSION_ID_LENGTH + 1)))
        self.assertIsNotNone(set_cookie)
        _, set_cookie = self.select(cookie(b"srv=" + b"x" * MAX_SESSION_ID_LENGTH))
        self.assertIsNone(set_cookie)

    def test_unhealthy_backend_rebound(self) -> None:
        """
        When the bound backend is unhealthy, the same id is rebound by the strategy, with no
        new cookie, and stays on the new backend when the old one recovers.
        """
        backend, session_id = self.new_session()
        backend.active_healthy = False
        moved, set_cookie = self.select(cookie(b"srv=" + session_id))
        self.assertIsNone(set_cookie)
        self.assertIsNot(moved, backend)
        backend.active_healthy = True
        self.assertEqual(self.select(cookie(b"srv=" + session_id)), (moved, None))
        self.assertEqual(len(self.sticky), 1)

    def test_excluded_backend_rebound(self) -> None:
        """A retry excluding the bound backend rebinds the session to the retry's backend."""
        backend, session_id = self.new_session()
        moved, _ = self.select(cookie(b"srv=" + session_id), exclude=(backend,))
        self.assertIsNot(moved, backend)
        self.assertEqual(self.select(cookie(b"srv=" + session_id)), (moved, None))

    def test_no_healthy_backend(self) -> None:
        """With no healthy backend there is no choice, with or without a session."""
        _, session_id = self.new_session()
        for backend in self.backends:
            backend.active_healthy = False
        self.assertIsNone(self.sticky.select(Headers(), self.balancer, False))
        self.assertIsNone(self.sticky.select(cookie(b"srv=" + session_id), self.balancer, False))

    def test_ttl_slides(self) -> None:
        """Every lookup extends the session by the TTL."""
        backend, session_id = self.new_session()
        for _ in range(3):
            self.clock.advance(3000)
            self.assertEqual(self.select(cookie(b"srv=" + session_id)), (backend, None))

    def test_expired_session_rebound(self) -> None:
        """An expired session's id is bound afresh by the strategy, with no new cookie."""
        backend, session_id = self.new_session()
        self.clock.advance(3600)
        moved, set_cookie = self.select(cookie(b"srv=" + session_id))
        self.assertIsNone(set_cookie)
        self.assertIsNot(moved, backend)
        self.assertEqual(len(self.sticky), 1)


class EvictionTests(SynchronousTestCase):
    """
    The table is bounded: expired entries go first, then the least recently used.

    New sessions are placed by least-connections while backend 0 is idle; making backend 0
    busy afterwards sends every new placement to backend 1, so a lookup answering backend 0
    shows that the session was still in the table.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backends = make_backends(2)
        self.balancer = LoadBalancer(self.backends, "least-connections")
        self.sticky = StickySessions(
            StickyConfig(cookie="s", ttl=100.0, max_sessions=3), self.clock
        )

    def bound(self, session_id: bytes) -> Backend:
        choice = self.sticky.select(cookie(b"s=" + session_id), self.balancer, False)
        assert choice is not None
        self.assertIsNone(choice[1])
        return choice[0]

    def place_elsewhere(self) -> None:
        self.backends[0].active_connections = 10

    def test_bounded(self) -> None:
        """The table never holds more than C{max_sessions} bindings."""
        for i in range(10):
            self.bound(b"id%d" % i)
            self.assertLessEqual(len(self.sticky), 3)
        self.assertEqual(len(self.sticky), 3)

    def test_lru_evicted(self) -> None:
        """When full, the least recently used binding is evicted, not the oldest created."""
        first, second = self.backends
        for session_id in (b"a", b"b", b"c", b"a", b"d"):
            self.bound(session_id)
        # Order of use: b, c, a, d: binding d evicted b.
        self.place_elsewhere()
        self.assertEqual(
            [self.bound(session_id) for session_id in (b"a", b"d", b"c", b"b")],
            [first, first, first, second],
        )

    def test_expired_evicted_first(self) -> None:
        """Expired bindings are dropped before any live one, even a less recently used one."""
        first, second = self.backends
        self.bound(b"old1")
        self.bound(b"old2")
        self.clock.advance(60)
        self.bound(b"live")
        self.clock.advance(50)
        self.bound(b"new")
        self.assertEqual(len(self.sticky), 2)
        self.place_elsewhere()
        self.assertEqual([self.bound(b"live"), self.bound(b"new")], [first, first])
        self.assertEqual(self.bound(b"old1"), second)
