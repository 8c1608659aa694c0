# -*- test-case-name: tests.test_reactor -*-
"""
The gateway's reactor: Twisted's epoll reactor, handing each ready connection its event
directly, sending the gateway's queued writes during long batches of events, and handling the
events of outgoing connections before those of incoming ones (see L{GatewayReactor}).

Why: Twisted's reactors dispatch every event through C{twisted.python.log.callWithLogger}, which
asks the connection for its log prefix, copies the legacy logging context with it and pushes it
for the duration of the handler, so that legacy C{log.msg} calls made there are prefixed with
the connection. A proxied request is two or three events; the wrapping measured about 8% of its
CPU time. The gateway logs through C{twisted.logger}, whose events never carried that prefix.
What this reactor gives up: a legacy C{log.msg}/C{log.err} made while handling an event (Twisted's
own report of a handler that raised, for one) shows ``-`` where the connection's prefix was.
Everything else, including how a handler that raises is logged and disconnected, is the epoll
reactor's.

The C{a3s-gateway} command runs on it wherever epoll exists; with twistd it is
C{twistd --reactor=a3s a3s-gateway} (the plugin in C{twisted/plugins/a3s_gateway_plugin.py}), and
C{trial --reactor=a3s} runs tests on it.
"""

from __future__ import annotations

import errno
import select
from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

from a3s_gateway.transport import flusher_for

_log = Logger()


SEND_EVERY = 8
"""
Handled events after which a long batch sends what its handlers wrote so far (see
L{GatewayReactor}).
"""


INTAKE_BATCH = 16
"""
Events of incoming connections (listening ports and the connections they accepted) handled
per turn at most (see L{GatewayReactor}).
"""


class GatewayReactor(EPollReactor):
    """
    An epoll reactor whose dispatch of ready descriptors skips the legacy logging context,
    which sends the gateway's transports' writes every L{SEND_EVERY} events of a batch, and
    which handles outgoing connections' events first.

    Incoming connections (L{tcp.Port}s and the L{tcp.Server}s they accept: clients arriving,
    their requests, their closes) are registered with a second epoll object, the intake, which
    the main one watches like any descriptor (L{_Pollers}). Each turn handles every ready event
    of the main poller (outgoing connections: upstream responses and the streamed events they
    carry, plus the reactor's own descriptors), then at most L{INTAKE_BATCH} events of the
    intake. Why: setting up a stream costs the gateway about 200 us on CPython, so 1,000 streams
    opening at once are 200 ms of work; handled as one batch (as a single epoll object returns
    them) the events of the streams already running waited behind up to 60 ms of it, and their
    first events' delay made the per-event p99 three to four times going direct. With the intake
    read 16 events at a time, a running stream's event waits for at most 16 set-ups, about 3 ms.
    Every turn still takes up to 16 intake events, so no burst of upstream traffic starves new
    clients; the epoll object returns ready descriptors in turn (those it reported go behind the
    rest), so none is starved within the intake either. HAProxy bounds its loop the same way
    (C{tune.maxaccept}, C{tune.maxpollevents}).

    The gateway's transports (L{a3s_gateway.transport}) send what a turn wrote at its end. When
    many connections are ready at once (64 streams opening together), the first one's upstream
    request would wait for every other one to be read, parsed and routed: sending every eight
    events cut the time to first event at 64 simultaneous streams by about a quarter, at no
    measurable cost to throughput (sending after every event cost a third of it: replies leave
    one by one and the batches the reactor handles get small).
    """

    def __init__(self) -> None:
        super().__init__()
        # The base class made one epoll object and registered the waker with it.
        made, self._poller = self._poller, _Pollers()
        for fd in self._selectables:
            flags = (select.EPOLLIN if fd in self._reads else 0) | (
                select.EPOLLOUT if fd in self._writes else 0
            )
            self._poller.register(fd, flags)
        made.close()
        self._flusher = flusher_for(self)

    def _add(
        self,
        xer: Any,
        primary: Set[int],
        other: Set[int],
        selectables: Dict[int, Any],
        event: int,
        antievent: int,
    ) -> None:
        if isinstance(xer, (tcp.Port, tcp.Server)):
            # Named before EPollReactor registers it: the pollers put it in the intake.
            self._poller.incoming.add(xer.fileno())
        super()._add(xer, primary, other, selectables, event, antievent)

    def doPoll(self, timeout: Optional[float]) -> None:
        """
        Wait for events up to C{timeout} seconds (forever if None) and handle each ready one of
        the main poller, then up to L{INTAKE_BATCH} of the intake, as L{EPollReactor.doPoll}
        does but calling the handler directly; send the queued writes after every
        L{SEND_EVERY} handled events.
        """
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handled, intake = self._handle(events, 0)
        if intake:
            self._handle(self._poller.intake.poll(0, INTAKE_BATCH), handled)

    def _handle(self, events: List[Tuple[int, int]], handled: int) -> Tuple[int, bool]:
        """
        Handle C{events}, which come C{handled} events after the last send. Returns how many
        were handled since the last send, and whether the intake was among them (ready).
        """
        handle = self._doReadOrWrite
        selectables = self._selectables
        flusher = self._flusher
        intake_fd = self._poller.intake_fd
        intake = False
        for fd, event in events:
            if fd == intake_fd:
                intake = True
                continue
            selectable = selectables.get(fd)
            if selectable is None:
                # Removed by a handler earlier in this batch.
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # _doReadOrWrite already logs a failing doRead/doWrite and disconnects; this
                # is what escapes it (a connectionLost that raises), logged as
                # callWithLogger does.
                _log.failure("Unhandled error handling {selectable}", selectable=selectable)
            handled += 1
            if handled == SEND_EVERY:
                handled = 0
                flusher.send()
        return handled, intake

    doIteration = doPoll


class _Pollers:
    """
    A L{GatewayReactor}'s two epoll objects behind the interface that L{EPollReactor} gives its
    one: a descriptor named in L{incoming} first is registered with the intake, any other with
    the main object, which is the one C{poll} waits on and which watches the intake.
    """

    def __init__(self) -> None:
        self.main = select.epoll()
        self.intake = select.epoll()
        self.intake_fd = self.intake.fileno()
        self.main.register(self.intake_fd, select.EPOLLIN)
        # The descriptors that are (or are about to be) registered with the intake.
        self.incoming: Set[int] = set()

    def _of(self, fd: int) -> select.epoll:
        return self.intake if fd in self.incoming else self.main

    def register(self, fd: int, flags: int) -> None:
        self._of(fd).register(fd, flags)

    def modify(self, fd: int, flags: int) -> None:
        self._of(fd).modify(fd, flags)

    def unregister(self, fd: int) -> None:
        self._of(fd).unregister(fd)
        self.incoming.discard(fd)

    def poll(self, timeout: float, maxevents: int) -> List[Tuple[int, int]]:
        return self.main.poll(timeout, maxevents)

    def close(self) -> None:
        self.main.close()
        self.intake.close()


def install() -> None:
    """
    Install a L{GatewayReactor} as the global reactor (what twistd and trial call for
    C{--reactor=a3s}).
    """
    installReactor(GatewayReactor())
