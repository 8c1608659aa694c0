# -*- test-case-name: tests.test_sticky -*-
"""
L{StickySessions}: cookie-bound sessions for a service with C{load_balancer { sticky { } }}.

Used by C{Service.select}: the session id comes from the request's cookie, the table maps it
to a backend server-side with a sliding TTL, and a new client gets a C{Set-Cookie}.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Container, Optional, Tuple

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from a3s_gateway.config.schema import StickyConfig
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.balancer import LoadBalancer

MAX_SESSION_ID_LENGTH = 128
"""
The longest client-sent session id accepted (a uuid4 has 36 characters). Longer ids are
ignored, as if absent, so that clients cannot fill the bounded table with huge keys.
"""


@attr.s(auto_attribs=True, slots=True)
class _Session:
    """A binding: mutable, because every lookup slides C{expires} and may rebind."""

    backend: Backend
    expires: float


class StickySessions:
    """
    The session table of one service.

    Entries are kept in an C{OrderedDict} in order of last access. As every access slides the
    TTL by the same amount, that is also the order of expiry: expired entries are always at the
    front, where eviction (expired first, then least recently used) takes them in O(1).
    """

    def __init__(self, config: StickyConfig, clock: IReactorTime) -> None:
        self.config = config
        self._clock = clock
        self._name = config.cookie.encode("utf-8")
        self._prefix = self._name + b"="
        attributes = b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax" % (int(config.ttl),)
        self._cookie_attributes = attributes
        self._secure_cookie_attributes = attributes + b"; Secure"
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()

    def __len__(self) -> int:
        """The number of bindings held (expired ones not yet dropped included)."""
        return len(self._sessions)

    def select(
        self,
        headers: Headers,
        balancer: LoadBalancer,
        secure: bool,
        exclude: Container[Backend] = (),
    ) -> Optional[Tuple[Backend, Optional[bytes]]]:
        """
        Choose the backend for a request by its session.

        @param headers: The request headers (the session id is in the first C{Cookie} header).
        @param balancer: The service's load balancer, whose strategy places new sessions and
            rebinds sessions whose backend is unhealthy or excluded.
        @param secure: Whether the request came over TLS (the new cookie gets C{Secure}).
        @param exclude: Backends already tried for this request; a session bound to one of
            them is rebound (the retry's backend is the one that now holds the session).
        @return: The backend and, for a new session, the C{Set-Cookie} value to send; or
            C{None} when no backend is available.
        """
        now = self._clock.seconds()
        session_id = self._session_id(headers)
        if session_id is not None:
            session = self._sessions.get(session_id)
            if session is not None:
                if session.expires <= now:
                    del self._sessions[session_id]
                else:
                    backend = session.backend
                    if backend.healthy and backend not in exclude:
                        session.expires = now + self.config.ttl
                        self._sessions.move_to_end(session_id)
                        return backend, None
            # Unknown, expired, or bound to a backend that cannot serve: (re)bind the same id.
            chosen = balancer.next_backend(exclude)
            if chosen is None:
                return None
            self._bind(session_id, chosen, now)
            return chosen, None
        chosen = balancer.next_backend(exclude)
        if chosen is None:
            return None
        session_id = str(uuid.uuid4()).encode("ascii")
        self._bind(session_id, chosen, now)
        attributes = self._secure_cookie_attributes if secure else self._cookie_attributes
        return chosen, self._prefix + session_id + attributes

    def _session_id(self, headers: Headers) -> Optional[bytes]:
        """
        The session id: in the first C{Cookie} header, split on C{;}, the value of the first
        trimmed part that starts with C{NAME=} and has a non-empty value.
        """
        cookies = headers.getRawHeaders(b"cookie")
        if not cookies:
            return None
        prefix = self._prefix
        for part in cookies[0].split(b";"):
            part = part.strip()
            if part.startswith(prefix) and len(prefix) < len(part):
                value = part[len(prefix) :]
                if len(value) <= MAX_SESSION_ID_LENGTH:
                    return value
        return None

    def _bind(self, session_id: bytes, backend: Backend, now: float) -> None:
        """Bind C{session_id} to C{backend}, making room first for a new id."""
        sessions = self._sessions
        expires = now + self.config.ttl
        session = sessions.get(session_id)
        if session is not None:
            session.backend = backend
            session.expires = expires
            sessions.move_to_end(session_id)
            return
        while sessions and next(iter(sessions.values())).expires <= now:
            sessions.popitem(last=False)
        if sessions and len(sessions) >= self.config.max_sessions:
            sessions.popitem(last=False)
        sessions[session_id] = _Session(backend, expires)
