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
    the main one watches like any descriptor. Each turn handles every ready event of the main
    poller (outgoing connections: upstream responses and the streamed events they carry, plus
    the reactor's own descriptors), then at most L{INTAKE_BATCH} events of the intake. Why:
    setting up a stream costs the gateway about 200 us on CPython, so 1,000 streams opening at
    once are 200 ms of work; handled as one batch (as a single epoll object returns them) the
    events of the streams already running waited behind up to 60 ms of it, and their first and
    last events' delay made the per-event p99 three to four times going direct. With the intake
    read 16 events at a time, a running stream's event waits for at most 16 set-ups, about
    3 ms. Every turn still takes up to 16 intake events, so no burst of upstream traffic
    starves new clients; the epoll object returns ready descriptors in turn (those it reported
    go behind the rest), so none is starved within the intake either. HAProxy bounds its loop
    the same way (C{tune.maxaccept}, C{tune.maxpollevents}).

    The gateway's transports (L{a3s_gateway.transport}) send what a turn wrote at its end. When
    many connections are ready at once (64 streams opening together), the first one's upstream
    request would wait for every other one to be read, parsed and routed: sending every eight
    events cut the time to first event at 64 simultaneous streams by about a quarter, at no
    measurable cost to throughput (sending after every event cost a third of it: replies leave
    one by one and the batches the reactor handles get small).
    """

    def __init__(self) -> None:
        # Before the base class, which registers the reactor's waker.
        self._intake = select.epoll()
        self._intake_fd = self._intake.fileno()
        # The descriptors registered with the intake rather than the main poller.
        self._intake_fds: Set[int] = set()
        super().__init__()
        self._poller.register(self._intake_fd, select.EPOLLIN)
        self._flusher = flusher_for(self)

    def _poller_of(self, fd: int) -> Any:
        return self._intake if fd in self._intake_fds else self._poller

    # _add and _remove are EPollReactor's, choosing the epoll object by the descriptor.
    def _add(
        self,
        xer: Any,
        primary: Set[int],
        other: Set[int],
        selectables: Dict[int, Any],
        event: int,
        antievent: int,
    ) -> None:
        fd = xer.fileno()
        if fd not in primary:
            flags = event
            if fd in other:
                flags |= antievent
                self._poller_of(fd).modify(fd, flags)
            elif isinstance(xer, (tcp.Port, tcp.Server)):
                self._intake.register(fd, flags)
                self._intake_fds.add(fd)
            else:
                self._poller.register(fd, flags)
            primary.add(fd)
            selectables[fd] = xer

    def _remove(
        self,
        xer: Any,
        primary: Set[int],
        other: Set[int],
        selectables: Dict[int, Any],
        event: int,
        antievent: int,
    ) -> None:
        fd = xer.fileno()
        if fd == -1:
            # Already closed: found by the object, as EPollReactor does.
            fd = next((number for number, known in selectables.items() if known is xer), -1)
            if fd == -1:
                return
        if fd in primary:
            if fd in other:
                self._poller_of(fd).modify(fd, antievent)
            else:
                del selectables[fd]
                self._poller_of(fd).unregister(fd)
                self._intake_fds.discard(fd)
            primary.remove(fd)

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
            self._handle(self._intake.poll(0, INTAKE_BATCH), handled)

    def _handle(self, events: List[Tuple[int, int]], handled: int) -> Tuple[int, bool]:
        """
        Handle C{events}, which come C{handled} events after the last send. Returns how many
        were handled since the last send, and whether the intake was among them (ready).
        """
        handle = self._doReadOrWrite
        selectables = self._selectables
        flusher = self._flusher
        intake_fd = self._intake_fd
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


def install() -> None:
    """
    Install a L{GatewayReactor} as the global reactor (what twistd and trial call for
    C{--reactor=a3s}).
    """
    installReactor(GatewayReactor())
