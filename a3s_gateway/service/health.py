# -*- test-case-name: tests.test_health -*-
"""
L{HealthChecker}: the active health check of one service (C{load_balancer { health_check { } }}).

An C{IService} built by the service registry and started with the gateway: every C{interval}
it probes all the service's HTTP(S) backends at once and sets L{Backend.active_healthy}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, cast

import attr
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse

from a3s_gateway.config.schema import HealthCheckConfig
from a3s_gateway.service.backend import HTTP_SCHEMES, Backend

log = Logger()


@attr.s(auto_attribs=True, slots=True)
class _Streak:
    """Consecutive probe results of one backend; each result resets the other count."""

    successes: int = 0
    failures: int = 0


class _DiscardBody(Protocol):
    """
    Reads and drops a probe's response body, so that a pooled connection is released; the
    C{done} Deferred fires when the body ends, and cancelling it aborts the connection.
    """

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._abort)

    def dataReceived(self, data: bytes) -> None:
        """Drop the data: only the status matters."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended (or broke: the status was already counted)."""
        if not self.done.called:
            self.done.callback(None)

    def _abort(self, done: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if not done.called:
            done.callback(None)


class HealthChecker(Service):
    """
    Probes a service's backends every C{interval} seconds, the first round at once on start.

    Every backend of a round is probed concurrently with C{GET <url without trailing "/">
    <path>} (redirects followed); the next round starts only when the whole round, bounded
    by C{timeout}, is over. A 2xx answer is a success; any other status, a timeout or a
    connection error is a failure. A healthy backend becomes unhealthy after
    C{unhealthy_threshold} consecutive failures, an unhealthy one healthy after
    C{healthy_threshold} consecutive successes. Only C{http}/C{https} backends are probed.

    Nothing a probe does can stop the loop: a C{LoopingCall} stops for good on a failure, so
    every probe's outcome is caught and counted.
    """

    def __init__(
        self,
        service_name: str,
        backends: Sequence[Backend],
        config: HealthCheckConfig,
        clock: IReactorTime,
        agent: IAgent,
    ) -> None:
        self.setName(f"health-check:{service_name}")
        self.service_name = service_name
        self.config = config
        self.backends = tuple(b for b in backends if b.scheme in HTTP_SCHEMES)
        self._clock = clock
        self._agent = agent
        self._streaks: Dict[Backend, _Streak] = {b: _Streak() for b in self.backends}
        # Every counted probe outcome per backend, [successes, failures], for the metrics.
        self._results: Dict[Backend, List[int]] = {b: [0, 0] for b in self.backends}
        self._loop: Optional[LoopingCall] = None
        self._in_flight: Set[Deferred[None]] = set()

    def startService(self) -> None:
        """Start probing: the first round runs now."""
        Service.startService(self)
        loop = self._loop = LoopingCall(self._round)
        loop.clock = self._clock
        loop.start(self.config.interval, now=True).addErrback(self._loop_failed)

    def stopService(self) -> Optional[Deferred[None]]:
        """Stop the loop and cancel the probes in flight; their outcome is not counted."""
        Service.stopService(self)
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        for probe in list(self._in_flight):
            probe.cancel()
        return None

    def probe_counts(self) -> Dict[Backend, Tuple[int, int]]:
        """
        The probe outcomes counted so far for each probed backend, as C{(successes, failures)};
        probes cancelled by a stop are not counted.
        """
        return {backend: (ok, failed) for backend, (ok, failed) in self._results.items()}

    def _loop_failed(self, failure: Failure) -> None:
        log.failure(
            "Health check loop of service {service} stopped", failure, service=self.service_name
        )

    def _round(self) -> Deferred[Any]:
        """Probe every backend at once; fires when all probes are over, never with a failure."""
        probes: List[Deferred[None]] = [self._probe(backend) for backend in self.backends]
        return DeferredList(probes, consumeErrors=True)

    def _probe(self, backend: Backend) -> Deferred[None]:
        url = backend.url.rstrip("/") + self.config.path
        # A client per probe: treq keeps cookies in its client, and probes must carry no state
        # from one round (or backend) to the next. The clock is passed as treq's reactor
        # because it is only used for scheduling (and treq would otherwise import the global
        # reactor); treq's own timeout is not used because it ends at the response headers.
        client = HTTPClient(self._agent)
        request: Deferred[Any] = maybeDeferred(
            client.get, url, unbuffered=True, reactor=cast(Any, self._clock)
        )
        probe: Deferred[None] = request.addCallbacks(
            self._got_response,
            self._failed,
            callbackArgs=(backend,),
            errbackArgs=(backend, url),
        )
        probe.addTimeout(self.config.timeout, self._clock)
        self._in_flight.add(probe)
        probe.addBoth(self._done, probe)
        return probe

    def _got_response(self, response: IResponse, backend: Backend) -> Deferred[None]:
        self._count(backend, 200 <= response.code < 300)
        # The body is drained under the same timeout as the rest of the probe.
        body = _DiscardBody()
        response.deliverBody(body)
        return body.done

    def _failed(self, failure: Failure, backend: Backend, url: str) -> None:
        if self.running:
            log.debug(
                "Health probe {url} failed: {error}", url=url, error=failure.getErrorMessage()
            )
        self._count(backend, False)

    def _done(self, result: object, probe: Deferred[None]) -> None:
        self._in_flight.discard(probe)
        if isinstance(result, Failure):
            log.failure("Unexpected health probe error", result)

    def _count(self, backend: Backend, success: bool) -> None:
        if not self.running:
            return
        streak = self._streaks[backend]
        self._results[backend][0 if success else 1] += 1
        if success:
            streak.successes += 1
            streak.failures = 0
            if not backend.active_healthy and streak.successes >= self.config.healthy_threshold:
                backend.active_healthy = True
                log.info(
                    "Backend {url} of service {service} is healthy again",
                    url=backend.url,
                    service=self.service_name,
                )
        else:
            streak.failures += 1
            streak.successes = 0
            if backend.active_healthy and streak.failures >= self.config.unhealthy_threshold:
                backend.active_healthy = False
                log.warn(
                    "Backend {url} of service {service} is unhealthy",
                    url=backend.url,
                    service=self.service_name,
                )
