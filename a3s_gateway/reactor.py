# -*- test-case-name: tests.test_reactor -*-
"""
The gateway's reactor: Twisted's epoll reactor, handing each ready connection its event
directly.

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
from typing import Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

_log = Logger()


class GatewayReactor(EPollReactor):
    """
    An epoll reactor whose dispatch of ready descriptors skips the legacy logging context.
    """

    def doPoll(self, timeout: Optional[float]) -> None:
        """
        Wait for events up to C{timeout} seconds (forever if None) and handle each, as
        L{EPollReactor.doPoll} does, calling the handler directly.
        """
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
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

    doIteration = doPoll


def install() -> None:
    """
    Install a L{GatewayReactor} as the global reactor (what twistd and trial call for
    C{--reactor=a3s}).
    """
    installReactor(GatewayReactor())
