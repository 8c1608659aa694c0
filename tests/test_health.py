# -*- test-case-name: tests.test_health -*-
"""Tests for L{a3s_gateway.service.health}."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from treq.testing import RequestTraversalAgent
from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from a3s_gateway.config.schema import HealthCheckConfig, ServerConfig
from a3s_gateway.service.backend import Backend
from a3s_gateway.service.health import HealthChecker

HANG = "hang"
"""Behaviour: never answer (the request stays pending)."""

STREAM = "stream"
"""Behaviour: answer 200 and send a body that never ends."""

Behaviour = Union[int, str]


class Backends(Resource):
    """
    Every fake backend at once, told apart by host name: each answers its health path with a
    status (or hangs, or streams), follows C{redirects} first, and logs every request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.behaviour: Dict[str, Behaviour] = {}
        self.redirects: Dict[bytes, bytes] = {}
        self.requests: List[Tuple[str, bytes]] = []
        self.pending: List[Request] = []
        self.lost: List[str] = []

    def render_GET(self, request: Request) -> Union[bytes, int]:
        host = request.getRequestHostname().decode("ascii")
        self.requests.append((host, request.uri))
        if request.uri in self.redirects:
            request.redirect(self.redirects[request.uri])
            return b""
        behaviour = self.behaviour.get(host, 200)
        if behaviour == HANG or behaviour == STREAM:
            self.pending.append(request)
            request.notifyFinish().addErrback(lambda _: self.lost.append(host))
            if behaviour == STREAM:
                request.write(b"first chunk of an endless body")
            return NOT_DONE_YET
        assert isinstance(behaviour, int)
        request.setResponseCode(behaviour)
        return b"body"

    def probes(self, host: str) -> int:
        return sum(1 for h, _ in self.requests if h == host)


@implementer(IAgent)
class BrokenAgent:
    """An agent whose requests raise, or fail, as a broken client stack might."""

    def __init__(self) -> None:
        self.calls = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> Deferred[IResponse]:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("the client blew up")
        return fail(ConnectionRefusedError("nobody home"))


def backends(*urls: str) -> List[Backend]:
    return [Backend.from_config(ServerConfig(url=url)) for url in urls]


class HealthCheckerTests(SynchronousTestCase):
    """Probing, thresholds, concurrency, resilience and stopping."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Backends()
        self.agent = RequestTraversalAgent(self.resource)

    def checker(
        self, targets: Sequence[Backend], agent: Optional[IAgent] = None, **config: Any
    ) -> HealthChecker:
        config.setdefault("interval", 10.0)
        config.setdefault("timeout", 5.0)
        checker = HealthChecker(
            "api",
            targets,
            HealthCheckConfig(path="/health", **config),
            self.clock,
            agent if agent is not None else self.agent,
        )
        self.addCleanup(self.stop, checker)
        return checker

    def stop(self, checker: HealthChecker) -> None:
        if checker.running:
            checker.stopService()
        self.agent.flush()

    def rounds(self, n: int, interval: float = 10.0) -> None:
        for _ in range(n):
            self.clock.advance(interval)

    def test_is_a_service(self) -> None:
        """The checker is an C{IService} named after its service."""
        checker = self.checker(backends("http://a.test"))
        self.assertTrue(verifyObject(IService, checker))
        self.assertEqual(checker.name, "health-check:api")

    def test_first_round_at_once(self) -> None:
        """Starting probes every backend at once with GET <url without "/"><path>."""
        checker = self.checker(backends("http://a.test/", "http://b.test:8080/base/"))
        checker.startService()
        self.assertEqual(
            sorted(self.resource.requests), [("a.test", b"/health"), ("b.test", b"/base/health")]
        )

    def test_every_interval(self) -> None:
        """A round runs every C{interval} seconds."""
        checker = self.checker(backends("http://a.test"), interval=3.0)
        checker.startService()
        self.clock.advance(2.9)
        self.assertEqual(self.resource.probes("a.test"), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.resource.probes("a.test"), 2)
        self.rounds(3, 3.0)
        self.assertEqual(self.resource.probes("a.test"), 5)

    def test_unhealthy_threshold(self) -> None:
        """A healthy backend becomes unhealthy after 3 (default) consecutive failures."""
        (a,) = targets = backends("http://a.test")
        self.resource.behaviour["a.test"] = 503
        self.checker(targets).startService()
        self.rounds(1)
        self.assertTrue(a.active_healthy)
        self.rounds(1)
        self.assertFalse(a.active_healthy)
        self.assertFalse(a.healthy)

    def test_failures_must_be_consecutive(self) -> None:
        """A success resets the failure count."""
        (a,) = targets = backends("http://a.test")
        self.resource.behaviour["a.test"] = 500
        self.checker(targets).startService()
        self.rounds(1)
        self.resource.behaviour["a.test"] = 200
        self.rounds(1)
        self.resource.behaviour["a.test"] = 500
        self.rounds(2)
        self.assertTrue(a.active_healthy)
        self.rounds(1)
        self.assertFalse(a.active_healthy)

    def test_healthy_threshold_default(self) -> None:
        """An unhealthy backend becomes healthy after 1 (default) success."""
        (a,) = targets = backends("http://a.test")
        self.resource.behaviour["a.test"] = 500
        self.checker(targets, unhealthy_threshold=1).startService()
        self.assertFalse(a.active_healthy)
        self.resource.behaviour["a.test"] = 204
        self.rounds(1)
        self.assertTrue(a.active_healthy)

    def test_healthy_threshold_configured(self) -> None:
        """With C{healthy_threshold = 2}, two consecutive successes are needed."""
        (a,) = targets = backends("http://a.test")
        self.resource.behaviour["a.test"] = 500
        self.checker(targets, unhealthy_threshold=1, healthy_threshold=2).startService()
        self.resource.behaviour["a.test"] = 200
        self.rounds(1)
        self.assertFalse(a.active_healthy)
        self.rounds(1)
        self.assertTrue(a.active_healthy)

    def test_only_2xx_succeeds(self) -> None:
        """Any status outside 2xx is a failure, 404 and 418 included."""
        targets = backends("http://a.test", "http://b.test", "http://c.test")
        self.resource.behaviour.update({"a.test": 404, "b.test": 418, "c.test": 299})
        self.checker(targets, unhealthy_threshold=1).startService()
        self.assertEqual([b.active_healthy for b in targets], [False, False, True])

    def test_redirect_followed(self) -> None:
        """A redirect is followed and the final status decides."""
        good, bad = targets = backends("http://good.test", "http://bad.test")
        self.resource.redirects[b"/health"] = b"/elsewhere"
        self.resource.behaviour["bad.test"] = 500
        self.checker(targets, unhealthy_threshold=1).startService()
        self.assertEqual((good.active_healthy, bad.active_healthy), (True, False))
        self.assertIn(("good.test", b"/elsewhere"), self.resource.requests)

    def test_concurrent_probes(self) -> None:
        """
        All backends are probed at once: a backend that never answers does not delay the
        probes of the others, nor their verdicts.
        """
        targets = backends("http://slow.test", "http://f.test", "http://ok.test")
        self.resource.behaviour.update({"slow.test": HANG, "f.test": 500})
        self.checker(targets, unhealthy_threshold=1).startService()
        self.assertEqual(
            [self.resource.probes(h) for h in ("slow.test", "f.test", "ok.test")], [1, 1, 1]
        )
        self.assertEqual([b.active_healthy for b in targets], [True, False, True])
        self.assertEqual(self.resource.pending[0].getRequestHostname(), b"slow.test")

    def test_round_waits_for_slowest(self) -> None:
        """The next round starts only when every probe of the current one is over."""
        targets = backends("http://slow.test", "http://ok.test")
        self.resource.behaviour["slow.test"] = HANG
        self.checker(targets, interval=1.0, timeout=5.0).startService()
        self.clock.advance(4.5)
        self.assertEqual(self.resource.probes("ok.test"), 1)
        self.clock.advance(0.5)  # the slow probe times out; the round is over
        self.clock.advance(1.0)
        self.assertEqual(self.resource.probes("ok.test"), 2)

    def test_timeout_is_failure(self) -> None:
        """A probe unanswered within C{timeout} fails, and its request is aborted."""
        (slow,) = targets = backends("http://slow.test")
        self.resource.behaviour["slow.test"] = HANG
        self.checker(targets, unhealthy_threshold=1, timeout=2.0).startService()
        self.clock.advance(1.9)
        self.assertTrue(slow.active_healthy)
        self.clock.advance(0.1)
        self.assertFalse(slow.active_healthy)
        self.agent.flush()
        self.assertEqual(self.resource.lost, ["slow.test"])

    def test_timeouts_do_not_stop_loop(self) -> None:
        """After timeouts the loop keeps probing, and a recovered backend is healthy again."""
        (slow,) = targets = backends("http://slow.test")
        self.resource.behaviour["slow.test"] = HANG
        self.checker(targets, unhealthy_threshold=1).startService()
        # Time passes in steps, so that each timeout fires at its own time.
        self.clock.pump([5.0] * 6)
        self.assertEqual(self.resource.probes("slow.test"), 4)
        self.resource.behaviour["slow.test"] = 200
        self.clock.pump([5.0, 5.0])
        self.assertTrue(slow.active_healthy)

    def test_endless_body(self) -> None:
        """
        The status decides at once; a body that never ends is aborted at the timeout and
        does not hold the loop.
        """
        (streaming,) = targets = backends("http://stream.test")
        self.resource.behaviour["stream.test"] = STREAM
        self.checker(targets, unhealthy_threshold=1, healthy_threshold=1).startService()
        self.agent.flush()
        self.assertTrue(streaming.active_healthy)
        self.assertEqual(self.resource.lost, [])
        self.clock.advance(5.0)
        self.agent.flush()
        self.assertEqual(self.resource.lost, ["stream.test"])
        self.assertTrue(streaming.active_healthy)
        self.clock.advance(5.0)
        self.assertEqual(self.resource.probes("stream.test"), 2)

    def test_client_errors_do_not_stop_loop(self) -> None:
        """An agent that raises or fails counts failures and the loop goes on."""
        (a,) = targets = backends("http://a.test")
        agent = BrokenAgent()
        self.checker(targets, agent=agent).startService()
        self.rounds(4)
        self.assertEqual(agent.calls, 5)
        self.assertFalse(a.active_healthy)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_only_http_backends(self) -> None:
        """Only http and https backends are probed; others keep their state untouched."""
        targets = backends("https://s.test", "tcp://t.test:5", "h2c://g.test:9", "ws://w.test")
        checker = self.checker(targets)
        self.assertEqual(checker.backends, (targets[0],))
        checker.startService()
        self.assertEqual([h for h, _ in self.resource.requests], ["s.test"])

    def test_stop_cancels(self) -> None:
        """
        Stopping ends the loop and aborts the probes in flight, whose outcome is not
        counted; nothing is left scheduled on the clock.
        """
        (slow,) = targets = backends("http://slow.test")
        self.resource.behaviour["slow.test"] = HANG
        checker = self.checker(targets, unhealthy_threshold=1)
        checker.startService()
        checker.stopService()
        self.assertFalse(checker.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.agent.flush()
        self.assertEqual(self.resource.lost, ["slow.test"])
        self.assertTrue(slow.active_healthy)
        self.rounds(3)
        self.assertEqual(self.resource.probes("slow.test"), 1)

    def test_restart(self) -> None:
        """A stopped checker can be started again: it probes at once."""
        checker = self.checker(backends("http://a.test"))
        checker.startService()
        checker.stopService()
        checker.startService()
        self.assertEqual(self.resource.probes("a.test"), 2)
        self.rounds(1)
        self.assertEqual(self.resource.probes("a.test"), 3)
